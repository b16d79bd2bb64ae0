r"""Stateful diagonal preconditioners and the operators that read them.

A preconditioner keeps running statistics of the potential gradient :math:`a = \nabla_θ ℓ / N -
λθ` and exposes a diagonal scale :math:`P` (one tensor per leaf). The engine updates every
preconditioner once per step, before any drift, so all operators of the step see the same P:

.. math::
    v \leftarrow ρ v + (1-ρ) a^2, \qquad
    P = \sqrt{\max(v, v_{max})/c_t - \bar a^2} + ε, \qquad c_t = 1 - ρ^{t+1}\ \text{(bias correction)}

RMSprop (and pSGLD) is ``SquaredGradientAverage(alpha, eps)``, its centered variant adds the mean
:math:`\bar a`, and Adam's second moment is ``SquaredGradientAverage(beta2, eps,
bias_correction=True, amsgrad=...)``. Because v is built from past gradients, P is frozen within a
step and treated as independent of z; its Γ is zero by that convention (pSGLD's choice).

The statistics are updated at the start of a step (:meth:`SquaredGradientAverage.update_state`);
P itself (:meth:`SquaredGradientAverage.values`) is computed when an operator first reads it, so
that it can be written into memory that is free by then (see ``Context.values``).

Example:
    >>> from bayesflow.engine import Preconditioned, SquaredGradientAverage
    >>> rms = SquaredGradientAverage(decay=0.99, eps=1e-8)
    >>> D = Preconditioned(rms, power=-1.0)   # pSGLD: D = diag(1 / (sqrt(v) + eps))
"""

from __future__ import annotations

import math

import torch

from bayesflow.engine.accumulator import Accumulator, Leaves, sqrt
from bayesflow.engine.context import Context
from bayesflow.engine.operators import Operator

__all__ = ["Preconditioned", "SquaredGradientAverage"]

LARGE_LEAVES = 1 << 14
"""Mean leaf size from which a per-leaf kernel (one memory pass) beats two foreach kernels."""


