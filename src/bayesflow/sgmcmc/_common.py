"""What the SG-MCMC presets share: argument checks, posteriors' ``beta``, initial values, engine options.

Nothing here touches a parameter during a step: presets only *configure* the engine.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from numbers import Real

import torch

from bayesflow.engine import Block, Scalar, SDEConfig, hamiltonian_curl
from bayesflow.engine import build as engine_build
from bayesflow.engine.groups import TemperatureGroups
from bayesflow.engine.schedules import Constant, Cyclical, as_schedule
from bayesflow.tree import tree_map
from bayesflow.types import Transform

ENGINE_OPTIONS = ("num_data", "check_finite", "on_nonfinite", "momenta_init", "compile", "compile_options")
"""Engine fields a preset passes through unchanged (``**options`` of every ``config``)."""


def positive(name: str, value, *, allow_zero: bool = False, schedule: bool = False, per_chain: bool = False):
    """Return ``value`` if it is a finite positive number (or a schedule where allowed), or — with
    ``per_chain`` — a 1-D tensor of such numbers, one per chain (ensembles and sweeps)."""
    if schedule and callable(value) and not isinstance(value, torch.Tensor):
        # the library's value schedules are checked now (Cyclical(initial=-0.1)); another callable's values
        # are checked by the engine at each step it is read
        return as_schedule(value, name) if isinstance(value, (Constant, Cyclical)) else value
    if isinstance(value, torch.Tensor):
        if not per_chain:
            raise ValueError(f"{name} of one value per chain (a tensor) is not supported here: "
                             + (f"this preset's operators depend on {name} in a way one batched step cannot hold; "
                                "build one transform per value" if name == "lr" else
                                "per-chain values are taken for lr and temperature only"))
        if value.ndim != 1 or not value.is_floating_point() or not bool(torch.isfinite(value).all()) or bool(
                (value < 0).any()) or (not allow_zero and bool((value == 0).any())):
            expected = "non-negative" if allow_zero else "positive"
            raise ValueError(f"{name} per chain must be a 1-D floating-point tensor of finite {expected} values, "
                             f"got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or (
            value < 0 or (value == 0 and not allow_zero)):
        expected = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {expected} finite number{' or a schedule' if schedule else ''}, "
                         f"got {value!r}")
    return float(value)


def learning_rate(lr, *, schedule: bool = True):
    """``lr`` checked as a step size: a positive number, a schedule, or one value per chain."""
    return positive("lr", lr, schedule=schedule, per_chain=True)


def temperature_value(temperature, *, schedule: bool = True, groups: bool = True):
    """``temperature`` checked: a non-negative number, a schedule, one value per chain, or (``groups``)
    a dict ``{parameter-name glob: T}`` of per-group temperatures (:mod:`bayesflow.engine.groups`)."""
    if isinstance(temperature, Mapping):
        if not groups:
            raise ValueError("per-group temperatures (a dict) are not supported by this preset: its operators "
                             "depend on the temperature as a whole")
        TemperatureGroups(temperature)  # checked here, at the preset's boundary
        return dict(temperature)
    return positive("temperature", temperature, allow_zero=True, schedule=schedule, per_chain=True)


def fraction(name: str, value, *, closed: bool = False) -> float:
    """Return ``value`` if it lies in [0, 1) (or [0, 1] with ``closed``)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (
            0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value!r}")
    return float(value)


