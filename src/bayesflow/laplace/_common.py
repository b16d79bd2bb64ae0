r"""What the Laplace approximations share: their two states, initial precisions, accumulation (sampling:
:mod:`bayesflow.laplace.sampling`).

Every Laplace approximation here is a Normal distribution :math:`N(\mu, P^{-1})` around parameters
:math:`\mu` (normally a MAP estimate), whose precision :math:`P` is a curvature summed over batches,

.. math:: P = P_0 + \sum_{b} C(\mu; B_b),

with :math:`C` the empirical Fisher, the GGN or the Hessian of the negative log posterior. A
*diagonal* state keeps :math:`\mathrm{diag}(P)` as a tree shaped like the parameters; a *dense* state
keeps :math:`P` as one ``(d, d)`` matrix over the ravelled parameters (the leaves in bayesflow's optree
order, flattened and concatenated: the order of :func:`bayesflow.utils.empirical_fisher`). Samples come
back as trees shaped like the parameters, with ``sample_shape`` in front of every leaf, on the
parameters' devices, from an optional ``torch.Generator``.

Example:
    >>> import torch
    >>> from bayesflow.laplace import dense_fisher
    >>> params = {"w": torch.zeros(2, 2), "b": torch.zeros(1)}   # any tree, any leaf shape
    >>> state = dense_fisher.init(params, init_prec=4.0)        # P = 4 I over the 5 ravelled numbers
    >>> draws = dense_fisher.sample(state, (3,), generator=torch.Generator().manual_seed(0))
    >>> draws["w"].shape, draws["b"].shape
    (torch.Size([3, 2, 2]), torch.Size([3, 1]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any, NamedTuple

import optree
import torch

from bayesflow.engine.gradients import require_graph
from bayesflow.engine.validation import check_finite_params, param_leaves, param_paths
from bayesflow.records import record
from bayesflow.tree import flat_layout, flatten, ravel, unraveller  # noqa: F401  (re-exported to the methods)
from bayesflow.types import TensorTree
from bayesflow.utils.linalg import check_psd

__all__ = ["DenseLaplaceState", "DiagLaplaceState"]

_NO_AUX = "torch.tensor([])"
ONE_DRAW = torch.Size([])
"""The default ``sample_shape``: one draw, leaves shaped like the parameters."""


class _DiagFields(NamedTuple):
    params: TensorTree
    prec_diag: TensorTree
    step: torch.Tensor | None = None


class _DenseFields(NamedTuple):
    params: TensorTree
    prec: torch.Tensor
    step: torch.Tensor | None = None


@record
class DiagLaplaceState(_DiagFields):
    r"""A diagonal Normal :math:`N(\mu, \mathrm{diag}(p)^{-1})` over the parameters (posteriors' fields).

    Attributes:
        params: :math:`\mu`, the parameters themselves (not copied).
        prec_diag: :math:`p`, the precision diagonal, a tree shaped like ``params``.
        step: the number of batches accumulated (an int64 tensor on the CPU; a fresh ``tensor(0)`` when
            left out, so in-place updates of one state never touch another's).

    Example:
        >>> import torch
        >>> from bayesflow.laplace.diag_fisher import DiagLaplaceState
        >>> state = DiagLaplaceState(torch.zeros(2), torch.ones(2))
        >>> state.step, torch.stack([state, state]).prec_diag.shape
        (tensor(0), torch.Size([2, 2]))
    """

    __slots__ = ()

    def __new__(cls, params: TensorTree, prec_diag: TensorTree, step: torch.Tensor | None = None):
        return super().__new__(cls, params, prec_diag, _fresh_step() if step is None else step)


@record
class DenseLaplaceState(_DenseFields):
    r"""A Normal :math:`N(\mu, P^{-1})` with a dense precision over the ravelled parameters (posteriors' fields).

    Attributes:
        params: :math:`\mu`, the parameters themselves (not copied), any tree of any leaf shapes.
        prec: :math:`P`, a ``(d, d)`` tensor, ``d`` the number of parameter entries, in the order of
            the leaves flattened and concatenated.
        step: the number of batches accumulated (an int64 tensor on the CPU; a fresh ``tensor(0)`` when
            left out).

    Example:
        >>> import torch
        >>> from bayesflow.laplace.dense_fisher import DenseLaplaceState
        >>> state = DenseLaplaceState({"a": torch.zeros(2)}, torch.eye(2))
        >>> state.step, state.prec.shape
        (tensor(0), torch.Size([2, 2]))
    """

    __slots__ = ()

    def __new__(cls, params: TensorTree, prec: torch.Tensor, step: torch.Tensor | None = None):
        return super().__new__(cls, params, prec, _fresh_step() if step is None else step)


def _fresh_step() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------
# Arguments and the user's functions


def check_callable(name: str, fn: Any) -> None:
    """TypeError unless ``fn`` is callable."""
    if not callable(fn):
        raise TypeError(f"{name} must be a function, got {type(fn).__name__}")


def split_output(name: str, out: Any) -> tuple[Any, Any]:
    """``(value, aux)`` of a user function, or a TypeError saying the contract."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(f"{name} must return a tuple (value, aux), got {type(out).__name__}; "
                        f"with no auxiliary information return (value, {_NO_AUX})")
    return out


def scalar_value(name: str, value: Any, hint: str = "") -> torch.Tensor:
    """``value`` as a 0-d tensor, or a TypeError (not a tensor) / ValueError (not one number)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must return a tensor value, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must return a scalar value (one number), got a value of shape "
                         f"{tuple(value.shape)}{hint}")
    return value.reshape(())


def differentiated(name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` if it depends on the params being differentiated (inside a ``torch.func`` transform),
    else a ValueError: a function that ignores them (``model(x)`` in place of ``functional_call``) would
    add a curvature of exactly zero without a word."""
    require_graph(value, name)
    return value


def vector_value(name: str, value: Any) -> torch.Tensor:
    """``value`` if it is a 1-D tensor (one value per sample), else a TypeError / ValueError."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must return a tensor value, got {type(value).__name__}")
    if value.ndim != 1:
        raise ValueError(f"with per_sample=True, {name} must return a vector of one log posterior per sample "
                         f"(shape (batch_size,)), got a value of shape {tuple(value.shape)}; pass "
                         "per_sample=False if it returns one scalar for the whole batch")
    return value


def likelihood_terms(forward: Callable, outer_log_likelihood: Callable, batch: Any,
                     ) -> tuple[Callable, Callable]:
    r"""``(model, loss)`` for :func:`bayesflow.utils.ggn`: ``model(params) = forward(params, batch)`` (checked
    to be an ``(output, aux)`` tuple) and :math:`\ell(z) = -` ``outer_log_likelihood(z, batch)`` (checked scalar)."""

    def model(params: TensorTree) -> tuple[Any, Any]:
        output, aux = split_output("forward", forward(params, batch))
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"forward must return a tensor output (e.g. logits) and aux, got {type(output).__name__}")
        return differentiated("forward's output", output), aux

    def loss(z: torch.Tensor) -> torch.Tensor:
        out = outer_log_likelihood(z, batch)
        if isinstance(out, tuple):
            raise TypeError("outer_log_likelihood must return the log likelihood value alone (no aux), got a tuple")
        value = scalar_value("outer_log_likelihood", out, " (sum the log likelihood over the batch)")
        return -differentiated("outer_log_likelihood's value (a function of the output z)", value)

    return model, loss


# ----------------------------------------------------------------------------------------------------
# Initial precisions


def check_scalar_precision(name: str, value: Any, *, tree: bool | None = None) -> None:
    """An initial precision as given to ``build`` (and ``init``), checked before any parameter is seen.

    ``init_prec`` (``tree`` False) is a number or a tensor; ``init_prec_diag`` (``tree`` True, the
    default for that name) is a number, a tensor, or a tree of numbers and tensors (its structure and
    shapes are checked against the parameters at ``init``). Numbers, one-element tensors and the entries
    of a diagonal must be finite and non-negative; a dense ``(d, d)`` tensor must be finite (its
    positive semi-definiteness is checked at ``init``).

    Raises:
        TypeError: a bool, a string or another type where a precision is expected; a tensor of a
            non-numeric dtype.
        ValueError: a NaN, infinite or negative precision.
    """
    if tree is None:
        tree = name.endswith("_diag")
    expected = ("a number, a tensor or a tree of them shaped like params" if tree else
                "a number or a (d, d) tensor")
    if _is_leaf_precision(value) or not tree:
        _check_precision_leaf(name, value, expected, entries_non_negative=tree)
        return
    paths, leaves, _ = optree.tree_flatten_with_path(value, none_is_leaf=True, namespace="bayesflow")
    if not leaves:
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    for path, leaf in zip(paths, leaves):
        where = "".join(f"[{p!r}]" for p in path)
        _check_precision_leaf(f"{name}{where}", leaf, expected, entries_non_negative=True)


def _is_leaf_precision(value: Any) -> bool:
    return isinstance(value, (Real, torch.Tensor, str, bytes))


def _check_precision_leaf(name: str, value: Any, expected: str, entries_non_negative: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex() or not (
                value.is_floating_point() or value.dtype in _INTEGER_DTYPES):
            raise TypeError(f"{name} must hold real numbers ({expected}), got a tensor of dtype {value.dtype}")
        if value.numel() == 1:
            value = value.item()
        else:
            finite = bool(torch.isfinite(value).all())
            if not finite or (entries_non_negative and bool((value < 0).any())):
                what = "finite non-negative precisions" if entries_non_negative else "finite values"
                raise ValueError(f"{name} must hold {what}, got {value}")
            return
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite non-negative precision, got {value!r}")


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_number(value: Any) -> bool:
    return (isinstance(value, Real) and not isinstance(value, bool)) or (
        isinstance(value, torch.Tensor) and value.numel() == 1)


def init_diag(params: TensorTree, init_prec_diag: TensorTree | float) -> DiagLaplaceState:
    """A :class:`DiagLaplaceState` with ``prec_diag`` the (checked, copied) initial diagonal."""
    leaves, spec = param_leaves("init", params)
    check_finite_params(leaves, spec)
    check_scalar_precision("init_prec_diag", init_prec_diag)
    if _is_number(init_prec_diag):
        value = float(init_prec_diag)
        prec = [torch.full(leaf.shape, value, dtype=leaf.dtype, device=leaf.device) for leaf in leaves]
    else:
        try:
            given = spec.flatten_up_to(init_prec_diag)
        except (TypeError, ValueError) as error:
            raise ValueError(f"init_prec_diag must be a number or a tree with the structure of params "
                             f"({spec}): {error}") from None
        prec = []
        for path, leaf, value in zip(param_paths(params), leaves, given):
            value = torch.as_tensor(value, dtype=leaf.dtype, device=leaf.device)
            try:
                value = torch.broadcast_to(value, leaf.shape)
            except RuntimeError:
                raise ValueError(f"init_prec_diag{path} has shape {tuple(value.shape)}, which does not "
                                 f"broadcast to the parameter's shape {tuple(leaf.shape)}") from None
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise ValueError(f"init_prec_diag{path} must hold finite non-negative precisions, "
                                 f"got {value}")
            prec.append(value.clone())
    return DiagLaplaceState(params, spec.unflatten(prec))


def init_dense(params: TensorTree, init_prec: torch.Tensor | float) -> DenseLaplaceState:
    """A :class:`DenseLaplaceState` with ``prec`` the (checked, copied) initial ``(d, d)`` precision."""
    leaves, spec = param_leaves("init", params)
    check_finite_params(leaves, spec)
    dtype, device = flat_layout(leaves)
    d = sum(leaf.numel() for leaf in leaves)
    check_scalar_precision("init_prec", init_prec)
    if _is_number(init_prec):
        prec = torch.eye(d, dtype=dtype, device=device) * float(init_prec)
        return DenseLaplaceState(params, prec)
    if not isinstance(init_prec, torch.Tensor):
        raise TypeError(f"init_prec must be a number or a (d, d) tensor, got {type(init_prec).__name__}")
    if init_prec.shape != (d, d):
        raise ValueError(f"init_prec must be a number or a ({d}, {d}) tensor (params has {d} entries), "
                         f"got shape {tuple(init_prec.shape)}")
    prec = init_prec.detach().to(dtype=dtype, device=device).clone()
    check_psd("init_prec", prec)
    return DenseLaplaceState(params, prec)


# ----------------------------------------------------------------------------------------------------
# Accumulation


def add_diag(state: DiagLaplaceState, increment: TensorTree, inplace: bool) -> DiagLaplaceState:
    """``prec_diag + increment`` and ``step + 1``: in place (the state's own tensors) or in a new state."""
    prec, spec = flatten(state.prec_diag)
    extra = spec.flatten_up_to(increment)
    if inplace:
        torch._foreach_add_(prec, extra)
        state.step.add_(1)
        return state
    return DiagLaplaceState(state.params, spec.unflatten(torch._foreach_add(prec, extra)), state.step + 1)


def add_dense(state: DenseLaplaceState, increment: torch.Tensor, inplace: bool) -> DenseLaplaceState:
    """``prec + increment`` and ``step + 1``: in place (the state's own tensors) or in a new state."""
    if inplace:
        state.prec.add_(increment)
        state.step.add_(1)
        return state
    return DenseLaplaceState(state.params, state.prec + increment, state.step + 1)


def per_sample_gram(jacobian: TensorTree) -> torch.Tensor:
    r""":math:`J^\top J` for a tree of per-sample gradients (leaves ``(n, *leaf.shape)``), ``(d, d)``."""
    leaves, _ = flatten(jacobian)
    dtype, device = flat_layout(leaves)
    rows = torch.cat([leaf.reshape(leaf.shape[0], -1).to(dtype=dtype, device=device) for leaf in leaves], dim=1)
    return rows.mT @ rows


# ----------------------------------------------------------------------------------------------------
# Sampling
