r"""Data-parallel EKF (diagonal and dense): the shards' gradient and curvature means, weighted by size.

:mod:`bayesflow.ekf.diag_fisher` and :mod:`bayesflow.ekf.dense_fisher` read a batch :math:`B` of n
samples through three per-datum means at the current mean μ — the gradient, the curvature (the
squared gradient, the empirical Fisher matrix or the negative Hessian) and the log likelihood,

.. math::
    \bar g = \tfrac1n \textstyle\sum_{i∈B} g_i, \qquad
    \bar F = \tfrac1n \textstyle\sum_{i∈B} F_i, \qquad
    \bar\ell = \tfrac1n \textstyle\sum_{i∈B} \log p(b_i \mid μ),

then apply the filter's update to them. A mean over the concatenated shards is the size-weighted mean
of the shards' means, :math:`\bar g = \sum_r n_r \bar g_r / \sum_r n_r`, so each rank computes its
shard's three means, and one all-reduce (weighted by :math:`n_r`, carried in the same buffer) hands
every rank the whole batch's before the method's own update applies them (its ``reduce`` hook): the
update is the one-process update on :math:`∪_r B_r`, for shards of any sizes, and the states stay
identical across ranks.

Example (one process: the transform itself):
    >>> import torch
    >>> from bayesflow.distributed import data_parallel_ekf
    >>> from bayesflow.ekf import diag_fisher
    >>> ll = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
    >>> transform = data_parallel_ekf(diag_fisher.build(ll, lr=2.0))
    >>> state, _ = transform.update(transform.init(torch.zeros(1)), torch.tensor([[1.0], [1.0]]))
    >>> state.params, state.sd_diag ** 2
    (tensor([0.6667]), tensor([0.3333]))
"""

from __future__ import annotations

from functools import partial
from typing import Any

from bayesflow.distributed.reduce import all_reduce_mean, world
from bayesflow.ekf import dense_fisher, diag_fisher
from bayesflow.types import Transform

__all__ = ["data_parallel_ekf"]

_UPDATES = (diag_fisher.update, dense_fisher.update)


def data_parallel_ekf(transform: Transform, group=None) -> Transform:
    r"""The data-parallel version of an EKF transform (``ekf.diag_fisher.build`` or
    ``ekf.dense_fisher.build``): ``update(state, batch_r)`` on each rank is the update of the whole
    batch :math:`∪_r B_r` (see the module docstring).

    Args:
        transform: the transform of ``bayesflow.ekf.diag_fisher.build(...)`` or
            ``bayesflow.ekf.dense_fisher.build(...)`` (``lr`` the inverse temperature of a whole batch:
            ε = the total batch size is the Bayesian update).
        group: the process group of the data-parallel ranks (None: the default group, or one process).

    Returns:
        A :class:`~bayesflow.types.Transform` with the same ``init`` and a reducing
        ``update(state, batch, inplace=False)``.

    Raises:
        TypeError: ``transform`` is not an EKF transform of this package.
        CollectiveFailed: (from ``update``) the all-reduce failed: another rank raised, exited or timed out.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import data_parallel_ekf
        >>> from bayesflow.ekf import dense_fisher
        >>> ll = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
        >>> ours, theirs = data_parallel_ekf(dense_fisher.build(ll, lr=3.0)), dense_fisher.build(ll, lr=3.0)
        >>> batch = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.5, 0.5]])
        >>> a, _ = ours.update(ours.init(torch.zeros(2)), batch)
        >>> b, _ = theirs.update(theirs.init(torch.zeros(2)), batch)
        >>> torch.allclose(a.params, b.params) and torch.allclose(a.cov, b.cov)
        True
    """
    update = transform.update
    if not isinstance(update, partial) or update.func not in _UPDATES:
        raise TypeError(f"data_parallel_ekf takes the transform of bayesflow.ekf.diag_fisher.build or "
                        f"dense_fisher.build, got one whose update is {update!r}")

    def reduce(statistics, n, step):
        return all_reduce_mean(statistics, group, weight=n, what=f"EKF statistics all-reduce of step {step}")

    def reducing_update(state, batch: Any, inplace: bool = False):
        if world(group)[1] == 1:
            return update(state, batch, inplace=inplace)
        return update(state, batch, inplace=inplace, reduce=reduce)

    return transform._replace(update=reducing_update)
