r"""The four targets of the mixing benchmark (issue 15), their data (fixed seeds) and exact moments.

Every log posterior follows the library convention — ``log_posterior(params, batch)`` is **per
datum** (mean log likelihood over the batch + log prior / N) and the temperature T = 1/N samples the
posterior — and is **batched**: ``params`` of shape ``(K, d)`` (K chains), ``batch`` None (full
data) or an index tensor ``(K, B)`` (one mini-batch per chain), value of shape ``(K,)``.

=====  ==================================================================  ==========================
name   target                                                              exact moments
=====  ==================================================================  ==========================
a      2-D Gaussian, precision eigenvalues 1, 100, rotated 30°, T = 1        closed form
b      100-D Gaussian, precision eigenvalues log-spaced 1…100, random        closed form
       rotation, T = 1
c      linear regression, N = 1000, d = 20, x ~ N(0, C) with C's             closed form
       eigenvalues log-spaced 1…0.1 (random rotation), noise σ = 1,
       prior N(0, I), batch 32, T = 1/N
d      logistic regression, N = 500, d = 10, x ~ N(0, I), w* ~ N(0, I),      HMC, checked by importance
       prior N(0, I), batch 32, T = 1/N                                     sampling (mixing_reference)
=====  ==================================================================  ==========================

Mini-batches are drawn uniformly with replacement, independently per chain and step, from a
stream fixed by a seed (the same stream for every configuration: common random numbers).

Example:
    >>> from mixing_targets import make_target
    >>> target = make_target("a")
    >>> target.dim, abs(target.log_posterior(target.mean[None], None)[0].item())   # at the mean: 0
    (2, 0.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["GOALS", "ISSUE", "TARGETS", "Target", "make_target"]

DTYPE = torch.float64
DATA_SEED = 15
TARGETS = ("a", "b", "c", "d")
GOALS = {"a": 0.014, "b": 0.035, "c": 0.04, "d": 0.03}
"""Issue 15's target W2/√tr Σ per target."""
ISSUE = {"a": (0.019, 0.028, 0.008), "b": (0.061, 0.062, 0.029), "c": (0.188, 0.183, 0.017),
         "d": (0.121, 0.102, 0.014)}
"""Issue 15's measured (bayesflow best, posteriors best, iid floor) before the work."""


