"""One engine transform per param group of :class:`~bayesflow.integrations.EngineOptimizer`: building it
from the group's options (re-read every step, rebuilt only when the operators depend on a changed lr;
at lr = 0 built at a proxy lr and told how the face steps, see :data:`HOLD`), the per-parameter state
templates that ``state_dict`` stores, and the argument checks. Private.
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import fields, replace

import torch

from bayesflow.engine import SDEConfig
from bayesflow.engine import build as engine_build
from bayesflow.engine.operators import Scalar
from bayesflow.engine.preconditioners import Preconditioned

ENGINE = "engine"
"""The param-group key holding the group's engine state (step, noise key, thermostat, ...)."""

RESERVED = frozenset({"params", "name", "param_names", ENGINE, "initial_lr", "differentiable"})
"""Group keys that are not preset options (torch's, the schedulers', and ours)."""

SKIP = "skip"
"""At lr = 0 the face skips the step: h = 0 is the frozen SDE (samplers, T > 0; momenta with h ∝ lr)."""

HOLD = "hold"
"""At lr = 0 the face steps at the proxy lr and puts θ back: torch's statistics advance (T = 0)."""

ZERO_LR_PROXY = 1.0
"""The proxy lr of a group that has had no non-zero lr (a warm-up from 0); any positive value is exact."""

_STRUCTURE = tuple(f.name for f in fields(SDEConfig) if f.name not in ("step_size", "temperature", "recipe"))
_PROBE_SHAPES = (torch.Size([1]), torch.Size([2]), torch.Size([3]))


def _never_called(params, batch):
    raise RuntimeError("an optimizer face is driven by .grad (engine step); it never evaluates a log posterior")


class _Live:
    """A schedule the face rewrites: the step size or temperature of a group's current options."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __call__(self, step: int) -> float:
        value = self.value
        return value(step) if callable(value) else value

    def __repr__(self):
        return f"Live({self.value!r})"


def _same(a, b) -> bool:
    """Option values compared without tensor truthiness (a tensor counts as changed unless identical)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


def _same_structure(a: SDEConfig, b: SDEConfig) -> bool:
    try:
        return all(getattr(a, name) == getattr(b, name) for name in _STRUCTURE)
    except (RuntimeError, TypeError, ValueError):
        return False


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _momentum_scale(config: SDEConfig, lr):
    """c = lr·s/h with s the mass's scale: the engine's momenta are -c × torch's momentum buffer."""
    h = config.step_size
    if "momenta" not in config.components or not _real(h) or not _real(lr) or h == 0:
        return None
    mass = config.mass
    scale = mass.value if isinstance(mass, Scalar) else mass.scale if isinstance(mass, Preconditioned) else 1.0
    return float(lr) * scale / h


def _is_zero_lr(lr, index: int) -> bool:
    """lr = 0 (schedulers reach it), with a negative, NaN or infinite lr refused here, where 0 is allowed."""
    if not _real(lr):
        return False  # a tensor or a schedule: the preset checks it
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"param group {index}: Invalid learning rate: {lr!r}; lr must be a finite number >= 0 "
                         "(0 holds the parameters still)")
    return lr == 0


# ----- per-parameter pieces of the preconditioner state --------------------------------------------
class _PerParam:
    """A list with one tensor per parameter, stored under ``name`` in each parameter's state."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class _Shared:
    """A tensor of the whole group, stored under ``name`` in the group's engine state."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


def _template(tree, shapes, path: str):
    if isinstance(tree, (list, tuple)) and len(tree) == len(shapes) and all(
            isinstance(t, torch.Tensor) and t.shape == s for t, s in zip(tree, shapes)):
        return _PerParam(path)
    if isinstance(tree, (list, tuple)):
        children = [_template(t, shapes, f"{path}.{i}") for i, t in enumerate(tree)]
        return type(tree)(*children) if hasattr(tree, "_fields") else type(tree)(children)
    return _Shared(path) if isinstance(tree, torch.Tensor) else tree


def _assemble(node, states: list, shared: dict):
    if isinstance(node, _PerParam):
        return [s[node.name] for s in states]
    if isinstance(node, _Shared):
        return shared[node.name]
    if isinstance(node, (list, tuple)):
        children = [_assemble(child, states, shared) for child in node]
        return type(node)(*children) if hasattr(node, "_fields") else type(node)(children)
    return node


def _store(node, tree, states: list, shared: dict) -> None:
    if isinstance(node, _PerParam):
        name = node.name
        for s, t in zip(states, tree):
            if s.get(name) is not t:
                s[name] = t
    elif isinstance(node, _Shared):
        shared[node.name] = tree
    elif isinstance(node, (list, tuple)):
        for child, sub in zip(node, tree):
            _store(child, sub, states, shared)


