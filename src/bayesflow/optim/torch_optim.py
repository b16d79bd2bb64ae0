r"""Any ``torch.optim`` optimizer as an ``(init, update)`` transform (posteriors' ``optim`` module).

:func:`build` wraps an optimizer *class* such as ``torch.optim.AdamW``: ``init(params)`` creates it
on the parameter tree's leaves, and each ``update(state, batch)`` takes one ordinary step on
``loss, aux = loss_fn(params, batch)``. The parameters are the caller's own tensors, stepped in place
by the optimizer, so ``update`` is in place only. Code written for ``posteriors.optim`` runs with the
import renamed to ``bayesflow.optim``. (The temperature-zero presets :mod:`~bayesflow.optim.sgd`,
:mod:`~bayesflow.optim.adam`, ... are functional and become samplers at T > 0; this wrapper takes
any ``torch.optim`` class as it is.)

Example:
    >>> import torch
    >>> import bayesflow
    >>> def loss_fn(params, batch):
    ...     return ((params["w"] - batch) ** 2).sum(), None
    >>> params = {"w": torch.zeros(2, requires_grad=True)}
    >>> transform = bayesflow.optim.build(loss_fn, torch.optim.SGD, lr=0.25)
    >>> state = transform.init(params)
    >>> for _ in range(3):
    ...     state, aux = transform.update(state, torch.ones(2))
    >>> state.params["w"]  # the caller's tensor, stepped in place: w ← 1 - (1/2)^t
    tensor([0.8750, 0.8750], requires_grad=True)
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import optree
import torch

from bayesflow.engine.validation import check_finite_params
from bayesflow.types import TensorTree, Transform

__all__ = ["OptimState", "build", "init", "update"]


class OptimState(NamedTuple):
    """State of a ``torch.optim`` optimizer transform (posteriors' ``OptimState``).

    Attributes:
        params: the parameter tree; its leaves are the tensors the optimizer steps in place.
        optimizer: the ``torch.optim.Optimizer`` instance (its moments live in ``optimizer.state``;
            checkpoint it with ``optimizer.state_dict()``).
        loss: the loss at the parameters before the last update, detached; an empty tensor before
            the first update.

    Example:
        >>> import torch
        >>> from bayesflow.optim import OptimState, build
        >>> transform = build(lambda p, batch: (((p - 1) ** 2).sum(), None), torch.optim.SGD, lr=0.5)
        >>> state = transform.init(torch.zeros(2, requires_grad=True))
        >>> isinstance(state, OptimState), state.loss
        (True, tensor([]))
        >>> state, _ = transform.update(state, None)
        >>> state.loss, state.params
        (tensor(2.), tensor([1., 1.], requires_grad=True))
    """

    params: TensorTree
    optimizer: torch.optim.Optimizer
    loss: torch.Tensor


def _check_optimizer_class(optimizer: Any) -> None:
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return
    if isinstance(optimizer, torch.optim.Optimizer):
        hint = (f"; got an instance of {type(optimizer).__name__}: pass the class and its options, "
                f"e.g. build(loss_fn, torch.optim.{type(optimizer).__name__}, lr=...)")
    elif callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        hint = (f"; got {optimizer!r:.80}, which looks like a functional (init, update) optimizer: "
                "use bayesflow.torchopt.build(loss_fn, optimizer) for those")
    else:
        hint = f"; got {optimizer!r:.80} ({type(optimizer).__name__})"
    raise TypeError(f"optimizer must be a torch.optim.Optimizer subclass such as torch.optim.SGD{hint}")


def _loss_and_aux(out: Any, differentiable: bool) -> tuple[torch.Tensor, Any]:
    """``(value, aux)`` from what a loss function returned, with a clear error for anything else."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("loss_fn must return (loss, aux): a scalar loss tensor and an auxiliary output "
                        f"(None or torch.tensor([]) if there is none); got {type(out).__name__}")
    value, aux = out
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"loss_fn's loss must be a floating-point tensor, got {value!r:.80}")
    if value.shape != ():
        raise ValueError(f"loss_fn's loss must be a scalar tensor (shape ()), got shape {tuple(value.shape)}; "
                         "reduce it, e.g. with .sum() or .mean()")
    if differentiable and not value.requires_grad:
        raise ValueError("loss_fn's loss does not depend on the params it was given (no autograd graph): was "
                         "it computed under torch.no_grad(), from detached values, or from other tensors?")
    return value, aux


def _write_loss(target: torch.Tensor, value: torch.Tensor) -> None:
    """Store ``value`` in the state's loss tensor in place (it is empty before the first update)."""
    value = value.detach()
    with torch.no_grad():
        if target.shape == value.shape and target.dtype == value.dtype and target.device == value.device:
            target.copy_(value)
        else:
            target.data = value.clone()


