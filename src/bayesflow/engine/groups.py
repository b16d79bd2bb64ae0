r"""Per-parameter-group temperatures: optimize some parameters and sample others in one step.

A *partially stochastic* network keeps most parameters at a point (T = 0: an optimizer) and samples a
few (the last layer, LoRA adapters) at T = 1/N. With ``temperature={"head.*": 1/N, "*": 0.0}`` the
engine gives every parameter leaf its own temperature :math:`T_\ell`, the first pattern (in the dict's
order, :func:`fnmatch.fnmatchcase` on the leaf's dotted path, the names of ``model.named_parameters()``
for a dict of them) that matches deciding:

.. math::
    z_\ell \leftarrow z_\ell - h\,[(D+Q)\nabla H]_\ell + h\,T_\ell Γ_\ell + \sqrt{2 T_\ell h}\,(D^{1/2}ξ)_\ell .

Noise is drawn only for the leaves with :math:`T_\ell > 0` (the cold leaves draw no random numbers and
follow exactly the T = 0 update, i.e. ``torch.optim``'s), and initial momenta are :math:`N(0, T_\ell M)`
per leaf. Because D and Q act leaf by leaf (diagonal diffusions, the Hamiltonian curl coupling each θ
leaf to its own momenta), the sampled leaves keep their exact stationary law given the others. A pattern
that decides no leaf is refused at ``init`` (when the parameters are first seen), naming it and the
parameters: one that matches no name (a typo such as ``"haed.*"``), or one whose matches an earlier
pattern all takes (``{"*": 0.0, "head.*": 1/N}``: order the specific patterns first); a catch-all
matching every leaf may be left with nothing to decide. Couplings across leaves (a dense diffusion over
all parameters), the lattice walk, per-chain temperature tensors and temperature schedules are refused
with an error.

Example:
    >>> import torch
    >>> from bayesflow.engine.groups import TemperatureGroups
    >>> groups = TemperatureGroups({"head.*": 0.01, "*": 0.0})
    >>> params = {"body.weight": torch.zeros(2), "head.weight": torch.zeros(3), "head.bias": torch.zeros(1)}
    >>> groups.resolve(params).values   # in optree's (sorted) leaf order: body, head.bias, head.weight
    (0.0, 0.01, 0.01)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from numbers import Real

import torch

from bayesflow.tree import _paths

__all__ = ["LeafTemperature", "TemperatureGroups", "check_config", "is_hot"]


def is_hot(temperature) -> bool:
    """Whether noise is drawn at all: some leaf (:class:`LeafTemperature`), chain (a tensor) or the one
    temperature (a float) is above zero."""
    if isinstance(temperature, LeafTemperature):
        return bool(temperature.hot)
    if isinstance(temperature, torch.Tensor):
        return bool((temperature != 0).any())
    return temperature != 0.0


def check_config(config) -> None:
    """What per-group temperatures need of an engine configuration: operators that act leaf by leaf.

    Raises:
        ValueError: the lattice random walk (its lattice spacing is one temperature), or a diffusion or
            curl coupling all parameters (``Dense``, ``Function``, a joint ``Block.dense``).
    """
    from bayesflow.engine.lattice import LatticeRandomWalk  # here: the lattice module imports the system
    from bayesflow.engine.matrices import Dense, Function

    if isinstance(config.integrator, LatticeRandomWalk):
        raise ValueError("per-group temperatures are not supported by the lattice random walk (its lattice spacing "
                         "is one temperature); use SGLD")
    for block in (config.diffusion_block, config.curl_block):
        for op in block.blocks.values():
            if getattr(op, "joint", None) is not None or isinstance(op, (Dense, Function)):
                raise ValueError(f"per-group temperatures need operators that act leaf by leaf; {op!r} couples "
                                 "all parameters")


class TemperatureGroups:
    """A ``{glob pattern: temperature}`` mapping, checked; :meth:`resolve` gives each leaf its value.

    Args:
        groups: a non-empty mapping from glob patterns (``str``) to finite non-negative numbers. Every
            pattern must decide some parameter (checked by :meth:`resolve`, at ``init``).

    Raises:
        TypeError / ValueError: not a mapping, an empty one, a non-string pattern, a bad temperature.

    Example:
        >>> from bayesflow.engine.groups import TemperatureGroups
        >>> TemperatureGroups({"head.*": -1.0})
        Traceback (most recent call last):
            ...
        ValueError: temperature['head.*'] must be a finite non-negative number, got -1.0
    """

    def __init__(self, groups: Mapping):
        if not isinstance(groups, Mapping) or not groups:
            raise TypeError(f"per-group temperatures must be a non-empty dict {{pattern: T}}, got {groups!r}")
        checked = {}
        for pattern, value in groups.items():
            if not isinstance(pattern, str):
                raise TypeError(f"temperature patterns must be strings (globs on parameter names), got {pattern!r}")
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"temperature[{pattern!r}] must be a finite non-negative number, got {value!r}")
            checked[pattern] = float(value)
        self.groups = checked

    @property
    def all_zero(self) -> bool:
        return all(value == 0.0 for value in self.groups.values())

    def resolve(self, params) -> LeafTemperature:
        """The per-leaf temperatures of ``params`` (a tree; its leaves' dotted paths are matched).

        Raises:
            ValueError: a parameter no pattern matches; a pattern that matches no parameter (a typo
                would run that group at another temperature); a pattern whose parameters an earlier
                pattern all decides (it never applies: order the specific patterns first), unless it
                matches every parameter (a catch-all default with nothing left to decide).
        """
        paths = _paths(params)
        values, decided = [], {pattern: [] for pattern in self.groups}
        for path in paths:
            for pattern, value in self.groups.items():
                if fnmatch.fnmatchcase(path, pattern):
                    values.append(value)
                    decided[pattern].append(path)
                    break
            else:
                raise ValueError(f"no temperature pattern matches the parameter {path!r} (patterns "
                                 f"{list(self.groups)}); add a catch-all such as '*': 0.0")
        shown = ", ".join(repr(path) for path in paths[:12]) + (", ..." if len(paths) > 12 else "")
        for pattern, taken in decided.items():
            if taken:
                continue
            matched = [path for path in paths if fnmatch.fnmatchcase(path, pattern)]
            if not matched:
                raise ValueError(f"temperature pattern {pattern!r} matches no parameter (globs are matched on the "
                                 f"dotted names); the parameters are {shown}")
            if len(matched) < len(paths):
                earlier = sorted({p for p, taken_by in decided.items() for path in matched if path in taken_by},
                                 key=list(self.groups).index)
                raise ValueError(f"temperature pattern {pattern!r} never applies: every parameter it matches "
                                 f"({', '.join(map(repr, matched[:12]))}) is decided by the earlier pattern(s) "
                                 f"{earlier} (the first match decides); put {pattern!r} before them")
        return LeafTemperature(tuple(values))

    def __repr__(self) -> str:
        return f"TemperatureGroups({self.groups!r})"


class LeafTemperature:
    """The resolved temperature of every leaf, and the draws of the hot ones.

    Attributes:
        values: :math:`T_\\ell` per leaf (the order of the params' leaves).
        hot: the indices of the leaves with :math:`T_\\ell > 0`.
        common: the one temperature all hot leaves share, or None when they differ.
    """

    def __init__(self, values: tuple[float, ...]):
        self.values = values
        self.hot = tuple(i for i, value in enumerate(values) if value > 0)
        shared = {values[i] for i in self.hot}
        self.common = shared.pop() if len(shared) == 1 else None
        self._roots = [math.sqrt(values[i]) for i in self.hot]
        self._views: dict = {}

    def draw(self, noise, like: list, key: str, h) -> tuple[list, float]:
        r"""``(views, alpha)`` with ``alpha * views[ℓ]`` = :math:`\sqrt{2 T_\ell h}\,ξ_\ell` (zero for cold leaves).

        Standard normals are drawn for the hot leaves only; the cold leaves' views are zeros made once
        (never written: the noise is added to the state, the views only read, or scaled by a finite
        diffusion, which keeps a zero zero).
        """
        flat, hot_views = noise.normal([like[i] for i in self.hot], key)
        cached = self._views.get(key)
        if cached is None or cached[0] is not flat:
            # the noise stream reuses one buffer per key, so the full list of views is built once
            views = [torch.zeros_like(leaf) for leaf in like]
            for i, view in zip(self.hot, hot_views):
                views[i] = view
            cached = self._views[key] = (flat, views)
        if isinstance(h, torch.Tensor):
            raise ValueError("per-group temperatures take a scalar step size (not one per chain)")
        if self.common is not None:
            return cached[1], math.sqrt(2.0 * self.common * h)
        torch._foreach_mul_(hot_views, self._roots)
        return cached[1], math.sqrt(2.0 * h)

    def scale_divergence(self, divergence: list) -> list:
        """:math:`T_\\ell Γ_\\ell` for Γ's leaves."""
        return torch._foreach_mul(divergence, list(self.values))

    def __repr__(self) -> str:
        return f"LeafTemperature({self.values})"
