"""Hyper-parameter checks shared by the optimizer presets (ValueErrors naming the bad value)."""

from __future__ import annotations

import math

import torch

__all__ = ["check_beta", "check_lr", "check_nonnegative", "check_unit", "engine_options"]

ENGINE_OPTIONS = ("check_finite", "on_nonfinite", "momenta_init", "compile", "compile_options")
"""SDEConfig fields an optimizer preset passes through; the rest define the optimizer itself."""


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_lr(lr, *, per_chain: bool = False):
    """A learning rate must be a positive finite float (h = lr or sqrt(lr) enters as a divisor).

    ``per_chain``: the preset also takes one learning rate per chain (a 1-D tensor) — only where its
    operators do not depend on lr, so that chain k is exactly the preset built with ``lr[k]``.
    """
    if isinstance(lr, torch.Tensor):
        if not per_chain:
            raise ValueError("one learning rate per chain (a tensor) is not supported by this optimizer: its friction "
                             "or preconditioner scale depends on lr, which one batched step cannot hold per chain; "
                             "build one transform per learning rate")
        if lr.ndim != 1 or not lr.is_floating_point() or not bool(torch.isfinite(lr).all()) or bool((lr <= 0).any()):
            raise ValueError(f"Invalid learning rates: {lr!r}; expected a 1-D tensor of positive finite values")
        return lr
    if not _real(lr) or lr <= 0:
        raise ValueError(f"Invalid learning rate: {lr!r}; expected a positive finite float")
    return float(lr)


def check_nonnegative(name: str, value) -> float:
    if not _real(value) or value < 0:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite float >= 0")
    return float(value)


def check_unit(name: str, value) -> float:
    """A value in the closed interval [0, 1] (momentum: 1 is frictionless, above 1 is not a diffusion)."""
    if not _real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a float in [0, 1]")
    return float(value)


def check_beta(name: str, value) -> float:
    """A decay rate in [0, 1), as torch.optim requires of Adam's betas."""
    if not _real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a float in [0, 1)")
    return float(value)


def engine_options(options: dict) -> dict:
    """The engine fields a preset lets through (finite checks, momenta initialisation)."""
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected engine option(s) {unknown}; an optimizer preset accepts {ENGINE_OPTIONS} "
                        "(to change D, Q or the integrator, edit the returned SDEConfig with dataclasses.replace)")
    return dict(options)
