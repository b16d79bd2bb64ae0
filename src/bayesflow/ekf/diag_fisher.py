r"""Extended Kalman filter with a diagonal Gaussian and the diagonal empirical Fisher (posteriors' ``ekf.diag_fisher``).

The state is :math:`q(\theta) = \mathcal N(\mu, \operatorname{diag}(\sigma^2))`. One update with a batch
:math:`b_1, \ldots, b_n`, inverse temperature ε (``lr``) and transition noise τ (``transition_sd``):

.. math::
    \text{predict:}\quad & \tilde\sigma^2 = \sigma^2 + \tau^2, \\
    \text{update:}\quad  & \sigma'^{-2} = \tilde\sigma^{-2} + ε\, \tfrac1n \textstyle\sum_i g_i^{\odot 2}, \qquad
                           \mu' = \mu + ε\, \sigma'^2 \odot \tfrac1n \textstyle\sum_i g_i,

with :math:`g_i = \nabla_\theta \log p(b_i \mid \theta)|_{\mu}` (element-wise squares and products).
It is the Laplace/Gauss–Newton step of :math:`\log q(\theta) + ε\,\bar\ell(\theta)` about μ with the
likelihood's curvature replaced by the diagonal of the empirical Fisher
:math:`\tfrac1n\sum_i g_i g_i^\top` (Ollivier 2019, "The extended Kalman filter is a natural gradient
descent in trajectory space"): the precision only grows with data. Where every sample's gradient
touches one coordinate (independent coordinates) the empirical Fisher is diagonal and this filter is
exactly :mod:`bayesflow.ekf.dense_fisher` with a diagonal covariance.

For an ``nn.Module`` model, :func:`build_for_module` runs this filter on its ``torch.nn.Linear`` layers
with the per-sample squares from one forward and one backward pass (:mod:`bayesflow.ekf.module_diag`)
instead of a per-sample Jacobian.

Example:
    >>> import torch
    >>> from bayesflow.ekf import diag_fisher
    >>> def log_likelihood(params, batch):      # y ~ N(θ, 1), one θ per column
    ...     return -0.5 * ((batch - params) ** 2).sum(), torch.tensor([])
    >>> transform = diag_fisher.build(log_likelihood, lr=1.0, init_sds=1.0)
    >>> state = transform.init(torch.zeros(2))
    >>> state, _ = transform.update(state, torch.tensor([[1.0, -1.0]]))
    >>> state.params, state.sd_diag ** 2       # prior N(0, 1), one observation with residual² = 1
    (tensor([ 0.5000, -0.5000]), tensor([0.5000, 0.5000]))
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, NamedTuple

import torch
from torch.func import jacrev

from bayesflow.ekf._common import (
    check_lr,
    check_params,
    check_state,
    current_lr,
    per_sample_log_likelihood,
    ravel,
    write_counters,
)
from bayesflow.engine.validation import check_bool
from bayesflow.records import record
from bayesflow.tree import flatten, tree_map
from bayesflow.tree_utils import tree_insert_
from bayesflow.types import LogProbFn, Schedule, TensorTree, Transform
from bayesflow.utils.gaussian import sample_size

__all__ = ["EKFDiagState", "build", "build_for_module", "init", "sample", "update"]


@record
class EKFDiagState(NamedTuple):
    """A diagonal Normal :math:`\\mathcal N(\\mu, \\operatorname{diag}(\\sigma^2))` over the parameters.

    Attributes:
        params: the mean μ (a tree like the parameters).
        sd_diag: the standard deviations σ (a tree like ``params``).
        log_likelihood: the mean per-sample log likelihood of the last batch at the previous mean
            (``torch.tensor([])`` before the first update).
        step: the number of updates (an int64 tensor).

    Example:
        >>> import torch
        >>> from bayesflow.ekf.diag_fisher import init
        >>> state = init({"w": torch.zeros(2)}, init_sds=0.5)
        >>> state.sd_diag, int(state.step)
        ({'w': tensor([0.5000, 0.5000])}, 0)
    """

    params: TensorTree
    sd_diag: TensorTree
    log_likelihood: torch.Tensor = torch.tensor([])
    step: torch.Tensor = torch.tensor(0)


def _check_transition_sd(transition_sd: Any) -> Any:
    if isinstance(transition_sd, torch.Tensor) and transition_sd.numel() == 1:
        value = float(transition_sd)
    elif isinstance(transition_sd, numbers.Real) and not isinstance(transition_sd, bool):
        value = float(transition_sd)
    else:
        raise TypeError(f"transition_sd must be a number ≥ 0, got {transition_sd!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"transition_sd must be a finite number ≥ 0 (a standard deviation), got {transition_sd!r}")
    return transition_sd


def build(log_likelihood: LogProbFn, lr: float | Schedule, transition_sd: float = 0.0, per_sample: bool = False,
          init_sds: TensorTree | float = 1.0) -> Transform:
    r"""The diagonal EKF transform (see the module docstring for the update).

    Args:
        log_likelihood: ``log_likelihood(params, batch) -> (value, aux)``.
        lr: the inverse temperature ε of each update (a number ≥ 0 or a schedule ``step -> ε``); the batch
            enters through its mean per-sample log likelihood, so ε = batch size is the Bayesian update.
        transition_sd: τ, the standard deviation of the transition noise added to every coordinate before
            each update (:math:`\sigma^2 \leftarrow \sigma^2 + \tau^2`).
        per_sample: ``True``: ``log_likelihood`` returns one value per sample (a vector); ``False``: it
            returns a scalar for the batch and is mapped over the samples with ``torch.vmap``.
        init_sds: the initial σ, a number > 0 or a tree like the parameters.

    Returns:
        A :class:`~bayesflow.types.Transform` with ``init(params)`` and ``update(state, batch, inplace=False)``.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import diag_fisher
        >>> transform = diag_fisher.build(lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([])), lr=2.0)
        >>> state, _ = transform.update(transform.init(torch.zeros(1)), torch.tensor([[1.0], [1.0]]))
        >>> state.params, state.sd_diag ** 2, state.log_likelihood
        (tensor([0.6667]), tensor([0.3333]), tensor(-0.5000))
    """
    per_sample_log_likelihood(log_likelihood, per_sample)  # argument checks
    check_lr(lr)
    _check_transition_sd(transition_sd)
    return Transform(partial(init, init_sds=init_sds),
                     partial(update, log_likelihood=log_likelihood, lr=lr, transition_sd=transition_sd,
                             per_sample=per_sample))


def init(params: TensorTree, init_sds: TensorTree | float = 1.0) -> EKFDiagState:
    """The initial state :math:`\\mathcal N(\\text{params}, \\operatorname{diag}(\\text{init\\_sds}^2))`.

    Args:
        params: the initial mean (kept as given, so that ``inplace`` updates change these tensors).
        init_sds: the initial standard deviations, a number > 0 or a tree like ``params`` of positive values
            (copied).

    Raises:
        ValueError: ``params`` holds NaN or ±inf (the message names the leaf), or a bad initial
            spread.

    Returns:
        An :class:`EKFDiagState` at step 0.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import diag_fisher
        >>> diag_fisher.init({"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 2.0])}).sd_diag
        {'w': tensor([1., 2.])}
    """
    from bayesflow.utils import is_scalar

    leaves, spec = check_params(params)
    if is_scalar(init_sds) and not isinstance(init_sds, bool):
        value = float(init_sds)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"init_sds must be a number > 0 (a standard deviation), got {init_sds!r}")
        sds = tree_map(lambda x: torch.full_like(x, value, requires_grad=x.requires_grad), params)
        return _initial_state(params, sds)
    try:
        sd_leaves = spec.flatten_up_to(init_sds)
    except (TypeError, ValueError):
        sd_leaves = None
    if sd_leaves is None or any(not isinstance(s, torch.Tensor) or s.shape != p.shape
                                for s, p in zip(sd_leaves, leaves)):
        raise ValueError("init_sds must be a number > 0 or a tree of tensors shaped like params "
                         f"({tree_map(lambda x: tuple(x.shape), params)}), got {init_sds!r}")
    if not all(bool((s > 0).all() & torch.isfinite(s).all()) for s in sd_leaves):
        raise ValueError(f"init_sds must be positive and finite (standard deviations), got {init_sds!r}")
    sds = spec.unflatten([s.detach().to(device=p.device, dtype=p.dtype, copy=True) for s, p in zip(sd_leaves, leaves)])
    return _initial_state(params, sds)


def _initial_state(params: TensorTree, sds: TensorTree) -> EKFDiagState:
    device = flatten(params)[0][0].device
    return EKFDiagState(params, sds, torch.tensor([], device=device), torch.tensor(0))


def update(state: EKFDiagState, batch: Any, log_likelihood: LogProbFn, lr: float | Schedule,
           transition_sd: float = 0.0, per_sample: bool = False,
           inplace: bool = False, *, reduce=None) -> tuple[EKFDiagState, TensorTree]:
    r"""One diagonal EKF update (see the module docstring): precision += ε · diag(empirical Fisher),
    mean += ε · σ'² ⊙ (mean gradient).

    Args:
        state: the current :class:`EKFDiagState`.
        batch: the data passed to ``log_likelihood``.
        log_likelihood, lr, transition_sd, per_sample: as in :func:`build`.
        inplace: write the new mean, σ, log likelihood and step into the tensors of ``state`` (and return it;
            a hand-built state holding the class's default counters gets new counters).
        reduce: ``reduce(statistics, n, step) -> statistics`` combines this batch's means (mean gradient,
            mean squared per-sample gradient, mean log likelihood; n rows) with other shards' before they
            are applied (:func:`bayesflow.distributed.data_parallel_ekf`); None: this batch alone.

    Returns:
        ``(new_state, aux)``, ``aux`` being the log likelihood's auxiliary output (per sample).

    Example:
        >>> import torch
        >>> from bayesflow.ekf import diag_fisher
        >>> ll = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
        >>> state = diag_fisher.init(torch.zeros(1))
        >>> state, _ = diag_fisher.update(state, torch.tensor([[1.0]]), ll, lr=1.0, transition_sd=1.0)
        >>> state.params, state.sd_diag ** 2    # σ̃² = 2, precision 1/2 + 1
        (tensor([0.6667]), tensor([0.6667]))
    """
    check_bool(inplace, "inplace")
    check_state(state, EKFDiagState, "diag_fisher")
    values_and_aux = per_sample_log_likelihood(log_likelihood, per_sample)
    _check_transition_sd(transition_sd)
    lr = current_lr(lr, state.step)

    def jacobian_target(params, batch):
        values, aux = values_and_aux(params, batch)
        return values, (values, aux)

    from bayesflow.utils import CatchAuxError

    with torch.no_grad(), CatchAuxError():
        jac, (log_liks, aux) = jacrev(jacobian_target, has_aux=True)(state.params, batch)
        mu, unravel = ravel(state.params)
        sd, unravel_sd = ravel(state.sd_diag)
        jac_leaves = flatten(jac)[0]
        n = log_liks.shape[0]
        per_sample_grads = torch.cat([leaf.reshape(n, -1) for leaf in jac_leaves], dim=1)  # (n, d)
        grad = per_sample_grads.mean(0)
        fisher_diag = per_sample_grads.square().mean(0)
        log_likelihood_value = log_liks.mean()
        if reduce is not None:
            grad, fisher_diag, log_likelihood_value = reduce(
                [grad, fisher_diag, log_likelihood_value.to(mu.dtype)], n, int(state.step))
        predict_var = sd.square() + transition_sd ** 2
        new_var = 1.0 / (1.0 / predict_var + lr * fisher_diag)
        new_mean = mu + lr * new_var * grad
        new_sd = new_var.sqrt()

    if inplace:
        tree_insert_(state.params, unravel(new_mean))
        tree_insert_(state.sd_diag, unravel_sd(new_sd))
        return write_counters(state, log_likelihood_value), aux
    return EKFDiagState(unravel(new_mean), unravel_sd(new_sd), log_likelihood_value,
                        state.step + 1), aux


def sample(state: EKFDiagState, sample_shape: torch.Size = torch.Size([]),  # noqa: B008
           generator: torch.Generator | None = None) -> TensorTree:
    r"""Draws :math:`\theta = \mu + \sigma \odot z`, :math:`z \sim \mathcal N(0, I)`, leaf by leaf
    (:func:`bayesflow.utils.diag_normal_sample`; posteriors' draws for the same global seed).

    Args:
        state: an :class:`EKFDiagState`.
        sample_shape: the shape of the batch of draws; every leaf gets shape ``sample_shape + leaf.shape``.
        generator: the ``torch.Generator`` to draw from (torch's global generator when None).

    Returns:
        A tree like ``state.params``, on its device.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import diag_fisher
        >>> state = diag_fisher.init({"w": torch.zeros(2, 3)}, init_sds=0.1)
        >>> diag_fisher.sample(state, (5,), generator=torch.Generator().manual_seed(0))["w"].shape
        torch.Size([5, 2, 3])
    """
    from bayesflow.utils import diag_normal_sample

    check_state(state, EKFDiagState, "diag_fisher")
    sample_shape = sample_size(sample_shape)
    if generator is None:
        return diag_normal_sample(state.params, state.sd_diag, sample_shape=sample_shape)
    return tree_map(lambda mu, sd: mu + sd * torch.randn(sample_shape + mu.shape, generator=generator,
                                                         dtype=mu.dtype, device=mu.device),
                    state.params, state.sd_diag)


# The per-layer route for nn.Module models builds on this module's state and init, so it is imported last.
from bayesflow.ekf.module_diag import build_for_module  # noqa: E402