def build(loss_fn, optimizer: type[torch.optim.Optimizer], **kwargs: Any) -> Transform:
    r"""The transform of a ``torch.optim`` optimizer class (posteriors' ``optim.build``).

    Each update evaluates :math:`\mathrm{loss}_t, \mathrm{aux}_t = \mathrm{loss\_fn}(θ_t, \mathrm{batch})`
    and takes the optimizer's step on :math:`g_t = \nabla_θ \mathrm{loss}_t`, e.g. for
    ``torch.optim.SGD`` :math:`θ_{t+1} = θ_t - \mathrm{lr}\, g_t`. The steps are torch's own, in place
    on the parameters passed to ``init``.

    Args:
        loss_fn: ``loss, aux = loss_fn(params, batch)``, the loss a scalar tensor (minimised).
        optimizer: a ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.AdamW`` (the class, not an
            instance).
        **kwargs: its options (``lr=...``), passed to it at ``init``.

    Returns:
        A :class:`~bayesflow.types.Transform`: ``state = transform.init(params)`` (an
        :class:`OptimState`) and ``state, aux = transform.update(state, batch, inplace=True)``.

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` subclass.

    Example:
        >>> import torch
        >>> import bayesflow
        >>> transform = bayesflow.optim.build(lambda p, batch: ((p**2).sum(), None), torch.optim.SGD, lr=0.1)
        >>> params = torch.ones(2, requires_grad=True)
        >>> state = transform.init(params)
        >>> state, aux = transform.update(state, None)  # θ ← θ - lr · 2θ
        >>> params
        tensor([0.8000, 0.8000], requires_grad=True)
    """
    _check_optimizer_class(optimizer)
    return Transform(partial(init, optimizer_cls=optimizer, **kwargs), partial(update, loss_fn=loss_fn))


def init(params: TensorTree, optimizer_cls: type[torch.optim.Optimizer], *args: Any, **kwargs: Any) -> OptimState:
    """A ``torch.optim`` optimizer created on the leaves of ``params``, in its initial state.

    Args:
        params: a tensor or tree of tensors; every leaf must be a leaf tensor that requires grad
            (``torch.zeros(3, requires_grad=True)``, ``dict(model.named_parameters())``).
        optimizer_cls: a ``torch.optim.Optimizer`` subclass.
        *args: its positional arguments after the parameters.
        **kwargs: its keyword arguments.

    Returns:
        An :class:`OptimState` with an empty ``loss``. The optimizer holds the caller's tensors.

    Raises:
        TypeError: ``optimizer_cls`` is not an optimizer class, or a leaf is not a tensor.
        ValueError: ``params`` has no leaves, a leaf is not a leaf tensor that requires grad, or holds NaN / ±inf.

    Example:
        >>> import torch
        >>> from bayesflow.optim import torch_optim
        >>> model = torch.nn.Linear(2, 1)
        >>> state = torch_optim.init(dict(model.named_parameters()), torch.optim.Adam, lr=1e-3)
        >>> type(state.optimizer).__name__, sorted(state.params), state.loss.numel()
        ('Adam', ['bias', 'weight'], 0)
    """
    _check_optimizer_class(optimizer_cls)
    paths, leaves, spec = optree.tree_flatten_with_path(params, none_is_leaf=False, namespace="bayesflow")
    if not leaves:
        raise ValueError("params has no tensors to optimize")
    for path, leaf in zip(paths, leaves):
        where = "params" + "".join(f"[{p!r}]" for p in path)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{where} is a {type(leaf).__name__}, not a tensor")
        if not leaf.is_leaf or not leaf.requires_grad:
            raise ValueError(
                f"{where} must be a leaf tensor that requires grad for torch.optim to step it in place; got "
                f"{'a non-leaf tensor (the result of an operation)' if not leaf.is_leaf else 'requires_grad=False'}"
                ": create it with requires_grad=True, or pass p.detach().requires_grad_()"
            )
    check_finite_params(leaves, spec)
    optimizer = optimizer_cls(leaves, *args, **kwargs)
    return OptimState(params, optimizer, torch.tensor([]))


def update(state: OptimState, batch: Any, loss_fn, inplace: bool = True) -> tuple[OptimState, Any]:
    r"""One step of the state's ``torch.optim`` optimizer on ``loss_fn(state.params, batch)``.

    ``optimizer.zero_grad()``; :math:`\mathrm{loss}, \mathrm{aux} = \mathrm{loss\_fn}(θ_t, \mathrm{batch})`;
    ``loss.backward()``; ``optimizer.step()`` (θ_{t+1} from θ_t and :math:`\nabla_θ \mathrm{loss}`, in
    place); the detached loss is written into ``state.loss``.

    Args:
        state: an :class:`OptimState` from :func:`init`.
        batch: passed to ``loss_fn`` as it is.
        loss_fn: ``loss, aux = loss_fn(params, batch)``, the loss a scalar tensor.
        inplace: must be True (the default).

    Returns:
        ``(state, aux)``: the same state, its parameters and loss updated in place, and ``loss_fn``'s aux.

    Raises:
        NotImplementedError: ``inplace=False``: torch.optim steps the parameter tensors in place and
            keeps its moments inside the optimizer object, so there is no way to leave the input
            state untouched.
        TypeError, ValueError: ``loss_fn`` did not return ``(scalar loss tensor, aux)``.

    Example:
        >>> import torch
        >>> from bayesflow.optim import torch_optim
        >>> def loss_fn(p, batch):
        ...     return (p**2).sum(), None
        >>> state = torch_optim.init(torch.ones(1, requires_grad=True), torch.optim.SGD, lr=0.1)
        >>> state, aux = torch_optim.update(state, None, loss_fn)
        >>> state.params, state.loss
        (tensor([0.8000], requires_grad=True), tensor(1.))
    """
    if not inplace:
        raise NotImplementedError(
            "inplace=False is not supported for torch.optim optimizers: optimizer.step() modifies the "
            "parameter tensors in place and keeps its state inside the optimizer object. Use "
            "bayesflow.torchopt.build (functional torchopt optimizers) or the bayesflow.optim presets "
            "(sgd, adam, ...) for functional updates."
        )
    state.optimizer.zero_grad()
    with torch.enable_grad():
        loss, aux = _loss_and_aux(loss_fn(state.params, batch), differentiable=True)
        loss.backward()
    state.optimizer.step()
    _write_loss(state.loss, loss)
    return state, aux

