"""One step of the engine: the arithmetic every configuration shares, eager or traced.

:func:`arithmetic` advances the extended state of one step given the step's scalars (temperature,
step size, step count), a noise source and a gradient function; :func:`advance` is the eager step
around it (snapshot and rollback of refused steps, the state record). The compiled step
(:mod:`bayesflow.engine.compiled`) traces the same :func:`arithmetic` once per parameter layout, so
the two can never disagree about what a step computes.
"""

from __future__ import annotations

import math
import numbers

import torch

from bayesflow.engine.accumulator import Accumulator
from bayesflow.engine.context import Context
from bayesflow.engine.noise import STEP
from bayesflow.engine.plan_inputs import Given
from bayesflow.engine.rollback import guarded, snapshot
from bayesflow.engine.schedules import BiasCorrection, Constant, FirstStep
from bayesflow.engine.state import SDEState
from bayesflow.engine.system import StepInputs
from bayesflow.engine.validation import checked_gradient, step_count
from bayesflow.tree import tree_leaves, unflatten

__all__ = ["accumulators", "advance", "arithmetic", "counts", "finish", "gradient_cache", "scalars", "scale_values",
           "step_scales"]


def scalars(engine, step: int):
    """The temperature and step size of step ``step`` (fixed values, or the schedules' values)."""
    temperature = engine._fixed_temperature
    if temperature is None:
        temperature = _scheduled(engine.temperature(step), "temperature", step)
    h = engine._fixed_step_size
    if h is None:
        h = _scheduled(engine.step_size(step), "step size", step)
    return temperature, h


# schedules whose every value is finite by construction (their arguments are checked when they are made)
_CHECKED_SCALES = (Constant, BiasCorrection, FirstStep)


def scale_values(engine, step: int) -> list:
    """The step scales' values at ``step``, in ``engine.scales``' order; a user's schedule's value is checked
    like a step size's (a NaN or negative scale is refused before the step writes anything)."""
    return [scale(step) if type(scale) in _CHECKED_SCALES else
            _scheduled(scale(step), f"step_scales[{name!r}]", step) for name, scale in engine.scales.items()]


def step_scales(engine, step: int) -> dict:
    """``engine.scales`` with each user schedule replaced by its checked value at ``step`` (the presets'
    own schedules, checked at construction, stay as they are: no cost on their hot path)."""
    scales = engine.scales
    if all(type(scale) in _CHECKED_SCALES for scale in scales.values()):
        return scales
    return {name: scale if type(scale) in _CHECKED_SCALES else Given(value)
            for (name, scale), value in zip(scales.items(), scale_values(engine, step))}


def _scheduled(value, name: str, step: int):
    """A schedule's value, refused before anything is written when it is a number that is NaN, infinite or
    negative (per-chain tensors are not read: that would be a host sync on an accelerator). Numbers of
    other real types (numpy's) are taken as floats."""
    if type(value) is not float:
        if isinstance(value, torch.Tensor) and value.ndim == 0 and value.device.type == "cpu":
            value = value.item()  # one value on the CPU: read without a device sync, and checked
        if isinstance(value, bool) or value is None or isinstance(value, (str, bytes, complex)):
            raise TypeError(f"the {name} schedule returned {value!r} at step {step}; expected a number "
                            "(or a tensor of per-chain values)")
        if not isinstance(value, numbers.Real):
            return value  # per-chain tensors, per-group temperatures
        value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"the {name} schedule returned {value!r} at step {step}; expected a finite number >= 0")
    return value


def advance(engine, state: SDEState, params: list, gradient_fn, inplace: bool,
            caller_gradient: bool = False, value_given: bool = True) -> SDEState:
    """The eager step: ``arithmetic`` on the state's own tensors, refusals rolled back."""
    draw, step = counts(state)
    if engine.compiled is not None:
        return engine.compiled.advance(engine, state, params, gradient_fn, inplace, caller_gradient,
                                       value_given, step, draw)
    temperature, h = scalars(engine, step)
    scales = step_scales(engine, step)
    checked = checked_gradient(gradient_fn, engine.config, engine.spec, engine.layout.small, draw,
                               caller_gradient, value_given)
    z = components(engine, state, params, inplace)
    ctx = Context(z, step, {}, engine.numel, engine.buffers)
    saved = None
    if inplace and engine._evaluates_mid_step:  # see engine.rollback
        saved = snapshot(ctx, [t for t in tree_leaves(state.preconditioner) if isinstance(t, torch.Tensor)])
    inputs = StepInputs(temperature, h, engine.noise, checked, cached(state, caller_gradient))

    def run():
        if inputs.hot:
            engine.noise.begin(state.rng, draw, STEP)
        return arithmetic(engine, state, ctx, inputs, scales, inplace)

    preconditioner, refusal = guarded(run, saved, state, inplace)
    if refusal is not None:
        return refusal
    return finish(state, engine.spec, ctx, gradient_cache(engine, ctx, inputs), inputs.value, preconditioner, inplace,
                  draw)