# ----- one param group ---------------------------------------------------------------------------
class _GroupEngine:
    """The engine transform of one param group, rebuilt only when its options change the SDE's structure."""

    def __init__(self, builder, names: tuple):
        self.builder, self.names = builder, names
        self.values = self.config = self.transform = self.engine = self.template = None
        self.step_size = self.temperature = self.momentum_scale = None
        self.components, self.rebuilds = (), 0
        self.last_lr = self.zero_lr = None  # the last non-zero lr; at lr = 0, SKIP or HOLD

    def configure(self, group: dict, index: int) -> None:
        values = [group[name] for name in self.names]
        if self.values is not None and all(map(_same, values, self.values)):
            return
        options = dict(zip(self.names, values))
        zero = _is_zero_lr(options.get("lr"), index)
        if zero:  # a preset refuses lr = 0 (h = √lr and friction (1 - μ)/√lr): built at a proxy lr
            # the group's state remembers its last lr (the momenta's units), a loaded checkpoint's too
            saved = (group.get(ENGINE) or {}).get("last_lr", self.last_lr)
            options["lr"] = ZERO_LR_PROXY if saved is None else saved
        transform = _preset(self.builder, options, index)
        config = transform.config
        if self.engine is not None and _same_structure(config, self.config):
            self.step_size.value, self.temperature.value = config.step_size, config.temperature
        else:  # the operators changed (or first use): a new transform whose h and T are live values
            self.step_size, self.temperature = _Live(config.step_size), _Live(config.temperature)
            self.engine = engine_build(_never_called, replace(config, step_size=self.step_size,
                                                              temperature=self.temperature))
            self.template = None
            self.rebuilds += 1
        self.config, self.transform, self.values = config, transform, values
        self.components = config.components
        self.momentum_scale = _momentum_scale(config, options.get("lr"))
        self.zero_lr = self._zero_lr_mode(options, index) if zero else None
        if not zero and _real(options.get("lr")):
            self.last_lr = float(options["lr"])

    def _zero_lr_mode(self, options: dict, index: int) -> str:
        """HOLD at T = 0 without momenta or with momenta stored as torch's buffer (rescaled with lr): their
        lr → 0⁺ limit is torch's update of the statistics, θ fixed. SKIP otherwise (T > 0; momenta with
        h ∝ lr), whose limit leaves everything as it is. See the optimizer module's docstring."""
        temperature = self.config.temperature
        if not (_real(temperature) and temperature == 0):
            return SKIP
        if "momenta" not in self.components:
            return HOLD
        if self.momentum_scale is None:
            return SKIP
        lr = 0.25 * options["lr"]  # does c = lr·s/h change with lr (√lr·…)? Smaller: presets bound h above
        scale = _momentum_scale(_preset(self.builder, {**options, "lr": lr}, index).config, lr)
        rescaled = scale is not None and not math.isclose(scale, self.momentum_scale, rel_tol=1e-6)
        return HOLD if rescaled else SKIP

    def preconditioner_template(self, like: torch.Tensor):
        """Which parts of the preconditioner state are per parameter (read off a three-leaf probe)."""
        if self.template is None:
            probe = [torch.zeros(s, dtype=like.dtype, device=like.device) for s in _PROBE_SHAPES]
            state = engine_build(_never_called, self.config).init(probe, seed=0)
            self.template = _template(state.preconditioner, _PROBE_SHAPES, "preconditioner")
        return self.template


def _preset(builder, options: dict, index: int):
    """``builder(log_posterior, **options)``, checked to be a single-chain, one-gradient engine transform."""
    name = getattr(builder, "__module__", "") + "." + getattr(builder, "__name__", repr(builder))
    try:
        transform = builder(_never_called, **options)
    except TypeError as error:
        raise TypeError(f"param group {index}: {name}: {error}") from error
    except ValueError as error:
        raise ValueError(f"param group {index}: {name}: {error}") from error
    config = getattr(transform, "config", None)
    if not isinstance(config, SDEConfig) or getattr(transform, "step", None) is None:
        raise TypeError(f"builder must return an engine transform (e.g. bayesflow.sgmcmc.sghmc.build, "
                        f"bayesflow.optim.adam.build); {name} returned {type(transform).__name__}")
    if getattr(transform, "chains", None) is not None:
        raise ValueError(f"{name} built {transform.chains} chains; an optimizer face advances one chain")
    integrator = config.integrator
    if not integrator.evaluates_at_start() or integrator.caches_gradient:
        raise ValueError(f"{name} integrates with {integrator!r}, which needs ∇ℓ at a second point of each step; "
                         "an optimizer receives one gradient per step (.grad). Use a one-gradient sampler "
                         "(sgmcmc.sghmc, sgmcmc.baoa, sgmcmc.sgld, ...) or drive this transform with "
                         "update(state, batch)")
    for what, value in (("lr", config.step_size), ("temperature", config.temperature)):
        if isinstance(value, torch.Tensor):
            raise ValueError(f"param group {index}: {what} of one value per chain is not supported by an optimizer "
                             "face (one chain); give a number")
    return transform


def _builder_defaults(builder) -> dict:
    """The builder's keyword defaults (``momentum=0.0``, ...): every option appears in the groups."""
    try:
        parameters = list(inspect.signature(builder).parameters.values())[1:]  # after log_posterior
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _log_posterior_value(loss, like: torch.Tensor):
    if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.numel() == 1:
        return loss.detach().reshape(()).to(like.dtype).neg()
    if _real(loss):
        return torch.tensor(-float(loss), dtype=like.dtype, device=like.device)
    return None


def _check_params(params: list, index: int) -> None:
    dtypes, devices = set(), set()
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"param group {index}: parameter {i} has dtype {p.dtype}; parameters must be "
                            "floating point")
        dtypes.add(p.dtype)
        devices.add(p.device)
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(f"param group {index} mixes dtypes {sorted(map(str, dtypes))} / devices "
                         f"{sorted(map(str, devices))}; one engine transform steps one dtype on one device: "
                         "put the parameters in separate param groups")


def _placed(engine: dict, like: torch.Tensor) -> dict:
    """The group's engine state where the engine expects it (a loaded or device-moved checkpoint)."""
    for name in ("step", "rng", "rejected"):
        if engine[name].device.type != "cpu":
            engine[name] = engine[name].cpu()
    for name in ("log_posterior", "xi"):
        t = engine[name]
        if t is not None and (t.device != like.device or t.dtype != like.dtype):
            engine[name] = t.to(device=like.device, dtype=like.dtype)
    return engine
