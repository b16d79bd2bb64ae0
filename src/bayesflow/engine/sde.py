r"""``build``: the one integrator behind every sampler, optimizer and ensemble in bayesflow.

.. math::
    dz = -[D(z) + Q(z)]\,\nabla H(z)\,dt + T\,Γ(z)\,dt + \sqrt{2 T D(z)}\,dW, \qquad
    H(z) = -ℓ(θ)/N + \tfrac12 m^\top M^{-1} m + \tfrac d2 (ξ - A)^2

with ℓ the user's ``log_posterior`` (per datum, posteriors' convention), T the temperature
(T = 1/num_data samples the posterior, T = 0 optimizes) and Γᵢ = Σⱼ ∂ⱼ(Dᵢⱼ + Qᵢⱼ).

Example:
    >>> import torch
    >>> from bayesflow.engine import SDEConfig, build
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = build(log_posterior, SDEConfig(step_size=0.1, temperature=1.0))  # SGLD
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Mapping

import torch

from bayesflow.engine.accumulator import Accumulator
from bayesflow.engine.compiled import CompiledStep
from bayesflow.engine.config import SDEConfig
from bayesflow.engine.context import Context
from bayesflow.engine.gradients import autograd_gradient, caller_gradient, vmapped_gradient
from bayesflow.engine.groups import LeafTemperature, TemperatureGroups, check_config, is_hot
from bayesflow.engine.layout import Layout
from bayesflow.engine.noise import INIT
from bayesflow.engine.schedules import Constant, as_schedule, is_zero
from bayesflow.engine.state import SDEState
from bayesflow.engine.step import _scheduled, advance
from bayesflow.engine.system import GradientNotAvailable
from bayesflow.engine.validation import (
    chain_mismatch,
    check_bool,
    check_finite_params,
    check_params,
)
from bayesflow.tree import flatten, unflatten
from bayesflow.types import LogPosterior, Transform

__all__ = ["build"]


_SHAPE = operator.attrgetter("shape")

MAX_LAYOUTS = 8
"""Parameter layouts a transform keeps (each holds scratch buffers the size of its parameters);
a state of an evicted layout still advances: its layout is rebuilt."""


def _fixed(schedule):
    """The value every step reads from ``schedule`` (a tensor or a constant's float), or None."""
    if isinstance(schedule, torch.Tensor):
        return schedule
    return schedule.value if type(schedule) is Constant else None


def build(log_posterior: LogPosterior, config: SDEConfig | None = None, *, chains: int | None = None,
          vectorize: str = "vmap", **fields) -> Transform:
    """Build the transform ``(init, update, step)`` for an engine configuration.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        config: an :class:`SDEConfig`; or give its fields as keywords.
        chains: K for K chains in one batched state: every leaf carries a leading chain dimension,
            each chain has its own noise stream, and temperature / step size may be tensors of K
            values (see :mod:`bayesflow.ensemble`). None: a single chain.
        vectorize: with chains, how gradients are taken: ``"vmap"`` maps an ordinary single-chain
            ``log_posterior`` over the chain dimension with ``torch.func.vmap`` (one autograd
            backward through the mapped forward); ``"batched"`` means ``log_posterior`` already
            takes batched params and returns K values.

    Returns:
        A :class:`~bayesflow.types.Transform`: ``init(params, momenta=None, xi=None, seed=None)``,
        ``update(state, batch, inplace=False) -> (state, aux)`` and
        ``step(state, grads, inplace=False, log_posterior=None) -> state`` which advances with
        gradients the caller computed (DDP, Lightning, custom autograd): ``grads`` is ∇ℓ, the ascent
        direction of the per-datum log posterior, with the structure of params.

    Example (gradient descent, T = 0: θ ← θ + h∇ℓ, once by the engine's autograd, once by the caller):
        >>> import torch
        >>> from bayesflow.engine import SDEConfig, build
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), SDEConfig(step_size=0.1, temperature=0.0))
        >>> state, aux = transform.update(transform.init(torch.ones(2), seed=0), batch=None)
        >>> state = transform.step(state, grads=-state.params)   # ∇ℓ(θ) = -θ, computed by the caller
        >>> state.params
        tensor([0.8100, 0.8100])
    """
    if config is None:
        config = SDEConfig(**fields)
    elif fields:
        raise TypeError("give either a config or its fields as keywords, not both")
    config.validate()
    if vectorize not in ("vmap", "batched"):
        raise ValueError(f"unknown vectorize {vectorize!r}; expected 'vmap' or 'batched'")
    if chains is not None and (not isinstance(chains, int) or chains < 1):
        raise ValueError(f"chains must be a positive integer, got {chains!r}")
    engine = _Engine(log_posterior, config, chains, vectorize)
    return Transform(init=engine.init, update=engine.update, step=engine.step, config=config,
                     log_posterior=log_posterior, chains=chains)


class _Engine:
    def __init__(self, log_posterior: LogPosterior, config: SDEConfig, chains: int | None, vectorize: str):
        self.log_posterior = log_posterior
        self.config = config
        self.components = config.components
        self._momenta, self._xi = "momenta" in self.components, "xi" in self.components
        self.groups = None  # per-group temperatures (engine.groups), resolved per layout
        temperature = config.temperature
        if isinstance(temperature, Mapping):
            self.groups = TemperatureGroups(temperature)
            check_config(config)
            temperature = 0.0 if self.groups.all_zero else max(self.groups.groups.values())
        self.temperature = as_schedule(temperature, "temperature")
        self.step_size = as_schedule(config.step_size, "step_size")
        # what a step reads without calling a schedule: a tensor (per chain), a constant's float, or None
        self._fixed_temperature, self._fixed_step_size = _fixed(self.temperature), _fixed(self.step_size)
        self.scales = dict(config.step_scales)
        self.chains = chains
        self.vectorize = vectorize
        for name, value in (("temperature", self.temperature), ("step_size", self.step_size)):
            if isinstance(value, torch.Tensor) and value.ndim == 1 and value.numel() != (chains or 0):
                raise ValueError(f"{name} has {value.numel()} values but the transform has chains={chains}; "
                                 "per-chain values need chains=K with K values")
        if self.groups is not None and isinstance(self.step_size, torch.Tensor) and self.step_size.ndim == 1:
            # refused here, not in the step's noise draw, which would run after the state is half-written
            raise ValueError("per-group temperatures take a scalar step size, not one per chain: give the "
                             "chains one step size, or one temperature per chain instead of per group")
        self._keys_shape = torch.Size([]) if chains is None else torch.Size([chains])
        integrator = config.integrator
        self._evaluates_mid_step = integrator.caches_gradient or not integrator.evaluates_at_start()
        self._layouts: dict = {}  # Layout.key -> Layout: one per parameter layout this transform has seen
        self.layout = self.system = self.noise = self.spec = self.signature = None
        self.numel = 0
        self.buffers: dict = {}
        # the compiled step (engine.compiled), when config.compile asks for it
        self.compiled = (CompiledStep(config.compile, config.compile_options) if config.compile is not False
                         else None)

    def _use(self, layout: Layout) -> None:
        self.layout, self.spec, self.signature = layout, layout.spec, layout.signature
        if self.groups is not None:  # the step reads the layout's per-leaf temperatures
            self._fixed_temperature = layout.leaf_temperature
        self.system, self.noise, self.numel, self.buffers = layout.system, layout.noise, layout.numel, layout.buffers

    def _layout(self, leaves: list, spec) -> Layout:
        check_params(leaves)
        key = Layout.key(leaves, spec)
        layout = self._layouts.get(key)
        if layout is None:
            for name, value in (("temperature", self.temperature), ("step_size", self.step_size)):
                if isinstance(value, torch.Tensor) and value.device != leaves[0].device:
                    raise ValueError(f"{name} is a tensor on {value.device} but params are on {leaves[0].device}; "
                                     f"move it with .to({str(leaves[0].device)!r})")
            layout = Layout(self.config, self.chains, self.components, leaves, spec)
            if self.groups is not None:  # resolved before the layout is kept: a bad pattern caches nothing
                layout.leaf_temperature = self.groups.resolve(unflatten(spec, leaves))
            self._layouts[key] = layout
            if len(self._layouts) > MAX_LAYOUTS:  # a bounded cache: the oldest layout's buffers go
                del self._layouts[next(iter(self._layouts))]
        self._use(layout)
        return layout

    def _state_params(self, state) -> list:
        """The leaves of ``state.params`` (its layout selected), after checking that ``state`` is an
        SDEState with this transform's components, not another method's."""
        if not isinstance(state, SDEState):
            raise TypeError(f"state must be the SDEState that init(params) or update returned, got "
                            f"{type(state).__name__}; call init(params) first")
        keys = state.rng
        if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or (
                keys.shape != self._keys_shape):
            raise ValueError(chain_mismatch(keys, self.chains))
        params = self._select(state.params)
        if ((state.momenta is None) == self._momenta or (state.xi is None) == self._xi
                or len(state.preconditioner) != len(self.system.preconditioners)):
            components, preconditioners = self.components, len(self.system.preconditioners)
            held = ("params", *(["momenta"] if state.momenta is not None else []),
                    *(["xi"] if state.xi is not None else []))
            raise ValueError(f"this state holds {held} with {len(state.preconditioner)} preconditioner state(s), "
                             f"but this transform's SDE is on {components} with {preconditioners}: it comes from "
                             "another method's transform; init a state with this one")
        return params

    def _select(self, params) -> list:
        """The leaves of a state's params, switching to the state's layout when it is not the current one
        (one transform may drive states of several parameter trees, or a state loaded from a checkpoint)."""
        layout = self.layout
        if layout is not None:
            try:
                leaves = layout.spec.flatten_up_to(params)
                if list(map(_SHAPE, leaves)) == layout.shapes and (
                        leaves[0].dtype, leaves[0].device) == layout.signature_head:
                    return leaves
            except (ValueError, TypeError, AttributeError, IndexError):
                pass
        leaves, spec = flatten(params)
        if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            raise ValueError(f"state.params must be a tensor or a tree of tensors, got {spec}")
        self._layout(leaves, spec)
        return leaves

    # ----- init ---------------------------------------------------------------------------------
    def init(self, params, momenta=None, xi=None, seed=None) -> SDEState:
        """The initial state at ``params`` (a tensor or tree); momenta default to N(0, T·M).

        ``seed``: an int (with chains: chain k gets ``seed + k``, or give a list of one per chain),
        a ``torch.Generator`` (the seed is drawn from it), or None (drawn from torch's global RNG).
        """
        config = self.config
        leaves, spec = flatten(params)
        layout = self._layout(leaves, spec)
        check_finite_params(leaves, spec)
        xi_shape = layout.xi_shape
        if seed is None and (self.groups.all_zero if self.groups is not None else is_zero(self.temperature)):
            seed = 0  # a T = 0 transform never draws: leave torch's global generator untouched
        rng = self.noise.initial_state(seed)
        ctx = Context({"params": Accumulator(leaves, False)}, 0, {}, layout.numel)
        states = tuple(p.init(leaves) for p in self.system.preconditioners)
        momenta_tree = None
        if "momenta" in self.components:
            momenta_tree = self._initial_momenta(momenta, leaves, spec, ctx, rng)
        xi_value = None
        if "xi" in self.components:
            xi_value = torch.full(xi_shape, float(config.thermostat_target), dtype=leaves[0].dtype,
                                  device=leaves[0].device)
            if xi is not None:
                xi_value = xi_value + torch.as_tensor(xi, dtype=leaves[0].dtype, device=leaves[0].device) - (
                    config.thermostat_target)
        return SDEState(
            params=params,
            momenta=momenta_tree,
            xi=xi_value,
            log_posterior=torch.full(xi_shape, math.nan, dtype=leaves[0].dtype, device=leaves[0].device),
            step=torch.zeros(xi_shape, dtype=torch.int64),
            preconditioner=states,
            gradient=(),
            rng=rng,
            rejected=torch.zeros(xi_shape, dtype=torch.int64),
        )

    def _initial_momenta(self, momenta, leaves, spec, ctx, rng):
        if momenta is not None:
            given, given_spec = flatten(momenta)
            if given_spec != spec or any(a.shape != b.shape for a, b in zip(given, leaves)):
                raise ValueError("momenta must have the structure and shapes of params")
            return momenta
        zeros = [torch.zeros_like(leaf) for leaf in leaves]
        temperature = self.temperature if isinstance(self.temperature, torch.Tensor) else _scheduled(
            self.temperature(0), "temperature", 0)
        if self.groups is not None:
            temperature = self.layout.leaf_temperature
        if self.config.momenta_init == "zero" or not is_hot(temperature):
            return unflatten(spec, zeros)
        mass = self.config.mass.diagonal(ctx) if not self.config.mass.preconditioners() else 1.0
        self.noise.begin(rng, 0, INIT)  # a stream of its own: no step reuses these numbers
        if isinstance(temperature, LeafTemperature):  # N(0, T_ℓ M) per leaf; cold leaves draw nothing
            views, scale = temperature.draw(self.noise, zeros, "momenta", 0.5)
        else:
            flat_noise, views = self.noise.normal(zeros, "momenta")
            scale = 1.0
            if isinstance(temperature, torch.Tensor):
                flat_noise.mul_(temperature.to(flat_noise.dtype).sqrt().view(-1, 1))
            else:
                scale = math.sqrt(temperature)
        drawn = [view.clone() * scale for view in views]
        if isinstance(mass, float):
            drawn = [d * math.sqrt(mass) for d in drawn]
        else:
            drawn = [d * m.sqrt() for d, m in zip(drawn, mass)]
        return unflatten(spec, drawn)

    # ----- the step -----------------------------------------------------------------------------
    def update(self, state: SDEState, batch, inplace: bool = False):
        """Advance one step, evaluating ∇ℓ with autograd on ``batch``. Returns ``(state, aux)``."""
        check_bool(inplace, "inplace")
        aux_box = [None]
        params = self._state_params(state)
        aliases = self.layout.aliases if inplace else None
        if self.chains is not None and self.vectorize == "vmap":
            gradient_fn = vmapped_gradient(self.log_posterior, self.spec, batch, self.chains, aux_box, aliases)
        else:
            gradient_fn = autograd_gradient(self.log_posterior, self.spec, batch, self.chains, aux_box, aliases)
        # The step itself is not differentiated (the gradient is taken inside gradient_fn, under
        # enable_grad): without no_grad, nn.Parameter leaves would refuse in-place updates and
        # functional updates would chain an autograd graph through every step.
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad() costs several µs of Python per step
        try:
            return advance(self, state, params, gradient_fn, inplace), aux_box[0]
        finally:
            torch._C._set_grad_enabled(enabled)

    def step(self, state: SDEState, grads, inplace: bool = False, log_posterior=None) -> SDEState:
        """Advance one step with the caller's gradient ∇ℓ(θ_t) (same structure as params)."""
        check_bool(inplace, "inplace")
        params = self._state_params(state)
        if log_posterior is not None:
            log_posterior = torch.as_tensor(log_posterior)
            expected = () if self.chains is None else (self.chains,)
            if tuple(log_posterior.shape) != expected:
                raise ValueError(f"log_posterior must have shape {expected} (the value of each chain's log "
                                 f"posterior), got {tuple(log_posterior.shape)}")
        gradient_fn = caller_gradient(self._flatten_like_params(grads, "grads"), log_posterior, self.signature,
                                      self.spec, self.config.integrator)
        if not self.config.integrator.evaluates_at_start():
            raise GradientNotAvailable(f"{self.config.integrator!r} evaluates its gradient mid-step; "
                                       "use update(state, batch)")
        if self.config.integrator.caches_gradient:
            raise GradientNotAvailable(f"{self.config.integrator!r} also needs the gradient at the end of the "
                                       "step (first same as last); use update(state, batch)")
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return advance(self, state, params, gradient_fn, inplace, caller_gradient=True,
                           value_given=log_posterior is not None)
        finally:
            torch._C._set_grad_enabled(enabled)

    def _flatten_like_params(self, tree, name: str) -> list:
        """Leaves of a tree with the structure of params (the spec from ``init``).

        ``spec.flatten_up_to`` walks the known structure and is several times cheaper than a fresh
        ``flatten`` on the hot path; a tree of another structure raises a ValueError naming it.
        """
        if self.spec is None:
            return flatten(tree)[0]
        try:
            leaves = self.spec.flatten_up_to(tree)
        except (ValueError, TypeError):
            leaves = None
        if leaves is None or not all(map(isinstance, leaves, itertools.repeat(torch.Tensor))):
            raise ValueError(f"{name} must have the structure of params: got {flatten(tree)[1]}, "
                             f"expected {self.spec}")
        return leaves
