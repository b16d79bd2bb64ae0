r"""Data-parallel diagonal EKF: the shards' gradient and Fisher means, weighted by their sizes.

:mod:`bayesflow.ekf.diag_fisher` reads a batch :math:`B` of n samples through three per-datum means
at the current mean μ — the gradient, the squared gradient and the log likelihood,

.. math::
    \bar g = \tfrac1n \textstyle\sum_{i∈B} g_i, \qquad
    \bar F = \tfrac1n \textstyle\sum_{i∈B} g_i^{\odot 2}, \qquad
    \bar\ell = \tfrac1n \textstyle\sum_{i∈B} \log p(b_i \mid μ),

then takes :math:`\sigma'^{-2} = (\sigma^2 + τ^2)^{-1} + ε\bar F`, :math:`μ' = μ + ε\,\sigma'^2 \odot \bar g`.
A mean over the concatenated shards is the size-weighted mean of the shards' means,
:math:`\bar g = \sum_r n_r \bar g_r / \sum_r n_r`, so each rank computes its shard's three means and
one all-reduce (weighted by :math:`n_r`, carried in the same buffer) gives every rank the whole
batch's: the update is the one-process update on :math:`∪_r B_r`, for shards of any sizes, and the
states stay identical across ranks. (The filter itself — predict, update — is
:mod:`bayesflow.ekf.diag_fisher`'s, written out again here after the reduction.)

Example (one process: ``ekf.diag_fisher`` itself):
    >>> import torch
    >>> from bayesflow.distributed import data_parallel_ekf
    >>> transform = data_parallel_ekf(lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([])), lr=2.0)
    >>> state, _ = transform.update(transform.init(torch.zeros(1)), torch.tensor([[1.0], [1.0]]))
    >>> state.params, state.sd_diag ** 2
    (tensor([0.6667]), tensor([0.3333]))
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import jacrev

from bayesflow.distributed.reduce import all_reduce_mean, world
from bayesflow.ekf import diag_fisher
from bayesflow.ekf._common import check_state, current_lr, per_sample_log_likelihood, ravel, write_counters
from bayesflow.tree import flatten
from bayesflow.tree_utils import tree_insert_
from bayesflow.types import LogProbFn, Schedule, TensorTree, Transform
from bayesflow.utils import CatchAuxError

__all__ = ["data_parallel_ekf"]


def data_parallel_ekf(log_likelihood: LogProbFn, lr: float | Schedule, transition_sd: float = 0.0,
                      per_sample: bool = False, init_sds: TensorTree | float = 1.0, group=None) -> Transform:
    r"""The data-parallel diagonal EKF (:func:`bayesflow.ekf.diag_fisher.build`'s arguments and state):
    ``update(state, batch_r)`` on each rank is the update of the whole batch :math:`∪_r B_r`.

    Args:
        log_likelihood, lr, transition_sd, per_sample, init_sds: as in :func:`bayesflow.ekf.diag_fisher.build`
            (``lr`` the inverse temperature of a whole batch: ε = total batch size is the Bayesian update).
        group: the process group of the data-parallel ranks (None: the default group, or one process).

    Returns:
        A :class:`~bayesflow.types.Transform` with ``diag_fisher``'s ``init`` and a reducing
        ``update(state, batch, inplace=False)``.

    Raises:
        TypeError / ValueError: the argument errors of ``diag_fisher.build``.
        CollectiveFailed: (from ``update``) the all-reduce failed: another rank raised, exited or timed out.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import data_parallel_ekf
        >>> from bayesflow.ekf import diag_fisher
        >>> ll = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
        >>> ours, theirs = data_parallel_ekf(ll, lr=3.0), diag_fisher.build(ll, lr=3.0)
        >>> batch = torch.tensor([[1.0], [2.0], [0.5]])
        >>> a, _ = ours.update(ours.init(torch.zeros(1)), batch)
        >>> b, _ = theirs.update(theirs.init(torch.zeros(1)), batch)
        >>> torch.allclose(a.params, b.params) and torch.allclose(a.sd_diag, b.sd_diag)
        True
    """
    transform = diag_fisher.build(log_likelihood, lr, transition_sd=transition_sd, per_sample=per_sample,
                                  init_sds=init_sds)
    values_and_aux = per_sample_log_likelihood(log_likelihood, per_sample)

    def jacobian_target(params, batch):
        values, aux = values_and_aux(params, batch)
        return values, (values, aux)

    def update(state, batch: Any, inplace: bool = False):
        if world(group)[1] == 1:
            return transform.update(state, batch, inplace=inplace)
        check_state(state, diag_fisher.EKFDiagState, "diag_fisher")
        epsilon = current_lr(lr, state.step)
        with torch.no_grad(), CatchAuxError():
            jac, (log_liks, aux) = jacrev(jacobian_target, has_aux=True)(state.params, batch)
            mu, unravel = ravel(state.params)
            sd, unravel_sd = ravel(state.sd_diag)
            n = log_liks.shape[0]
            per_sample_grads = torch.cat([leaf.reshape(n, -1) for leaf in flatten(jac)[0]], dim=1)  # (n_r, d)
            grad, fisher_diag, log_likelihood_value = all_reduce_mean(
                [per_sample_grads.mean(0), per_sample_grads.square().mean(0), log_liks.mean().to(mu.dtype)],
                group, weight=n, what=f"EKF statistics all-reduce of step {int(state.step)}")
            predict_var = sd.square() + transition_sd ** 2
            new_var = 1.0 / (1.0 / predict_var + epsilon * fisher_diag)
            new_mean = mu + epsilon * new_var * grad
            new_sd = new_var.sqrt()
        if inplace:
            tree_insert_(state.params, unravel(new_mean))
            tree_insert_(state.sd_diag, unravel_sd(new_sd))
            return write_counters(state, log_likelihood_value), aux
        return diag_fisher.EKFDiagState(unravel(new_mean), unravel_sd(new_sd), log_likelihood_value,
                                        state.step + 1), aux

    return transform._replace(update=update)
