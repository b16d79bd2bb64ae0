r"""The operators that read a :class:`~bayesflow.engine.learned_mass.LearnedMass`, and the burn-in step.

* :class:`LearnedRoot` — ``c·S`` (:math:`S = \hat Σ^{1/2}`), the θ–m blocks of ``LearnedMass.curl()``;
* :class:`LearnedCovariance` — ``c·S²`` with square root ``√c·S``, ``LearnedMass.diffusion()``;
* :class:`BurnInStep` and :func:`learned_operators` — what a preset's ``mass=`` / ``burn_in_lr=`` configure.

Neither operator depends on the current z (S is a function of the past during burn-in and a constant
after it), so their Γ is zero. The first operator call of a step absorbs θ_t into the estimate: the
engine hands preconditioners the gradient, operators the state.

Example:
    >>> from bayesflow.engine.learned_mass import LearnedMass
    >>> from bayesflow.engine.learned_operators import LearnedRoot
    >>> mass = LearnedMass("dense", burn_in=500)
    >>> mass.curl().get("params", "momenta") == LearnedRoot(mass, -1.0)   # Q_θm = -S
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import torch

from bayesflow.engine.accumulator import Leaves, flat_leaves, leaf_views
from bayesflow.engine.context import Context
from bayesflow.engine.learned_mass import LearnedMass
from bayesflow.engine.operators import Operator

__all__ = ["BurnInStep", "LearnedCovariance", "LearnedRoot", "learned_operators"]


def _read(mass: LearnedMass, ctx: Context):
    """S of this step; the first read of a step absorbs θ_t (θ has not moved yet: every integrator's
    first operator call reads it before writing)."""
    entry = ctx.pending.get(id(mass))
    if entry is not None:
        mass.absorb(entry[1], ctx.leaves("params"), ctx.step, ctx.numel)
    return ctx.values(mass)


class _Learned(Operator):
    def __init__(self, mass: LearnedMass, scale: float):
        if not isinstance(mass, LearnedMass):
            raise TypeError(f"{type(self).__name__} reads a LearnedMass, got {type(mass).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"{type(self).__name__} scale must be finite, got {scale}")
        self.mass, self.scale = mass, scale

    def preconditioners(self):
        return (self.mass,)

    def _apply(self, root, v: Leaves) -> Leaves:
        """S v."""
        if self.mass.kind == "diag":
            return torch._foreach_mul(root, v)
        vector = flat_leaves(v, None if root.ndim == 2 else root.shape[0])
        product = root @ vector if root.ndim == 2 else (root @ vector.unsqueeze(-1)).squeeze(-1)
        return leaf_views(product, v)

    def __eq__(self, other):
        return type(other) is type(self) and other.mass is self.mass and other.scale == self.scale

    def __hash__(self):
        return hash((type(self).__name__, id(self.mass), self.scale))

    def __repr__(self):
        return f"{type(self).__name__}({self.mass!r}, scale={self.scale:g})"


class LearnedRoot(_Learned):
    r"""``c·S``, S the learned root :math:`\hat Σ^{1/2}`: the θ–m blocks of :meth:`LearnedMass.curl`.

    Example:
        >>> from bayesflow.engine.learned_mass import LearnedMass
        >>> from bayesflow.engine.learned_operators import LearnedRoot
        >>> mass = LearnedMass("diag", burn_in=100)
        >>> mass.curl().get("momenta", "params") == LearnedRoot(mass, 1.0)
        True
    """

    def accumulate(self, out, v, alpha, ctx):
        out.add(self._apply(_read(self.mass, ctx), v), alpha=alpha * self.scale)

    def symbol(self):
        return ("learned root", id(self.mass), self.scale)

    def check(self, shapes, role, where):
        raise ValueError(f"{where}: the learned root S is symmetric: it belongs off the diagonal of the "
                         "curl (LearnedMass.curl()), or use LearnedMass.diffusion() for D")


class LearnedCovariance(_Learned):
    r"""``c·Σ̂ = c·S²`` on θ with square root √c·S: the diffusion of :meth:`LearnedMass.diffusion`.

    Example (SGLD preconditioned by the covariance learned in 100 burn-in steps):
        >>> import torch
        >>> from bayesflow.engine import build
        >>> from bayesflow.engine.learned_mass import LearnedMass
        >>> mass = LearnedMass("diag", burn_in=100)
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.1, diffusion=mass.diffusion())
        >>> state, _ = transform.update(transform.init(torch.zeros(2), seed=0), None)
    """

    def accumulate(self, out, v, alpha, ctx):
        root = _read(self.mass, ctx)
        out.add(self._apply(root, self._apply(root, v)), alpha=alpha * self.scale)

    def sqrt_accumulate(self, out, noise, alpha, ctx):
        out.add(self._apply(_read(self.mass, ctx), noise), alpha=alpha * math.sqrt(self.scale))

    def symbol(self):
        return ("learned covariance", id(self.mass), self.scale)

    def check(self, shapes, role, where):
        if role != "diffusion":
            raise ValueError(f"{where}: the learned covariance is symmetric PSD: it is a diffusion, not a {role}")
        if self.scale < 0:
            raise ValueError(f"{where}: diffusion must be positive semi-definite, got scale {self.scale}")


SETTLE = 0.75
"""The last window's step as a fraction of ``lr``: its S is the previous window's estimate, from half the
draws (measured on issue 15's 100-D target: 0.75·lr in the last window, then lr, reached W2 0.0325
where lr throughout diverged at lr ≥ 1.4 and 0.0375 was the best)."""


@dataclass(frozen=True)
class BurnInStep:
    """A step size in three stages: ``before`` for ``t < until`` (the initial mass or a first rough
    estimate: the target's own small step), ``settle`` for ``until ≤ t < freeze`` (the last window, on the
    previous window's estimate), ``after`` from ``freeze`` on (the frozen mass).

    Example:
        >>> from bayesflow.engine.learned_operators import BurnInStep
        >>> h = BurnInStep(before=0.01, settle=0.75, after=1.0, until=100, freeze=300)
        >>> h(99), h(100), h(300)
        (0.01, 0.75, 1.0)
    """

    before: float
    settle: float
    after: float
    until: int
    freeze: int

    def __call__(self, step: int) -> float:
        if step < self.until:
            return self.before
        return self.settle if step < self.freeze else self.after


def learned_operators(mass, lr, burn_in_lr=None, temperature=None) -> dict:
    """``{"curl": mass.curl(), "step_size": ...}`` for a preset given ``mass=`` (None: ``{}``).

    ``burn_in_lr`` (a positive float, with a float ``lr``) is the step until the last window starts
    (with one window, the whole burn-in); the last window runs at ``SETTLE · lr`` (0.75) with the
    previous window's estimate, and ``lr`` follows from the end of burn-in (:class:`BurnInStep`). None
    keeps ``lr`` throughout. ``temperature`` is the preset's T, which a ``gradients=True`` mass scales
    its estimate by (:meth:`LearnedMass.at_temperature`).

    Example:
        >>> from bayesflow.engine.learned_mass import LearnedMass
        >>> from bayesflow.engine.learned_operators import learned_operators
        >>> fields = learned_operators(LearnedMass("diag", burn_in=70), lr=1.0, burn_in_lr=0.1)
        >>> fields["step_size"]
        BurnInStep(before=0.1, settle=0.75, after=1.0, until=30, freeze=70)
    """
    if mass is None:
        if burn_in_lr is not None:
            raise ValueError("burn_in_lr is the step before a learned mass is estimated: give mass=LearnedMass(...)")
        return {}
    if not isinstance(mass, LearnedMass):
        raise TypeError(f"mass must be a LearnedMass (or None for the identity), got {mass!r}")
    if mass.gradients and temperature is not None:
        mass = mass.at_temperature(temperature)
    fields = {"curl": mass.curl()}
    if burn_in_lr is not None:
        for name, value in (("burn_in_lr", burn_in_lr), ("lr", lr)):
            if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < math.inf:
                raise ValueError(f"with burn_in_lr, {name} must be a positive finite float, got {value!r}")
        fields["step_size"] = BurnInStep(float(burn_in_lr), SETTLE * float(lr), float(lr), mass.rough_until,
                                         mass.burn_in)
    return fields
