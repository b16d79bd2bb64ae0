r"""Running moments and the matrix roots a learned mass is made of (:mod:`bayesflow.engine.learned_mass`).

* :func:`welford_dense` / :func:`welford_diag` — Welford's running mean and scatter, one sample per
  chain, or every chain's samples pooled (Chan, Golub & LeVeque's merge);
* :func:`symmetric_root` — :math:`A^{1/2}` of a symmetric PSD matrix (batched, eigh in float64);
* :func:`geometric_mean` — the SPD Σ with :math:`Σ B Σ = A`,
  :math:`Σ = B^{-1/2}(B^{1/2} A B^{1/2})^{1/2} B^{-1/2}` (Σ = A when B = A⁻¹).

Why the geometric mean: for a Gaussian law ∝ exp(−H/T) with covariance Σ, the potential gradient
:math:`g = \nabla H = TΣ^{-1}(θ - μ)` has :math:`\operatorname{Cov} g = T^2 Σ^{-1} C Σ^{-1}` for *any*
law of θ with covariance C — so :math:`T\cdot\mathrm{gm}(C, \operatorname{Cov} g)` is Σ exactly, from
draws that are neither stationary nor many (n > d), where the draws' covariance C alone is only
right at stationarity. This is nutpie's mass-matrix estimate (Seyboldt et al., 2024); the diagonal
version is :math:`T\sqrt{\operatorname{Var}θ_i / \operatorname{Var} g_i}`.

Example (the geometric mean recovers Σ from a non-stationary cloud and its gradients):
    >>> import torch
    >>> from bayesflow.engine.moments import geometric_mean
    >>> sigma = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    >>> theta = 3.0 * torch.randn(50, 2, dtype=torch.float64)          # far too spread: C ≠ Σ
    >>> grads = theta @ torch.linalg.inv(sigma)                          # g = Σ⁻¹θ at T = 1
    >>> torch.allclose(geometric_mean(torch.cov(theta.T), torch.cov(grads.T)), sigma)
    True
"""

from __future__ import annotations

import torch

__all__ = ["geometric_mean", "symmetric_root", "welford_dense", "welford_diag"]


def _eigh(matrix: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh in float64, raising FloatingPointError (the chains diverged) where it cannot be taken."""
    problem = None
    if not bool(torch.isfinite(matrix).all()):
        problem = "is not finite"
    else:
        try:
            return torch.linalg.eigh(matrix.double())
        except torch.linalg.LinAlgError:
            problem = "has no eigendecomposition"
    raise FloatingPointError(f"LearnedMass: the running {what} at the end of a burn-in window {problem}: the "
                             "chains diverged while the mass was learned; lower burn_in_lr (the step in the "
                             "target's own units) or lengthen the windows")


def _power(eigenvalues: torch.Tensor, vectors: torch.Tensor, power: float) -> torch.Tensor:
    scaled = vectors * eigenvalues.clamp_min(0.0).pow(power).unsqueeze(-2)
    return scaled @ vectors.transpose(-1, -2)


def symmetric_root(covariance: torch.Tensor, what: str = "covariance of θ") -> torch.Tensor:
    """The symmetric PSD square root of ``covariance`` (batched ``(..., d, d)``), in its dtype.

    Raises FloatingPointError when the matrix is not finite or not decomposable.
    """
    eigenvalues, vectors = _eigh(covariance, what)
    return _power(eigenvalues, vectors, 0.5).to(covariance.dtype)


def geometric_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""The SPD solution Σ of :math:`Σ b Σ = a` (batched ``(..., d, d)``; ``b`` positive definite).

    Computed in float64 as :math:`b^{-1/2}(b^{1/2} a b^{1/2})^{1/2} b^{-1/2}`; returned in a's dtype.
    """
    values, vectors = _eigh(b, "covariance of the gradients")
    if bool((values <= 0).any()):
        raise FloatingPointError("LearnedMass: the covariance of the gradients is singular at the end of a burn-in "
                                 "window (raise jitter, or lengthen the windows beyond d draws)")
    root, inverse_root = _power(values, vectors, 0.5), _power(values, vectors, -0.5)
    middle = root @ a.double() @ root
    mid_values, mid_vectors = _eigh(0.5 * (middle + middle.transpose(-1, -2)), "covariance of θ")
    return (inverse_root @ _power(mid_values, mid_vectors, 0.5) @ inverse_root).to(a.dtype)


def welford_dense(mean: torch.Tensor, scatter: torch.Tensor, x: torch.Tensor, n: int, pool: bool) -> None:
    """Welford's update of (mean, scatter) with sample(s) x, the n-th of the window (Chan's when pooled)."""
    if n == 1:
        scatter.zero_()
        mean.zero_()
    if pool:  # K samples at once: the chains' batch mean and scatter, merged (Chan, Golub & LeVeque)
        K = x.shape[0]
        batch_mean = x.mean(0)
        centred = x - batch_mean
        delta = batch_mean - mean[0]
        before = K * (n - 1)
        total = before + K
        merged = scatter[0] + centred.T @ centred + torch.outer(delta, delta) * (before * K / total)
        scatter.copy_(merged.expand_as(scatter))
        mean.copy_((mean[0] + delta * (K / total)).expand_as(mean))
        return
    delta = x - mean
    mean.add_(delta, alpha=1.0 / n)
    scatter.add_(delta.unsqueeze(-1) * (x - mean).unsqueeze(-2))


def welford_diag(mean: list, scatter: list, x: list, n: int, pool: bool) -> None:
    """Welford's update per element of the leaves ``x`` (pooled over the leading chain dimension)."""
    if n == 1:
        torch._foreach_zero_(scatter)
        torch._foreach_zero_(mean)
    if pool:  # per element over the chain dimension, kept replicated per chain
        K = x[0].shape[0]
        for m, s, leaf in zip(mean, scatter, x):
            batch_mean = leaf.mean(0, keepdim=True)
            delta = batch_mean - m[:1]
            before = K * (n - 1)
            total = before + K
            s.copy_((s[:1] + ((leaf - batch_mean) ** 2).sum(0, keepdim=True)
                     + delta * delta * (before * K / total)).expand_as(s))
            m.copy_((m[:1] + delta * (K / total)).expand_as(m))
        return
    delta = torch._foreach_sub(x, mean)
    torch._foreach_add_(mean, delta, alpha=1.0 / n)
    torch._foreach_addcmul_(scatter, delta, torch._foreach_sub(x, mean))
