r"""Schedules of the step count: temperatures, step sizes and step-dependent coefficients.

Schedules are small value objects (printable, comparable) so an engine configuration stays data.
Anything callable ``step -> float`` is accepted too.

Example (cyclical SGLD, Zhang et al. 2020):
    >>> from bayesflow.engine import Cyclical
    >>> h = Cyclical(initial=1e-2, period=1000)          # cosine step size restarting every 1000 steps
    >>> T = Cyclical(initial=1e-4, period=1000, exploration=0.8, floor=0.0)  # T = 0 for the first 80%
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["BiasCorrection", "Constant", "Cyclical", "FirstStep", "as_schedule"]


@dataclass(frozen=True)
class Constant:
    """``f(t) = value``.

    Example:
        >>> from bayesflow.engine import Constant
        >>> h = Constant(1e-3)   # what SDEConfig(step_size=1e-3) makes of a float
        >>> h(0), h(10_000)
        (0.001, 0.001)
    """

    value: float

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class BiasCorrection:
    r"""``f(t) = 1 / (1 - β^{t+1})``: Adam's first-moment bias correction as a step-size factor.

    Example (Adam with β₁ = 0.9 scales θ's sub-step by 10 at step 0, then less and less):
        >>> from bayesflow.engine import BiasCorrection
        >>> correction = BiasCorrection(beta=0.9)   # SDEConfig(step_scales=(("params", correction),))
        >>> round(correction(0), 6), round(correction(1), 6), round(correction(200), 6)
        (10.0, 5.263158, 1.0)
    """

    beta: float

    def __call__(self, step: int) -> float:
        return 1.0 / (1.0 - self.beta ** (step + 1))


@dataclass(frozen=True)
class FirstStep:
    """``first`` at step 0 and ``then`` afterwards (torch SGD starts its momentum buffer undampened).

    Example (SGD with dampening 0.5: the first momentum sub-step is scaled by 1 / (1 - 0.5)):
        >>> from bayesflow.engine import FirstStep
        >>> scale = FirstStep(first=2.0)   # SDEConfig(step_scales=(("momenta", scale),))
        >>> scale(0), scale(1), scale(1000)
        (2.0, 1.0, 1.0)
    """

    first: float
    then: float = 1.0

    def __call__(self, step: int) -> float:
        return self.first if step == 0 else self.then


@dataclass(frozen=True)
class Cyclical:
    r"""Cosine cycles: :math:`f(t) = \tfrac{a}{2}(\cos(\pi\, (t \bmod P)/P) + 1)`.

    Args:
        initial: a, the value at the start of each cycle.
        period: P, steps per cycle.
        exploration: fraction of each cycle in which ``floor`` replaces the value (cSGLD's
            exploration stage runs at T = 0); None keeps the cosine throughout.
        floor: the value during exploration.
        anneal: follow the cosine (step sizes); False holds ``initial`` outside exploration
            (cSGLD's temperature: 0 while exploring, constant while sampling).

    Example (cSGLD with 100-step cycles: exploration at T = 0 for the first half of each cycle):
        >>> from bayesflow.engine import Cyclical
        >>> h = Cyclical(initial=0.1, period=100)
        >>> h(0), h(50), h(100)   # cycle start, half-way, restart
        (0.1, 0.05, 0.1)
        >>> T = Cyclical(initial=1.0, period=100, exploration=0.5, anneal=False)
        >>> T(10), T(60)
        (0.0, 1.0)
    """

    initial: float
    period: int
    exploration: float | None = None
    floor: float = 0.0
    anneal: bool = True

    def __post_init__(self):
        if self.period < 1:
            raise ValueError(f"period must be a positive number of steps, got {self.period}")
        if self.exploration is not None and not 0.0 <= self.exploration <= 1.0:
            raise ValueError(f"exploration must be a fraction in [0, 1], got {self.exploration}")

    def __call__(self, step: int) -> float:
        phase = (step % self.period) / self.period
        if self.exploration is not None and phase < self.exploration:
            return self.floor
        if not self.anneal:
            return self.initial
        return 0.5 * self.initial * (math.cos(math.pi * phase) + 1.0)


def as_schedule(value, name: str) -> Callable[[int], float] | torch.Tensor:
    """A float becomes :class:`Constant`; a callable is kept; a tensor (one value per chain) is kept."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 1:
            raise ValueError(f"{name} tensor must hold one value per chain (1-D), got {tuple(value.shape)}")
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"{name} values must be finite and non-negative, got {value}")
        return value
    if callable(value):
        return value
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and non-negative, got {value}")
        return Constant(float(value))
    raise TypeError(f"{name} must be a float, a schedule step -> float or a tensor, got {type(value).__name__}")


def is_zero(schedule) -> bool:
    """True when a schedule is the constant 0 (then no random numbers are ever drawn)."""
    if isinstance(schedule, torch.Tensor):
        return bool((schedule == 0).all())
    return isinstance(schedule, Constant) and schedule.value == 0.0
