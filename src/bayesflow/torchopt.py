r"""Functional (torchopt-style) optimizers as ``(init, update)`` transforms (posteriors' ``torchopt``).

:func:`build` wraps a gradient transformation: a ``torchopt`` functional optimizer such as
``torchopt.adam(lr=1e-3)`` (lower case), or one of bayesflow's own,
``bayesflow.optim.adam.transformation(lr=1e-3)`` or ``bayesflow.optim.as_gradient_transformation(config)``,
which follow the same ``init`` / ``update`` protocol. Each ``update(state, batch)`` computes the loss
gradient with ``torch.func.grad_and_value``, maps it to increments with the optimizer and applies them
with ``torchopt.apply_updates``: functional by default (``inplace=False``: new parameters, the input
state untouched), or in place. Code written for ``posteriors.torchopt`` runs with the import renamed
to ``bayesflow.torchopt``.

torchopt is an optional dependency (``pip install torchopt``); it is imported when a transform is
built or updated, never when this module is imported.

Example:
    >>> import torch
    >>> import torchopt
    >>> import bayesflow.torchopt
    >>> def loss_fn(params, batch):
    ...     return ((params["w"] - batch) ** 2).sum(), None
    >>> transform = bayesflow.torchopt.build(loss_fn, torchopt.sgd(lr=0.25))
    >>> state = transform.init({"w": torch.zeros(2)})
    >>> for _ in range(3):
    ...     state, aux = transform.update(state, torch.ones(2))
    >>> state.params["w"]  # w ← 1 - (1/2)^t
    tensor([0.8750, 0.8750])
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import optree
import torch

from bayesflow.engine import SDEConfig
from bayesflow.engine.validation import check_finite_params, param_leaves
from bayesflow.optim.torch_optim import _loss_and_aux, _write_loss
from bayesflow.types import TensorTree, Transform

__all__ = ["TorchOptState", "build", "init", "update"]


def _torchopt():
    try:
        import torchopt
    except ImportError as error:
        raise ImportError("bayesflow.torchopt needs the optional dependency torchopt: pip install torchopt") from error
    return torchopt


class TorchOptState(NamedTuple):
    """State of a functional optimizer transform (posteriors' ``TorchOptState``).

    Attributes:
        params: the parameter tree.
        opt_state: the optimizer's state, from its ``init`` and ``update``.
        loss: the loss at the parameters before the last update; an empty tensor before the first.

    Example:
        >>> import torch
        >>> import torchopt
        >>> from bayesflow.torchopt import TorchOptState, build
        >>> transform = build(lambda p, batch: (((p - 1) ** 2).sum(), None), torchopt.sgd(lr=0.5))
        >>> state = transform.init(torch.zeros(2))
        >>> isinstance(state, TorchOptState), state.loss
        (True, tensor([]))
        >>> state, _ = transform.update(state, None)
        >>> state.loss, state.params
        (tensor(2.), tensor([1., 1.]))
    """

    params: TensorTree
    opt_state: Any
    loss: torch.Tensor


def _check_optimizer(optimizer: Any) -> None:
    """A gradient transformation: an object with ``init(params)`` and ``update(updates, state, ...)``."""
    if isinstance(optimizer, SDEConfig):
        hint = ("an SDEConfig: convert it once with bayesflow.optim.as_gradient_transformation(config), "
                "or use a preset's transformation(...), e.g. bayesflow.optim.adam.transformation(lr=1e-3)")
    elif isinstance(optimizer, Transform):
        hint = ("a bayesflow Transform (update(state, batch)), not a gradient transformation: use the preset's "
                "transformation(...), e.g. bayesflow.optim.adam.transformation(lr=1e-3), or "
                "bayesflow.optim.as_gradient_transformation(transform.config)")
    elif isinstance(optimizer, type):
        hint = (f"the class {optimizer.__name__}: use a lower-case functional optimizer instance such as "
                "torchopt.adam(lr=1e-3) (for torch.optim classes, use bayesflow.optim.build)")
    elif isinstance(optimizer, torch.optim.Optimizer):
        hint = (f"a torch.optim optimizer instance ({type(optimizer).__name__}): use "
                "bayesflow.optim.build(loss_fn, torch.optim.<Class>, **options) for those")
    elif callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return
    else:
        hint = f"{optimizer!r:.80} ({type(optimizer).__name__}), which has no init and update methods"
    raise TypeError("optimizer must be a functional gradient transformation with init(params) and "
                    f"update(updates, state, params=..., inplace=...) such as torchopt.adam(lr=1e-3); got {hint}")


def build(loss_fn, optimizer) -> Transform:
    r"""The transform of a functional optimizer (posteriors' ``torchopt.build``).

    Each update evaluates :math:`(g_t, \mathrm{loss}_t) = (\nabla_θ \mathrm{loss}, \mathrm{loss})(θ_t,
    \mathrm{batch})` with ``torch.func.grad_and_value``, asks the optimizer for increments
    :math:`u_t, s_{t+1} = \mathrm{optimizer.update}(g_t, s_t, \mathrm{params}=θ_t)` and sets
    :math:`θ_{t+1} = θ_t + u_t` (``torchopt.apply_updates``); e.g. for ``torchopt.sgd(lr)``
    :math:`u_t = -\mathrm{lr}\, g_t`.

    Args:
        loss_fn: ``loss, aux = loss_fn(params, batch)``, the loss a scalar tensor (minimised); it must
            be ``torch.func``-compatible (no ``.item()`` or ``.backward()`` inside).
        optimizer: a gradient transformation: a lower-case torchopt optimizer (``torchopt.adamw(lr=...)``)
            or a bayesflow one (``bayesflow.optim.adam.transformation(lr=...)``,
            :func:`bayesflow.optim.as_gradient_transformation`).

    Returns:
        A :class:`~bayesflow.types.Transform`: ``state = transform.init(params)`` (a
        :class:`TorchOptState`) and ``state, aux = transform.update(state, batch, inplace=False)``.

    Raises:
        TypeError: ``optimizer`` is not a gradient transformation (a class, a torch.optim optimizer, a
            bayesflow Transform or SDEConfig; the message says what to use instead).
        ImportError: torchopt is not installed.

    Example:
        >>> import torch
        >>> import bayesflow.optim
        >>> import bayesflow.torchopt
        >>> def loss_fn(p, batch):
        ...     return (p**2).sum(), None
        >>> transform = bayesflow.torchopt.build(loss_fn, bayesflow.optim.adam.transformation(lr=0.1))
        >>> state, aux = transform.update(transform.init(torch.ones(2)), None)
        >>> state.params  # Adam's first step: θ - lr · sign(g)
        tensor([0.9000, 0.9000])
    """
    _check_optimizer(optimizer)
    _torchopt()
    return Transform(partial(init, optimizer=optimizer), partial(update, loss_fn=loss_fn, optimizer=optimizer))


def init(params: TensorTree, optimizer) -> TorchOptState:
    """The initial state: ``optimizer.init(params)`` and an empty loss.

    Args:
        params: a tensor or tree of tensors (they need not require grad).
        optimizer: a gradient transformation (see :func:`build`).

    Returns:
        A :class:`TorchOptState` holding ``params`` itself (not a copy).

    Raises:
        TypeError: a leaf of ``params`` is not a floating-point tensor, or ``optimizer`` is not a
            gradient transformation.
        ValueError: ``params`` has no tensors, or a leaf holds NaN / ±inf (named).

    Example:
        >>> import torch
        >>> import torchopt
        >>> import bayesflow.torchopt
        >>> state = bayesflow.torchopt.init({"w": torch.zeros(2)}, torchopt.adam(lr=1e-3))
        >>> state.params["w"] is state.params["w"], state.loss  # the params as given; no loss yet
        (True, tensor([]))
    """
    _check_optimizer(optimizer)
    check_finite_params(*param_leaves("bayesflow.torchopt.init", params))
    return TorchOptState(params, optimizer.init(params), torch.tensor([]))


def _tensor_aux(loss_fn, held: list):
    """``loss_fn`` returning only aux's tensors (all ``torch.func`` lets out); the rest is kept in ``held``."""

    def wrapped(params, batch):
        loss, aux = _loss_and_aux(loss_fn(params, batch), differentiable=True)  # inside grad_and_value
        leaves, spec = optree.tree_flatten(aux, none_is_leaf=False, namespace="bayesflow")
        held[:] = [spec, [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]]
        return loss, [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    return wrapped


def _rebuild_aux(held: list, tensors: list) -> Any:
    spec, leaves = held
    tensors = iter(tensors)
    return spec.unflatten([next(tensors) if leaf is None else leaf for leaf in leaves])


def update(state: TorchOptState, batch: Any, loss_fn, optimizer, inplace: bool = False) -> tuple[TorchOptState, Any]:
    r"""One step: :math:`θ_{t+1} = θ_t + u_t` with :math:`u_t, s_{t+1} = \mathrm{optimizer.update}(\nabla_θ
    \mathrm{loss}(θ_t, \mathrm{batch}), s_t, \mathrm{params}=θ_t)`.

    The gradient comes from ``torch.func.grad_and_value(loss_fn, has_aux=True)``; everything runs
    under ``torch.no_grad()`` (no autograd graph builds up from step to step).

    Args:
        state: a :class:`TorchOptState`.
        batch: passed to ``loss_fn`` as it is.
        loss_fn: ``loss, aux = loss_fn(params, batch)``, the loss a scalar tensor.
        optimizer: the gradient transformation that made ``state.opt_state``.
        inplace: False (default): new parameter, optimizer-state and loss tensors; the input state is
            left untouched (the new parameters require grad where the old ones did). True: the state's
            parameter and loss tensors are updated in place (as ``torchopt.apply_updates(...,
            inplace=True)`` and the optimizer's ``inplace=True`` do) and returned in the new state;
            keep the returned state, whose ``opt_state`` is the optimizer's latest.

    Returns:
        ``(state, aux)``: the new :class:`TorchOptState` and ``loss_fn``'s aux.

    Raises:
        TypeError, ValueError: ``loss_fn`` did not return ``(scalar loss tensor, aux)``.
        ImportError: torchopt is not installed.

    Example:
        >>> import torch
        >>> import torchopt
        >>> import bayesflow.torchopt
        >>> def loss_fn(p, batch):
        ...     return (p**2).sum(), None
        >>> optimizer = torchopt.sgd(lr=0.1)
        >>> state = bayesflow.torchopt.init(torch.ones(1), optimizer)
        >>> new, aux = bayesflow.torchopt.update(state, None, loss_fn, optimizer)
        >>> new.params, new.loss, state.params  # θ ← θ - lr · 2θ; the input state is untouched
        (tensor([0.8000]), tensor(1.), tensor([1.]))
        >>> same, aux = bayesflow.torchopt.update(state, None, loss_fn, optimizer, inplace=True)
        >>> same.params is state.params, state.params
        (True, tensor([0.8000]))
    """
    torchopt = _torchopt()
    params = state.params
    held: list = []
    with torch.no_grad():
        grads, (loss, aux) = torch.func.grad_and_value(_tensor_aux(loss_fn, held), has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, params=params, inplace=inplace)
        new_params = torchopt.apply_updates(params, updates, inplace=inplace)
    aux = _rebuild_aux(held, aux)
    if inplace:
        _write_loss(state.loss, loss)
        return state._replace(opt_state=opt_state), aux
    new_params = optree.tree_map(
        lambda new, old: new.requires_grad_() if old.requires_grad and new is not old and new.is_leaf else new,
        new_params, params, namespace="bayesflow")
    return TorchOptState(new_params, opt_state, loss.detach()), aux
