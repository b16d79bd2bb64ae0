r"""The engine's configuration as data: D, Q, N, T, h, integrator and the extended state.

Every preset returns one of these; ``bayesflow.engine.build(log_posterior, config)`` turns it into a
transform. Configurations print, compare, and can be edited with :func:`dataclasses.replace`
(``replace(config, temperature=0.0)`` is the optimizer of any sampler).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Any, Literal

import torch

from bayesflow.engine.block import Block, as_block
from bayesflow.engine.groups import TemperatureGroups
from bayesflow.engine.integrators import EulerMaruyama, Integrator, Splitting
from bayesflow.engine.operators import Diagonal, Operator, Scalar
from bayesflow.engine.schedules import as_schedule
from bayesflow.tree import tree_leaves

__all__ = ["SDEConfig", "preset"]

CHECKS = ("auto", "full", "value", "none")
POLICIES = ("raise", "reject")
MOMENTA_INIT = ("temperature", "zero")


COMPILE_OPTIONS = ("mode", "backend", "options")
"""The ``torch.compile`` arguments ``compile_options`` may set (the graph is always whole and static)."""
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_options(compile, options) -> None:
    """Refuses ``compile_options`` that are not a dict of :data:`COMPILE_OPTIONS`, an unknown ``mode``,
    or options given where nothing is compiled (``compile`` False or ``"replay"``)."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise TypeError(f"compile_options must be a dict of torch.compile arguments, got {type(options).__name__}")
    unknown = sorted(set(options) - set(COMPILE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown compile_options {unknown}; expected some of {COMPILE_OPTIONS}")
    if "mode" in options and options["mode"] not in COMPILE_MODES:
        raise ValueError(f"unknown compile_options mode {options['mode']!r}; expected one of {COMPILE_MODES}")
    if "options" in options and not isinstance(options["options"], dict):
        raise TypeError("compile_options['options'] must be a dict of inductor settings, got "
                        f"{type(options['options']).__name__}")
    if compile not in (True, "auto"):
        raise ValueError(f"compile_options {options} need compile=True or 'auto', got compile={compile!r}")


def _number(name: str, value, *, sign: str = "") -> None:
    """Refuses a field that is not a finite real number (a bool, NaN, ±inf, a string), or (``sign``
    ``"non-negative"`` or ``"positive"``) one below zero or at it: ``wd < 0`` alone lets NaN through."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or (
            sign == "non-negative" and value < 0) or (sign == "positive" and value <= 0):
        raise ValueError(f"{name} must be a finite {sign + ' ' if sign else ''}number, got {value!r}")


def check_mass(mass) -> None:
    """A constant mass must be positive: M⁻¹ and M^{1/2} enter every step (``Scalar(0)`` would divide
    by zero, a negative one has no square root). Preconditioned masses are positive by construction."""
    if isinstance(mass, Scalar) and not mass.value > 0:
        raise ValueError(f"mass must be positive (M⁻¹ and M^(1/2) enter every step), got {mass!r}")
    if isinstance(mass, Diagonal):
        for i, values in enumerate(mass.values):
            if values.numel() and not bool((values > 0).all()):
                raise ValueError(f"mass must be positive (M⁻¹ and M^(1/2) enter every step); Diagonal leaf {i} "
                                 f"has entries <= 0 (min {values.min().item():g})")


def check_num_data(num_data) -> None:
    """N as given: a positive finite number, or a tree of them (one per leaf: its length is checked at
    ``init``, against the parameters)."""
    if isinstance(num_data, (bool, Real)) or not isinstance(num_data, (Mapping, list, tuple, torch.Tensor)):
        _number("num_data", num_data, sign="positive")
        return
    for i, value in enumerate(tree_leaves(num_data)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        _number(f"num_data entry {i}", value, sign="positive")


@dataclass(frozen=True)
class SDEConfig:
    r"""One point in the family :math:`dz = -[D+Q]\nabla H\,dt + TΓ\,dt + \sqrt{2TD}\,dW`.

    Args:
        step_size: h, a finite float >= 0 or a schedule ``step -> float`` (its values are checked each step).
        diffusion: D, an operator on θ or a :class:`Block` over (params, momenta, xi).
        curl: Q, likewise (None: zero).
        temperature: T, a finite float >= 0, a schedule, a tensor with one value per chain, or a dict
            ``{parameter-name glob: T}`` of per-group temperatures (:mod:`bayesflow.engine.groups`).
        num_data: N, the normaliser of the user's log posterior (1 for per-datum values, the
            default; num_data for summed ones), or one float per leaf of params (per-group N); every
            value positive and finite.
        integrator: an :class:`~bayesflow.engine.integrators.Integrator`.
        mass: M in the kinetic energy ½ mᵀM⁻¹m (a Scalar, Diagonal or Preconditioned operator); a Scalar
            or Diagonal mass must be positive (``Scalar(0)`` is refused, not divided by).
        thermostat_target: A in SGNHT's thermostat energy (d/(2Q))(ξ - A)², a finite number.
        thermostat_mass: Q in that energy, the thermostat's inertia (SGNHT: σ², the momenta's mass, so
            the friction is ξ/σ² whatever units m is measured in; ξ's stationary spread is T·Q/d), a
            positive finite number.
        weight_decay: λ >= 0 of a Gaussian prior (λ/2)|θ|² added to H (torch's coupled weight decay).
        decoupled_weight_decay: per-step factor ε >= 0 of θ ← (1 - ε)θ applied before the step (AdamW).
        step_scales: ``((component, schedule), ...)``: that component's sub-steps use h·schedule(t)
            (Adam's bias correction, torch SGD's undampened first step).
        gamma: compute Γ for state-dependent operators (False drops it, as pSGLD does).
        momenta_init: "temperature" draws m ~ N(0, T·M) at init; "zero" starts at rest.
        check_finite: "full" checks the log posterior and every gradient leaf each evaluation (one
            read pass over the gradient), "value" only the log posterior, "none" nothing. "auto"
            (default) is "full" in ``update``, where the engine calls the user's log posterior, and
            "value" in ``step``, whose caller computed the gradient (and its checks, e.g. GradScaler).
        on_nonfinite: "raise" a FloatingPointError naming step and leaf, or "reject" the step.
        compile: False (the eager step), True (the step traced once per parameter layout and compiled
            with ``torch.compile``), ``"replay"`` (traced and replayed eagerly, without the engine's
            Python) or ``"auto"`` (compiled for large layouts, the eager step for small ones); see
            :mod:`bayesflow.engine.compiled`. The numbers a step computes do not change (up to
            floating-point reordering), nor the noise it draws.
        compile_options: keyword arguments of ``torch.compile`` for ``compile=True``: ``mode``
            (``"reduce-overhead"``: CUDA graphs for small, launch-bound models on a GPU;
            ``"max-autotune"``, ...), ``backend``, ``options`` (inductor's settings). None (default): the
            traced graph goes to inductor directly, without a dynamo frame (the fastest call on the CPU).
        recipe: set by presets (:func:`preset`): the preset's ``config`` with its arguments bound, so
            that an overridden temperature or learning rate (ensembles, sweeps) is configured *by the
            preset* — with its schedules and corrections — instead of written over them. Not compared.

    Raises:
        ValueError / TypeError: a field outside what it accepts, naming the field and the value (NaN and
            infinite numbers included); operator shapes and per-leaf ``num_data`` lengths are checked at
            ``init``, against the parameters.

    Example (SGHMC with friction γ = 0.1, and the same dynamics as an optimizer at T = 0):
        >>> from dataclasses import replace
        >>> from bayesflow.engine import Block, Scalar, SDEConfig, SemiImplicitEuler, hamiltonian_curl
        >>> sghmc = SDEConfig(step_size=1e-2, diffusion=Block({("momenta", "momenta"): Scalar(0.1)}),
        ...                   curl=hamiltonian_curl(1.0), integrator=SemiImplicitEuler(), temperature=1e-3)
        >>> sghmc.components, replace(sghmc, temperature=0.0).temperature
        (('params', 'momenta'), 0.0)
    """

    step_size: Any
    diffusion: Operator | Block = field(default_factory=lambda: Scalar(1.0))
    curl: Operator | Block | None = None
    temperature: Any = 1.0
    num_data: Any = 1.0
    integrator: Integrator = field(default_factory=EulerMaruyama)
    mass: Operator = field(default_factory=lambda: Scalar(1.0))
    thermostat_target: float = 1.0
    thermostat_mass: float = 1.0
    weight_decay: float = 0.0
    decoupled_weight_decay: float = 0.0
    step_scales: tuple = ()
    gamma: bool = True
    momenta_init: Literal["temperature", "zero"] = "temperature"
    check_finite: Literal["auto", "full", "value", "none"] = "auto"
    on_nonfinite: Literal["raise", "reject"] = "raise"
    compile: bool | Literal["auto", "replay"] = False
    compile_options: dict | None = field(default=None, hash=False)
    recipe: Callable[..., SDEConfig] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for name, value, allowed in (("check_finite", self.check_finite, CHECKS),
                                     ("on_nonfinite", self.on_nonfinite, POLICIES),
                                     ("momenta_init", self.momenta_init, MOMENTA_INIT)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if not (self.compile is True or self.compile is False or self.compile in ("auto", "replay")):
            raise ValueError(f"unknown compile {self.compile!r}; expected True, False, 'auto' or 'replay'")
        check_compile_options(self.compile, self.compile_options)
        if not isinstance(self.integrator, Integrator):
            raise TypeError(f"integrator must be an Integrator, got {type(self.integrator).__name__}")
        if not isinstance(self.mass, Operator) or self.mass.diagonal is Operator.diagonal:
            raise TypeError(f"mass must be a diagonal operator (Scalar, Diagonal, Preconditioned), got {self.mass!r}")
        check_mass(self.mass)
        _number("thermostat_target", self.thermostat_target)
        _number("thermostat_mass", self.thermostat_mass, sign="positive")
        _number("weight_decay", self.weight_decay, sign="non-negative")
        _number("decoupled_weight_decay", self.decoupled_weight_decay, sign="non-negative")
        if isinstance(self.temperature, Mapping):
            TemperatureGroups(self.temperature)
        else:
            as_schedule(self.temperature, "temperature")
        as_schedule(self.step_size, "step_size")
        check_num_data(self.num_data)
        if not isinstance(self.gamma, bool):
            raise TypeError(f"gamma must be True or False, got {self.gamma!r}")
        for entry in self.step_scales:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise TypeError(f"step_scales must be ((component, schedule), ...) pairs, got {entry!r}")
            component, scale = entry
            if component not in ("params", "momenta", "xi"):
                raise ValueError(f"step_scales names unknown component {component!r}")
            if not callable(scale):
                raise TypeError(f"step_scales[{component!r}] must be a schedule step -> float (e.g. Constant(2.0), "
                                f"FirstStep(...)), got {scale!r}")

    @property
    def diffusion_block(self) -> Block:
        return as_block(self.diffusion)

    @property
    def curl_block(self) -> Block:
        return as_block(self.curl)

    @property
    def components(self) -> tuple[str, ...]:
        """The extended state's components, from the operators and the integrator."""
        used = self.diffusion_block.components() | self.curl_block.components() | {"params"}
        if self.integrator.needs_momenta:
            used.add("momenta")
        return tuple(c for c in ("params", "momenta", "xi") if c in used)

    def validate(self) -> None:
        """Checks that need no parameters (operator shapes are checked at ``init``)."""
        components = self.components
        check = getattr(self.integrator, "validate", None)
        if check is not None:  # what an integrator needs of the operators (the lattice walk: a diagonal D)
            check(self)
        if isinstance(self.integrator, Splitting):
            if "momenta" not in components or ("params", "momenta") not in self.curl_block.blocks:
                raise ValueError(f"splitting integrator {self.integrator.word!r} needs momenta coupled to params "
                                 "by the curl (curl=hamiltonian_curl(...))")
            if any(getattr(op, "joint", None) is not None for op in self.diffusion_block.blocks.values()):
                raise ValueError(f"splitting integrator {self.integrator.word!r} takes an exact Ornstein–Uhlenbeck "
                                 "step on the momenta alone; a diffusion coupling params and momenta (Block.dense) "
                                 "needs EulerMaruyama or SemiImplicitEuler")
            preconditioned = self.diffusion_block.preconditioners() + self.curl_block.preconditioners()
            if preconditioned and not self.integrator.evaluates_at_start():
                raise ValueError("a preconditioned splitting word must kick (B) before it drifts (A)")


def preset(config_fn: Callable[..., SDEConfig]) -> Callable[..., SDEConfig]:
    """Decorate a preset's ``config`` function: the configurations it returns carry their recipe.

    ``config.recipe(temperature=T)`` is ``config_fn`` called again with the same arguments but T,
    so a preset's own temperature rules (cSGLD's exploration stage, posteriors' ``beta`` correction)
    and step-size rules (a friction that depends on ``lr``) apply to overridden values too.

    Example:
        >>> from bayesflow.sgmcmc import csgld
        >>> config = csgld.config(lr=0.1, cycle_length=10, exploration=0.5, temperature=1.0)
        >>> hotter = config.recipe(temperature=2.0)       # still cyclical: T = 0 while exploring
        >>> hotter.temperature(0), hotter.temperature(7)
        (0.0, 2.0)
    """
    signature = inspect.signature(config_fn)
    var_keyword = [name for name, p in signature.parameters.items() if p.kind is p.VAR_KEYWORD]

    @functools.wraps(config_fn)
    def configured(*args, **kwargs) -> SDEConfig:
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        for name in var_keyword:
            arguments.update(arguments.pop(name, {}))
        config = config_fn(**arguments)
        return replace(config, recipe=functools.partial(configured, **arguments))

    configured.accepts = frozenset(signature.parameters) - set(var_keyword)
    return configured
