r"""Functional plumbing: modules as functions of their parameters, per-sample maps, aux-output errors.

posteriors' (normal-computing/posteriors) ``CatchAuxError``, ``model_to_function``, ``per_samplify`` and
``is_scalar``, with the same names, signatures and return conventions. They turn ``torch.nn`` code into
the pure functions of a parameter tree that ``torch.func`` transforms (and every bayesflow method) take.

Example:
    >>> import torch
    >>> from bayesflow.utils import model_to_function, per_samplify
    >>> model = torch.nn.Linear(2, 1)
    >>> f = model_to_function(model)  # f(params, x) = model(x) with params in place of the module's
    >>> params = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([0.5])}
    >>> def mean_output(p, batch):  # a batch-averaged statistic ...
    ...     return f(p, batch).mean()
    >>> per_samplify(mean_output)(params, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))  # ... one value per sample
    tensor([3.5000, 2.5000])
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call

from bayesflow.tree import batch_leaves, tree_map
from bayesflow.types import TensorTree

__all__ = ["NON_TENSOR_AUX_ERROR_MSG", "NO_AUX_ERROR_MSG", "CatchAuxError", "is_scalar", "model_to_function",
           "per_samplify"]

NO_AUX_ERROR_MSG = "should be a tuple: (output, aux) if has_aux is True"
"""The part of torch.func's error message when a ``has_aux=True`` function returns no ``(output, aux)``."""

NON_TENSOR_AUX_ERROR_MSG = "Expected tensors, got unsupported type"
"""The part of torch.func's error message when the aux output holds something other than tensors."""

_HINT = ("If there is no auxiliary information, return an empty tensor as aux, e.g. "
         "log_posterior(params, batch) -> (value, torch.tensor([])).")


class CatchAuxError(contextlib.AbstractContextManager):
    r"""Context manager that rewords torch.func's errors about a missing or non-tensor ``aux`` output.

    Every ``torch.func`` transform called with ``has_aux=True`` (``grad``, ``jvp``, ``vjp``, ``jacrev``, ...)
    needs :math:`f(\theta, \ldots) = (\text{output}, \text{aux})` with ``aux`` a tree of tensors. Inside the
    block, the error torch.func raises when ``f`` returns no tuple (its message contains
    :data:`NO_AUX_ERROR_MSG`) becomes ``RuntimeError("Auxiliary output not found ...")`` and the error
    for an ``aux`` holding e.g. ``None`` (:data:`NON_TENSOR_AUX_ERROR_MSG`) becomes
    ``RuntimeError("Auxiliary output should be a TensorTree ...")``; both say what was expected and keep
    torch's error as their cause. Other exceptions pass through unchanged. (``RuntimeError``, not
    ``TypeError``, as in posteriors: code written for posteriors catches that.)

    Example:
        >>> import torch
        >>> from bayesflow.utils import CatchAuxError
        >>> try:
        ...     with CatchAuxError():
        ...         torch.func.grad(lambda x: (x**2, None), has_aux=True)(torch.tensor(1.0))
        ... except RuntimeError as error:
        ...     print(str(error).splitlines()[0])
        Auxiliary output should be a TensorTree, got unsupported type <class 'NoneType'>.
        >>> with CatchAuxError():  # a tensor aux is fine
        ...     torch.func.grad(lambda x: (x**2, torch.tensor([])), has_aux=True)(torch.tensor(3.0))
        (tensor(6.), tensor([]))
    """

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        if exc_value is None:
            return False
        message = str(exc_value)
        if NO_AUX_ERROR_MSG in message:
            raise RuntimeError(
                "Auxiliary output not found: with has_aux=True the function must return a tuple "
                f"(output, aux). Perhaps you have forgotten to return the aux output?\n\t{_HINT}\n"
                f"\t(torch.func: {message})"
            ) from exc_value
        if NON_TENSOR_AUX_ERROR_MSG in message:
            got = message[message.index(NON_TENSOR_AUX_ERROR_MSG) + len("Expected tensors, "):]
            raise RuntimeError(
                f"Auxiliary output should be a TensorTree, {got}.\n\tIt must be a tensor or a tree of tensors. "
                f"{_HINT}"
            ) from exc_value
        return False


