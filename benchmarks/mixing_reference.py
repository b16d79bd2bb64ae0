r"""The exact reference of the logistic-regression target (issue 15 (d)): long full-batch HMC, checked
against importance sampling, cached in ``benchmarks/results/mixing_reference.json``.

Posterior of Bayesian logistic regression with prior N(0, τ² I):

.. math:: \log p(θ \mid X, y) = \sum_i \big(y_i z_i - \log(1 + e^{z_i})\big) - \frac{|θ|^2}{2τ^2} + c,
          \qquad z = Xθ.

* **Laplace**: the mode θ̂ by Newton's method, Σ_L = H⁻¹ with H = Xᵀ diag(p(1−p)) X + I/τ².
* **HMC** (the reference): ``chains`` independent chains started from N(θ̂, Σ_L), run in the
  whitened coordinates u = C⁻¹(θ − θ̂) (C = chol Σ_L, i.e. mass matrix Σ_L⁻¹), leapfrog step
  ε·U(0.8, 1.2) and 3–6 leapfrog steps drawn per iteration (no periodicities), Metropolis accept.
  Moments are pooled over chains; their standard errors are the spread of the per-chain estimates
  over √chains (the chains are independent, so autocorrelation is accounted for).
* **Check**: self-normalised importance sampling from a multivariate t₇ around θ̂ with scale 1.2²Σ_L,
  standard errors by the delta method (Σ w̃ᵢ²(fᵢ − f̂)²). The reference is accepted when every one
  of the d + d(d+1)/2 moments agrees, max |z| < 4 (z = difference / combined standard error; a
  false alarm over 65 moments has probability ≈ 0.4 %). The same statistic for the Laplace
  moments is recorded to show the check resolves the posterior's non-Gaussianity.

Example (a tiny problem; the benchmark's runs on N = 500, d = 10):
    >>> import torch
    >>> from mixing_reference import laplace, reference_moments
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(50, 2, generator=g, dtype=torch.float64)
    >>> p = torch.sigmoid(X @ torch.ones(2, dtype=torch.float64))
    >>> y = (torch.rand(50, generator=g, dtype=torch.float64) < p).double()
    >>> ref = reference_moments(X, y, prior_var=1.0, chains=64, draws=400, is_draws=20000, seed=0)
    >>> ref["validation"]["passed"], ref["validation"]["laplace_max_abs_z"] > ref["validation"]["max_abs_z"]
    (True, True)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

__all__ = ["cached_reference", "laplace", "log_posterior_and_grad", "reference_moments"]

Z_LIMIT = 4.0


def log_posterior_and_grad(theta: torch.Tensor, X: torch.Tensor, y: torch.Tensor, prior_var: float,
                           value: bool = True):
    """Total log posterior (up to a constant; None unless ``value``) and its gradient, ``theta`` of shape ``(C, d)``."""
    z = theta @ X.T
    grad = (y - torch.sigmoid(z)) @ X - theta / prior_var
    if not value:
        return None, grad
    return (y * z - torch.nn.functional.softplus(z)).sum(-1) - (theta**2).sum(-1) / (2 * prior_var), grad


def laplace(X: torch.Tensor, y: torch.Tensor, prior_var: float, iterations: int = 50):
    """Mode θ̂ (Newton) and Laplace covariance H⁻¹ of the logistic-regression posterior."""
    d = X.shape[1]
    theta = torch.zeros(d, dtype=X.dtype)
    for _ in range(iterations):
        _, grad = log_posterior_and_grad(theta[None], X, y, prior_var)
        p = torch.sigmoid(X @ theta)
        hessian = (X.T * (p * (1 - p))) @ X + torch.eye(d, dtype=X.dtype) / prior_var
        step = torch.linalg.solve(hessian, grad[0])
        theta = theta + step
        if float(step.abs().max()) < 1e-13:
            break
    p = torch.sigmoid(X @ theta)
    hessian = (X.T * (p * (1 - p))) @ X + torch.eye(d, dtype=X.dtype) / prior_var
    return theta, torch.linalg.inv(hessian)


def _hmc(X, y, prior_var, mode, chol, chains, warmup, draws, step, generator):
    d = mode.numel()

    def grad_u(u, value=True):
        value, grad = log_posterior_and_grad(mode + u @ chol.T, X, y, prior_var, value)
        return value, grad @ chol

    u = torch.randn(chains, d, generator=generator, dtype=X.dtype)
    value, grad = grad_u(u)
    total = torch.zeros(chains, d, dtype=X.dtype)
    outer = torch.zeros(chains, d, d, dtype=X.dtype)
    accepted = 0.0
    for it in range(warmup + draws):
        eps = step * (0.8 + 0.4 * float(torch.rand((), generator=generator)))
        leaps = int(torch.randint(3, 7, (), generator=generator))
        p0 = torch.randn(chains, d, generator=generator, dtype=X.dtype)
        u1, p, g = u, p0 + 0.5 * eps * grad, grad
        for leap in range(leaps):
            u1 = u1 + eps * p
            v1, g = grad_u(u1, value=leap == leaps - 1)
            p = p + (eps if leap < leaps - 1 else 0.5 * eps) * g
        log_ratio = v1 - 0.5 * (p**2).sum(-1) - value + 0.5 * (p0**2).sum(-1)
        accept = torch.log(torch.rand(chains, generator=generator, dtype=X.dtype)) < log_ratio
        u = torch.where(accept[:, None], u1, u)
        value, grad = torch.where(accept, v1, value), torch.where(accept[:, None], g, grad)
        if it >= warmup:
            accepted += float(accept.double().mean())
            total += u
            outer += u[:, :, None] * u[:, None, :]
    n = draws
    chain_mean = total / n                                      # per chain, whitened coordinates
    pooled = chain_mean.mean(0)
    chain_second = outer / n - chain_mean[:, :, None] * pooled[None, None, :] - pooled[None, :, None] * \
        chain_mean[:, None, :] + pooled[:, None] * pooled[None, :]   # per chain, about the pooled mean
    theta_means = mode + chain_mean @ chol.T
    theta_covs = chol @ chain_second @ chol.T
    return {"mean": theta_means.mean(0), "cov": theta_covs.mean(0),
            "se_mean": theta_means.std(0) / math.sqrt(chains), "se_cov": theta_covs.std(0) / math.sqrt(chains),
            "accept": accepted / draws}


def _importance(X, y, prior_var, mode, chol, draws, generator, nu=7.0, scale=1.2):
    d = mode.numel()
    z = torch.randn(draws, d, generator=generator, dtype=X.dtype)
    chi2 = 2 * torch._standard_gamma(torch.full((draws,), nu / 2, dtype=X.dtype), generator=generator)
    t = z * (nu / chi2).sqrt()[:, None]
    theta = mode + scale * t @ chol.T
    log_q = -(nu + d) / 2 * torch.log1p((t**2).sum(-1) / nu)
    log_p = torch.cat([log_posterior_and_grad(part, X, y, prior_var)[0] for part in theta.split(20000)])
    w = torch.softmax(log_p - log_q, 0)
    mean = w @ theta
    centred = theta - mean
    f = centred[:, :, None] * centred[:, None, :]
    cov = torch.einsum("n,nij->ij", w, f)
    se_mean = ((w**2) @ (centred**2)).sqrt()
    se_cov = torch.einsum("n,nij->ij", w**2, (f - cov) ** 2).sqrt()
    return {"mean": mean, "cov": cov, "se_mean": se_mean, "se_cov": se_cov, "ess": float(1 / (w**2).sum())}


def _max_abs_z(a: dict, b_mean, b_cov, b_se_mean=None, b_se_cov=None) -> float:
    rows, cols = torch.triu_indices(len(b_mean), len(b_mean))
    se_mean = a["se_mean"] ** 2 + (0 if b_se_mean is None else b_se_mean**2)
    se_cov = a["se_cov"] ** 2 + (0 if b_se_cov is None else b_se_cov**2)
    z_mean = (a["mean"] - b_mean) / se_mean.sqrt()
    z_cov = ((a["cov"] - b_cov) / se_cov.sqrt())[rows, cols]
    return float(torch.cat([z_mean, z_cov]).abs().max())


def reference_moments(X: torch.Tensor, y: torch.Tensor, prior_var: float, *, chains: int = 256,
                      warmup: int = 200, draws: int = 8000, step: float = 0.45, is_draws: int = 400_000,
                      seed: int = 0) -> dict:
    """HMC moments of the logistic-regression posterior, validated by importance sampling.

    Returns:
        ``{"mean", "cov", "se_mean", "se_cov"}`` (lists) and ``"validation"``: HMC acceptance, the IS
        effective sample size, ``max_abs_z`` (HMC vs IS), ``laplace_max_abs_z`` (Laplace vs HMC),
        ``passed``.
    """
    X, y = X.to(torch.float64), y.to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    mode, laplace_cov = laplace(X, y, prior_var)
    chol = torch.linalg.cholesky(laplace_cov)
    hmc = _hmc(X, y, prior_var, mode, chol, chains, warmup, draws, step, generator)
    imp = _importance(X, y, prior_var, mode, chol, is_draws, generator)
    z_is = _max_abs_z(hmc, imp["mean"], imp["cov"], imp["se_mean"], imp["se_cov"])
    z_laplace = _max_abs_z(hmc, mode, laplace_cov)
    validation = {"hmc_accept": hmc["accept"], "hmc_chains": chains, "hmc_draws_per_chain": draws,
                  "is_draws": is_draws, "is_ess": imp["ess"], "max_abs_z": z_is, "z_limit": Z_LIMIT,
                  "laplace_max_abs_z": z_laplace, "passed": z_is < Z_LIMIT}
    return {**{k: hmc[k].tolist() for k in ("mean", "cov", "se_mean", "se_cov")}, "validation": validation}


def cached_reference(path: Path, spec: dict, X: torch.Tensor, y: torch.Tensor, prior_var: float,
                     verbose: bool = True) -> dict:
    """:func:`reference_moments`, read from ``path`` when it was computed for the same ``spec`` (the
    data's definition and fingerprint), else computed (and refused if its validation fails) and saved."""
    path = Path(path)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("spec") == spec:
            return stored
    if verbose:
        print("computing the HMC reference of the logistic-regression target (cached afterwards)", flush=True)
    result = {"spec": spec, **reference_moments(X, y, prior_var)}
    if not result["validation"]["passed"]:
        raise RuntimeError(f"the HMC reference disagrees with importance sampling: {result['validation']}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result
