r"""Predictive distributions of Laplace states: the linearised (GLM) predictive and Monte Carlo over parameters.

laplace-torch's ``la(x, pred_type="glm", link_approx="probit" | "mc")`` and ``pred_type="nn"`` (Daxberger et
al., 2021, *Laplace Redux*, arXiv:2106.14806), for bayesflow's Laplace states: a
:class:`~bayesflow.laplace.DiagLaplaceState`, a :class:`~bayesflow.laplace.DenseLaplaceState` or a
:class:`~bayesflow.laplace.kfac.KFACLaplaceState`, each the Normal :math:`N(\mu, \Sigma)` with
:math:`\Sigma = P^{-1}` for the precision :math:`P` *as stored* (its prior precision, and any tempering
or data-set scaling, are whatever the state was built with; rescale ``prec`` first to change them).
``forward(params, batch) -> (output, aux)`` is the model, its output ``(B, out)`` (logits for
classification; ``out = 1`` means binary classification with the logit of class 1).

* :func:`glm_predictive`: linearise the model at :math:`\mu`, :math:`f(x \mid \theta) \approx f(x \mid \mu)
  + J(x)(\theta - \mu)`, so :math:`f(x) \sim N(m, C)` with :math:`m = f(x \mid \mu)`, :math:`C = J \Sigma
  J^\top` (Immer et al., 2021, arXiv:2008.08400); regression returns :math:`(m, C + \sigma^2 I)`,
  classification the probit approximation of :math:`E[\mathrm{softmax}(f)]` or its Monte Carlo estimate.
* :func:`mc_predictive`: Monte Carlo over the parameters themselves, :math:`\theta_s \sim N(\mu, \Sigma)`,
  the mean of :math:`\mathrm{softmax} f(x \mid \theta_s)` (classification) or the mean and covariance of
  :math:`f(x \mid \theta_s)` (regression), in chunks of draws so memory does not grow with ``n_samples``;
  :func:`predictive_samples` returns the draws' outputs themselves.

Predictions carry no autograd history.

Example:
    >>> import torch
    >>> from bayesflow.laplace import DiagLaplaceState
    >>> from bayesflow.laplace.predictive import glm_predictive
    >>> forward = lambda w, x: (x @ w, torch.tensor([]))          # binary logits, f(x) = x·w
    >>> state = DiagLaplaceState(torch.tensor([[1.0], [0.0]]), torch.full((2, 1), 0.1))  # Σ = 10 I
    >>> x = torch.tensor([[2.0, 0.0]])                            # m = 2, v = 40
    >>> glm_predictive(state, forward, x, "classification")      # σ(2 / √(1 + 40π/8)) < σ(2) = 0.88
    tensor([[0.6199]])
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bayesflow.laplace._common import DenseLaplaceState, DiagLaplaceState
from bayesflow.laplace._predictive_terms import (
    _check_choice,
    _check_count,
    _check_state,
    _glm_covariance,
    _glm_monte_carlo,
    _noise,
    _output_chunks,
    _probabilities,
)
from bayesflow.laplace.kfac_posterior import KFACLaplaceState
from bayesflow.types import ForwardFn
from bayesflow.utils.linearized import forward_output

__all__ = ["LIKELIHOODS", "LINK_APPROXIMATIONS", "glm_predictive", "mc_predictive", "predictive_samples"]

LIKELIHOODS = ("classification", "regression")
"""The ``likelihood`` choices (laplace-torch's names): softmax/sigmoid of logits, or Gaussian outputs."""

LINK_APPROXIMATIONS = ("probit", "mc")
"""The ``link_approx`` choices of :func:`glm_predictive` for classification (laplace-torch's names)."""

LaplaceState = DiagLaplaceState | DenseLaplaceState | KFACLaplaceState
_PROBIT_SCALE = math.pi / 8  # λ² of σ(x) ≈ Φ(λx), λ = √(π/8): slopes equal at 0


def glm_predictive(state: LaplaceState, forward: ForwardFn, batch: Any, likelihood: str,
                   link_approx: str = "probit", *, n_samples: int = 100, noise_var: float | torch.Tensor = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""The linearised (GLM) predictive of a Laplace state: :math:`f(x_b) \sim N(m_b, C_b)`, then the link.

    With :math:`J_b = \partial f(x_b \mid \theta)/\partial\theta` at :math:`\mu` (``(out, d)``, one batched
    Jacobian: :mod:`bayesflow.utils.linearized`) and :math:`\Sigma = P^{-1}` the state's covariance,

    .. math:: m_b = f(x_b \mid \mu), \qquad C_b = J_b \Sigma J_b^\top,

    computed as :math:`J_b\,\mathrm{diag}(p)^{-1} J_b^\top` (diagonal), :math:`V_b^\top V_b` with
    :math:`V_b = L^{-1} J_b^\top`, :math:`P = L L^\top` (dense: one Cholesky factor, no inverse), or per
    Linear layer in the eigenbases of the Kronecker factors (KFAC: :math:`K_b = U_G^\top \tilde J_b U_A`
    scaled by :math:`(N \gamma \alpha^\top + \lambda)^{-1/2}`, no ``(d, d)`` matrix; other parameters
    have no variance). Then:

    * ``"regression"``: :math:`(m_b, C_b + \sigma^2 I)`, :math:`\sigma^2` ``noise_var`` (0: the
      distribution of the model output alone, laplace-torch's ``f_var``).
    * ``"classification"``, ``link_approx="probit"`` (the probit approximation, MacKay, 1992):
      :math:`E[\mathrm{softmax}(f)]_k \approx \mathrm{softmax}_k\big(m_b / \sqrt{1 + \tfrac{\pi}{8}
      \mathrm{diag}\,C_b}\big)`; for ``out = 1`` (binary) :math:`E[\sigma(f)] \approx \sigma\big(m_b /
      \sqrt{1 + \tfrac{\pi}{8} C_b}\big)`, from :math:`\sigma(x) \approx \Phi(\sqrt{\pi/8}\,x)` and
      :math:`\int \Phi(\lambda f) N(f; m, v)\,df = \Phi(\lambda m / \sqrt{1 + \lambda^2 v})` (error at most
      twice :math:`\sup_x |\sigma(x) - \Phi(\sqrt{\pi/8}\,x)| \approx 0.019`).
    * ``"classification"``, ``link_approx="mc"``: :math:`\frac1S \sum_s \mathrm{softmax}(f_s)` (sigmoid
      for ``out = 1``), :math:`f_s = m_b + R_b z_s`, :math:`R_b R_b^\top = C_b` (eigendecomposition, so a
      singular :math:`C_b` is fine), :math:`z_s \sim N(0, I)`; standard error :math:`\le 0.5/\sqrt S`.

    Args:
        state: a :class:`DiagLaplaceState`, :class:`DenseLaplaceState` or
            :class:`~bayesflow.laplace.kfac.KFACLaplaceState` (its ``params`` :math:`\mu`).
        forward: ``forward(params, batch) -> (output, aux)``, ``output`` ``(B, out)`` (logits for
            classification).
        batch: the inputs, passed to ``forward`` as they are.
        likelihood: ``"classification"`` or ``"regression"``.
        link_approx: ``"probit"`` or ``"mc"`` (classification only; checked, and unused, for regression).
        n_samples: the number of Gaussian draws :math:`S` for ``link_approx="mc"``.
        noise_var: :math:`\sigma^2 \ge 0` for regression, a number or an ``(out,)`` tensor (one per output).
        generator: the ``torch.Generator`` of the ``"mc"`` draws; torch's global one when None.

    Returns:
        Classification: the ``(B, out)`` predictive probabilities (``out = 1``: of class 1). Regression:
        ``(mean, cov)``, ``(B, out)`` and ``(B, out, out)``.

    Raises:
        TypeError: ``state`` is no Laplace state, ``forward`` returns no ``(output, aux)`` or no tensor.
        ValueError: an unknown ``likelihood`` or ``link_approx``, an ``output`` that is not ``(B, out)``,
            ``n_samples < 1``, a negative or misshapen ``noise_var`` (or one given for classification),
            or a precision that is not positive definite.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_ggn
        >>> from bayesflow.laplace.predictive import glm_predictive
        >>> forward = lambda w, x: (x @ w, torch.tensor([]))            # f(x) = x·w, one output
        >>> state = dense_ggn.init(torch.zeros(2, 1), init_prec=torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> mean, cov = glm_predictive(state, forward, torch.tensor([[1.0, 1.0], [1.0, -1.0]]), "regression",
        ...                            noise_var=0.5)
        >>> cov.flatten()   # xᵀ P⁻¹ x + σ²: 2/3 + 0.5 and 2 + 0.5
        tensor([1.1667, 2.5000])
    """
    _check_choice("likelihood", likelihood, LIKELIHOODS)
    _check_choice("link_approx", link_approx, LINK_APPROXIMATIONS)
    _check_state(state)
    with torch.no_grad():
        mean, _ = forward_output("glm_predictive", forward, state.params, batch)
        mean = mean.detach()
        noise = _noise(noise_var, likelihood, mean)
        if link_approx == "mc" and likelihood == "classification":
            _check_count("n_samples", n_samples)
        cov = _glm_covariance(state, forward, batch, mean)
        if likelihood == "regression":
            return mean, cov + torch.diag_embed(noise.expand(mean.shape))
        if link_approx == "probit":
            return _probabilities(mean / torch.sqrt(1 + _PROBIT_SCALE * torch.diagonal(cov, dim1=-2, dim2=-1)))
        return _glm_monte_carlo(mean, cov, n_samples, generator)


def mc_predictive(state: LaplaceState, forward: ForwardFn, batch: Any, likelihood: str, n_samples: int = 100, *,
                  noise_var: float | torch.Tensor = 0.0, generator: torch.Generator | None = None,
                  chunk_size: int = 32) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Monte Carlo over the Laplace posterior's parameters: :math:`\theta_s \sim N(\mu, \Sigma)`, no linearisation.

    With :math:`f_s = f(x_b \mid \theta_s)` for :math:`S` draws (the state's ``sample``: diagonal, dense
    with one Cholesky factor of :math:`P` for all chunks, or KFAC's matrix normal):

    * ``"classification"``: :math:`\frac1S \sum_s \mathrm{softmax}(f_s)` (:math:`\sigma` for ``out = 1``),
      laplace-torch's ``pred_type="nn", link_approx="mc"``; standard error :math:`\le 0.5/\sqrt S`.
    * ``"regression"``: the sample mean :math:`\bar f = \frac1S \sum_s f_s` and covariance
      :math:`\frac1{S-1} \sum_s (f_s - \bar f)(f_s - \bar f)^\top + \sigma^2 I` (accumulated around
      :math:`f(x_b \mid \mu)`, which keeps the sums well conditioned).

    The draws are taken and pushed through ``forward`` ``chunk_size`` at a time (``vmap`` over the
    chunk; a loop over it when ``forward`` cannot be vmapped), so memory is that of ``chunk_size``
    parameter copies and forwards, whatever ``n_samples``.

    Args:
        state: a :class:`DiagLaplaceState`, :class:`DenseLaplaceState` or
            :class:`~bayesflow.laplace.kfac.KFACLaplaceState` (precision positive definite).
        forward: ``forward(params, batch) -> (output, aux)``, ``output`` ``(B, out)``.
        batch: the inputs, passed to ``forward`` as they are.
        likelihood: ``"classification"`` or ``"regression"``.
        n_samples: :math:`S \ge 1` (:math:`\ge 2` for regression).
        noise_var: :math:`\sigma^2 \ge 0` for regression, a number or an ``(out,)`` tensor.
        generator: the ``torch.Generator`` of the parameter draws; torch's global one when None.
        chunk_size: the number of draws held at once.

    Returns:
        Classification: the ``(B, out)`` predictive probabilities. Regression: ``(mean, cov)``,
        ``(B, out)`` and ``(B, out, out)``.

    Raises:
        TypeError / ValueError: as :func:`glm_predictive`; ``n_samples`` or ``chunk_size`` not a positive int.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_fisher
        >>> from bayesflow.laplace.predictive import mc_predictive
        >>> forward = lambda w, x: (x @ w, torch.tensor([]))     # 3-class logits, f(x) = x W
        >>> state = diag_fisher.init(torch.zeros(2, 3), init_prec_diag=1.0)
        >>> probs = mc_predictive(state, forward, torch.ones(4, 2), "classification", 1000,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> probs.shape, probs[0].round(decimals=2)   # symmetric classes: each ≈ 1/3
        (torch.Size([4, 3]), tensor([0.3300, 0.3300, 0.3400]))
    """
    _check_choice("likelihood", likelihood, LIKELIHOODS)
    _check_count("n_samples", n_samples)
    _check_count("chunk_size", chunk_size)
    if likelihood == "regression" and n_samples < 2:
        raise ValueError(f"mc_predictive needs n_samples ≥ 2 for a regression covariance, got {n_samples}")
    _check_state(state)
    with torch.no_grad():
        center, _ = forward_output("mc_predictive", forward, state.params, batch)
        center = center.detach()
        noise = _noise(noise_var, likelihood, center)
        total = torch.zeros_like(center)
        squares = center.new_zeros(*center.shape, center.shape[1]) if likelihood == "regression" else None
        for outputs in _output_chunks(state, forward, batch, n_samples, generator, chunk_size):
            if likelihood == "classification":
                total += _probabilities(outputs).sum(0)
            else:
                shifted = outputs - center
                total += shifted.sum(0)
                squares += torch.einsum("sbi,sbj->bij", shifted, shifted)
        if likelihood == "classification":
            return total / n_samples
        shift = total / n_samples
        cov = (squares - n_samples * shift.unsqueeze(-1) * shift.unsqueeze(-2)) / (n_samples - 1)
        return center + shift, cov + torch.diag_embed(noise.expand(center.shape))


def predictive_samples(state: LaplaceState, forward: ForwardFn, batch: Any, likelihood: str, n_samples: int = 100,
                       *, generator: torch.Generator | None = None, chunk_size: int = 32) -> torch.Tensor:
    r"""Per-draw outputs :math:`\mathrm{link}\,f(x_b \mid \theta_s)`, :math:`\theta_s \sim N(\mu, \Sigma)`, unaveraged.

    laplace-torch's ``predictive_samples(x, pred_type="nn")``: the link is softmax (:math:`\sigma` for
    ``out = 1``) for ``"classification"`` and the identity (the model output, no observation noise) for
    ``"regression"``. Draws are taken ``chunk_size`` at a time as in :func:`mc_predictive`; the result
    itself is ``(n_samples, B, out)``.

    Args:
        state, forward, batch, likelihood, generator, chunk_size: as in :func:`mc_predictive`.
        n_samples: the number of draws :math:`S \ge 1`.

    Returns:
        The ``(n_samples, B, out)`` outputs, draw ``s`` in row ``s``.

    Raises:
        TypeError / ValueError: as :func:`mc_predictive`.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_fisher
        >>> from bayesflow.laplace.predictive import predictive_samples
        >>> forward = lambda w, x: (x @ w, torch.tensor([]))
        >>> state = dense_fisher.init(torch.zeros(2, 1), init_prec=1e6)   # draws within ~1e-3 of μ = 0
        >>> draws = predictive_samples(state, forward, torch.ones(5, 2), "classification", 10)
        >>> draws.shape, bool((draws - 0.5).abs().max() < 0.01)
        (torch.Size([10, 5, 1]), True)
    """
    _check_choice("likelihood", likelihood, LIKELIHOODS)
    _check_count("n_samples", n_samples)
    _check_count("chunk_size", chunk_size)
    _check_state(state)
    with torch.no_grad():
        forward_output("predictive_samples", forward, state.params, batch)
        chunks = list(_output_chunks(state, forward, batch, n_samples, generator, chunk_size))
        outputs = torch.cat(chunks)
        return _probabilities(outputs) if likelihood == "classification" else outputs


# ----------------------------------------------------------------------------------------------------
# The linearised Gaussian
