r"""Running moments and predictive averages of a chain-parallel ensemble, put together across ranks.

**Moments.** :func:`bayesflow.ensemble.running_moments` on a block of chains (leaves leading with
the block) keeps each chain's own Welford mean and variance (and SWAG deviations, shaped
``(max_rank, block, ...)``): elementwise per chain, so :func:`gather_moments` only concatenates the
blocks — the result is the one-process K-chain moments state.

**Predictive.** Each rank holds the predictions of its own samples (chains) on the *same* inputs.
Classification sums (:func:`bayesflow.predictive.predictive_sums`) add over samples:

.. math::
    L = \log\sum_k p_k = \operatorname{logsumexp}_r L_r, \qquad S = \sum_r S_r, \qquad K = \sum_r K_r,

taken as :math:`m + \log\sum_r e^{L_r - m}` with :math:`m = \max_r L_r` (one MAX and one SUM
all-reduce). Gaussian regression predictions (:class:`~bayesflow.predictive.RegressionUncertainty`)
merge with Chan et al.'s pairwise rule: with :math:`K_r, \bar μ_r` and the sums of squared deviations
:math:`Q_r = K_r\,\mathrm{EU}_r`,

.. math::
    \bar μ = \frac{\sum_r K_r \bar μ_r}{K}, \qquad Q = \sum_r \big(Q_r + K_r (\bar μ_r - \bar μ)^2\big), \qquad
    \mathrm{AU} = \frac{\sum_r K_r \mathrm{AU}_r}{K}, \quad \mathrm{EU} = Q/K.

Example (one process: the inputs themselves):
    >>> import torch
    >>> from bayesflow.distributed import reduce_predictive
    >>> from bayesflow.predictive import classification_uncertainty
    >>> u = classification_uncertainty(torch.zeros(3, 5, 4))
    >>> reduce_predictive(u).num_samples
    3
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from bayesflow.distributed.chain_parallel import gather_chains
from bayesflow.distributed.reduce import _failed, all_reduce_sum, world
from bayesflow.ensemble.moments import MomentsState
from bayesflow.predictive.classification import ClassificationUncertainty, PredictiveSums, decompose
from bayesflow.predictive.regression import RegressionUncertainty
from bayesflow.tree import tree_map

__all__ = ["gather_moments", "reduce_predictive"]


def gather_moments(state: MomentsState, num_chains: int, group=None) -> MomentsState:
    """The K-chain :class:`~bayesflow.ensemble.MomentsState` from every rank's block (per-chain moments).

    Args:
        state: this rank's running moments of its block of chains (leaves leading with the block;
            SWAG deviations ``(max_rank, block, ...)``), updated as many times on every rank.
        num_chains: K.
        group: the chain-parallel process group (None: the default group, or one process).

    Returns:
        A :class:`~bayesflow.ensemble.MomentsState` whose leaves lead with all K chains, on every rank.

    Raises:
        TypeError: ``state`` is not a ``MomentsState``.
        ValueError: a leaf does not lead with this rank's chains.
        CollectiveFailed: the all-gather failed (another rank raised, exited or timed out).

    Example:
        >>> import torch
        >>> from bayesflow.distributed import gather_moments
        >>> from bayesflow.ensemble import running_moments
        >>> moments = running_moments(max_rank=2)
        >>> state, _ = moments.update(moments.init(torch.zeros(4, 3)), torch.ones(4, 3))   # 4 chains
        >>> gather_moments(state, num_chains=4).deviations.shape
        torch.Size([2, 4, 3])
    """
    if not isinstance(state, MomentsState):
        raise TypeError(f"gather_moments takes the MomentsState of bayesflow.ensemble.running_moments, got "
                        f"{type(state).__name__}")
    deviations = state.deviations
    tree = {"mean": state.mean, "variance": state.variance}
    if deviations is not None:  # (max_rank, block, ...) -> chains first for the gather, and back
        tree["deviations"] = tree_map(lambda t: t.movedim(1, 0), deviations)
    gathered = gather_chains(tree, num_chains, group)
    if deviations is not None:
        deviations = tree_map(lambda t: t.movedim(0, 1).contiguous(), gathered["deviations"])
    return MomentsState(state.count.clone(), gathered["mean"], gathered["variance"], deviations)


def reduce_predictive(predictive, group=None):
    """The posterior predictive of every rank's samples together (see the module docstring).

    Args:
        predictive: this rank's :class:`~bayesflow.predictive.PredictiveSums`,
            :class:`~bayesflow.predictive.ClassificationUncertainty` or
            :class:`~bayesflow.predictive.RegressionUncertainty`, on the same inputs on every rank.
        group: the process group (None: the default group, or one process).

    Returns:
        The same type over the samples of all ranks, identical on every rank (the input itself in
        a world of one process).

    Raises:
        TypeError: ``predictive`` is none of the three.
        CollectiveFailed: a collective failed (another rank raised, exited or timed out).

    Example:
        >>> import torch
        >>> from bayesflow.distributed import reduce_predictive
        >>> from bayesflow.predictive import regression_uncertainty
        >>> u = regression_uncertainty(torch.tensor([[1.0], [3.0]]), 0.5)
        >>> reduce_predictive(u).total
        tensor([1.5000])
    """
    if not isinstance(predictive, (PredictiveSums, ClassificationUncertainty, RegressionUncertainty)):
        raise TypeError(f"reduce_predictive takes PredictiveSums, ClassificationUncertainty or RegressionUncertainty, "
                        f"got {type(predictive).__name__}")
    if world(group)[1] == 1:
        return predictive
    if isinstance(predictive, RegressionUncertainty):
        return _regression(predictive, group)
    if isinstance(predictive, ClassificationUncertainty):
        count = predictive.num_samples
        sums = PredictiveSums(torch.tensor(count), predictive.log_predictive + math.log(count),
                              predictive.aleatoric * count)
        return decompose(_sums(sums, group))
    return _sums(predictive, group)


def _sums(sums: PredictiveSums, group) -> PredictiveSums:
    rank, _ = world(group)
    largest = sums.log_sum_probs.clone()
    try:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    except Exception as error:  # gloo/NCCL raise RuntimeError subclasses; keep the cause
        raise _failed(rank, "predictive all-reduce (max)", error) from error
    shift = torch.where(torch.isfinite(largest), largest, torch.zeros_like(largest))  # all -inf: stays -inf
    scaled = (sums.log_sum_probs - shift).exp()
    count = torch.as_tensor(sums.count, dtype=scaled.dtype, device=scaled.device).reshape(1)
    total, entropy, count = all_reduce_sum([scaled, sums.sum_entropy, count], group, what="predictive all-reduce")
    return PredictiveSums(count.round().to(torch.int64).reshape(()).cpu(), total.log() + shift, entropy)


def _regression(u: RegressionUncertainty, group) -> RegressionUncertainty:
    k = float(u.num_samples)
    weight = u.mean.new_full((1,), k)
    sum_means, sum_variances, count = all_reduce_sum([u.mean * k, u.aleatoric * k, weight], group,
                                                     what="predictive all-reduce (means)")
    mean = sum_means / count
    (squares,) = all_reduce_sum([u.epistemic * k + k * (u.mean - mean).square()], group,
                                what="predictive all-reduce (deviations)")
    aleatoric, epistemic = sum_variances / count, squares / count
    return RegressionUncertainty(mean, aleatoric + epistemic, aleatoric, epistemic, round(float(count)))