@dataclasses.dataclass
class Target:
    """One target: its batched per-datum log posterior, exact moments, curvature scales and data."""

    name: str
    title: str
    log_posterior: Callable
    mean: torch.Tensor
    cov: torch.Tensor
    temperature: float
    curvature: tuple[float, float]  # (λ_min, λ_max) of −∇²ℓ, the per-datum Hessian (per unit time)
    step_range: tuple[float, float]  # dimensionless step u: h = u/λ_max (first order), u/√λ_max (momentum)
    num_data: int | None = None
    batch_size: int | None = None
    data: dict = dataclasses.field(default_factory=dict)
    reference: str = "closed form"
    spec: dict = dataclasses.field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def goal(self) -> float:
        return GOALS[self.name]

    def single(self, params: torch.Tensor, batch):
        """The single-chain log posterior (``params`` ``(d,)``, ``batch`` ``(B,)`` or None), for vmap."""
        value, aux = self.log_posterior(params[None], None if batch is None else batch[None])
        return value[0], aux

    def batches(self, steps: int, replicates: int, seed: int) -> torch.Tensor | None:
        """Mini-batch indices ``(steps, replicates, B)`` (None for a full-batch target)."""
        if self.batch_size is None:
            return None
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(self.num_data, (steps, replicates, self.batch_size), generator=generator)

    def initial(self, replicates: int, seed: int) -> torch.Tensor:
        """Starting points ``(replicates, d)``: overdispersed draws μ + 2 Σ^{1/2} z."""
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(replicates, self.dim, generator=generator, dtype=DTYPE)
        return self.mean + 2 * z @ torch.linalg.cholesky(self.cov).T

    def exact_draws(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` independent draws from N(mean, cov) (the exact posterior for a–c)."""
        z = torch.randn(n, self.dim, generator=generator, dtype=DTYPE)
        return self.mean + z @ torch.linalg.cholesky(self.cov).T


def _rotation(d: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=DTYPE))
    return q * torch.sign(torch.diagonal(r))


def _gaussian(name: str, precision_eigs: torch.Tensor, rotation: torch.Tensor, mean: torch.Tensor,
              title: str) -> Target:
    precision = rotation @ torch.diag(precision_eigs) @ rotation.T

    def log_posterior(params, batch):
        centred = params - mean
        return -0.5 * ((centred @ precision) * centred).sum(-1), None

    return Target(name, title, log_posterior, mean, torch.linalg.inv(precision), temperature=1.0,
                  curvature=(float(precision_eigs.min()), float(precision_eigs.max())), step_range=(1.6, 0.016))


def _regression(name: str, title: str, X, y, prior_var: float, batch_size: int, logistic: bool,
                noise_var: float = 1.0, **fields) -> Target:
    num_data = len(X)

    def log_posterior(params, batch):
        xb, yb = (X.expand(len(params), -1, -1), y.expand(len(params), -1)) if batch is None else (X[batch], y[batch])
        z = torch.bmm(xb, params.unsqueeze(-1)).squeeze(-1)  # (K, B)
        lik = yb * z - torch.nn.functional.softplus(z) if logistic else -0.5 * (yb - z) ** 2 / noise_var
        return lik.mean(-1) - 0.5 * (params**2).sum(-1) / (prior_var * num_data), None

    return Target(name, title, log_posterior, temperature=1.0 / num_data, num_data=num_data, batch_size=batch_size,
                  data={"X": X, "y": y}, **fields)


def _curvature(hessian: torch.Tensor) -> tuple[float, float]:
    eigs = torch.linalg.eigvalsh(hessian)
    return float(eigs.min()), float(eigs.max())


def make_target(name: str, cache: Path | None = None, verbose: bool = True) -> Target:
    """Target ``name`` ∈ {"a", "b", "c", "d"}; the HMC reference of "d" is read from / written to
    ``cache`` (default ``benchmarks/results/mixing_reference.json``)."""
    generator = torch.Generator().manual_seed(DATA_SEED + TARGETS.index(name) if name in TARGETS else 0)
    if name == "a":
        angle = math.pi / 6
        rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=DTYPE)
        return _gaussian("a", torch.tensor([1.0, 100.0], dtype=DTYPE), rot, torch.tensor([0.5, -0.5], dtype=DTYPE),
                         "2-D Gaussian, condition 100, full batch")
    if name == "b":
        rot = _rotation(100, generator)
        mean = 0.5 * torch.randn(100, generator=generator, dtype=DTYPE)
        return _gaussian("b", torch.logspace(0, 2, 100, dtype=DTYPE), rot, mean,
                         "100-D Gaussian, condition 100, random rotation, full batch")
    if name == "c":
        n, d, prior_var = 1000, 20, 1.0
        scales = torch.logspace(0, -1, d, dtype=DTYPE).sqrt()
        X = torch.randn(n, d, generator=generator, dtype=DTYPE) * scales @ _rotation(d, generator).T
        w = torch.randn(d, generator=generator, dtype=DTYPE)
        y = X @ w + torch.randn(n, generator=generator, dtype=DTYPE)
        precision = X.T @ X + torch.eye(d, dtype=DTYPE) / prior_var
        cov = torch.linalg.inv(precision)
        return _regression("c", "Bayesian linear regression N=1000, d=20, batch 32, T=1/N", X, y, prior_var, 32,
                           logistic=False, mean=cov @ X.T @ y, cov=cov, curvature=_curvature(precision / n),
                           step_range=(0.4, 0.004))
    if name == "d":
        from mixing_reference import cached_reference, laplace

        n, d, prior_var = 500, 10, 1.0
        X = torch.randn(n, d, generator=generator, dtype=DTYPE)
        w = torch.randn(d, generator=generator, dtype=DTYPE)
        y = (torch.rand(n, generator=generator, dtype=DTYPE) < torch.sigmoid(X @ w)).to(DTYPE)
        spec = {"target": "d", "N": n, "d": d, "prior_var": prior_var, "seed": DATA_SEED + 3,
                "fingerprint": [round(float(X.sum()), 10), round(float(y.sum()), 10)]}
        cache = Path(cache) if cache is not None else Path(__file__).resolve().parent / "results" / \
            "mixing_reference.json"
        ref = cached_reference(cache, spec, X, y, prior_var, verbose=verbose)
        _, laplace_cov = laplace(X, y, prior_var)
        return _regression("d", "Bayesian logistic regression N=500, d=10, batch 32, T=1/N", X, y, prior_var, 32,
                           logistic=True, mean=torch.tensor(ref["mean"], dtype=DTYPE),
                           cov=torch.tensor(ref["cov"], dtype=DTYPE),
                           curvature=_curvature(torch.linalg.inv(laplace_cov) / n), step_range=(0.4, 0.004),
                           reference="HMC (validated by importance sampling)",
                           spec={"hmc_validation": ref["validation"]})
    raise ValueError(f"unknown target {name!r}; expected one of {TARGETS}")
