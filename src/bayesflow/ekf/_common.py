r"""Shared pieces of the extended Kalman filters: argument checks, the step's inverse temperature, the
per-sample log likelihood, and the flat view of a parameter tree.

Both filters weigh a batch :math:`B = \{b_1, \ldots, b_n\}` by its *mean* per-sample log likelihood
:math:`\bar\ell(\theta) = \frac1n \sum_i \log p(b_i \mid \theta)` times the inverse temperature ``lr``
(posteriors' convention), so ``lr = n`` gives a batch its full Bayesian weight.

Example:
    >>> import torch
    >>> from bayesflow.ekf._common import ravel
    >>> flat, unravel = ravel({"a": torch.ones(2), "b": torch.zeros(1, 2)})
    >>> flat, unravel(torch.arange(8.0).reshape(2, 4))["b"].shape
    (tensor([1., 1., 0., 0.]), torch.Size([2, 1, 2]))
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from bayesflow.engine.gradients import require_graph
from bayesflow.engine.validation import check_bool, check_finite_params, param_leaves
from bayesflow.tree import flatten, unraveller
from bayesflow.tree import ravel as tree_ravel
from bayesflow.tree_utils import tree_insert_
from bayesflow.types import TensorTree

__all__ = ["check_lr", "check_params", "check_state", "current_lr", "per_sample_log_likelihood", "ravel",
           "write_counters"]


def check_params(params: TensorTree) -> tuple[list, Any]:
    """The leaves and tree spec of initial parameters: floating-point tensors holding finite values.

    Raises:
        TypeError: ``params`` is not a tree of tensors, or a leaf is not floating point (naming it).
        ValueError: a leaf holds NaN or ±inf (naming it).
    """
    leaves, spec = param_leaves("init", params)
    check_finite_params(leaves, spec)
    return leaves, spec


def check_lr(lr: Any) -> Any:
    """``lr`` unchanged if it is a finite number ≥ 0 (or a 1-element tensor) or a schedule ``step -> lr``.

    Raises:
        TypeError: ``lr`` is neither a number nor callable.
        ValueError: ``lr`` is negative or not finite.
    """
    return lr if callable(lr) else _checked_value(lr)


def _checked_value(lr: Any) -> Any:
    """``lr`` unchanged if it is a finite number ≥ 0 or a 1-element tensor holding one."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        value = float(lr)
    elif isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        value = float(lr)
    else:
        raise TypeError(f"lr must be a number ≥ 0 or a schedule step -> lr, got {lr!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lr must be a finite number ≥ 0 (the inverse temperature of each update), got {lr!r}")
    return lr


def current_lr(lr: Any, step: torch.Tensor) -> Any:
    """The inverse temperature of this step: ``lr(step)`` for a schedule (posteriors passes the step tensor).

    The value is checked before anything is written (:func:`check_lr`): a schedule's value names the
    step it was evaluated at. A tensor on an accelerator is not read (that would be a host sync).

    Raises:
        TypeError / ValueError: the value is not a finite number ≥ 0.
    """
    value = lr(step) if callable(lr) else lr
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        return value
    try:
        return _checked_value(value)
    except (TypeError, ValueError) as error:
        if not callable(lr):
            raise
        raise type(error)(f"the lr schedule returned {value!r} at step {int(step)}; expected a finite number "
                          "≥ 0 (the inverse temperature of the update)") from None


def check_state(state: Any, cls: type, module: str) -> None:
    """Raise ``TypeError`` unless ``state`` is a ``cls`` (the state made by ``module.init``)."""
    if not isinstance(state, cls):
        raise TypeError(f"{module}.update expects an {cls.__name__} (from {module}.init), got {type(state).__name__}")


def per_sample_log_likelihood(log_likelihood: Callable, per_sample: bool) -> Callable:
    r"""``f(params, batch) -> (values, aux)`` with ``values[i] = \log p(b_i | θ)``, a vector.

    ``per_sample=False``: ``log_likelihood`` is a batch statistic, mapped over the samples with
    :func:`bayesflow.utils.per_samplify`. The output is checked to be one value per sample.
    """
    if not callable(log_likelihood):
        raise TypeError(f"log_likelihood must be a function (params, batch) -> (value, aux), got {log_likelihood!r}")
    check_bool(per_sample, "per_sample")
    from bayesflow.utils import per_samplify

    inner = log_likelihood if per_sample else per_samplify(log_likelihood)

    def values_and_aux(params: TensorTree, batch: Any):
        try:
            out = inner(params, batch)
        except ValueError as error:
            if "must only return Tensors" not in str(error):  # torch.vmap's error for a non-tensor output
                raise
            raise TypeError("log_likelihood must return (value, aux) made of tensors: a tensor value and a tensor "
                            "or tree of tensors as aux (return torch.tensor([]) as aux if there is none)") from error
        if not isinstance(out, tuple) or len(out) != 2:
            raise TypeError("log_likelihood must return a tuple (value, aux); return torch.tensor([]) as aux "
                            f"if there is none (got {type(out).__name__})")
        values, aux = out
        if not isinstance(values, torch.Tensor) or values.ndim != 1:
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            if per_sample:
                expected = "with per_sample=True, a vector of one log likelihood per sample"
            else:
                expected = "with per_sample=False, a scalar log likelihood (it is mapped over the samples)"
            raise ValueError(f"log_likelihood returned a value of shape {shape}; expected {expected}")
        # called only inside torch.func transforms: a value that ignores the params would be a zero update
        require_graph(values, "log_likelihood's value")
        return values, aux

    return values_and_aux


def ravel(tree: TensorTree):
    r"""The leaves of ``tree`` as one flat vector (:func:`bayesflow.tree.ravel`) and ``unravel(flat)``
    mapping a ``(..., d)`` tensor back to a tree whose leaves have shape ``(..., *leaf.shape)``."""
    leaves, spec = flatten(tree)
    if not leaves:
        raise ValueError("params must hold at least one tensor")
    leaves = [torch.as_tensor(leaf) for leaf in leaves]
    return tree_ravel(leaves), unraveller(leaves, spec)


def write_counters(state: Any, log_likelihood: torch.Tensor) -> Any:
    """The in-place end of an update: ``state.log_likelihood`` ← ``log_likelihood``, ``state.step`` ← step + 1.

    Returns ``state`` itself, unless a counter is the state class's shared default tensor (a state built
    by hand, not by ``init``): that tensor is never written, and a state with new counters is returned.
    """
    defaults = type(state)._field_defaults
    if state.log_likelihood is defaults["log_likelihood"] or state.step is defaults["step"]:
        return state._replace(log_likelihood=log_likelihood, step=state.step + 1)
    tree_insert_(state.log_likelihood, log_likelihood)
    tree_insert_(state.step, state.step + 1)
    return state
