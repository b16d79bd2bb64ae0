r"""Sample-quality metrics of the mixing benchmark (issue 15): Gaussian W2, multi-chain ESS, run statistics.

* :func:`gaussian_w2` — the 2-Wasserstein distance between two Gaussians,

  .. math:: W_2^2 = |μ_1 - μ_2|^2 + \operatorname{tr}Σ_1 + \operatorname{tr}Σ_2
            - 2\operatorname{tr}\big(Σ_2^{1/2} Σ_1 Σ_2^{1/2}\big)^{1/2},

  reported as :math:`W_2 / \sqrt{\operatorname{tr}Σ}` of the exact Σ (scale-free).
* :func:`ess` — Stan's multi-chain effective sample size (Vehtari et al. 2021, without rank
  normalisation): within-chain autocovariances by FFT, ρ_t = 1 − (W − mean_m γ_{m,t})/var⁺,
  Geyer's initial positive sequence of pair sums made monotone, ESS = M n / (−1 + 2 Σ P_k).
* :class:`RunStatistics` — moments and ESS summaries of a batched run of S settings × R chains,
  accumulated in chunks (a run of 56 chains × 18 000 samples × 100 dimensions is never stored).

Example:
    >>> import torch
    >>> from mixing_metrics import ess, gaussian_w2
    >>> eye, zero = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> round(float(gaussian_w2(zero, eye, zero + 1, eye) ** 2), 9)   # |μ1 − μ2|² = 2
    2.0
    >>> round(float(gaussian_w2(zero, 4 * eye, zero, eye) ** 2), 9)   # (2 − 1)² per dimension
    2.0
    >>> x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> 0.9 < float(ess(x)) / 20000 < 1.1                                  # iid draws: ESS ≈ M n
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["RunStatistics", "ess", "gaussian_w2", "psd_sqrt"]


def psd_sqrt(cov: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a (batch of) positive semi-definite matrices (negative eigenvalues clipped)."""
    values, vectors = torch.linalg.eigh(cov)
    return (vectors * values.clamp(min=0).sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)


def gaussian_w2(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor,
                cov2_sqrt: torch.Tensor | None = None) -> torch.Tensor:
    """W2 between N(mean1, cov1) and N(mean2, cov2); mean1/cov1 may carry leading batch dimensions.

    Args:
        mean1, cov1: ``(..., d)`` and ``(..., d, d)`` (e.g. the Gaussian fits of many settings).
        mean2, cov2: ``(d,)`` and ``(d, d)``, the reference.
        cov2_sqrt: ``cov2``'s symmetric square root if already computed.

    Returns:
        ``(...)`` tensor of distances; ``inf`` where the inputs are not finite.
    """
    root = psd_sqrt(cov2) if cov2_sqrt is None else cov2_sqrt
    finite = torch.isfinite(cov1).flatten(-2).all(-1) & torch.isfinite(mean1).all(-1)
    safe = torch.where(finite[..., None, None], cov1, torch.eye(cov1.shape[-1], dtype=cov1.dtype))
    middle = root @ safe @ root
    cross = torch.linalg.eigvalsh((middle + middle.transpose(-1, -2)) / 2).clamp(min=0).sqrt().sum(-1)
    squared = ((torch.where(finite[..., None], mean1, 0.0) - mean2) ** 2).sum(-1) + safe.diagonal(
        dim1=-2, dim2=-1).sum(-1) + cov2.diagonal().sum() - 2 * cross
    return torch.where(finite, squared.clamp(min=0).sqrt(), torch.inf)


def ess(x: torch.Tensor) -> torch.Tensor:
    """Multi-chain effective sample size of ``x`` of shape ``(..., M, n)`` (M chains of n draws).

    Returns:
        ``(...)`` tensor; 0 where a chain is not finite or constant.
    """
    x = x.to(torch.float64)
    *lead, chains, n = x.shape
    finite = torch.isfinite(x).flatten(-2).all(-1)
    x = torch.where(finite[..., None, None], x, 0.0)
    centred = x - x.mean(-1, keepdim=True)
    spectrum = torch.fft.rfft(centred, n=2 * n)
    acov = torch.fft.irfft(spectrum * spectrum.conj(), n=2 * n)[..., :n] / n  # (..., M, n), biased
    within = (acov[..., 0] * n / (n - 1)).mean(-1)
    between = x.mean(-1).var(-1) if chains > 1 else torch.zeros_like(within)
    var_plus = within * (n - 1) / n + between
    ok = finite & (var_plus > 0)
    var_plus = torch.where(ok, var_plus, 1.0)
    rho = 1 - (within[..., None] - acov.mean(-2)) / var_plus[..., None]
    rho[..., 0] = 1.0
    pairs = n // 2
    sums = (rho[..., 0:2 * pairs:2] + rho[..., 1:2 * pairs:2]).numpy()
    positive = np.cumprod(sums > 0, axis=-1).astype(bool)  # Geyer: stop at the first negative pair
    monotone = np.minimum.accumulate(np.where(positive, sums, np.inf), axis=-1)
    tau = -1 + 2 * np.where(positive, monotone, 0.0).sum(-1)
    total = chains * n
    value = torch.as_tensor(total / np.maximum(tau, 1.0 / math.log10(total)), dtype=torch.float64)
    return torch.where(ok, value, 0.0).reshape(lead)


