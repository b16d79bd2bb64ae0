r"""Integrators: how one step of length h advances the extended state.

* :class:`EulerMaruyama` — every component from the old state (weak order 1); the general scheme.
* :class:`SemiImplicitEuler` — components in sequence (momenta, then params with the new momenta,
  then the thermostat), each from the newest values (weak order 1). At T = 0 with the SGHMC operators
  this is exactly torch's SGD with momentum.
* :class:`Nesterov` — semi-implicit, but the position moves with the look-ahead momentum
  :math:`\tilde m = m' + h\,(\text{momentum drift at } m')` (torch's ``nesterov=True``).
* :class:`Splitting` — a word over A (position drift), B (gradient kick) and O (exact
  Ornstein–Uhlenbeck step on the momenta), each letter taking h / (its count): ``BAOAB``, ``OBABO``,
  ``ABOBA`` (weak order 2), ``BAOA`` (posteriors' name). A word that kicks after moving (BAOAB, OBABO)
  reuses its last gradient as the next step's first one (first same as last), so every word costs
  one gradient evaluation per step.

Example:
    >>> from bayesflow.engine import Splitting
    >>> integrator = Splitting("BAOAB")
    >>> integrator.weak_order
    2
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bayesflow.engine.accumulator import Accumulator
from bayesflow.engine.context import Context
from bayesflow.engine.operators import Scalar
from bayesflow.engine.system import StepInputs, System

__all__ = ["EulerMaruyama", "Integrator", "Nesterov", "SemiImplicitEuler", "Splitting"]


class Integrator:
    """An integrator advances ``ctx.z`` by one step; it declares its weak order.

    Example (a user integrator: one Euler sub-step of θ, what EulerMaruyama does for SGLD):
        >>> import torch
        >>> from bayesflow.engine import Integrator, build
        >>> class PositionStep(Integrator):
        ...     def advance(self, system, ctx, inputs, scales):
        ...         system.row(ctx, inputs, "params", inputs.h)   # θ ← θ - h·D∇H + sqrt(2Th)·D^{1/2}ξ
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.1, integrator=PositionStep())
        >>> state, _ = transform.update(transform.init(torch.zeros(2), seed=0), batch=None)
    """

    weak_order: int = 1
    needs_momenta: bool = False
    caches_gradient: bool = False

    def advance(self, system: System, ctx: Context, inputs: StepInputs, scales: dict) -> None:
        raise NotImplementedError

    def evaluates_at_start(self) -> bool:
        """Whether the one gradient of a step is taken at the step's starting θ."""
        return True


def _h(inputs: StepInputs, scales: dict, component: str, step: int) -> float:
    scale = scales.get(component)
    return inputs.h if scale is None else inputs.h * scale(step)


@dataclass(frozen=True)
class EulerMaruyama(Integrator):
    """z ← z + h·drift(z) + sqrt(2Th)·D^{1/2}ξ, all components from the old z.

    Example (T = 0 and D = 1/2: one step θ ← θ - h·D·θ for ℓ(θ) = -|θ|²/2):
        >>> import torch
        >>> from bayesflow.engine import EulerMaruyama, Scalar, build
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.1, diffusion=Scalar(0.5),
        ...                   temperature=0.0, integrator=EulerMaruyama())
        >>> transform.update(transform.init(torch.ones(2), seed=0), batch=None)[0].params
        tensor([0.9500, 0.9500])
    """

    weak_order: int = field(default=1, init=False)

    def advance(self, system, ctx, inputs, scales):
        rows = list(system.rows)
        if rows == ["params"] and not system.state_dependent["params"]:
            system.row(ctx, inputs, "params", _h(inputs, scales, "params", ctx.step))
            return
        system.potential(ctx, inputs)
        increments = {}
        for row in rows:
            current = ctx.z[row].leaves
            increments[row] = Accumulator([leaf.new_zeros(leaf.shape) for leaf in current], owned=True)
            system.row(ctx, inputs, row, _h(inputs, scales, row, ctx.step), target=increments[row])
        for row, increment in increments.items():
            ctx.z[row].add(increment.leaves)


@dataclass(frozen=True)
class SemiImplicitEuler(Integrator):
    """Components updated in ``order``, each from the newest values (symplectic Euler).

    Example (SGHMC at T = 0 from rest: m ← m + h·∇ℓ first, then θ ← θ + h·m with the new m):
        >>> import torch
        >>> from bayesflow.engine import Block, Scalar, SemiImplicitEuler, build, hamiltonian_curl
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.1, temperature=0.0,
        ...                   diffusion=Block({("momenta", "momenta"): Scalar(1.0)}), curl=hamiltonian_curl(1.0),
        ...                   integrator=SemiImplicitEuler(), momenta_init="zero")
        >>> state, _ = transform.update(transform.init(torch.ones(1), seed=0), batch=None)
        >>> state.momenta, state.params
        (tensor([-0.1000]), tensor([0.9900]))
    """

    order: tuple[str, ...] = ("momenta", "params", "xi")
    weak_order: int = field(default=1, init=False)

    def advance(self, system, ctx, inputs, scales):
        system.potential(ctx, inputs)
        last = system.last_gradient_reader(self.order)
        for row in self.order:
            if row in system.rows:
                # after the last row that kicks with ∇θH its memory may hold P (Adam: no P buffer)
                system.row(ctx, inputs, row, _h(inputs, scales, row, ctx.step), release_gradient=row == last)


