r"""The drift, Γ and noise of one row of the SDE — the arithmetic every integrator shares.

For component i of z = (θ, m, ξ) and a sub-step of length h,

.. math::
    z_i \leftarrow z_i - h \sum_j (D+Q)_{ij} \nabla_j H(z) + h\,T\,Γ_i(z) + \sqrt{2 T h}\,(D^{1/2} ξ)_i,

with :math:`-\nabla_θ H = \nabla_θ ℓ / N - λθ` (ℓ the user's per-datum log posterior, λ the coupled
weight decay), :math:`\nabla_m H = M^{-1} m` (mass M) and :math:`\nabla_ξ H = (d/Q)(ξ - A)` (SGNHT's
thermostat with target friction A, inertia Q, d parameters). Integrators are words over such row updates.
"""

from __future__ import annotations

import itertools
import math

import torch

from bayesflow.engine.accumulator import Accumulator, Leaves, per_chain, sqrt
from bayesflow.engine.block import Block
from bayesflow.engine.context import Context
from bayesflow.engine.groups import LeafTemperature, is_hot
from bayesflow.engine.operators import Operator, Scalar


class GradientNotAvailable(RuntimeError):
    """Raised when an integrator needs the gradient at a point the caller did not provide.

    Example (BAOAB also needs ∇ℓ at the end of the step, so ``step`` with one gradient refuses):
        >>> import torch
        >>> from bayesflow.engine import GradientNotAvailable, Splitting, build, hamiltonian_curl
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.1,
        ...                   curl=hamiltonian_curl(1.0), integrator=Splitting("BAOAB"))
        >>> state = transform.init(torch.zeros(2), seed=0)
        >>> try:
        ...     state = transform.step(state, grads=-state.params)
        ... except GradientNotAvailable:
        ...     state, aux = transform.update(state, batch=None)   # the engine evaluates both gradients
    """


class StepInputs:
    """Per-step values: temperature, step sizes, noise stream and the potential gradient.

    ``gradient_fn(params_leaves) -> (grads_leaves, value, owned)`` evaluates ∇ℓ (ascent) at θ.
    """

    __slots__ = ("fresh", "gradient_fn", "grads", "h", "hot", "noise", "owned", "released", "scaled", "temperature",
                 "value")

    def __init__(self, temperature, h: float, noise, gradient_fn, cached: Leaves | None, hot: bool | None = None):
        self.temperature = temperature
        # whether noise and Γ are active (T > 0) this step (given by a traced step, whose T is symbolic)
        self.hot = is_hot(temperature) if hot is None else hot
        self.h = h
        self.noise = noise
        self.gradient_fn = gradient_fn
        self.grads = cached
        self.owned = False
        self.value = None
        self.scaled = cached  # a cached gradient is stored as the potential -∇_θ H itself
        self.fresh = cached is not None  # gradient valid at the current θ
        self.released = False  # the gradient's memory was handed on (System.row(release_gradient=True))

    def disposable(self) -> Leaves | None:
        """The leaves holding -∇θH if the engine owns them (its own autograd output or a scaled
        copy) and they may be written over, else None (a caller's or a cached gradient is never)."""
        if self.owned:
            leaves = self.grads
        elif self.scaled is not None and self.scaled is not self.grads and self.grads is not None:
            leaves = self.scaled
        else:
            return None
        return leaves if _exclusive(leaves) else None


def _exclusive(leaves: Leaves) -> bool:
    """Whether every leaf is dense and no two share memory.

    Autograd may hand out broadcast views (the gradient of a sum is an expanded scalar) or one
    tensor for several leaves (the two inputs of an addition): such leaves cannot hold separate
    values.
    """
    spans = []
    for leaf in leaves:
        if not leaf.is_contiguous():
            return False
        start = leaf.data_ptr()
        spans.append((start, start + leaf.numel() * leaf.element_size()))
    spans.sort()
    return all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))


