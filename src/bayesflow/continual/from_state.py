r"""Sequential Bayesian updating in one line: the posterior after task :math:`k` as the prior of task :math:`k+1`.

With data arriving in tasks :math:`D_1, D_2, \ldots`, Bayes' rule chains,

.. math:: p(\theta \mid D_{1:k+1}) \propto p(D_{k+1} \mid \theta)\, p(\theta \mid D_{1:k}),

and a Gaussian approximation :math:`q_k = N(\mu_k, P_k^{-1})` of :math:`p(\theta \mid D_{1:k})` (Laplace, EKF
or VI) stands in for the last factor. :func:`gaussian_prior` turns a state into that prior, a callable
``log_prior(params)``:

================================= ===================================================================
state                             precision :math:`P_k` (times ``strength``, plus ``prior_prec``)
================================= ===================================================================
``laplace`` diag state            ``prec_diag``
``laplace`` dense state           ``prec``
``laplace.kfac`` state            :math:`N (G \otimes A) + \lambda I` per Linear layer
``ekf.diag_fisher`` state         ``1 / sd_diag**2``
``ekf.dense_fisher`` state        ``inverse(cov)``
``vi.diag`` state                 ``exp(-2 log_sd_diag)``
``vi.dense`` state                ``inverse(L Lᵀ)``
================================= ===================================================================

The task :math:`k+1` log posterior, in bayesflow's per-datum convention, is then
``mean log-likelihood + log_prior(params) / num_data``. To keep the curvature of the earlier tasks in
the next Laplace, start its accumulation from the prior's precision (``init_prec_diag=prior.prec_diag``
or ``init_prec=prior.prec``): with a constant curvature (linear-Gaussian models) the chain of dense
updates is then the batch posterior exactly; the diagonal chain keeps only diagonals at every step, so
it is the approximation :math:`\mu_{k+1} = \arg\max \log p(D_{k+1} \mid \theta) - \frac12 \sum_i
p_{k,i} (\theta_i - \mu_{k,i})^2`, :math:`p_{k+1} = p_k + \mathrm{diag}\,H_{k+1}`. A ``strength``
:math:`s \neq 1` weights the old tasks as elastic weight consolidation's :math:`\lambda` does.

Example:
    >>> import torch
    >>> from bayesflow import continual, laplace
    >>> state = laplace.diag_fisher.init(torch.zeros(2), init_prec_diag=2.0)
    >>> log_prior = continual.gaussian_prior(state)       # N(0, ½ I)
    >>> log_prior(torch.zeros(2)), log_prior.prec_diag
    (tensor(-1.1447), tensor([2., 2.]))
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

from bayesflow.continual.gaussian_prior import DenseGaussianPrior, DiagGaussianPrior, KFACGaussianPrior
from bayesflow.ekf.dense_fisher import EKFDenseState
from bayesflow.ekf.diag_fisher import EKFDiagState
from bayesflow.laplace._common import DenseLaplaceState, DiagLaplaceState
from bayesflow.laplace.kfac_posterior import KFACLaplaceState
from bayesflow.tree import tree_map
from bayesflow.utils.linalg import L_from_flat
from bayesflow.vi.dense import VIDenseState
from bayesflow.vi.diag import VIDiagState

__all__ = ["gaussian_prior"]

_STATES = ("a laplace diag/dense/kfac state, an ekf diag_fisher/dense_fisher state or a vi diag/dense state")


def _positive_number(name: str, value: Any, allow_zero: bool) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value!r}")
    return float(value)


def gaussian_prior(state: Any, strength: float = 1.0, prior_prec: float = 0.0):
    r"""The Gaussian :math:`N(\mu, (sP + \lambda_0 I)^{-1})` of a posterior state, as a log-prior callable.

    Args:
        state: a posterior state (the table in the module docstring); its ``params`` are :math:`\mu`.
        strength: :math:`s > 0`, the weight of the old tasks (1: Bayesian updating; EWC's :math:`\lambda`).
        prior_prec: :math:`\lambda_0 \ge 0`, an isotropic precision added after scaling (keeps the prior
            proper where the state's precision is singular, e.g. a Fisher with unseen directions).

    Returns:
        A :class:`~bayesflow.continual.DiagGaussianPrior`, :class:`~bayesflow.continual.DenseGaussianPrior`
        or :class:`~bayesflow.continual.KFACGaussianPrior`: ``prior(params)`` is the normalised log density,
        and ``prior.prec_diag`` / ``prior.prec`` can start the next task's Laplace accumulation.

    Raises:
        TypeError: an unsupported state, or a strength / prior_prec that is not a number.
        ValueError: a non-positive or non-finite strength, a negative or non-finite prior_prec, or a
            singular precision.

    The prior holds detached copies of the state's mean and precision: training the state's parameters in
    place afterwards (the next task) does not move the prior.

    Example:
        >>> import torch
        >>> from bayesflow import continual, laplace
        >>> state = laplace.dense_hessian.init(torch.zeros(2), init_prec=torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> continual.gaussian_prior(state, strength=2.0).prec
        tensor([[4., 2.],
                [2., 4.]])
        >>> continual.gaussian_prior(laplace.diag_fisher.init(torch.zeros(2)))
        Traceback (most recent call last):
            ...
        ValueError: prec_diag's tensor 0 must be finite and positive (a Gaussian prior needs a positive ...
    """
    s = _positive_number("strength", strength, allow_zero=False)
    lam = _positive_number("prior_prec", prior_prec, allow_zero=True)
    if isinstance(state, DiagLaplaceState):
        return DiagGaussianPrior.of(state.params, tree_map(lambda p: s * p + lam, state.prec_diag))
    if isinstance(state, EKFDiagState):
        return DiagGaussianPrior.of(state.params, tree_map(lambda sd: s / sd.square() + lam, state.sd_diag))
    if isinstance(state, VIDiagState):
        return DiagGaussianPrior.of(state.params, tree_map(lambda ls: s * torch.exp(-2 * ls.detach()) + lam,
                                                           state.log_sd_diag))
    if isinstance(state, DenseLaplaceState):
        return DenseGaussianPrior.of(state.params, _dense(s * state.prec, lam))
    if isinstance(state, EKFDenseState):
        return DenseGaussianPrior.of(state.params, _dense(s * _inverse(state.cov, "cov"), lam))
    if isinstance(state, VIDenseState):
        L = L_from_flat(state.L_factor.detach())
        return DenseGaussianPrior.of(state.params, _dense(s * torch.cholesky_inverse(L), lam))
    if isinstance(state, KFACLaplaceState):
        scale = s * float(state.num_data)
        return KFACGaussianPrior.of(state.params, state.A, state.G, scale=scale,
                                    prior_prec=s * float(state.prior_prec) + lam)
    raise TypeError(f"gaussian_prior needs {_STATES}, got {type(state).__name__}")


def _dense(prec: torch.Tensor, lam: float) -> torch.Tensor:
    prec = 0.5 * (prec + prec.mT)   # inverses are symmetric only up to rounding
    return prec + lam * torch.eye(prec.shape[0], dtype=prec.dtype, device=prec.device) if lam else prec


def _inverse(cov: torch.Tensor, name: str) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ValueError(f"the state's {name} is not positive definite, so it has no precision")
    return torch.cholesky_inverse(chol)
