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
from numbers import Integral, Real

import torch

__all__ = ["BiasCorrection", "Constant", "Cyclical", "FirstStep", "as_schedule"]


def _finite_values(name: str, value) -> None:
    """Refuses a schedule parameter that is not a finite real number (or, for per-chain values, a 1-D
    floating-point tensor of them): NaN would pass every comparison and reach the step."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 1 or not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be a finite number or a 1-D tensor of them (one per chain), got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _negative(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool((value < 0).any())
    return value < 0


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

    def __post_init__(self):
        _finite_values("Constant value", self.value)

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

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, Real) or not 0.0 <= self.beta < 1.0:
            raise ValueError(f"BiasCorrection beta must be a decay rate in [0, 1), got {self.beta!r}")

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

    def __post_init__(self):
        _finite_values("FirstStep first", self.first)
        _finite_values("FirstStep then", self.then)

    def __call__(self, step: int) -> float:
        return self.first if step == 0 else self.then


@dataclass(frozen=True)
class Cyclical:
    r"""Cosine cycles: :math:`f(t) = \tfrac{a}{2}(\cos(\pi\, (t \bmod P)/P) + 1)`.

    Args:
        initial: a, the value at the start of each cycle: a finite number (or a 1-D tensor, one per
            chain); as a step size or temperature it must also be non-negative (checked at ``build``).
        period: P, steps per cycle: a positive integer (an integral float such as ``100.0`` is taken
            as 100; ``2.5``, ``0``, negatives and bools are refused).
        exploration: fraction in [0, 1] of each cycle in which ``floor`` replaces the value (cSGLD's
            exploration stage runs at T = 0); None keeps the cosine throughout.
        floor: the value during exploration, a finite number.
        anneal: follow the cosine (step sizes); False holds ``initial`` outside exploration
            (cSGLD's temperature: 0 while exploring, constant while sampling).

    Raises:
        ValueError: any of the above outside what it accepts, naming it and the value.

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
        period = self.period
        if isinstance(period, bool) or not isinstance(period, Integral):
            if isinstance(period, Real) and not isinstance(period, bool) and math.isfinite(period) and (
                    float(period).is_integer()):
                object.__setattr__(self, "period", int(period))  # 100.0 is 100 steps
            else:
                raise ValueError(f"Cyclical period must be a positive integer number of steps, got {period!r}")
        if self.period < 1:
            raise ValueError(f"Cyclical period must be a positive integer number of steps, got {period!r}")
        exploration = self.exploration
        if exploration is not None and (isinstance(exploration, bool) or not isinstance(exploration, Real)
                                        or not 0.0 <= exploration <= 1.0):
            raise ValueError(f"Cyclical exploration must be None or a fraction in [0, 1], got {exploration!r}")
        _finite_values("Cyclical initial", self.initial)
        _finite_values("Cyclical floor", self.floor)
        if not isinstance(self.anneal, bool):
            raise TypeError(f"Cyclical anneal must be True or False, got {self.anneal!r}")

    def __call__(self, step: int) -> float:
        phase = (step % self.period) / self.period
        if self.exploration is not None and phase < self.exploration:
            return self.floor
        if not self.anneal:
            return self.initial
        return 0.5 * self.initial * (math.cos(math.pi * phase) + 1.0)


def as_schedule(value, name: str) -> Callable[[int], float] | torch.Tensor:
    """A float becomes :class:`Constant`; a callable is kept; a tensor (one value per chain) is kept.

    Numbers, tensors, and the values a :class:`Constant` or :class:`Cyclical` takes must be finite and
    non-negative (a ValueError naming ``name`` and the value); a bool or another type is a TypeError.
    Other callables are checked when called, at each step."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 1:
            raise ValueError(f"{name} tensor must hold one value per chain (1-D), got {tuple(value.shape)}")
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"{name} values must be finite and non-negative, got {value}")
        return value
    if isinstance(value, (Constant, Cyclical)):  # the values these take are known now: refuse them here
        if isinstance(value, Constant):
            parts = {"value": value.value}
        else:
            parts = {"initial": value.initial, "floor": value.floor}
        for part, number in parts.items():
            if _negative(number):
                raise ValueError(f"{name} {type(value).__name__} {part} must be non-negative, got {number!r} "
                                 f"(in {value!r})")
        return value
    if callable(value):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float, a schedule step -> float or a tensor, got {value!r}")
    if isinstance(value, Real):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and non-negative, got {value}")
        return Constant(float(value))
    raise TypeError(f"{name} must be a float, a schedule step -> float or a tensor, got {type(value).__name__}")


def is_zero(schedule) -> bool:
    """True when a schedule is the constant 0 (then no random numbers are ever drawn)."""
    if isinstance(schedule, torch.Tensor):
        return bool((schedule == 0).all())
    return isinstance(schedule, Constant) and schedule.value == 0.0
