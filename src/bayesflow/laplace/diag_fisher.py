r"""Diagonal empirical-Fisher Laplace approximation (posteriors' ``laplace.diag_fisher``).

Around parameters :math:`\mu` (a MAP estimate) the posterior is approximated by
:math:`N(\mu, \mathrm{diag}(p)^{-1})` with the diagonal of the empirical Fisher summed over batches,

.. math::
    p = p_0 + \sum_i \big(\nabla_\theta \log p(y_i, \theta \mid x_i)\big|_{\theta=\mu}\big)^{2},

the square taken entry-wise and :math:`i` running over every sample seen (Martens, 2020; Daxberger et
al., 2021). With ``per_sample=False`` the log posterior returns one scalar for a batch and is called
on one sample at a time: the per-sample gradients are ``vmap(grad)`` (:func:`bayesflow.utils.per_samplify`
of the gradient), one backward pass per sample. With ``per_sample=True`` it returns one value per
sample, and the per-sample gradients are its Jacobian (``torch.func.jacrev``: one backward pass of the
whole batch per sample, so prefer ``per_sample=False`` where the function vmaps).

For an ``nn.Module`` model :func:`build_for_module` gives the same precision for its ``torch.nn.Linear``
layers from one forward and one backward pass (:mod:`bayesflow.laplace.module_diag`): use it where the
log posterior is a module's log likelihood.

Example:
    >>> import torch
    >>> from bayesflow.laplace import diag_fisher
    >>> def log_posterior(params, batch):  # one scalar per batch: a Gaussian likelihood of a line
    ...     x, y = batch
    ...     return -0.5 * ((y - x * params["w"]) ** 2).sum(), torch.tensor([])
    >>> transform = diag_fisher.build(log_posterior, init_prec_diag=1.0)
    >>> state = transform.init({"w": torch.tensor([1.0])})
    >>> x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [2.0]])
    >>> state, aux = transform.update(state, (x, y))   # p = 1 + Σ_i (x_i (y_i - x_i w))²
    >>> state.prec_diag, int(state.step)
    ({'w': tensor([2.])}, 1)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.func import grad, jacrev

from bayesflow.engine.validation import check_bool
from bayesflow.laplace._common import (
    DiagLaplaceState,
    add_diag,
    check_callable,
    check_scalar_precision,
    differentiated,
    init_diag,
    scalar_value,
    split_output,
    vector_value,
)
from bayesflow.laplace.module_diag import build_fisher_for_module as build_for_module
from bayesflow.laplace.sampling import diag_sample as sample
from bayesflow.tree import tree_map
from bayesflow.types import LogProbFn, TensorTree, Transform
from bayesflow.utils import CatchAuxError, per_samplify

__all__ = ["DiagLaplaceState", "build", "build_for_module", "init", "per_sample_scores", "sample", "update"]

_ONE_SAMPLE_HINT = ("; with per_sample=False it is called on one sample at a time and must return the log "
                    "posterior of that sample as one number (pass per_sample=True if it returns a vector of "
                    "per-sample values)")


def build(log_posterior: LogProbFn, per_sample: bool = False, init_prec_diag: TensorTree | float = 0.0,
          ) -> Transform:
    """The diagonal empirical-Fisher Laplace transform: ``init(params)`` and ``update(state, batch, inplace)``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``: a scalar value for the batch, or
            with ``per_sample=True`` a vector of one value per sample.
        per_sample: whether ``log_posterior`` already returns per-sample values.
        init_prec_diag: :math:`p_0`, a non-negative number or a tree shaped like (broadcasting to) params of
            non-negative numbers and tensors (checked here: a TypeError for another type, a ValueError for
            NaN, infinite or negative values; the shapes are checked at ``init``).

    Returns:
        A :class:`~bayesflow.types.Transform` of :func:`init` and :func:`update` with these arguments.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_fisher
        >>> transform = diag_fisher.build(lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([])))
        >>> state, _ = transform.update(transform.init(torch.zeros(2)), torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
        >>> state.prec_diag   # Σ_i (b_i - θ)²
        tensor([10.,  4.])
    """
    check_bool(per_sample, "per_sample")
    check_callable("log_posterior", log_posterior)
    check_scalar_precision("init_prec_diag", init_prec_diag)
    return Transform(partial(init, init_prec_diag=init_prec_diag),
                     partial(update, log_posterior=log_posterior, per_sample=per_sample))


def init(params: TensorTree, init_prec_diag: TensorTree | float = 0.0) -> DiagLaplaceState:
    """The initial state: ``params`` (kept, not copied), ``prec_diag`` :math:`p_0` and ``step`` 0.

    Args:
        params: :math:`\\mu`, a tree of floating-point tensors.
        init_prec_diag: a non-negative number, or a tree with params' structure whose leaves broadcast
            to the parameters' shapes (copied into the state, in each parameter's dtype and on its device).

    Raises:
        ValueError: a negative or non-finite precision, or a tree that does not match params.
        ValueError: ``params`` holds NaN or ±inf (the message names the leaf).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_fisher
        >>> params = {"a": torch.zeros(2), "b": torch.zeros(())}
        >>> state = diag_fisher.init(params, {"a": torch.tensor([1.0, 2.0]), "b": 3.0})
        >>> state.prec_diag, state.step
        ({'a': tensor([1., 2.]), 'b': tensor(3.)}, tensor(0))
    """
    return init_diag(params, init_prec_diag)


def per_sample_scores(log_posterior: LogProbFn, params: TensorTree, batch: Any,
                      per_sample: bool = False) -> tuple[TensorTree, Any]:
    r"""The per-sample scores :math:`\nabla_\theta \log p(y_i, \theta \mid x_i)`, leaves ``(n, *leaf.shape)``.

    ``per_sample=False``: :func:`bayesflow.utils.per_samplify` of ``torch.func.grad`` (the scalar log
    posterior of each sample, differentiated once per sample). ``per_sample=True``: ``torch.func.jacrev``
    of the per-sample vector. The aux output is the per-sample function's (stacked over samples with
    ``per_sample=False``, as in posteriors).

    Example:
        >>> import torch
        >>> from bayesflow.laplace.diag_fisher import per_sample_scores
        >>> scores, aux = per_sample_scores(lambda p, b: ((b * p).sum(), torch.tensor([])), torch.ones(2),
        ...                                 torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> scores
        tensor([[1., 2.],
                [3., 4.]])
    """
    if per_sample:
        def vector(p: TensorTree) -> tuple[torch.Tensor, Any]:
            value, aux = split_output("log_posterior", log_posterior(p, batch))
            return differentiated("log_posterior's value", vector_value("log_posterior", value)), aux

        return jacrev(vector, has_aux=True)(params)

    def scalar(p: TensorTree, sample: Any) -> tuple[torch.Tensor, Any]:
        value, aux = split_output("log_posterior", log_posterior(p, sample))
        return differentiated("log_posterior's value", scalar_value("log_posterior", value, _ONE_SAMPLE_HINT)), aux

    return per_samplify(grad(scalar, has_aux=True))(params, batch)


def update(state: DiagLaplaceState, batch: Any, log_posterior: LogProbFn, per_sample: bool = False,
           inplace: bool = False) -> tuple[DiagLaplaceState, Any]:
    r"""Adds the batch's diagonal empirical Fisher :math:`\sum_{i \in B} (\nabla_\theta \log p_i)^2` at ``params``.

    Args:
        state: the current state (its ``params`` are where the scores are taken; they do not move).
        batch: the batch passed to ``log_posterior`` (every leaf with the samples along dimension 0).
        log_posterior: as in :func:`build`.
        per_sample: as in :func:`build`.
        inplace: add into the state's own ``prec_diag`` and ``step`` tensors (and return the same state)
            instead of returning a new state.

    Returns:
        ``(state, aux)``, aux the per-sample aux output.

    Raises:
        TypeError / ValueError: ``log_posterior`` returns no ``(value, aux)`` tuple, or a value that is
            not a scalar (``per_sample=False``) or not a vector (``per_sample=True``).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_fisher
        >>> log_posterior = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
        >>> state = diag_fisher.init(torch.zeros(1))
        >>> state, _ = diag_fisher.update(state, torch.tensor([[1.0]]), log_posterior, inplace=True)
        >>> state, _ = diag_fisher.update(state, torch.tensor([[2.0]]), log_posterior, inplace=True)
        >>> state.prec_diag, state.step
        (tensor([5.]), tensor(2))
    """
    check_bool(inplace, "inplace")
    check_bool(per_sample, "per_sample")
    with torch.no_grad(), CatchAuxError():
        scores, aux = per_sample_scores(log_posterior, state.params, batch, per_sample)
        increment = tree_map(lambda score: score.square().sum(0), scores)
    return add_diag(state, increment, inplace), aux
