r"""The configurations of the mixing benchmark: a registry ``name -> Configuration`` (issue 15).

A configuration is a factory ``factory(problem, step, friction) -> sampler`` plus how its grid is
scaled. ``problem`` is a :class:`Problem` (the target — its batched per-datum ``log_posterior``,
``temperature``, data, exact moments — and the run's chain count and noise seeds); ``step`` is a
``(K,)`` tensor of step sizes, one per chain; ``friction`` is a float (one run per friction value)
or, for ``per_chain_friction`` configurations, a ``(K,)`` tensor. The sampler has
``init(params) -> state``, ``update(state, batch) -> state`` and ``params(state) -> (K, d)``;
``batch`` is None (full batch) or ``(K, B)`` indices, one mini-batch per chain.

Adding a configuration is one entry, e.g. a control-variate BAOA counted at two gradients a step::

    CONFIGURATIONS["bayesflow/baoa+cv"] = Configuration("bayesflow", "baoa+cv", my_factory, order=2,
                                                        momentum=True, grads_per_step=2)

Grids (``bench_mixing``): h = u/λ_max for ``order=1`` (SGLD-like), u/√λ_max for ``order=2``
(underdamped), λ the per-datum Hessian's eigenvalues; friction α = f·√λ_min.

Both libraries are batched the way their users batch: bayesflow with ``chains=K`` (one noise stream
and, for SGNHT, one thermostat per chain; ``vectorize="batched"``); posteriors by calling its
functions on a ``(K, d)`` tensor with the summed log posterior and per-chain ``lr`` / ``alpha``
tensors of shape ``(K, 1)`` (every update but SGNHT's is elementwise), and SGNHT — whose thermostat
averages over all parameters — through ``torch.func.vmap`` over chains. posteriors' momenta start
from N(0, T) as bayesflow's do (its default N(0, 1) is off-scale by √N at T = 1/N).

Example:
    >>> from mixing_configs import CONFIGURATIONS
    >>> [name for name in CONFIGURATIONS if name.startswith("bayesflow/")][:3]
    ['bayesflow/sgld', 'bayesflow/sghmc', 'bayesflow/sgnht']
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Callable

import torch

__all__ = ["CONFIGURATIONS", "Configuration", "Problem", "available"]


@dataclasses.dataclass
class Problem:
    """What a factory gets besides the grid point: the target and the run's chains and seeds."""

    target: object  # mixing_targets.Target
    chains: int
    seeds: list[int]
    burn_in: int = 2000  # the burn-in budget in gradients (a setup cost is paid from it)

    @property
    def log_posterior(self) -> Callable:
        return self.target.log_posterior

    @property
    def temperature(self) -> float:
        return self.target.temperature


@dataclasses.dataclass
class Configuration:
    """A sampler configuration of the benchmark (see the module docstring)."""

    library: str
    name: str
    factory: Callable
    order: int = 1
    momentum: bool = False
    grads_per_step: int = 1
    per_chain_friction: bool = False
    per_chain_step: bool = True
    curvature: Callable | None = None  # target -> (λ_min, λ_max) scaling the grid (default: the target's)
    applies: Callable | None = None  # target -> bool: run on this target (default: every target)
    step_range: tuple[float, float] | None = None  # (u_hi, u_lo) instead of the target's
    frictions: tuple[float, ...] | None = None  # friction factors f instead of the protocol's (α = f·√λ_min)
    requires: str = "bayesflow"
    note: str = ""


class _Engine:
    def __init__(self, transform, seeds):
        self.transform, self.seeds = transform, seeds

    def init(self, params):
        return self.transform.init(params, seed=list(self.seeds))

    def update(self, state, batch):
        return self.transform.update(state, batch, inplace=True)[0]

    @staticmethod
    def params(state):
        return state.params


def bayesflow_preset(module: str, momentum: bool) -> Callable:
    """Factory of the bayesflow preset ``bayesflow.sgmcmc.<module>`` lifted to K chains."""

    def factory(problem: Problem, step: torch.Tensor, friction):
        from bayesflow.ensemble import lift

        preset = importlib.import_module(f"bayesflow.sgmcmc.{module}")
        kwargs = {"alpha": float(friction)} if momentum else {}
        single = preset.build(problem.log_posterior, lr=float(step[0]), temperature=problem.temperature,
                              check_finite="none", **kwargs)
        return _Engine(lift(single, problem.chains, step_size=step, vectorize="batched"), problem.seeds)

    return factory