@dataclass(frozen=True)
class Nesterov(Integrator):
    r"""Momenta first; then θ moves with the look-ahead momentum (torch's ``nesterov=True``).

    The look-ahead is :math:`\tilde m = m' + h\,r(m')`, r the momenta's drift with the step's
    gradient. With scalar operators (SGD's case) θ's update is linear in m' and the gradient, so it
    is applied as two fused foreach updates without materialising :math:`\tilde m`.

    Example (torch's ``SGD(lr=0.01, momentum=0.9, nesterov=True)`` at T = 0: h = √lr, friction (1 - μ)/h):
        >>> from bayesflow.engine import Block, Nesterov, Scalar, SDEConfig, hamiltonian_curl
        >>> config = SDEConfig(step_size=0.1, diffusion=Block({("momenta", "momenta"): Scalar(1.0)}),
        ...                    curl=hamiltonian_curl(1.0), integrator=Nesterov(), temperature=0.0)
        >>> config.components   # Nesterov needs momenta
        ('params', 'momenta')
    """

    weak_order: int = field(default=1, init=False)
    needs_momenta: bool = field(default=True, init=False)

    def advance(self, system, ctx, inputs, scales):
        h_momenta = _h(inputs, scales, "momenta", ctx.step)
        h_params = _h(inputs, scales, "params", ctx.step)
        # ∇ℓ first: a failed (non-finite) evaluation must find the in-place state unwritten, and the
        # momenta row writes m (friction) before it reads the gradient
        system.potential(ctx, inputs)
        system.row(ctx, inputs, "momenta", h_momenta)
        coefficients = _scalar_momentum_system(system)
        if coefficients is not None:
            q_pm, q_mp, friction, mass = coefficients
            leaves, scale, _ = system.grad_h("params", ctx, inputs)  # ∇θH = scale · leaves
            move = -h_params * q_pm / mass
            ctx.z["params"].add(ctx.leaves("momenta"), alpha=move * (1.0 - h_momenta * friction / mass))
            ctx.z["params"].add(leaves, alpha=-move * h_momenta * q_mp * scale)
        else:
            updated = ctx.z["momenta"]
            look_ahead = Accumulator(list(updated.leaves), owned=False)
            system.row(ctx, inputs, "momenta", h_momenta, noise=False, target=look_ahead)
            ctx.z["momenta"] = look_ahead
            system.row(ctx, inputs, "params", h_params)
            ctx.z["momenta"] = updated
        if "xi" in system.rows:
            system.row(ctx, inputs, "xi", _h(inputs, scales, "xi", ctx.step))


def _scalar_momentum_system(system: System) -> tuple[float, float, float, float] | None:
    """(Q_θm, Q_mθ, D_mm, M) when θ's and m's rows hold only scalar blocks, else None."""
    params_terms = dict(system.terms.get("params", ()))
    momenta_terms = dict(system.terms.get("momenta", ()))
    blocks = [params_terms.get("momenta"), momenta_terms.get("params"), momenta_terms.get("momenta", Scalar(0.0))]
    if set(params_terms) != {"momenta"} or set(momenta_terms) - {"params", "momenta"} or "xi" in system.rows:
        return None
    if not all(isinstance(op, Scalar) for op in blocks) or not isinstance(system.mass, Scalar):
        return None
    return blocks[0].value, blocks[1].value, blocks[2].value, system.mass.value


@dataclass(frozen=True)
class Splitting(Integrator):
    """A splitting word over A, B, O; each letter advances by h / (number of its occurrences).

    Example (underdamped Langevin with BAOAB, friction γ = 1 on the momenta):
        >>> from bayesflow.engine import Block, Scalar, SDEConfig, Splitting, hamiltonian_curl
        >>> baoab = SDEConfig(step_size=0.05, diffusion=Block({("momenta", "momenta"): Scalar(1.0)}),
        ...                   curl=hamiltonian_curl(1.0), integrator=Splitting("BAOAB"))
        >>> baoab.integrator.weak_order, Splitting("BAOA").weak_order   # palindromic words are order 2
        (2, 1)
    """

    word: str = "BAOAB"
    needs_momenta: bool = field(default=True, init=False)

    def __post_init__(self):
        if not self.word or set(self.word) - set("ABO"):
            raise ValueError(f"a splitting word uses only the letters A, B and O, got {self.word!r}")
        for letter in "ABO":
            if letter not in self.word:
                raise ValueError(f"splitting word {self.word!r} lacks {letter!r}")

    @property
    def weak_order(self) -> int:
        return 2 if self.word == self.word[::-1] else 1

    @property
    def caches_gradient(self) -> bool:
        kicks = [i for i, c in enumerate(self.word) if c == "B"]
        drifts = [i for i, c in enumerate(self.word) if c == "A"]
        return kicks[-1] > drifts[-1] and kicks[0] < drifts[0]

    def evaluates_at_start(self) -> bool:
        return self.word.index("B") < self.word.index("A")

    def advance(self, system, ctx, inputs, scales):
        counts = {letter: self.word.count(letter) for letter in "ABO"}
        for letter in self.word:
            if letter == "A":
                system.row(ctx, inputs, "params", _h(inputs, scales, "params", ctx.step) / counts["A"])
                inputs.fresh = False
            elif letter == "B":
                h = _h(inputs, scales, "momenta", ctx.step) / counts["B"]
                system.row(ctx, inputs, "momenta", h, noise=False, columns=("params", "xi"))
            else:
                h = _h(inputs, scales, "momenta", ctx.step) / counts["O"]
                system.ornstein_uhlenbeck(ctx, inputs, h)