def injected_temperature(temperature, lr, beta: float, friction: float):
    r"""The temperature of the injected noise under posteriors' gradient-noise estimate ``beta``.

    posteriors injects noise of variance :math:`h T (2α - h β T)` (α the friction, 1 for SGLD): the
    variance :math:`h^2 β T^2` is left to the stochastic gradient itself (Chen et al. 2014's
    :math:`\hat B`). That is exactly the engine's noise :math:`2 h α T'` at the lowered temperature

    .. math:: T' = κ T, \qquad κ = 1 - \frac{h β T}{2 α},

    with the drift unchanged. Without gradient noise the chain therefore samples at κT; with gradient
    noise of variance :math:`β T^2` per unit of :math:`h^2` it samples at T, as in posteriors.
    """
    beta = positive("beta", beta, allow_zero=True)
    if beta == 0.0:
        return temperature
    if isinstance(temperature, Mapping):
        raise ValueError("beta > 0 needs one temperature, not per-group temperatures")
    constant = (isinstance(v, torch.Tensor) or not callable(v) for v in (lr, temperature))
    if not all(constant):
        raise ValueError("beta > 0 needs a constant lr and temperature (the noise correction "
                         "1 - lr·beta·temperature/(2·alpha) is fixed when the engine is configured)")
    if friction == 0.0:
        raise ValueError("beta > 0 needs a positive friction alpha: there is no injected noise to reduce")
    kappa = 1.0 - lr * beta * temperature / (2.0 * friction)  # elementwise for per-chain lr or temperature
    if bool((torch.as_tensor(kappa) < 0.0).any()):
        raise ValueError(f"beta={beta} is too large for lr={lr}, temperature={temperature} and friction "
                         f"{friction}: the injected noise variance lr·T·(2·alpha - lr·beta·T) would be "
                         f"negative")
    return kappa * temperature


def make_config(options: dict, **fields) -> SDEConfig:
    """An :class:`SDEConfig` from the preset's fields plus pass-through engine ``options``."""
    unknown = sorted(set(options) - set(ENGINE_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; presets pass through only {ENGINE_OPTIONS}")
    return SDEConfig(**fields, **options)


def build_with_defaults(log_posterior, config: SDEConfig, momenta=None, xi=None) -> Transform:
    """``engine.build(log_posterior, config)`` whose ``init`` defaults to the given momenta and xi.

    ``momenta`` (here or at ``init``) may be a tree like params or a number (posteriors: every entry
    equal to it); None draws them from N(0, T·M) (or zeros at T = 0) inside the engine.
    """
    transform = engine_build(log_posterior, config)
    if "momenta" not in config.components:
        return transform
    engine_init = transform.init

    def init(params, momenta=momenta, xi=xi, seed=None):
        if isinstance(momenta, Real):
            momenta = tree_map(lambda leaf: torch.full_like(leaf, float(momenta)), params)
        return engine_init(params, momenta=momenta, xi=xi, seed=seed)

    init.__doc__ = engine_init.__doc__
    return transform._replace(init=init)


def underdamped(alpha: float, sigma: float) -> dict:
    """D = diag(0, α), Q = ``hamiltonian_curl(1)`` and mass σ²: the operators of underdamped Langevin."""
    alpha = positive("alpha", alpha, allow_zero=True)
    sigma = positive("sigma", sigma)
    return {"diffusion": Block({("momenta", "momenta"): Scalar(alpha)}), "curl": hamiltonian_curl(1.0),
            "mass": Scalar(sigma**2)}


# ----- posteriors' module-level functions: sgld.init(params), sgld.update(state, batch, log_posterior, lr, ...)
_TRANSFORMS: OrderedDict = OrderedDict()
_KEEP = 8


def cached_transform(build_fn, log_posterior, **arguments) -> Transform:
    """``build_fn(log_posterior, **arguments)``, kept for the next call with the same arguments.

    posteriors' module-level ``update`` takes the log posterior and hyper-parameters on every call;
    building a transform each time would redo its checks and lose its per-layout buffers, so the
    last few are kept (keyed by identity of the callables and tensors, by value of numbers).
    """
    key = (build_fn, log_posterior, tuple(sorted(arguments.items())))
    try:
        transform = _TRANSFORMS.get(key)
    except TypeError:  # an unhashable argument (a list of momenta): build afresh
        return build_fn(log_posterior, **arguments)
    if transform is None:
        transform = _TRANSFORMS[key] = build_fn(log_posterior, **arguments)
        if len(_TRANSFORMS) > _KEEP:
            _TRANSFORMS.popitem(last=False)
    else:
        _TRANSFORMS.move_to_end(key)
    return transform


def _never_called(params, batch):  # the log posterior of the transform a module-level init builds
    raise RuntimeError("internal: init's transform is never updated")


def module_init(build_fn, params, seed=None, **defaults):
    """posteriors' ``init(params, ...)``: a state (momenta zero unless given, as posteriors starts them)
    with a noise key drawn from torch's global generator unless ``seed`` is given."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return build_fn(_never_called, lr=1.0, temperature=0.0, **defaults).init(params, seed=seed)
