r"""Dense empirical-Fisher Laplace approximation (posteriors' ``laplace.dense_fisher``).

Around parameters :math:`\mu` (a MAP estimate) the posterior is approximated by :math:`N(\mu, P^{-1})`
with the empirical Fisher summed over batches,

.. math::
    P = P_0 + \sum_i g_i g_i^\top, \qquad g_i = \nabla_\theta \log p(y_i, \theta \mid x_i)\big|_{\theta=\mu},

a ``(d, d)`` matrix over the ravelled parameters (Martens, 2020; Daxberger et al., 2021). With
``per_sample=False`` the scores :math:`g_i` are ``vmap(grad)`` of the one-sample log posterior and
:math:`P` gains :math:`J^\top J` (:math:`J` the ``(n, d)`` matrix of scores); with ``per_sample=True``
:math:`J^\top J` is :func:`bayesflow.utils.empirical_fisher` of the per-sample vector. Parameters may be
any tree with leaves of any shape; :func:`sample` draws trees of the same structure.

Example:
    >>> import torch
    >>> from bayesflow.laplace import dense_fisher
    >>> def log_posterior(params, batch):   # a line through the origin, two parameters
    ...     x, y = batch
    ...     return -0.5 * ((y - x @ params) ** 2).sum(), torch.tensor([])
    >>> transform = dense_fisher.build(log_posterior, init_prec=1.0)
    >>> state = transform.init(torch.zeros(2))
    >>> x, y = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([1.0, 2.0])
    >>> state, aux = transform.update(state, (x, y))   # I + Σ_i y_i² x_i x_iᵀ
    >>> state.prec
    tensor([[6., 4.],
            [4., 5.]])
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from bayesflow.engine.validation import check_bool
from bayesflow.laplace._common import (
    DenseLaplaceState,
    add_dense,
    check_callable,
    check_scalar_precision,
    differentiated,
    init_dense,
    per_sample_gram,
    split_output,
    vector_value,
)
from bayesflow.laplace.diag_fisher import per_sample_scores
from bayesflow.laplace.sampling import dense_sample as sample
from bayesflow.types import LogProbFn, TensorTree, Transform
from bayesflow.utils import CatchAuxError, empirical_fisher

__all__ = ["DenseLaplaceState", "build", "init", "sample", "update"]


def build(log_posterior: LogProbFn, per_sample: bool = False, init_prec: torch.Tensor | float = 0.0) -> Transform:
    """The dense empirical-Fisher Laplace transform: ``init(params)`` and ``update(state, batch, inplace)``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``: a scalar value for the batch, or
            with ``per_sample=True`` a vector of one value per sample.
        per_sample: whether ``log_posterior`` already returns per-sample values.
        init_prec: :math:`P_0`: a non-negative number :math:`c` (:math:`c I`) or a symmetric positive
            semi-definite ``(d, d)`` tensor (checked here: a TypeError for another type, a ValueError for
            NaN, infinite or negative values; the shape and definiteness are checked at ``init``).

    Returns:
        A :class:`~bayesflow.types.Transform` of :func:`init` and :func:`update` with these arguments.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_fisher
        >>> transform = dense_fisher.build(lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([])))
        >>> state, _ = transform.update(transform.init(torch.zeros(2)), torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
        >>> state.prec   # Σ_i b_i b_iᵀ at θ = 0
        tensor([[10.,  2.],
                [ 2.,  4.]])
    """
    check_bool(per_sample, "per_sample")
    check_callable("log_posterior", log_posterior)
    check_scalar_precision("init_prec", init_prec)
    return Transform(partial(init, init_prec=init_prec),
                     partial(update, log_posterior=log_posterior, per_sample=per_sample))


def init(params: TensorTree, init_prec: torch.Tensor | float = 0.0) -> DenseLaplaceState:
    r"""The initial state: ``params`` (kept, not copied), ``prec`` :math:`P_0` and ``step`` 0.

    Args:
        params: :math:`\mu`, a tree of floating-point tensors (``d`` entries in all).
        init_prec: a non-negative number :math:`c` (then :math:`P_0 = c I`, made on the parameters'
            device) or a symmetric positive semi-definite ``(d, d)`` tensor (copied into the state).
            The precision takes the parameters' promoted dtype and the first leaf's device.

    Raises:
        ValueError: a negative number, a tensor of another shape, or one that is not symmetric PSD.
        ValueError: ``params`` holds NaN or ±inf (the message names the leaf).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_fisher
        >>> dense_fisher.init({"w": torch.zeros(1, 2), "b": torch.zeros(())}, init_prec=2.0).prec
        tensor([[2., 0., 0.],
                [0., 2., 0.],
                [0., 0., 2.]])
    """
    return init_dense(params, init_prec)


def update(state: DenseLaplaceState, batch: Any, log_posterior: LogProbFn, per_sample: bool = False,
           inplace: bool = False) -> tuple[DenseLaplaceState, Any]:
    r"""Adds the batch's empirical Fisher :math:`\sum_{i \in B} g_i g_i^\top` (scores at ``params``).

    Args:
        state: the current state (its ``params`` are where the scores are taken; they do not move).
        batch: the batch passed to ``log_posterior`` (every leaf with the samples along dimension 0).
        log_posterior: as in :func:`build`.
        per_sample: as in :func:`build`.
        inplace: add into the state's own ``prec`` and ``step`` tensors (and return the same state)
            instead of returning a new state.

    Returns:
        ``(state, aux)``, aux the per-sample aux output.

    Raises:
        TypeError / ValueError: ``log_posterior`` returns no ``(value, aux)`` tuple, or a value that is
            not a scalar (``per_sample=False``) or not a vector (``per_sample=True``).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_fisher
        >>> log_posterior = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
        >>> state = dense_fisher.init(torch.zeros(2))
        >>> state, _ = dense_fisher.update(state, torch.tensor([[1.0, 1.0]]), log_posterior, inplace=True)
        >>> state.prec, state.step
        (tensor([[1., 1.],
                [1., 1.]]), tensor(1))
    """
    check_bool(inplace, "inplace")
    check_bool(per_sample, "per_sample")
    with torch.no_grad(), CatchAuxError():
        if per_sample:
            def vector(p: TensorTree) -> tuple[torch.Tensor, Any]:
                value, aux = split_output("log_posterior", log_posterior(p, batch))
                return differentiated("log_posterior's value", vector_value("log_posterior", value)), aux

            fisher, aux = empirical_fisher(vector, has_aux=True)(state.params)
        else:
            scores, aux = per_sample_scores(log_posterior, state.params, batch, per_sample=False)
            fisher = per_sample_gram(scores)
    return add_dense(state, fisher.to(state.prec.dtype), inplace), aux
