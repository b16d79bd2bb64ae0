r"""The share of a mini-batch kick's noise that BAOAB's O step takes off (the discrete Lyapunov equation).

Used by :class:`~bayesflow.engine.noise_correction.GradientNoise` for BAOAB: the step, rotated, is a
full kick (gradient noise G) then A, O, A; the kick's noise reaches θ through A before O, so it is
cancelled in the stationary variance of θ, not step by step. :func:`baoab_noise_weight` is the exact
share κ for one harmonic direction (ω, γ, h); κ → ((1 + c)/2)² as ωh → 0.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["baoab_noise_weight"]


@functools.lru_cache(maxsize=64)
def baoab_noise_weight(h: float, rate: float, frequency: float) -> float:
    r"""κ: the share of the kick's noise covariance G to take off BAOAB's O-step noise so that the
    stationary variance of θ is exact on a harmonic direction of frequency ω (rate γ = α/σ²).

    One step, rotated, is the full kick (noise G) then A, O, A; the stationary covariance of the
    linear map solves a discrete Lyapunov equation, linear in G and in the O step's noise, and κ is the
    ratio of their contributions to Var θ. κ → ((1 + c)/2)² as ωh → 0 (c = e^{-γh}); at ωh = 1,
    γh = 1 it is 1.33 times that.

    Example:
        >>> import math
        >>> from bayesflow.engine.baoab_noise import baoab_noise_weight
        >>> c = math.exp(-0.5)                               # h = 0.5, γ = 1
        >>> round(baoab_noise_weight(0.5, 1.0, 1e-4) / ((1 + c) / 2) ** 2, 6)   # ωh → 0: the leading order
        1.0
        >>> round(baoab_noise_weight(0.5, 1.0, 1.0), 4)       # ωh = 0.5
        0.6883
    """
    c = math.exp(-rate * h)
    dtype = torch.float64
    kick = torch.tensor([[1.0, 0.0], [-h * frequency**2, 1.0]], dtype=dtype)
    drift = torch.tensor([[1.0, h / 2], [0.0, 1.0]], dtype=dtype)
    friction = torch.tensor([[1.0, 0.0], [0.0, c]], dtype=dtype)
    step = drift @ friction @ drift @ kick
    unit = torch.tensor([0.0, 1.0], dtype=dtype)
    lyapunov = torch.eye(4, dtype=dtype) - torch.kron(step, step)

    def variance(noise):  # Var θ of the stationary law with this one noise column
        return torch.linalg.solve(lyapunov, torch.outer(noise, noise).reshape(-1))[0]

    return float(variance(drift @ friction @ drift @ unit) / variance(drift @ unit))