class RunStatistics:
    r"""Moments and ESS summaries of samples from ``settings × replicates`` chains (chain k belongs to
    setting ``k // replicates``), accumulated in chunks of ``chunk`` steps.

    Per chain it keeps Σ(θ−μ) and Σ(θ−μ)(θ−μ)ᵀ about the exact mean μ, and a float32 trace of four
    scalar summaries for the ESS: the coordinates along the exact covariance's largest-, median- and
    smallest-variance principal axes (standardised) and the squared Mahalanobis radius
    (θ−μ)ᵀΣ⁻¹(θ−μ). At each sample count in ``checkpoints`` it records the pooled and per-chain
    metric W2/√tr Σ of every setting (the error-vs-gradients curve).

    Args:
        settings, replicates: S and R (the run has S·R chains).
        mean, cov: the exact posterior moments, ``(d,)`` and ``(d, d)``.
        samples: samples per chain that will be added.
        checkpoints: sample counts (≤ ``samples``) at which to record the curve.
        chunk: steps buffered between reductions.
    """

    def __init__(self, settings: int, replicates: int, mean: torch.Tensor, cov: torch.Tensor, samples: int,
                 checkpoints=(), chunk: int = 250):
        self.settings, self.replicates, self.chains = settings, replicates, settings * replicates
        self.mean, self.cov = mean.to(torch.float64), cov.to(torch.float64)
        self.cov_sqrt, self.scale = psd_sqrt(self.cov), float(self.cov.diagonal().sum().sqrt())
        d = mean.numel()
        values, vectors = torch.linalg.eigh(self.cov)
        picks = sorted({d - 1, d // 2, 0}, reverse=True)  # largest, median, smallest variance
        self.axes = vectors[:, picks] / values[picks].sqrt()
        self.whiten = vectors / values.sqrt()
        self.sum = torch.zeros(self.chains, d, dtype=torch.float64)
        self.outer = torch.zeros(self.chains, d, d, dtype=torch.float64)
        self.buffer = torch.empty(chunk, self.chains, d, dtype=torch.float64)
        self.trace = torch.empty(samples, self.chains, len(picks) + 1, dtype=torch.float32)
        self.count = self.filled = 0
        self.checkpoints = sorted(c for c in set(checkpoints) if 0 < c <= samples)
        self.curve: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, params: torch.Tensor) -> None:
        """Record one sample of every chain, ``params`` of shape ``(S·R, d)``."""
        self.buffer[self.filled].copy_(params)
        self.filled += 1
        if self.filled == len(self.buffer) or self.count + self.filled in self.checkpoints:
            self._flush()
            if self.count in self.checkpoints:
                self.curve[self.count] = self.metrics(ess_too=False)

    def _flush(self) -> None:
        x = self.buffer[:self.filled] - self.mean  # (n, K, d)
        self.sum += x.sum(0)
        chains_first = x.transpose(0, 1)
        self.outer += chains_first.transpose(1, 2) @ chains_first
        summaries = torch.cat([x @ self.axes, ((x @ self.whiten) ** 2).sum(-1, keepdim=True)], -1)
        self.trace[self.count:self.count + self.filled] = summaries.to(torch.float32)
        self.count += self.filled
        self.filled = 0

    def _fits(self, total: torch.Tensor, outer: torch.Tensor, n: int):
        offset = total / n
        cov = outer / n - offset.unsqueeze(-1) * offset.unsqueeze(-2)
        return offset + self.mean, cov

    def metrics(self, ess_too: bool = True) -> dict[str, torch.Tensor]:
        """Per setting: ``w2`` (pooled fit), ``w2_chain`` (mean over chains of each chain's fit),
        ``mean_bias`` (|μ̂ − μ|/√tr Σ), ``trace_bias`` (tr Σ̂ / tr Σ − 1), ``diverged``; with
        ``ess_too`` also ``ess`` ((S, 4): the four summaries) and ``ess_min``."""
        if self.filled:
            self._flush()
        n, s, r = self.count, self.settings, self.replicates
        grouped = self.sum.view(s, r, -1).sum(1), self.outer.view(s, r, *self.outer.shape[1:]).sum(1)
        pooled_mean, pooled_cov = self._fits(*grouped, n * r)
        chain_mean, chain_cov = self._fits(self.sum, self.outer, n)
        w2 = gaussian_w2(pooled_mean, pooled_cov, self.mean, self.cov, self.cov_sqrt) / self.scale
        w2_chain = gaussian_w2(chain_mean, chain_cov, self.mean, self.cov, self.cov_sqrt).view(s, r) / self.scale
        out = {"w2": w2, "w2_chain": w2_chain.mean(1), "diverged": ~torch.isfinite(w2),
               "mean_bias": (pooled_mean - self.mean).norm(dim=-1) / self.scale,
               "trace_bias": pooled_cov.diagonal(dim1=-2, dim2=-1).sum(-1) / self.scale**2 - 1}
        if ess_too:
            trace = self.trace[:n].permute(2, 1, 0).reshape(-1, s, r, n)  # (summary, S, R, n)
            values = ess(trace).T  # (S, summary)
            out["ess"], out["ess_min"] = values, values.min(-1).values
        return out