class System:
    """The configured SDE: D, Q, N, mass, thermostat and weight decay, resolved for fast rows."""

    def __init__(self, diffusion: Block, curl: Block, num_data, mass: Operator,
                 thermostat_target: float, weight_decay: float, gamma: bool, thermostat_mass: float = 1.0):
        self.diffusion = diffusion
        self.curl = curl
        self.num_data = num_data
        self.mass = mass
        self.thermostat_target = thermostat_target
        self.thermostat_mass = thermostat_mass
        self.weight_decay = weight_decay
        self.gamma = gamma
        rows = sorted(diffusion.components() | curl.components())
        self.rows = {row: diffusion.terms(row) + curl.terms(row) for row in rows}
        self.terms = {row: sorted(terms, key=lambda t: t[0] != row) for row, terms in self.rows.items()}
        self.state_dependent = {row: any(op.state_dependent for _, op in t) for row, t in self.terms.items()}
        self.row_diffusion = {row: diffusion.get(row, row) for row in rows}
        self.preconditioners = tuple({id(p): p for p in diffusion.preconditioners() + curl.preconditioners()
                                      + mass.preconditioners()}.values())
        self._last_readers: dict = {}

    def last_gradient_reader(self, order: tuple[str, ...]) -> str | None:
        """The last row in ``order`` whose drift reads ∇θH (the gradient is dead after it)."""
        last = self._last_readers.get(order, "")
        if last == "":
            readers = [row for row in order if any(column == "params" for column, _ in self.terms.get(row, ()))]
            last = self._last_readers[order] = readers[-1] if readers else None
        return last

    # ----- gradients of H -------------------------------------------------------------------
    def potential(self, ctx: Context, inputs: StepInputs) -> tuple[Leaves, float]:
        """``(leaves, scale)`` with ``scale * leaves = -∇_θ H``, evaluating ∇ℓ on first use."""
        if inputs.released:
            raise RuntimeError("internal error: the gradient was read after its memory was released")
        if not inputs.fresh:
            inputs.grads, inputs.value, inputs.owned = inputs.gradient_fn(ctx.z["params"].leaves)
            inputs.fresh = True
            inputs.scaled = None
        if inputs.scaled is not None:
            return inputs.scaled, 1.0
        N = self.num_data
        if isinstance(N, float) and self.weight_decay == 0.0:
            return inputs.grads, 1.0 / N
        factor = [1.0 / n for n in N] if isinstance(N, list) else 1.0 / N
        if inputs.owned and _exclusive(inputs.grads):  # our own autograd output: scale it where it lies
            scaled = inputs.grads
            torch._foreach_mul_(scaled, factor)
        else:
            scaled = torch._foreach_mul(inputs.grads, factor)
        if self.weight_decay != 0.0:
            torch._foreach_add_(scaled, ctx.leaves("params"), alpha=-self.weight_decay)
        inputs.scaled = scaled
        return scaled, 1.0

    def grad_h(self, column: str, ctx: Context, inputs: StepInputs) -> tuple[Leaves, float, Operator | None]:
        """``(leaves, scale, mass)`` with ``∇_column H = scale * M⁻¹ leaves`` (mass None: M = 1).

        The momenta's ``M⁻¹ m`` is left unevaluated so that operators can fuse it (addcdiv) or
        cancel it (an Adam-type friction c·M times M⁻¹ is c) instead of materialising it.
        """
        if column == "params":
            leaves, scale = self.potential(ctx, inputs)
            return leaves, -scale, None
        if column == "momenta":
            momenta = ctx.leaves("momenta")
            if isinstance(self.mass, Scalar):
                return momenta, 1.0 / self.mass.value, None
            return momenta, 1.0, self.mass
        xi = ctx.leaves("xi")[0]
        return [(xi - self.thermostat_target) * (ctx.numel / self.thermostat_mass)], 1.0, None

    # ----- one row ----------------------------------------------------------------------------
    def row(self, ctx: Context, inputs: StepInputs, row: str, h: float, *, noise: bool = True,
            columns: tuple[str, ...] | None = None, target: Accumulator | None = None,
            release_gradient: bool = False) -> None:
        """Advance component ``row`` by one Euler sub-step of length h (in place on ``target``).

        ``columns`` restricts the drift to blocks from those components (splitting schemes);
        ``target`` defaults to the component itself. ``release_gradient``: the integrator
        guarantees that nothing reads ∇θH after this row's drift, so the gradient's memory may hold
        the preconditioner values computed after it (see :meth:`Context.values`).
        """
        current = ctx.z[row]
        target = target if target is not None else current
        terms = self.terms.get(row, ())
        if columns is not None:
            terms = [(column, op) for column, op in terms if column in columns]
        hot = noise and inputs.hot
        if target is current and self.state_dependent.get(row, False):
            fused = self._fused_self_terms(ctx, inputs, row, h, terms)
            if fused is not None:
                # Every term that reads this row is a multiple of it (friction, SGNHT's thermostat):
                # apply their sum first, in one elementwise pass, then the terms that read other rows.
                factor, rest = fused
                current.mul(1.0 + factor)  # one read of the row (row + factor·row would read it twice)
                self._row_terms(ctx, inputs, row, h, rest, hot, current, release_gradient)
                return
            # State-dependent operators must read the row's old values while it is written in place:
            # they read a snapshot (a reused buffer: one copy pass, no allocation).
            snapshot = ctx.scratch(("snapshot", row), current.leaves)
            torch._foreach_copy_(snapshot, current.leaves)
            ctx.z[row] = Accumulator(snapshot, owned=False)
            try:
                self._row_terms(ctx, inputs, row, h, terms, hot, current, release_gradient)
            finally:
                ctx.z[row] = current
        else:
            self._row_terms(ctx, inputs, row, h, terms, hot, target, release_gradient)

    def _fused_self_terms(self, ctx, inputs, row, h, terms):
        """``(factor, other_terms)`` when each term reading ``row`` is ``factor_k · row``, else None."""
        factor, rest = 0.0, []
        for column, op in terms:
            if column != row and not op.state_dependent:
                rest.append((column, op))
                continue
            if op.state_dependent and op.divergence(ctx) is not None:
                return None
            leaves, scale, mass = self.grad_h(column, ctx, inputs)
            if mass is not None:
                return None
            multiplier = op.multiplier(ctx, None if column == row else leaves, -h * scale)
            if multiplier is None:
                return None
            factor = factor + multiplier
        return factor, rest

    def _row_terms(self, ctx, inputs, row, h, terms, hot, out, release_gradient=False):
        if hot and self.gamma and self.state_dependent.get(row, True):  # Γ = 0 for constant operators
            self._gamma(ctx, inputs, terms, out, h)
        for column, op in terms:
            leaves, scale, mass = self.grad_h(column, ctx, inputs)
            if mass is None:
                op.accumulate(out, leaves, -h * scale, ctx)
            else:
                op.accumulate_through_mass(out, leaves, mass, -h * scale, ctx)
        if release_gradient and inputs.fresh:
            if ctx.pending:  # preconditioner values still to compute: they may take the memory
                ctx.donor = inputs.disposable()
            inputs.released = True
        if hot:
            diffusion = self.row_diffusion.get(row) or self.diffusion.get(row, row)
            joint = getattr(diffusion, "joint", None)
            if joint is not None:  # noise shared with other rows (a coupled Block.dense diffusion)
                out.add(joint.noise(row, ctx, inputs.noise), alpha=sqrt(2.0 * inputs.temperature * h))
            elif not diffusion.is_zero:
                views, alpha = _draw(inputs, out.leaves, row, h)
                diffusion.sqrt_accumulate(out, views, alpha, ctx)

    def _gamma(self, ctx, inputs, terms, out, h):
        for _, op in terms:
            if op.state_dependent:
                divergence = op.divergence(ctx)
                if divergence is not None:
                    T = inputs.temperature
                    if isinstance(T, LeafTemperature):
                        out.add(T.scale_divergence(divergence), alpha=h)
                    elif isinstance(T, torch.Tensor):
                        out.addcmul(divergence, per_chain(T, divergence), value=h)
                    else:
                        out.add(divergence, alpha=h * T)

    def ornstein_uhlenbeck(self, ctx: Context, inputs: StepInputs, h: float) -> None:
        r"""Exact O step :math:`m \leftarrow e^{-Gh} m + \sqrt{T M (1 - e^{-2Gh})}\,ξ`, G = D_m M^{-1}."""
        operator = self.diffusion.get("momenta", "momenta")
        corrected = getattr(operator, "ou_accumulate", None)  # gradient-noise corrected (BAOAB)
        friction = (operator.base if corrected else operator).diagonal(ctx)
        mass = self.mass.diagonal(ctx)
        if friction is None or mass is None:
            raise ValueError("an exact O step needs a diagonal momentum diffusion and mass")
        momenta = ctx.z["momenta"]
        if isinstance(friction, float) and isinstance(mass, float):
            rate = friction / mass
            decay = torch.exp(-rate * h) if isinstance(h, torch.Tensor) else math.exp(-rate * h)
            momenta.mul(decay)
            if inputs.hot:
                views, alpha = _draw(inputs, momenta.leaves, "momenta", 0.5)
                if corrected:
                    corrected(momenta, views, h, alpha * (mass * (1.0 - decay**2)) ** 0.5, ctx)
                else:
                    momenta.add(views, alpha=alpha * (mass * (1.0 - decay**2)) ** 0.5)
            return
        if corrected:
            raise ValueError("the gradient-noise corrected O step needs a Scalar friction and mass")
        like = momenta.leaves
        friction = friction if isinstance(friction, list) else [torch.full_like(t, friction) for t in like]
        mass = mass if isinstance(mass, list) else [torch.full_like(t, mass) for t in like]
        rates = torch._foreach_div(friction, mass)
        step = per_chain(-h, like) if isinstance(h, torch.Tensor) else -h
        decay = torch._foreach_exp(torch._foreach_mul(rates, step))
        momenta.mul(decay)
        if inputs.hot:
            spread = torch._foreach_sqrt(torch._foreach_mul(mass, torch._foreach_addcmul(
                [torch.ones_like(d) for d in decay], decay, decay, value=-1.0)))
            views, alpha = _draw(inputs, like, "momenta", 0.5)
            momenta.addcmul(spread, views, value=alpha)