class _Posteriors:
    def __init__(self, transform, seed, momentum_scale):
        self.transform, self.seed, self.momentum_scale = transform, seed, momentum_scale

    def init(self, params):
        torch.manual_seed(self.seed)
        if self.momentum_scale is None:
            return self.transform.init(params)
        return self.transform.init(params, momenta=self.momentum_scale * torch.randn_like(params))

    def update(self, state, batch):
        return self.transform.update(state, batch, inplace=True)[0]

    @staticmethod
    def params(state):
        return state.params


class _PosteriorsVmapped:
    """posteriors' SGNHT per chain: its module-level ``update`` under ``torch.func.vmap``."""

    def __init__(self, problem, lr, alpha, seed):
        from posteriors.sgmcmc import sgnht

        temperature = problem.temperature

        def single(params, batch):  # posteriors needs a tensor aux
            return problem.target.single(params, batch)[0], torch.tensor([])

        def one(params, momenta, xi, lr, alpha, batch):
            state = sgnht.SGNHTState(params, momenta, xi)
            new, _ = sgnht.update(state, batch, single, lr=lr, alpha=alpha, temperature=temperature)
            return new.params, new.momenta, new.xi

        self.lr, self.alpha, self.seed, self.temperature = lr, alpha, seed, temperature
        self.full = torch.func.vmap(one, in_dims=(0, 0, 0, 0, 0, None), randomness="different")
        self.batched = torch.func.vmap(one, in_dims=(0, 0, 0, 0, 0, 0), randomness="different")

    def init(self, params):
        torch.manual_seed(self.seed)
        return params.clone(), self.temperature**0.5 * torch.randn_like(params), self.alpha.clone()

    def update(self, state, batch):
        step = self.full if batch is None else self.batched
        return step(*state, self.lr, self.alpha, batch)

    @staticmethod
    def params(state):
        return state[0]


def posteriors_preset(name: str, momentum: bool) -> Callable:
    """Factory of posteriors 0.1.3's ``posteriors.sgmcmc.<name>`` on a ``(K, d)`` tensor."""

    def factory(problem: Problem, step: torch.Tensor, friction):
        seed = problem.seeds[0]
        alpha = None if friction is None else (
            friction if isinstance(friction, torch.Tensor) else torch.full_like(step, float(friction)))
        if name == "sgnht":
            return _PosteriorsVmapped(problem, step, alpha, seed)
        module = importlib.import_module(f"posteriors.sgmcmc.{name}")

        def summed(params, batch):
            return problem.log_posterior(params, batch)[0].sum(), torch.tensor([])

        kwargs = {"alpha": alpha[:, None]} if momentum else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            transform = module.build(summed, lr=step[:, None], temperature=problem.temperature, **kwargs)
        return _Posteriors(transform, seed, problem.temperature**0.5 if momentum else None)

    return factory


CONFIGURATIONS: dict[str, Configuration] = {}
for _name, _momentum in (("sgld", False), ("sghmc", True), ("sgnht", True), ("baoa", True), ("baoab", True),
                         ("obabo", True), ("sglrw", False)):
    CONFIGURATIONS[f"bayesflow/{_name}"] = Configuration("bayesflow", _name, bayesflow_preset(_name, _momentum),
                                                         order=2 if _momentum else 1, momentum=_momentum)
for _name, _momentum in (("sgld", False), ("sghmc", True), ("sgnht", True), ("baoa", True), ("sglrw", False)):
    CONFIGURATIONS[f"posteriors/{_name}"] = Configuration("posteriors", _name, posteriors_preset(_name, _momentum),
                                                          order=2 if _momentum else 1, momentum=_momentum,
                                                          per_chain_friction=True, requires="posteriors")


def available(names=None) -> tuple[list[str], list[str]]:
    """(configurations whose library imports, notes on those skipped)."""
    names = list(CONFIGURATIONS) if names is None else list(names)
    usable, notes, cache = [], [], {}
    for name in names:
        if name not in CONFIGURATIONS:
            raise ValueError(f"unknown configuration {name!r}; known: {sorted(CONFIGURATIONS)}")
        module = CONFIGURATIONS[name].requires
        if module not in cache:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    importlib.import_module(module)
                cache[module] = None
            except ImportError as error:
                cache[module] = f"{module} not importable ({error}): its configurations are skipped"
        if cache[module] is None:
            usable.append(name)
        elif cache[module] not in notes:
            notes.append(cache[module])
    return usable, notes


try:  # issue 15's new configurations, where this checkout has them (mixing_extensions)
    from mixing_extensions import register as _register

    _register(CONFIGURATIONS)
except ImportError:
    pass