def model_to_function(model: torch.nn.Module) -> Callable[..., Any]:
    r"""The module as a pure function of its parameters: :math:`f(\theta, \ldots) = \mathrm{model}_\theta(\ldots)`.

    ``f(params, *args, **kwargs)`` runs ``model(*args, **kwargs)`` with the tensors of the dict
    ``params`` (names as in ``model.named_parameters()``; missing names keep the module's own tensors)
    in place of the module's, via ``torch.func.functional_call``; the module is left unchanged.

    Args:
        model: a ``torch.nn.Module``.

    Returns:
        ``f(params, *args, **kwargs)``, returning whatever ``model`` returns.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.

    Example:
        >>> import torch
        >>> from bayesflow.utils import model_to_function
        >>> model = torch.nn.Linear(2, 1)
        >>> f = model_to_function(model)
        >>> f({"weight": torch.tensor([[1.0, -1.0]]), "bias": torch.tensor([2.0])}, torch.tensor([[3.0, 1.0]]))
        tensor([[4.]])
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_to_function expects a torch.nn.Module, got {type(model).__name__}")

    def func_model(params: TensorTree, *args: Any, **kwargs: Any) -> Any:
        return functional_call(model, params, args, kwargs)

    return func_model


def per_samplify(f: Callable[[TensorTree, TensorTree], Any]) -> Callable[[TensorTree, TensorTree], Any]:
    r"""Turn a batch statistic :math:`f(\theta, B)` into the per-sample map :math:`i \mapsto f(\theta, \{b_i\})`.

    ``per_samplify(f)(params, batch)[i] = f(params, batch_i)`` with ``batch_i`` the ``i``-th sample of
    every leaf of ``batch`` kept as a batch of one (leading dimension 1), computed at once with
    ``torch.vmap(..., in_dims=(None, 0))``. With ``f`` a batch-mean log likelihood this gives the
    per-sample log likelihoods that :func:`~bayesflow.utils.empirical_fisher` differentiates.

    Args:
        f: ``f(params, batch)``, whose output does not depend on the batch size (e.g. a mean over it).

    Returns:
        ``f_per_sample(params, batch)`` (``batch`` may also be passed by keyword), whose outputs gain a
        leading dimension of the batch size.

    Raises:
        TypeError: ``f`` is not callable.
        TypeError / ValueError: (when called) ``batch`` holds no tensor or a leaf that is not one, a 0-dim
            tensor, or tensors of different leading sizes: there is no batch dimension to map over.

    Example:
        >>> import torch
        >>> from bayesflow.utils import per_samplify
        >>> def f(params, batch):  # mean squared error of a scale model
        ...     return ((batch[:, 1] - params * batch[:, 0]) ** 2).mean()
        >>> batch = torch.tensor([[1.0, 1.0], [2.0, 0.0], [1.0, 3.0]])
        >>> per_samplify(f)(torch.tensor(2.0), batch), f(torch.tensor(2.0), batch)
        (tensor([ 1., 16.,  1.]), tensor(6.))
    """
    if not callable(f):
        raise TypeError(f"per_samplify expects a function f(params, batch), got {type(f).__name__}")

    def on_one_sample(params: TensorTree, sample: TensorTree) -> Any:
        return f(params, tree_map(lambda leaf: leaf.unsqueeze(0), sample))

    on_each_sample = torch.vmap(on_one_sample, in_dims=(None, 0))

    @functools.wraps(f)
    def f_per_sample(params: TensorTree, batch: TensorTree) -> Any:
        batch_leaves(batch, what="the batch of a per-sample map")
        return on_each_sample(params, batch)  # positional: vmap's in_dims do not cover keywords

    return f_per_sample


def is_scalar(x: Any) -> bool:
    r"""Whether ``x`` is a single number: a Python ``int``/``float``/``bool`` or a tensor with one element.

    :math:`\mathrm{is\_scalar}(x) \iff x \in \{\text{int}, \text{float}\} \lor \mathrm{numel}(x) = 1`
    (so ``torch.ones(1, 1)`` is a scalar and ``torch.ones(2)`` is not).

    Args:
        x: any object.

    Returns:
        ``True`` or ``False``.

    Example:
        >>> import torch
        >>> from bayesflow.utils import is_scalar
        >>> is_scalar(1), is_scalar(0.5), is_scalar(torch.ones(1, 1)), is_scalar(torch.ones(2)), is_scalar("1")
        (True, True, True, False, False)
    """
    return isinstance(x, (int, float)) or (isinstance(x, torch.Tensor) and x.numel() == 1)
