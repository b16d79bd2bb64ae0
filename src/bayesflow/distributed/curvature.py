r"""Data-parallel Laplace curvature: each rank accumulates its shard, the ranks' increments are summed.

A Laplace precision is a sum over the data, :math:`P = P_0 + \sum_b C(\mu; B_b)` with
:math:`C(\mu; B) = \sum_{i \in B} c_i` (:mod:`bayesflow.laplace`: squared scores, GGN, Hessian of a
log posterior summed over the batch), so a batch split into shards :math:`B = ∪_r B_r` adds

.. math::
    C(\mu; B) = \sum_{r=1}^{R} C(\mu; B_r),

whatever the shard sizes: every rank computes its shard's increment (the method's own ``update`` on
a copy of the state with a zero precision), one all-reduce sums them, and every rank adds the sum —
the state is the one-process state on the concatenated batch, on every rank, and ``step`` counts
one batch. KFAC keeps running *means* :math:`A = \frac1N\sum_n \tilde a_n\tilde a_n^\top` (and G)
with the count N: each rank's shard mean :math:`A_r` over its :math:`m_r` rows is weighted back into
the sum, :math:`A \leftarrow (N A + \sum_r m_r A_r) / (N + \sum_r m_r)`. (KFAC's
``fisher_type="mc"`` draws its label noise from the state's key per rank: every rank draws the same
noise for different data, a valid Monte-Carlo estimate but not the one-process draw; ``"ggn"`` and
``"empirical"`` are exact.) Low-rank states keep the top eigenvectors of the sum, which is not a sum
of the shards' top eigenvectors: they are refused.

Example (one process: the transform itself):
    >>> import torch
    >>> from bayesflow.distributed import data_parallel_laplace
    >>> from bayesflow.laplace import diag_fisher
    >>> transform = data_parallel_laplace(diag_fisher.build(lambda p, b: (-0.5 * ((b - p) ** 2).sum(),
    ...                                                                   torch.tensor([]))))
    >>> state, _ = transform.update(transform.init(torch.zeros(2)), torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    >>> state.prec_diag   # Σ_i (b_i - θ)², from every rank's rows
    tensor([10.,  4.])
"""

from __future__ import annotations

import torch

from bayesflow.distributed.reduce import all_reduce_sum, world
from bayesflow.laplace._common import DenseLaplaceState, DiagLaplaceState
from bayesflow.laplace.kfac_posterior import KFACLaplaceState
from bayesflow.tree import flatten, tree_map, unflatten
from bayesflow.types import Transform

__all__ = ["data_parallel_laplace"]

_FIELDS = {DiagLaplaceState: "prec_diag", DenseLaplaceState: "prec"}


def data_parallel_laplace(transform: Transform, group=None) -> Transform:
    r"""The data-parallel version of a Laplace transform: ``update(state, batch_r)`` adds the
    curvature of the whole batch :math:`∪_r B_r` (see the module docstring), on every rank.

    Works for every method whose state is a :class:`~bayesflow.laplace.DiagLaplaceState`
    (``diag_fisher``, ``diag_ggn``, their ``build_for_module``), a
    :class:`~bayesflow.laplace.DenseLaplaceState` (``dense_fisher``, ``dense_ggn``, ``dense_hessian``),
    a KFAC state, and their ``subset`` versions. Shards may have any sizes. The log posterior (or log
    likelihood) is the method's own convention: a *sum* over the batch — so a prior term inside it
    is added once per rank per batch, as it is added once per batch in one process.

    Args:
        transform: a Laplace transform (``init``, ``update(state, batch, inplace=False)``).
        group: the process group of the data-parallel ranks (None: the default group, or one process).

    Returns:
        A :class:`~bayesflow.types.Transform` with the same ``init`` and a reducing ``update``.

    Raises:
        TypeError: (from ``update``) a state that is not a sum over the data (a low-rank state).
        CollectiveFailed: (from ``update``) the all-reduce failed: another rank raised, exited or timed out.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import data_parallel_laplace
        >>> from bayesflow.laplace import dense_hessian
        >>> log_posterior = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
        >>> transform = data_parallel_laplace(dense_hessian.build(log_posterior))
        >>> state, _ = transform.update(transform.init(torch.zeros(2)), torch.ones(3, 2))
        >>> state.prec   # three data, each adding I
        tensor([[3., 0.],
                [0., 3.]])
    """
    if not isinstance(transform, Transform) or not callable(transform.init) or not callable(transform.update):
        raise TypeError(f"data_parallel_laplace needs a Laplace transform (init, update), got {transform!r:.80}")

    def update(state, batch, inplace: bool = False):
        if world(group)[1] == 1:
            return transform.update(state, batch, inplace=inplace)
        what = f"curvature all-reduce of batch {int(state.step)}"
        if isinstance(state, KFACLaplaceState):
            return _kfac_update(transform, state, batch, inplace, group, what)
        field = next((name for cls, name in _FIELDS.items() if isinstance(state, cls)), None)
        if field is None:
            raise TypeError(f"data_parallel_laplace sums the shards' curvatures, which needs a diagonal, dense or "
                            f"KFAC Laplace state; got {type(state).__name__} (a low-rank state keeps the top "
                            "eigenvectors of the sum, which the shards' do not give)")
        zero = state._replace(**{field: tree_map(torch.zeros_like, getattr(state, field))}, step=state.step.clone())
        local, aux = transform.update(zero, batch, inplace=True)
        increments, spec = flatten(getattr(local, field))
        total = all_reduce_sum(increments, group, what=what)
        precision = flatten(getattr(state, field))[0]
        if inplace:
            torch._foreach_add_(precision, total)
            state.step.add_(1)
            return state, aux
        return state._replace(**{field: unflatten(spec, torch._foreach_add(precision, total))},
                              step=state.step + 1), aux

    return transform._replace(update=update)


def _kfac_update(transform, state: KFACLaplaceState, batch, inplace: bool, group, what: str):
    """KFAC: the shards' running means weighted back into sums, one all-reduce for every factor and count."""
    names = list(state.A)
    zero = state._replace(A={k: torch.zeros_like(v) for k, v in state.A.items()},
                          G={k: torch.zeros_like(v) for k, v in state.G.items()},
                          num_data=torch.zeros_like(state.num_data), step=state.step.clone())
    local, aux = transform.update(zero, batch, inplace=True)
    weight = local.num_data.to(local.A[names[0]].dtype)  # m_r, in the factors' buffer: one all-reduce
    *factors, total = all_reduce_sum([*(local.A[k] * weight for k in names), *(local.G[k] * weight for k in names),
                                      weight], group, what=what)
    rows = total.round().to(state.num_data.dtype).to(state.num_data.device)
    count = state.num_data + rows
    scale = 1.0 / count.to(factors[0].dtype)
    A, G = {}, {}
    for k, sum_a, sum_g in zip(names, factors[:len(names)], factors[len(names):]):
        step_a = (sum_a - rows * state.A[k]) * scale   # A + (S_A - M A) / (N + M), as kfac.update
        step_g = (sum_g - rows * state.G[k]) * scale
        if inplace:
            state.A[k].add_(step_a)
            state.G[k].add_(step_g)
        else:
            A[k], G[k] = state.A[k] + step_a, state.G[k] + step_g
    if inplace:
        state.num_data.add_(rows)
        state.step.add_(1)
        return state, aux
    return state._replace(A=A, G=G, num_data=count, step=state.step + 1), aux
