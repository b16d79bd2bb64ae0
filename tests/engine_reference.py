"""Exact references and Monte-Carlo helpers for the engine's statistical tests.

Every reference here is computed independently of the engine, in float64:

* linear integrators on a Gaussian target are affine maps z' = F z + G ξ, whose stationary
  covariance solves the discrete Lyapunov equation Σ = F Σ Fᵀ + G Gᵀ (:func:`lyapunov`);
* a scalar Euler–Maruyama chain with state-dependent coefficients is a Markov kernel whose
  stationary law is solved on a fine grid (:func:`euler_grid_moment`).

Monte-Carlo estimates use many independent chains in one tensor: each chain's time average of a
statistic is one independent sample, so the standard error is the spread across chains / sqrt(C).
"""

from __future__ import annotations

import math

import torch

DTYPE = torch.float64
SIGMAS = 5.0
"""Tolerance in standard errors (a false alarm every ~1.7 million comparisons)."""


# ----- exact references --------------------------------------------------------------------------
def lyapunov(F: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """The stationary covariance Σ = F Σ Fᵀ + S of z' = F z + noise with covariance S."""
    n = F.shape[0]
    system = torch.eye(n * n, dtype=DTYPE) - torch.kron(F, F)
    return torch.linalg.solve(system, S.reshape(-1)).reshape(n, n)


def _compose(maps):
    """Compose affine maps (F_l, S_l) applied in order into one (F, S)."""
    F, S = maps[0]
    for F_l, S_l in maps[1:]:
        F, S = F_l @ F, F_l @ S @ F_l.T + S_l
    return F, S


def splitting_map(word: str, h: float, precision: torch.Tensor, gamma: float = 1.0, temperature: float = 1.0):
    """(F, S) of a splitting word on (x, m), H = ½xᵀAx + ½|m|²; each letter advances h / its count."""
    n = precision.shape[0]
    eye, zero = torch.eye(n, dtype=DTYPE), torch.zeros(n, n, dtype=DTYPE)
    counts = {letter: word.count(letter) for letter in "ABO"}
    maps = []
    for letter in word:
        eta = h / counts[letter]
        if letter == "A":
            maps.append((torch.block_diag(eye, eye) + _block(zero, eta * eye, zero, zero),
                         torch.zeros(2 * n, 2 * n, dtype=DTYPE)))
        elif letter == "B":
            maps.append((torch.block_diag(eye, eye) + _block(zero, zero, -eta * precision, zero),
                         torch.zeros(2 * n, 2 * n, dtype=DTYPE)))
        else:
            c = math.exp(-gamma * eta)
            maps.append((torch.block_diag(eye, c * eye), torch.block_diag(zero, temperature * (1 - c * c) * eye)))
    return _compose(maps)


def sghmc_map(h: float, precision: torch.Tensor, gamma: float = 1.0, temperature: float = 1.0,
              semi_implicit: bool = True):
    """(F, S) of SGHMC: m ← (1-γh)m - hAx + sqrt(2γhT)ξ, then x ← x + h·m (new m, or old m)."""
    n = precision.shape[0]
    eye, zero = torch.eye(n, dtype=DTYPE), torch.zeros(n, n, dtype=DTYPE)
    noise = torch.block_diag(zero, 2 * gamma * h * temperature * eye)
    if not semi_implicit:
        return _block(eye, h * eye, -h * precision, (1 - gamma * h) * eye), noise
    kick = (_block(eye, zero, -h * precision, (1 - gamma * h) * eye), noise)
    drift = (_block(eye, h * eye, zero, eye), torch.zeros(2 * n, 2 * n, dtype=DTYPE))
    return _compose([kick, drift])


def euler_map(h: float, precision: torch.Tensor, diffusion: torch.Tensor, curl: torch.Tensor | None = None,
              temperature: float = 1.0):
    """(F, S) of first-order Euler–Maruyama: x' = x - h(D+Q)Ax + sqrt(2hT) D^{1/2} ξ."""
    curl = torch.zeros_like(diffusion) if curl is None else curl
    eye = torch.eye(precision.shape[0], dtype=DTYPE)
    return eye - h * (diffusion + curl) @ precision, 2 * h * temperature * diffusion


def _block(a, b, c, d):
    return torch.cat([torch.cat([a, b], 1), torch.cat([c, d], 1)], 0)


def euler_grid_moment(h: float, drift, diffusion, moment=lambda x: x**2, half_width: float = 9.0,
                      points: int = 1501) -> float:
    """E[moment] under the exact stationary law of the scalar chain x' ~ N(x + h·drift(x), 2h·D(x)).

    The transition kernel is discretised on a uniform grid (rows normalised) and its stationary
    vector solved directly; for kernels a few grid spacings wide this is accurate to ~1e-9.
    """
    x = torch.linspace(-half_width, half_width, points, dtype=DTYPE)
    mean = x + h * drift(x)
    var = 2 * h * diffusion(x)
    kernel = torch.exp(-((x[None, :] - mean[:, None]) ** 2) / (2 * var[:, None]))
    kernel = kernel / kernel.sum(1, keepdim=True)
    system = kernel.T - torch.eye(points, dtype=DTYPE)
    system[-1] = 1.0
    rhs = torch.zeros(points, dtype=DTYPE)
    rhs[-1] = 1.0
    weights = torch.linalg.solve(system, rhs)
    return float((weights * moment(x)).sum())


# ----- Monte Carlo -----------------------------------------------------------------------------------
class ChainAverages:
    """Per-chain time averages of statistics; chains are independent, so SE = std / sqrt(C)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, **statistics: torch.Tensor) -> None:
        for name, value in statistics.items():
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value.clone()
        self.count += 1

    def estimate(self, name: str) -> tuple[float, float]:
        """(mean over chains of the time average, its standard error)."""
        per_chain = self.sums[name].reshape(-1) / self.count
        return per_chain.mean().item(), (per_chain.std() / math.sqrt(per_chain.numel())).item()


def run_chains(transform, state, burn_in: int, samples: int, statistics, batch=None):
    """Advance ``burn_in`` then ``samples`` steps in place, averaging ``statistics(state)`` (a dict)."""
    for _ in range(burn_in):
        state, _ = transform.update(state, batch, inplace=True)
    averages = ChainAverages()
    for _ in range(samples):
        state, _ = transform.update(state, batch, inplace=True)
        averages.add(**statistics(state))
    return averages, state


def assert_close(name: str, estimate: float, se: float, reference: float, sigmas: float = SIGMAS) -> None:
    assert se > 0, f"{name}: zero standard error (chains did not move)"
    assert abs(estimate - reference) < sigmas * se, (
        f"{name}: Monte-Carlo estimate {estimate:.5f} ± {se:.5f} vs exact {reference:.5f} "
        f"({abs(estimate - reference) / se:.1f} standard errors)"
    )
