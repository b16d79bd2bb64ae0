r"""Extended Kalman filter with a dense Gaussian and the empirical Fisher (posteriors' ``ekf.dense_fisher``).

The state is :math:`q(\theta) = \mathcal N(\mu, \Sigma)` over the flattened parameters. One update with a
batch :math:`b_1, \ldots, b_n`, inverse temperature ε (``lr``) and transition covariance Q:

.. math::
    \text{predict:}\quad & \tilde\Sigma = \Sigma + Q, \\
    \text{update:}\quad  & \Sigma'^{-1} = \tilde\Sigma^{-1} + ε F(\mu), \qquad \mu' = \mu + ε\, \Sigma' \bar g,

with :math:`\bar g = \tfrac1n \sum_i g_i`, :math:`g_i = \nabla_\theta \log p(b_i \mid \theta)|_\mu` and the
curvature :math:`F = \tfrac1n \sum_i g_i g_i^\top` (the empirical Fisher, default) or, with
``curvature="hessian"``, :math:`F = -\nabla^2_\theta \tfrac1n \sum_i \log p(b_i \mid \theta)|_\mu`.
This is the online Laplace (Gauss–Newton) step of :math:`\log q + ε\bar\ell`: the precision grows with
data. (posteriors 0.1.3 *subtracts* :math:`εF` from the precision, so its covariance grows with data and
turns non-positive-definite; bayesflow adds it.) For a linear model with Gaussian noise of known variance
the negative Hessian is the Fisher (it does not depend on the labels), the step is Newton's method on a
quadratic, and ``curvature="hessian"`` with ε = batch size is the exact Kalman filter: one pass over the
data, in batches of any size, gives the conjugate posterior. The empirical Fisher
:math:`\tfrac1n\sum_i g_i g_i^\top` equals that Fisher only in expectation over the labels.

The update never inverts :math:`\tilde\Sigma` or forms :math:`\Sigma'^{-1}`: with
:math:`\tilde\Sigma = LL^\top` and :math:`I + ε L^\top F L = RR^\top` (eigenvalues ≥ 1, so always
well conditioned), :math:`\Sigma' = K^\top K` with :math:`K = R^{-1}L^\top`.

Example:
    >>> import torch
    >>> from bayesflow.ekf import dense_fisher
    >>> def log_likelihood(params, batch):      # y ~ N(x·θ, 1)
    ...     x, y = batch
    ...     return -0.5 * ((y - x @ params) ** 2).sum(), torch.tensor([])
    >>> transform = dense_fisher.build(log_likelihood, lr=1.0, init_cov=1.0, curvature="hessian")
    >>> state = transform.init(torch.zeros(2, dtype=torch.float64))
    >>> state, _ = transform.update(state, (torch.tensor([[1.0, 1.0]], dtype=torch.float64),
    ...                                     torch.tensor([3.0], dtype=torch.float64)))
    >>> state.params.round(decimals=6), state.cov.float()   # conjugate: Σ' = (I + xxᵀ)⁻¹, μ' = Σ'x y
    (tensor([1., 1.], dtype=torch.float64), tensor([[ 0.6667, -0.3333],
            [-0.3333,  0.6667]]))
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, NamedTuple

import torch
from torch.func import grad_and_value, jacrev

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
from bayesflow.tree_utils import tree_insert_
from bayesflow.types import LogProbFn, Schedule, TensorTree, Transform
from bayesflow.utils.gaussian import sample_size

__all__ = ["CURVATURES", "EKFDenseState", "build", "init", "sample", "update"]

CURVATURES = ("empirical_fisher", "hessian")
"""The curvatures F of :func:`update`: the empirical Fisher (posteriors') or the negative Hessian."""


@record
class EKFDenseState(NamedTuple):
    """A Normal :math:`\\mathcal N(\\mu, \\Sigma)` over the flattened parameters.

    Attributes:
        params: the mean μ (a tree like the parameters).
        cov: Σ, a ``(d, d)`` tensor over the parameters flattened in optree's leaf order.
        log_likelihood: the mean per-sample log likelihood of the last batch at the previous mean
            (``torch.tensor([])`` before the first update).
        step: the number of updates (an int64 tensor).

    Example:
        >>> import torch
        >>> from bayesflow.ekf.dense_fisher import init
        >>> state = init({"a": torch.zeros(2), "b": torch.zeros(())}, init_cov=2.0)
        >>> state.cov.diagonal(), int(state.step)
        (tensor([2., 2., 2.]), 0)
    """

    params: TensorTree
    cov: torch.Tensor
    log_likelihood: torch.Tensor = torch.tensor([])
    step: torch.Tensor = torch.tensor(0)


def _number(value: Any) -> float | None:
    """``float(value)`` for a real number or a 1-element tensor, else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _check_transition_cov(transition_cov: Any, psd: bool = True) -> Any:
    """Q as given if it is a number ≥ 0, a vector ≥ 0 (a diagonal) or a symmetric PSD matrix.

    ``psd=False`` (every ``update``) skips the eigendecomposition of a matrix, O(d³) like the update
    itself, done once by ``build``; its diagonal is still checked ≥ 0."""
    value = _number(transition_cov)
    if value is not None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"transition_cov must be ≥ 0 (a variance added to each coordinate), "
                             f"got {transition_cov!r}")
        return transition_cov
    if not isinstance(transition_cov, torch.Tensor) or transition_cov.ndim not in (1, 2):
        raise TypeError("transition_cov must be a number, a vector (the diagonal) or a (d, d) matrix, "
                        f"got {transition_cov!r}")
    q = transition_cov.detach()
    if not bool(torch.isfinite(q).all()):
        raise ValueError("transition_cov must be finite")
    if q.ndim == 1:
        if bool((q < 0).any()):
            raise ValueError(f"transition_cov, given as a diagonal, must be ≥ 0, got {transition_cov}")
        return transition_cov
    if q.shape[0] != q.shape[1] or not torch.allclose(q, q.T):
        raise ValueError(f"transition_cov must be a symmetric (d, d) matrix, got shape {tuple(q.shape)}")
    if bool((q.diagonal() < 0).any()):
        raise ValueError("transition_cov must be positive semi-definite; its diagonal has negative entries "
                         f"(the smallest is {float(q.diagonal().min()):.3g})")
    if not psd:
        return transition_cov
    smallest = float(torch.linalg.eigvalsh(q.double()).min())
    if smallest < -1e-10 * max(1.0, float(q.abs().max())):
        raise ValueError(f"transition_cov must be positive semi-definite (its smallest eigenvalue is {smallest:.3g})")
    return transition_cov


def _check_curvature(curvature: Any) -> str:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    return curvature


def build(log_likelihood: LogProbFn, lr: float | Schedule, transition_cov: torch.Tensor | float = 0.0,
          per_sample: bool = False, init_cov: torch.Tensor | float = 1.0, *,
          curvature: str = "empirical_fisher") -> Transform:
    r"""The dense EKF transform (see the module docstring for the update).

    Args:
        log_likelihood: ``log_likelihood(params, batch) -> (value, aux)``.
        lr: the inverse temperature ε of each update (a number ≥ 0 or a schedule ``step -> ε``); the batch
            enters through its mean per-sample log likelihood, so ε = batch size is the Bayesian update.
        transition_cov: Q, added to Σ before each update: a number q (Q = q I), a vector (the diagonal of
            Q) or a symmetric positive semi-definite ``(d, d)`` matrix.
        per_sample: ``True``: ``log_likelihood`` returns one value per sample (a vector); ``False``: it
            returns a scalar for the batch and is mapped over the samples with ``torch.vmap``.
        init_cov: the initial Σ: a number s > 0 (Σ = s I), a positive vector (the diagonal) or a symmetric
            positive definite ``(d, d)`` matrix.
        curvature: ``"empirical_fisher"`` (posteriors') or ``"hessian"`` (the negative Hessian of the mean
            log likelihood: the Fisher of a canonical GLM, exact Kalman filtering for a linear-Gaussian
            model; it must be positive semi-definite, else the update gives NaN).

    Returns:
        A :class:`~bayesflow.types.Transform` with ``init(params)`` and ``update(state, batch, inplace=False)``.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import dense_fisher
        >>> ll = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
        >>> transform = dense_fisher.build(ll, lr=2.0, transition_cov=1.0)
        >>> state, _ = transform.update(transform.init(torch.zeros(1)), torch.tensor([[1.0], [1.0]]))
        >>> state.params, state.cov              # Σ̃ = 2, precision 1/2 + 2
        (tensor([0.8000]), tensor([[0.4000]]))
    """
    per_sample_log_likelihood(log_likelihood, per_sample)  # argument checks
    check_lr(lr)
    _check_transition_cov(transition_cov)
    _check_curvature(curvature)
    return Transform(partial(init, init_cov=init_cov),
                     partial(update, log_likelihood=log_likelihood, lr=lr, transition_cov=transition_cov,
                             per_sample=per_sample, curvature=curvature))


def init(params: TensorTree, init_cov: torch.Tensor | float = 1.0) -> EKFDenseState:
    """The initial state :math:`\\mathcal N(\\text{params}, \\Sigma_0)`.

    Args:
        params: the initial mean (kept as given, so that ``inplace`` updates change these tensors).
        init_cov: Σ₀: a number s > 0 (s I), a positive vector (the diagonal) or a symmetric positive definite
            ``(d, d)`` matrix (copied, in the parameters' dtype and device).

    Raises:
        ValueError: ``params`` holds NaN or ±inf (the message names the leaf), or a bad initial
            spread.

    Returns:
        An :class:`EKFDenseState` at step 0.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import dense_fisher
        >>> dense_fisher.init(torch.zeros(2), torch.tensor([1.0, 3.0])).cov
        tensor([[1., 0.],
                [0., 3.]])
    """
    check_params(params)
    flat = ravel(params)[0]
    d, options = flat.numel(), {"dtype": flat.dtype, "device": flat.device}
    value = _number(init_cov)
    if value is not None:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"init_cov must be > 0 (the prior variance of each coordinate), got {init_cov!r}")
        cov = value * torch.eye(d, **options)
    elif isinstance(init_cov, torch.Tensor) and init_cov.shape == (d,):
        if not bool((init_cov > 0).all() & torch.isfinite(init_cov).all()):
            raise ValueError(f"init_cov, given as a diagonal, must be positive and finite, got {init_cov}")
        cov = torch.diag(init_cov.detach().to(**options))
    elif isinstance(init_cov, torch.Tensor) and init_cov.shape == (d, d):
        cov = init_cov.detach().to(**options, copy=True)
        if not bool(torch.isfinite(cov).all()):
            raise ValueError("init_cov holds NaN or infinite entries; a covariance must be finite")
        if not torch.allclose(cov, cov.T):
            raise ValueError("init_cov must be symmetric")
        if int(torch.linalg.cholesky_ex(cov).info) != 0:
            raise ValueError("init_cov must be positive definite (its Cholesky factorisation failed)")
    else:
        shape = tuple(init_cov.shape) if isinstance(init_cov, torch.Tensor) else type(init_cov).__name__
        raise ValueError(f"init_cov must be a number, a ({d},) diagonal or a ({d}, {d}) matrix for the {d} "
                         f"parameters, got {shape}")
    return EKFDenseState(params, cov, torch.tensor([], device=flat.device), torch.tensor(0))


def _add_transition(cov: torch.Tensor, transition_cov: Any) -> torch.Tensor:
    """Σ + Q for Q a number (q I), a diagonal vector or a matrix."""
    d = cov.shape[0]
    if isinstance(transition_cov, numbers.Real):
        return cov + transition_cov * torch.eye(d, dtype=cov.dtype, device=cov.device) if transition_cov else cov
    q = transition_cov.to(dtype=cov.dtype, device=cov.device)
    if q.numel() == 1:
        return cov + q.reshape(()) * torch.eye(d, dtype=cov.dtype, device=cov.device)
    if q.shape == (d,):
        return cov + torch.diag(q)
    if q.shape == (d, d):
        return cov + q
    raise ValueError(f"transition_cov must be a number, a ({d},) diagonal or a ({d}, {d}) matrix for the {d} "
                     f"parameters, got shape {tuple(q.shape)}")


def update(state: EKFDenseState, batch: Any, log_likelihood: LogProbFn, lr: float | Schedule,
           transition_cov: torch.Tensor | float = 0.0, per_sample: bool = False, inplace: bool = False, *,
           curvature: str = "empirical_fisher", reduce=None) -> tuple[EKFDenseState, TensorTree]:
    r"""One dense EKF update (see the module docstring): Σ' = ((Σ + Q)⁻¹ + εF)⁻¹, μ' = μ + ε Σ' ḡ.

    Args:
        state: the current :class:`EKFDenseState`.
        batch: the data passed to ``log_likelihood``.
        log_likelihood, lr, transition_cov, per_sample, curvature: as in :func:`build`.
        inplace: write the new mean, covariance, log likelihood and step into the tensors of ``state``
            (and return it; a hand-built state holding the class's default counters gets new counters).
        reduce: ``reduce(statistics, n, step) -> statistics`` combines this batch's means (gradient,
            curvature matrix, log likelihood; n rows) with other shards' before they are applied
            (:func:`bayesflow.distributed.data_parallel_ekf`); None: this batch alone.

    Returns:
        ``(new_state, aux)``, ``aux`` being the log likelihood's auxiliary output (per sample).

    Raises:
        TypeError / ValueError: ``transition_cov`` is not a number, vector or (d, d) matrix, or is NaN,
            ±inf, negative, asymmetric or has a negative diagonal, before anything is written (``build``
            also checks a matrix's eigenvalues, once); ``log_likelihood`` returns no per-sample values
            or ignores the params.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import dense_fisher
        >>> ll = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
        >>> state = dense_fisher.init(torch.zeros(2))
        >>> state, _ = dense_fisher.update(state, torch.tensor([[1.0, 1.0]]), ll, lr=1.0)
        >>> state.params, state.cov              # F = g gᵀ with g = (1, 1): precision I + F
        (tensor([0.3333, 0.3333]), tensor([[ 0.6667, -0.3333],
                [-0.3333,  0.6667]]))
    """
    from bayesflow.utils import CatchAuxError, empirical_fisher

    check_bool(inplace, "inplace")
    check_state(state, EKFDenseState, "dense_fisher")
    values_and_aux = per_sample_log_likelihood(log_likelihood, per_sample)
    _check_transition_cov(transition_cov, psd=False)
    _check_curvature(curvature)
    lr = current_lr(lr, state.step)
    mu, unravel = ravel(state.params)
    d = mu.numel()
    if not isinstance(state.cov, torch.Tensor) or state.cov.shape != (d, d):
        shape = tuple(state.cov.shape) if isinstance(state.cov, torch.Tensor) else type(state.cov).__name__
        raise ValueError(f"state.cov must be ({d}, {d}) for the {d} parameters, got {shape}")

    def mean_log_likelihood(params, batch):
        values, aux = values_and_aux(params, batch)
        return values.mean(), (values, aux)

    with torch.no_grad(), CatchAuxError():
        grad, (log_liks, aux) = grad_and_value(mean_log_likelihood, has_aux=True)(state.params, batch)
        if curvature == "empirical_fisher":
            fisher = empirical_fisher(lambda p: values_and_aux(p, batch), has_aux=True, normalize=True)(
                state.params)[0]
        else:
            negative_hessian = jacrev(jacrev(lambda flat: -mean_log_likelihood(unravel(flat), batch)[0]))(mu)
            fisher = 0.5 * (negative_hessian + negative_hessian.T)
        g = ravel(grad)[0].to(mu.dtype)
        fisher = fisher.to(mu.dtype)
        log_likelihood_value = log_liks.mean()
        if reduce is not None:
            rows = aux[0].shape[0]  # grad_and_value's aux is (the per-sample values, the user's aux)
            g, fisher, log_likelihood_value = reduce([g, fisher, log_likelihood_value.to(mu.dtype)], rows,
                                                     int(state.step))
        predict_cov = _add_transition(state.cov.to(mu.dtype), transition_cov)
        chol, info_predict = torch.linalg.cholesky_ex(predict_cov)
        eye = torch.eye(d, dtype=mu.dtype, device=mu.device)
        gain = eye + lr * (chol.T @ fisher @ chol)
        chol_gain, info_gain = torch.linalg.cholesky_ex(0.5 * (gain + gain.T))
        factor = torch.linalg.solve_triangular(chol_gain, chol.T, upper=False)  # K = R⁻¹ Lᵀ, Σ' = KᵀK
        new_cov = factor.T @ factor
        new_mean = mu + lr * (factor.T @ (factor @ g))
        ok = (info_predict == 0) & (info_gain == 0)  # no host sync: a failed factorisation gives NaN
        new_cov = torch.where(ok, new_cov, torch.nan)
        new_mean = torch.where(ok, new_mean, torch.nan)

    if inplace:
        tree_insert_(state.params, unravel(new_mean))
        tree_insert_(state.cov, new_cov)
        return write_counters(state, log_likelihood_value), aux
    return EKFDenseState(unravel(new_mean), new_cov, log_likelihood_value, state.step + 1), aux


def sample(state: EKFDenseState, sample_shape: torch.Size = torch.Size([]),  # noqa: B008
           generator: torch.Generator | None = None) -> TensorTree:
    r"""Draws :math:`\theta = \mu + L z`, :math:`z \sim \mathcal N(0, I)`, :math:`\Sigma = LL^\top`.

    With torch's global generator seeded alike, the draws are those of posteriors'
    ``MultivariateNormal(μ, Σ).sample(sample_shape)``.

    Args:
        state: an :class:`EKFDenseState`.
        sample_shape: the shape of the batch of draws; every leaf gets shape ``sample_shape + leaf.shape``.
        generator: the ``torch.Generator`` to draw from (torch's global generator when None).

    Returns:
        A tree like ``state.params``, on its device.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import dense_fisher
        >>> state = dense_fisher.init({"w": torch.zeros(2, 3), "b": torch.zeros(())}, init_cov=0.1)
        >>> draws = dense_fisher.sample(state, (5,), generator=torch.Generator().manual_seed(0))
        >>> draws["w"].shape, draws["b"].shape
        (torch.Size([5, 2, 3]), torch.Size([5]))
    """
    check_state(state, EKFDenseState, "dense_fisher")
    sample_shape = sample_size(sample_shape)
    mu, unravel = ravel(state.params)
    chol, info = torch.linalg.cholesky_ex(state.cov.to(mu.dtype))
    if int(info) != 0:
        raise ValueError("state.cov is not positive definite: cannot sample")
    z = torch.randn(sample_shape + mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return unravel(mu + z @ chol.T)