class SquaredGradientAverage:
    """Exponential moving average of squared gradients (RMSprop, Adam's second moment).

    Args:
        decay: ρ in [0, 1).
        eps: ε > 0 added after the square root.
        centered: subtract the squared running mean of the gradient (centered RMSprop).
        bias_correction: divide v by 1 - ρ^(t+1) (Adam).
        amsgrad: use the running maximum of v (AMSGrad).

    Example (Adam's second moment after one gradient a = (1, -2): bias correction gives P = |a|):
        >>> import torch
        >>> from bayesflow.engine import SquaredGradientAverage
        >>> adam = SquaredGradientAverage(decay=0.9, eps=0.0, bias_correction=True)
        >>> statistics, P = adam.update(adam.init([torch.zeros(2)]), [torch.tensor([1.0, -2.0])], step=0, inplace=False)
        >>> P
        [tensor([1., 2.])]
    """

    def __init__(self, decay: float, eps: float, centered: bool = False,
                 bias_correction: bool = False, amsgrad: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        self.decay = float(decay)
        self.eps = float(eps)
        self.centered = centered
        self.bias_correction = bias_correction
        self.amsgrad = amsgrad

    def _key(self) -> tuple:
        return (self.decay, self.eps, self.centered, self.bias_correction, self.amsgrad)

    def __eq__(self, other):
        return isinstance(other, SquaredGradientAverage) and other._key() == self._key()

    def __hash__(self):
        return hash(("SquaredGradientAverage", *self._key()))

    def init(self, params: Leaves) -> tuple[Leaves, ...]:
        fields = [[torch.zeros_like(p) for p in params]]
        if self.centered:
            fields.append([torch.zeros_like(p) for p in params])
        if self.amsgrad:
            fields.append([torch.zeros_like(p) for p in params])
        return tuple(fields)

    def update_state(self, state: tuple[Leaves, ...], grads: Leaves, step: int, inplace: bool) -> tuple[Leaves, ...]:
        """New statistics (v, the mean when centered, the running maximum with AMSGrad) from ascent
        gradients ``grads``."""
        average = Accumulator(state[0], inplace)
        average.mul(self.decay)
        average.addcmul(grads, grads, value=1.0 - self.decay)
        new_state = [average.leaves]
        if self.centered:
            mean = Accumulator(state[1], inplace)
            mean.lerp(grads, 1.0 - self.decay)  # torch's rounding: v - mean² cancels, and amplifies any other
            new_state.append(mean.leaves)
        if self.amsgrad:
            second = average.leaves
            if self.centered:
                second = torch._foreach_addcmul(second, new_state[1], new_state[1], value=-1.0)
            maximum = state[-1]
            if inplace:
                torch._foreach_maximum_(maximum, second)
            else:
                maximum = torch._foreach_maximum(maximum, second)
            new_state.append(maximum)
        return tuple(new_state)

    def values(self, state: tuple[Leaves, ...], step: int, out: Leaves | None = None) -> Leaves:
        """The diagonal P of this step from updated statistics, written into ``out`` when given.

        The engine asks for P only when an operator first reads it, so that ``out`` may be a
        buffer whose previous contents are dead by then (the step's own gradient).
        """
        second = state[-1] if self.amsgrad else state[0]
        scale = out if out is not None else [torch.empty_like(t) for t in second]
        if self.centered and not self.amsgrad:  # AMSGrad's maximum is already of the centered variance
            torch._foreach_copy_(scale, second)
            torch._foreach_addcmul_(scale, state[1], state[1], value=-1.0)
            torch._foreach_sqrt_(scale)
        elif sum(t.numel() for t in second) >= LARGE_LEAVES * len(second):
            # large leaves: one pass per leaf (sqrt straight into the buffer) beats a foreach copy
            # and an in-place root, which pass over the memory twice
            for target, source in zip(scale, second):
                torch.sqrt(source, out=target)
        else:  # small leaves: two foreach launches beat a launch per leaf
            torch._foreach_copy_(scale, second)
            torch._foreach_sqrt_(scale)
        if self.bias_correction:
            torch._foreach_div_(scale, sqrt(1.0 - self.decay ** (step + 1)))
        torch._foreach_add_(scale, self.eps)
        return scale

    def update(self, state: tuple[Leaves, ...], grads: Leaves, step: int, inplace: bool,
               out: Leaves | None = None) -> tuple[tuple[Leaves, ...], Leaves]:
        """``(new statistics, P)``: :meth:`update_state` then :meth:`values` (``out``: buffers for P)."""
        new_state = self.update_state(state, grads, step, inplace)
        return new_state, self.values(new_state, step, out)

    def __repr__(self):
        flags = [n for n in ("centered", "bias_correction", "amsgrad") if getattr(self, n)]
        return f"SquaredGradientAverage(decay={self.decay:g}, eps={self.eps:g}{''.join(', ' + f for f in flags)})"


class Preconditioned(Operator):
    """``scale · diag(P)^power`` for a stateful preconditioner P (power +1 or -1).

    Args:
        preconditioner: e.g. :class:`SquaredGradientAverage`; shared by every operator that names it.
        power: +1 (multiply by P) or -1 (divide by P).
        scale: a constant factor.

    Example (pSGLD: D = diag(1 / (sqrt(v) + ε)) with RMSprop's running average v):
        >>> from bayesflow.engine import Preconditioned, SDEConfig, SquaredGradientAverage
        >>> rms = SquaredGradientAverage(decay=0.99, eps=1e-5)
        >>> psgld = SDEConfig(step_size=1e-3, diffusion=Preconditioned(rms, power=-1.0), gamma=False)
        >>> psgld.diffusion
        Preconditioned(SquaredGradientAverage(decay=0.99, eps=1e-05), power=-1, scale=1)
    """

    def __init__(self, preconditioner, power: float = -1.0, scale: float = 1.0):
        if power not in (1.0, -1.0):
            raise ValueError(f"power must be +1 or -1, got {power}")
        self.preconditioner = preconditioner
        self.power = float(power)
        self.scale = float(scale)

    def preconditioners(self):
        return (self.preconditioner,)

    def _values(self, ctx: Context) -> Leaves:
        return ctx.values(self.preconditioner)

    def accumulate(self, out, v, alpha, ctx):
        if self.power > 0:
            out.addcmul(self._values(ctx), v, value=alpha * self.scale)
        else:
            out.addcdiv(v, self._values(ctx), value=alpha * self.scale)

    def accumulate_through_mass(self, out, v, mass, alpha, ctx):
        if isinstance(mass, Preconditioned) and mass.preconditioner is self.preconditioner and (
                mass.power == self.power):
            # c·P^p (s·P^p)⁻¹ = c/s: an Adam-type friction or RMSprop coupling cancels its mass
            out.add(v, alpha=alpha * self.scale / mass.scale)
        else:
            super().accumulate_through_mass(out, v, mass, alpha, ctx)

    def solve(self, v, ctx):
        values = self._values(ctx)
        solved = torch._foreach_div(v, values) if self.power > 0 else torch._foreach_mul(v, values)
        if self.scale != 1.0:
            torch._foreach_div_(solved, self.scale)
        return solved

    def fused_inverse(self, ctx):
        return self._values(ctx), self.power, self.scale

    def sqrt_accumulate(self, out, noise, alpha, ctx):
        values = self._values(ctx)
        in_scratch = id(self.preconditioner) in ctx.scratch_values
        if in_scratch:
            # P lies in a scratch buffer: take its root in place and square it back afterwards
            # (two passes, as many as copying into a root buffer, and no buffer: the difference
            # between the root buffer and P would be one more parameter-sized tensor per step).
            # The round trip can move P by an ulp; it only happens at T > 0, where that is far
            # below the noise, so the T = 0 presets stay bitwise equal to torch.optim.
            root = values
        else:
            root = ctx.scratch(("root", id(self)), values)
            torch._foreach_copy_(root, values)
        torch._foreach_sqrt_(root)
        if self.power > 0:
            out.addcmul(root, noise, value=alpha * math.sqrt(self.scale))
        else:
            out.addcdiv(noise, root, value=alpha * math.sqrt(self.scale))
        if in_scratch:
            torch._foreach_mul_(root, root)

    def diagonal(self, ctx):
        values = self._values(ctx)
        if self.power > 0:
            return values if self.scale == 1.0 else torch._foreach_mul(values, self.scale)
        return torch._foreach_div(torch._foreach_reciprocal(values), 1.0 / self.scale)

    def symbol(self):
        return ("preconditioned", (id(self.preconditioner), self.power), self.scale)

    def __eq__(self, other):
        return isinstance(other, Preconditioned) and (other.preconditioner, other.power, other.scale) == (
            self.preconditioner, self.power, self.scale)

    def __hash__(self):
        return hash(("Preconditioned", self.preconditioner, self.power, self.scale))

    def check(self, shapes, role, where):
        if role == "curl":
            raise ValueError(f"{where}: a diagonal preconditioner cannot be a curl block on the diagonal")
        if role == "diffusion" and self.scale < 0:
            raise ValueError(f"{where}: diffusion must be positive semi-definite, got scale {self.scale}")

    def __repr__(self):
        return f"Preconditioned({self.preconditioner!r}, power={self.power:+g}, scale={self.scale:g})"