def counts(state: SDEState) -> tuple[int, int]:
    """``(draw, step)``: the index of the step's noise (every step taken, refused ones too, so that a retry
    draws new numbers) and the count of accepted steps that schedules, bias corrections and first-step
    scales read (a refused step is not a step of the dynamics: Adam's bias correction after a refused
    batch is torch's, which never saw the batch)."""
    draw = step_count(state.step)
    return draw, (draw if state.rejected is None else draw - step_count(state.rejected, "rejected"))


def components(engine, state: SDEState, params: list, inplace: bool) -> dict:
    """The step's extended state z as accumulators over the state's leaves."""
    momenta = engine._flatten_like_params(state.momenta, "state.momenta") if state.momenta is not None else []
    return accumulators(params, momenta, [state.xi] if state.xi is not None else [], inplace)


def accumulators(params: list, momenta: list, xi: list, owned: bool) -> dict:
    """z = {component: Accumulator} for the components present (momenta, xi: empty lists when absent)."""
    z = {"params": Accumulator(params, owned)}
    if momenta:
        z["momenta"] = Accumulator(momenta, owned)
    if xi:
        z["xi"] = Accumulator(xi, owned)
    return z


def cached(state: SDEState, caller_gradient: bool):
    """The first-same-as-last gradient a state carries into its step (never with a caller's gradient)."""
    return list(state.gradient) if (state.gradient and not caller_gradient) else None


def arithmetic(engine, state: SDEState, ctx: Context, inputs: StepInputs, scales: dict, inplace: bool) -> tuple:
    """Advance ``ctx.z`` by one step of ``engine``'s configuration; returns the preconditioner states."""
    config = engine.config
    preconditioner = precondition(engine, state, ctx, inputs, inplace)
    if config.decoupled_weight_decay:
        if config.integrator.evaluates_at_start():
            engine.system.potential(ctx, inputs)  # ∇ℓ(θ_t) before the decay (AdamW; as in step)
        ctx.z["params"].mul(1.0 - config.decoupled_weight_decay)
    config.integrator.advance(engine.system, ctx, inputs, scales)
    return preconditioner


def precondition(engine, state: SDEState, ctx: Context, inputs: StepInputs, inplace: bool) -> tuple:
    """Update every preconditioner's statistics with this step's gradient (before any drift)."""
    system = engine.system
    if not system.preconditioners:
        return state.preconditioner
    potential, scale = system.potential(ctx, inputs)
    if scale != 1.0:
        potential = torch._foreach_mul(potential, scale)
    new = []
    for p, p_state in zip(system.preconditioners, state.preconditioner):
        if hasattr(p, "update_state") and hasattr(p, "values"):
            p_state = p.update_state(p_state, potential, ctx.step, inplace)
            ctx.pending[id(p)] = (p, p_state)  # P itself is computed when first read
        else:  # a preconditioner with only update(...) -> (state, P): eagerly
            out = ctx.scratch(("preconditioner", id(p)), potential)
            p_state, values = p.update(p_state, potential, ctx.step, inplace, out=out)
            ctx.preconditioned[id(p)] = values
            if values is out:
                ctx.scratch_values.add(id(p))
        new.append(p_state)
    return tuple(new)


def gradient_cache(engine, ctx: Context, inputs: StepInputs) -> tuple:
    """The potential gradient a first-same-as-last word hands to the next step, else ()."""
    if not (engine.config.integrator.caches_gradient and inputs.fresh):
        return ()
    leaves, scale = engine.system.potential(ctx, inputs)
    if scale != 1.0:
        return tuple(torch._foreach_mul(leaves, scale))
    return tuple(leaves if inputs.owned or inputs.scaled is leaves else [g.clone() for g in leaves])


def finish(state: SDEState, spec, ctx: Context, gradient: tuple, value, preconditioner, inplace: bool,
           draw: int) -> SDEState:
    """The state after step ``draw`` (the same record, written in place, under ``inplace``)."""
    z = ctx.z
    value = value if value is not None else state.log_posterior
    if inplace:
        state.step.fill_(draw + 1)  # one scalar write (an add_ costs twice as much)
        if value is not state.log_posterior:
            state.log_posterior.copy_(value)
        if preconditioner is state.preconditioner and not gradient and not state.gradient:
            return state  # nothing to replace: skip building an identical record
        return state._replace(preconditioner=preconditioner, gradient=gradient)
    if value is state.log_posterior:
        value = value.clone()  # a value of its own, as in place: a later in-place step must not write this one
    elif value.dtype != state.log_posterior.dtype or value.device != state.log_posterior.device:
        value = value.to(state.log_posterior)  # the state's dtype, as in place (and checkpoints reload)
    return SDEState(
        params=unflatten(spec, z["params"].leaves),
        momenta=unflatten(spec, z["momenta"].leaves) if "momenta" in z else None,
        xi=z["xi"].leaves[0] if "xi" in z else None,
        log_posterior=value,
        step=state.step + 1,
        preconditioner=preconditioner,
        gradient=gradient,
        rng=state.rng,  # never written: states share it
        # a count of its own: an in-place refusal of a later state must not count in this one's
        rejected=None if state.rejected is None else state.rejected.clone(),
    )
