r"""Dense Hessian Laplace approximation (posteriors' ``laplace.dense_hessian``).

Around parameters :math:`\mu` (a MAP estimate) the posterior is approximated by :math:`N(\mu, P^{-1})`
with the Hessian of the negative log posterior summed over batches,

.. math::
    P = P_0 + \sum_b \Big( r\, \big(-\nabla_\theta^2 \log p(\theta \mid B_b)\big|_{\theta=\mu}\big) + \epsilon I \Big),

a ``(d, d)`` matrix over the ravelled parameters, taken by forward-over-reverse differentiation
(``jacfwd(jacrev)``) of the scalar log posterior, and symmetrised (round-off leaves it asymmetric).
At a MAP of a log-concave posterior it is the exact Laplace precision; elsewhere it need not be
positive definite, hence ``epsilon`` (a jitter) and ``rescale`` :math:`r` (e.g. the batch's share of
the data when the log posterior is scaled to the whole data set).

Example:
    >>> import torch
    >>> from bayesflow.laplace import dense_hessian
    >>> def log_posterior(params, batch):   # a Gaussian N(0, A⁻¹): the Hessian is -A everywhere
    ...     A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    ...     return -0.5 * params @ A @ params, torch.tensor([])
    >>> transform = dense_hessian.build(log_posterior)
    >>> state, aux = transform.update(transform.init(torch.ones(2)), None)
    >>> state.prec
    tensor([[2., 1.],
            [1., 3.]])
"""

from __future__ import annotations

import math
from functools import partial
from numbers import Real
from typing import Any

import torch
from torch.func import jacfwd, jacrev

from bayesflow.engine.validation import check_bool
from bayesflow.laplace._common import (
    DenseLaplaceState,
    add_dense,
    check_callable,
    check_scalar_precision,
    differentiated,
    init_dense,
    param_leaves,
    ravel,
    scalar_value,
    split_output,
    unraveller,
)
from bayesflow.laplace.sampling import dense_sample as sample
from bayesflow.types import LogProbFn, TensorTree, Transform
from bayesflow.utils import CatchAuxError

__all__ = ["DenseLaplaceState", "build", "init", "sample", "update"]


def _finite(name: str, value: Any, *, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or (
            non_negative and value < 0):
        raise ValueError(f"{name} must be a finite{' non-negative' if non_negative else ''} number, "
                         f"got {value!r}")
    return float(value)


def build(log_posterior: LogProbFn, init_prec: torch.Tensor | float = 0.0, epsilon: float = 0.0,
          rescale: float = 1.0) -> Transform:
    r"""The dense Hessian Laplace transform: ``init(params)`` and ``update(state, batch, inplace)``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)`` with a scalar value.
        init_prec: :math:`P_0`: a non-negative number :math:`c` (:math:`c I`) or a symmetric positive
            semi-definite ``(d, d)`` tensor (checked here: a TypeError for another type, a ValueError for
            NaN, infinite or negative values; the shape and definiteness are checked at ``init``).
        epsilon: :math:`\epsilon \ge 0`, added to the diagonal of every batch's term.
        rescale: :math:`r`, multiplying every batch's Hessian.

    Returns:
        A :class:`~bayesflow.types.Transform` of :func:`init` and :func:`update` with these arguments
        (``update`` also takes ``epsilon=`` and ``rescale=`` to override them for one call).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_hessian
        >>> transform = dense_hessian.build(lambda p, b: (-(p**4).sum(), torch.tensor([])), epsilon=0.5)
        >>> state, _ = transform.update(transform.init(torch.tensor([1.0, 0.0])), None)
        >>> state.prec   # diag(12 θ²) + ε I
        tensor([[12.5000,  0.0000],
                [ 0.0000,  0.5000]])
    """
    check_callable("log_posterior", log_posterior)
    check_scalar_precision("init_prec", init_prec)
    epsilon = _finite("epsilon", epsilon, non_negative=True)
    return Transform(partial(init, init_prec=init_prec),
                     partial(update, log_posterior=log_posterior, epsilon=epsilon, rescale=_finite("rescale", rescale)))


def init(params: TensorTree, init_prec: torch.Tensor | float = 0.0) -> DenseLaplaceState:
    r"""The initial state: ``params`` (kept, not copied), ``prec`` :math:`P_0` and ``step`` 0.

    Args:
        params: :math:`\mu`, a tree of floating-point tensors (``d`` entries in all).
        init_prec: a non-negative number :math:`c` (then :math:`P_0 = c I`, made on the parameters'
            device) or a symmetric positive semi-definite ``(d, d)`` tensor (copied into the state).

    Raises:
        ValueError: a negative number, a tensor of another shape, or one that is not symmetric PSD.
        ValueError: ``params`` holds NaN or ±inf (the message names the leaf).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_hessian
        >>> dense_hessian.init(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
        Traceback (most recent call last):
            ...
        ValueError: init_prec must be positive semi-definite, but has the eigenvalue -1
    """
    return init_dense(params, init_prec)


def update(state: DenseLaplaceState, batch: Any, log_posterior: LogProbFn, epsilon: float = 0.0,
           rescale: float = 1.0, inplace: bool = False) -> tuple[DenseLaplaceState, Any]:
    r"""Adds :math:`-r \nabla_\theta^2 \log p(\theta \mid B) + \epsilon I` at ``params`` to the precision.

    Args:
        state: the current state (its ``params`` are where the Hessian is taken; they do not move).
        batch: the batch passed to ``log_posterior``.
        log_posterior: as in :func:`build`.
        epsilon: :math:`\epsilon \ge 0`, added to the diagonal.
        rescale: :math:`r`, multiplying the Hessian.
        inplace: add into the state's own ``prec`` and ``step`` tensors (and return the same state)
            instead of returning a new state.

    Returns:
        ``(state, aux)``, aux the log posterior's aux output.

    Raises:
        TypeError / ValueError: ``log_posterior`` returns no ``(value, aux)`` tuple or a non-scalar value.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_hessian
        >>> log_posterior = lambda p, b: (-0.5 * b * (p["a"] ** 2 + p["b"].square().sum()), torch.tensor([]))
        >>> state = dense_hessian.init({"a": torch.zeros(()), "b": torch.zeros(1)})
        >>> state, _ = dense_hessian.update(state, 3.0, log_posterior, rescale=0.5)
        >>> state.prec
        tensor([[1.5000, 0.0000],
                [0.0000, 1.5000]])
    """
    check_bool(inplace, "inplace")
    epsilon = _finite("epsilon", epsilon, non_negative=True)
    rescale = _finite("rescale", rescale)
    leaves, spec = param_leaves("update", state.params)
    unravel = unraveller(leaves, spec)

    def negative_log_posterior(flat: torch.Tensor) -> tuple[torch.Tensor, Any]:
        value, aux = split_output("log_posterior", log_posterior(unravel(flat), batch))
        return -differentiated("log_posterior's value", scalar_value("log_posterior", value)), aux

    with torch.no_grad(), CatchAuxError():
        hessian, aux = jacfwd(jacrev(negative_log_posterior, has_aux=True), has_aux=True)(ravel(leaves))
        hessian = (hessian + hessian.mT) * (0.5 * rescale)
        if epsilon:
            hessian.diagonal().add_(epsilon)
    return add_dense(state, hessian.to(state.prec.dtype), inplace), aux