def _draw(inputs: StepInputs, like: Leaves, key: str, h) -> tuple[Leaves, float]:
    """``(views, alpha)``: standard normals shaped like ``like`` and the factor making them sqrt(2 T h) ξ."""
    if isinstance(inputs.temperature, LeafTemperature):  # per-group temperatures: only hot leaves draw
        return inputs.temperature.draw(inputs.noise, like, key, h)
    flat_noise, views = inputs.noise.normal(like, key)
    return views, _noise_scale(flat_noise, inputs.temperature, h)


def _noise_scale(flat_noise: torch.Tensor, temperature, h):
    """sqrt(2 T h) as a float, or (per-chain T or h) folded into the buffer's rows."""
    if isinstance(temperature, torch.Tensor) or isinstance(h, torch.Tensor):
        # in the params' dtype (a float32 scalar would cost a float64 run its precision), in the order
        # of the float path's 2·T·h: per-chain and single-chain runs round alike
        dtype = flat_noise.dtype
        scale = (2.0 * torch.as_tensor(temperature, dtype=dtype) * torch.as_tensor(h, dtype=dtype)).sqrt()
        flat_noise.mul_(scale.view(-1, 1) if flat_noise.ndim == 2 else scale)
        return 1.0
    return math.sqrt(2.0 * temperature * h)
