r"""Laplace approximations: a Normal :math:`N(\mu, P^{-1})` around a MAP :math:`\mu`, with :math:`P` a curvature.

posteriors' ``laplace`` modules, with its names, arguments, state fields and return conventions. Each
has ``build(...) -> Transform``, module-level ``init``, ``update(state, batch, ..., inplace=False)`` and
``sample(state, sample_shape=(), generator=None)``:

============== ======================================== ====================================== =========
module          precision added per batch                 built from                             state
============== ======================================== ====================================== =========
diag_fisher     :math:`\sum_i g_i^2` (scores squared)     ``log_posterior``                      diagonal
dense_fisher    :math:`\sum_i g_i g_i^\top`               ``log_posterior``                      dense
diag_ggn        :math:`\mathrm{diag}(J^\top H_\ell J)`    ``forward``, ``outer_log_likelihood``  diagonal
dense_ggn       :math:`J^\top H_\ell J`                   ``forward``, ``outer_log_likelihood``  dense
dense_hessian   :math:`-\nabla^2 \log p(\theta \mid B)`   ``log_posterior``                      dense
low_rank        top-k of Σ_b V_bᵀV_b (GGN roots)          ``forward``, ``outer_log_likelihood``  U, s, λ
subset          any method on chosen leaves (rest fixed)  ``method_build`` + its arguments       the method's
============== ======================================== ====================================== =========

For ``nn.Module`` models, ``diag_fisher.build_for_module`` and ``diag_ggn.build_for_module``
(:mod:`~bayesflow.laplace.module_diag`) compute the same diagonals for the ``nn.Linear`` layers exactly,
layer by layer from forward hooks and one (batched) backward pass — no per-sample gradients, no
Jacobian — at about one training step per batch instead of posteriors' hundreds.

:mod:`~bayesflow.laplace.marglik`: the Laplace evidence :func:`log_marginal_likelihood` and
:func:`optimize_prior_precision` (MacKay's fixed point or Adam on log λ; scalar, per leaf or per
Linear layer) for diagonal, dense and KFAC states.

Predictives (laplace-torch's): :mod:`~bayesflow.laplace.predictive` — :func:`glm_predictive` (the
linearised predictive with the probit or an MC link), :func:`mc_predictive` and
:func:`predictive_samples` (parameter draws, chunked), for diagonal, dense and KFAC states.

Diagonal states are :class:`~bayesflow.laplace._common.DiagLaplaceState` (``params``, ``prec_diag``,
``step``), dense ones :class:`~bayesflow.laplace._common.DenseLaplaceState` (``params``, ``prec``,
``step``). Beyond posteriors: dense sampling works for any parameter tree and leaf shapes and on any
device, ``sample`` takes a ``torch.Generator``, ``inplace=True`` accumulates into the state's own tensors,
and bad inputs (a non-scalar log posterior, a wrongly shaped or non-PSD initial precision, a precision
that cannot be sampled) raise errors that say what was expected.

Example:
    >>> import torch
    >>> from bayesflow import laplace
    >>> log_posterior = lambda p, b: (-0.5 * ((b - p) ** 2).sum() - 0.5 * (p**2).sum(), torch.tensor([]))
    >>> state = laplace.dense_hessian.init(torch.zeros(2))
    >>> state, _ = laplace.dense_hessian.update(state, torch.ones(2), log_posterior)
    >>> state.prec   # the exact posterior precision of a Gaussian model: 2 I
    tensor([[2., 0.],
            [0., 2.]])
"""

from bayesflow.laplace import (
    dense_fisher,
    dense_ggn,
    dense_hessian,
    diag_fisher,
    diag_ggn,
    kfac,
    low_rank,
    marglik,
    module_diag,
    predictive,
    subset,
)
from bayesflow.laplace._common import DenseLaplaceState, DiagLaplaceState
from bayesflow.laplace.low_rank import LowRankLaplaceState
from bayesflow.laplace.marglik import log_marginal_likelihood, optimize_prior_precision
from bayesflow.laplace.predictive import glm_predictive, mc_predictive, predictive_samples

__all__ = ["DenseLaplaceState", "DiagLaplaceState", "LowRankLaplaceState", "dense_fisher", "dense_ggn",
           "dense_hessian", "diag_fisher", "diag_ggn", "glm_predictive", "kfac", "log_marginal_likelihood", "low_rank",
           "marglik", "mc_predictive", "module_diag", "optimize_prior_precision", "predictive", "predictive_samples",
           "subset"]
