r"""Any engine configuration as a torchopt / optax-style gradient transformation.

A gradient transformation is a pair ``(init, update)``:

* ``opt_state = tx.init(params)``;
* ``updates, opt_state = tx.update(updates, opt_state, params=None, inplace=True)`` takes the
  *loss* gradients and returns parameter increments, to be applied as ``params + updates``
  (``torchopt.apply_updates``).

It lets bayesflow's optimizers go wherever a torchopt optimizer is expected, and torchopt's
optimizers go wherever bayesflow expects one. Internally ``update`` runs the engine's public
``transform.step(state, grads)`` with the ascent gradient :math:`\nabla ℓ = -\nabla \mathrm{loss}`
and returns :math:`θ_{t+1} - θ_t`; the engine keeps its own copy of θ in ``opt_state.params``
(coupled and decoupled weight decay read it). Pass ``params=`` to ``update`` to re-synchronise that
copy with the caller's parameters every step (torchopt's ``Optimizer`` does).

Example:
    >>> import torch
    >>> import torchopt
    >>> import bayesflow.optim
    >>> def loss_fn(params):
    ...     return 0.5 * (params[0] ** 2).sum()
    >>> params = (torch.ones(3, requires_grad=True),)
    >>> tx = bayesflow.optim.adam.transformation(lr=1e-3)        # or torchopt.adam(lr=1e-3)
    >>> opt_state = tx.init(params)
    >>> grads = torch.autograd.grad(loss_fn(params), params)
    >>> updates, opt_state = tx.update(grads, opt_state, params=params, inplace=False)
    >>> updates  # Adam's first step: -lr · sign(gradient)
    (tensor([-0.0010, -0.0010, -0.0010]),)
    >>> params = torchopt.apply_updates(params, updates, inplace=False)

Where the caller only wants the parameters advanced (as ``torch.optim`` does), the increments are
wasted work: ``init(params, share=True)`` makes the engine's θ the caller's tensors, and
``update(grads, opt_state, params=params, write_params=True)`` writes :math:`θ_{t+1}` straight into
them (returning ``None`` for the updates) — four passes over the parameters fewer per step.
``bayesflow.vi`` does this with every optimizer that has ``writes_params``.

To use one in ``torchopt.Optimizer``, wrap it: ``torchopt.Optimizer(model.parameters(),
torchopt.GradientTransformation(tx.init, tx.update))`` (torchopt checks the class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from bayesflow.engine import SDEConfig, SDEState
from bayesflow.engine import build as engine_build
from bayesflow.engine.schedules import as_schedule, is_zero
from bayesflow.tree import flatten, unflatten
from bayesflow.types import TensorTree

__all__ = ["GradientTransformation", "as_gradient_transformation"]


class GradientTransformation(NamedTuple):
    """``(init, update)`` with torchopt's signatures (see the module docstring).

    Example:
        >>> import torch
        >>> from bayesflow.optim import GradientTransformation, sgd
        >>> tx = sgd.transformation(lr=0.1)
        >>> isinstance(tx, GradientTransformation)
        True
        >>> updates, opt_state = tx.update([torch.ones(2)], tx.init([torch.zeros(2)]))
        >>> updates
        [tensor([-0.1000, -0.1000])]
    """

    init: Callable[..., SDEState]
    update: Callable[..., tuple[TensorTree, SDEState]]

    writes_params = True
    """``init(..., share=True)`` and ``update(..., write_params=True)`` are available (a torchopt
    transformation has neither: callers test ``getattr(tx, "writes_params", False)``)."""


def _no_log_posterior(params, batch):
    raise RuntimeError("a gradient transformation is driven by update(grads, ...); it never evaluates "
                       "a log posterior")


def as_gradient_transformation(config: SDEConfig) -> GradientTransformation:
    """The gradient transformation that advances ``config``'s engine with the caller's gradients.

    Args:
        config: an :class:`~bayesflow.engine.SDEConfig` whose integrator takes its one gradient at
            the start of the step (every optimizer preset; Euler, semi-implicit, Nesterov). At a
            non-zero temperature the increments include the sampler's noise.

    Returns:
        A :class:`GradientTransformation`. Its ``init(params, seed=None, share=False)`` copies params
        (the caller's tensors are never written; ``share=True`` keeps them as the engine's θ);
        ``update(updates, opt_state, params=None, inplace=True, write_params=False)`` maps loss
        gradients (a tree like params; None leaves count as zero) to increments. With ``inplace=True``
        the increments are written into the ``updates`` tensors and the state is advanced in place, as
        torchopt does. ``write_params=True`` (with ``params`` and ``inplace=True``) writes
        :math:`θ_{t+1}` into ``params`` instead and returns ``(None, opt_state)``; the state's θ is then
        ``params`` itself (a new state record when it was not already).

    Example:
        >>> import torch
        >>> from bayesflow.optim import adam, as_gradient_transformation
        >>> tx = as_gradient_transformation(adam.config(lr=1e-2))
        >>> updates, opt_state = tx.update({"w": torch.ones(3)}, tx.init({"w": torch.zeros(3)}), inplace=False)
        >>> updates["w"]  # Adam's first step: -lr · sign(gradient)
        tensor([-0.0100, -0.0100, -0.0100])
    """
    integrator = config.integrator
    if not integrator.evaluates_at_start() or integrator.caches_gradient:
        raise ValueError(f"{integrator!r} needs gradients inside the step; a gradient transformation only "
                         "receives the gradient at the step's start")
    transform = engine_build(_no_log_posterior, config)
    cold = is_zero(as_schedule(config.temperature, "temperature"))

    def init(params: TensorTree, seed: int | torch.Generator | None = None, share: bool = False) -> SDEState:
        leaves, spec = flatten(params)
        if share is not False and share is not True:
            raise TypeError(f"share must be True or False, got {share!r}")
        # share: the engine's θ is the caller's tensors (for update(..., write_params=True), which
        # advances them in place); otherwise a copy, which the caller's tensors never see written
        own = params if share else unflatten(spec, [leaf.detach().clone() for leaf in leaves])
        # At T = 0 nothing is random: seed 0 keeps torch's global generator untouched.
        return transform.init(own, seed=0 if seed is None and cold else seed)

    def update(updates: TensorTree, opt_state: SDEState, params: TensorTree | None = None,
               inplace: bool = True, write_params: bool = False) -> tuple[TensorTree | None, SDEState]:
        with torch.no_grad():
            if write_params is not False:
                return _write_params(transform, updates, opt_state, params, inplace, write_params)
            return _update(transform, updates, opt_state, params, inplace)

    return GradientTransformation(init, update)


def _update(transform, updates: Any, state: SDEState, params: Any, inplace: bool):
    given, spec = optree.tree_flatten(updates, none_is_leaf=True, namespace="bayesflow")
    theta, theta_spec = flatten(state.params)
    if len(given) != len(theta):
        raise ValueError(f"updates has {len(given)} leaves, the optimizer state has {len(theta)}")
    if params is not None:
        current, _ = flatten(params)
        if len(current) != len(theta):
            raise ValueError(f"params has {len(current)} leaves, the optimizer state has {len(theta)}")
        current = [p.detach() for p in current]
    if inplace and params is not None and _reusable(given, current, theta):
        # θ_t is the caller's params (copied into the engine's θ below), so the updates tensors can
        # hold the ascent gradient during the step and the increment after it: no new buffer
        torch._foreach_copy_(theta, current)
        out = [torch.zeros_like(t) if g is None else g for g, t in zip(given, theta)]
        torch._foreach_neg_(out)  # the engine takes the ascent ∇ℓ = -∇loss
        state = transform.step(state, unflatten(theta_spec, out), inplace=True)
        torch._foreach_copy_(out, flatten(state.params)[0])
        torch._foreach_sub_(out, current)  # θ_{t+1} - θ_t (bitwise -(θ_t - θ_{t+1}), as below)
        return optree.tree_unflatten(spec, out), state
    loss_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(given, theta)]
    grads = unflatten(theta_spec, torch._foreach_neg(loss_grads))  # the engine takes the ascent ∇ℓ = -∇loss
    if inplace:
        if params is not None:
            torch._foreach_copy_(theta, current)
        out = [t.clone() if g is None else g for g, t in zip(given, theta)]
        torch._foreach_copy_(out, theta)  # out holds θ_t, then θ_t - θ_{t+1}, then the increment
        state = transform.step(state, grads, inplace=True)
        torch._foreach_sub_(out, flatten(state.params)[0])
        torch._foreach_neg_(out)
    else:
        if params is not None:
            state = state._replace(params=unflatten(theta_spec, current))
            theta = current
        state = transform.step(state, grads, inplace=False)
        out = torch._foreach_sub(flatten(state.params)[0], theta)
    return optree.tree_unflatten(spec, out), state


def _write_params(transform, updates: Any, state: SDEState, params: Any, inplace: bool, write_params: Any):
    """``update(..., write_params=True)``: θ_{t+1} written into ``params`` (the engine's θ from now on)."""
    if write_params is not True:
        raise TypeError(f"write_params must be True or False, got {write_params!r}")
    if params is None or inplace is not True:
        raise ValueError("write_params=True writes the step into params: pass params= and inplace=True")
    given, _ = optree.tree_flatten(updates, none_is_leaf=True, namespace="bayesflow")
    theta, theta_spec = flatten(state.params)
    current, _ = flatten(params)
    if len(given) != len(theta) or len(current) != len(theta):
        raise ValueError(f"updates has {len(given)} leaves and params {len(current)}, the optimizer state "
                         f"{len(theta)}")
    if any(p is not t for p, t in zip(current, theta)):   # (a shared state: the same tensors, nothing to check)
        for p, t in zip(current, theta):
            if not isinstance(p, torch.Tensor) or p.dtype != t.dtype or p.shape != t.shape:
                raise ValueError(f"params must match the optimizer state's leaves: got "
                                 f"{getattr(p, 'dtype', type(p).__name__)} {tuple(getattr(p, 'shape', ()))}, "
                                 f"expected {t.dtype} {tuple(t.shape)}")
        state = state._replace(params=unflatten(theta_spec, current))   # no copy: the step writes params
    ascent = [torch.zeros_like(t) if g is None else g for g, t in zip(given, theta)]
    if _writable_gradients(given, current):   # the caller's gradient tensors hold the ascent gradient
        torch._foreach_neg_(ascent)   # the engine takes the ascent ∇ℓ = -∇loss
    else:
        ascent = torch._foreach_neg(ascent)
    return None, transform.step(state, unflatten(theta_spec, ascent), inplace=True)


def _reusable(given: list, current: list, theta: list) -> bool:
    """Whether the in-place update may hold the gradient in the caller's ``updates`` tensors and take
    θ_t from ``params``: the updates writable (:func:`_writable_gradients`), and no parameter sharing
    memory with the engine's own θ (it would change with the step)."""
    if not _writable_gradients(given, theta):
        return False
    if any(p.dtype != t.dtype or p.shape != t.shape for p, t in zip(current, theta)):
        return False
    engine = {t.untyped_storage().data_ptr() for t in theta}
    return not any(p.untyped_storage().data_ptr() in engine for p in current)


def _writable_gradients(given: list, theta: list) -> bool:
    """Every update a distinct contiguous tensor of its parameter's dtype and shape (an update given
    twice, as autograd returns for ``(p + p).sum()``, would be negated twice), none sharing memory
    with θ (writing it would move the parameters)."""
    pointers = set()
    for g, t in zip(given, theta):
        if g is not None:
            if (not isinstance(g, torch.Tensor) or g.dtype != t.dtype or g.shape != t.shape
                    or not g.is_contiguous() or g.data_ptr() in pointers):
                return False
            pointers.add(g.data_ptr())
    storages = {t.untyped_storage().data_ptr() for t in theta}
    return not any(g is not None and g.untyped_storage().data_ptr() in storages for g in given)
