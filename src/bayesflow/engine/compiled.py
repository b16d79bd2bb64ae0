r"""The compiled step: a configuration's whole step traced once per layout, then compiled or replayed.

The engine knows everything a step does before it runs: which operators act, in which order, on
which leaves. ``build(..., compile=...)`` turns that knowledge into a **step plan**: the step's
:func:`~bayesflow.engine.step.arithmetic` is traced once per parameter layout (and per kind of
step: in place or not, hot or cold, with a cached gradient or not) into an ATen graph by
``make_fx``; the graph is then

* ``compile=True``: compiled by ``torch.compile`` (inductor: C++/OpenMP on the CPU, Triton on GPUs)
  into a few fused loops over the parameters — one pass for Adam, one pass plus the noise draw for
  SGLD;
* ``compile="replay"``: replayed as it is, eagerly — the plan's ATen calls without the engine's
  Python objects (to inspect a plan, ``transform``-independent; measured *slower* than the eager step
  on the CPU for small models — the eager step's buffer reuse is not in the graph — so it is not the
  small-model route: see benchmarks/results/compiled.json);
* ``compile="auto"``: compiled from :data:`AUTO_NUMEL` parameters on, the eager step below (where a
  compiled call's fixed cost exceeds what fusion saves).

What stays outside the graph, by design:

* **the gradient**: ``update`` evaluates ∇ℓ where the integrator asks for it (at the start, or after
  moving for BAOAB / OBABO), through the opaque operator ``bayesflow::gradient`` that calls the
  user's ``log_posterior`` with ordinary autograd; ``step(state, grads)`` passes the caller's gradient in;
* **the noise**: drawn eagerly with ``Tensor.normal_`` semantics into the plan's buffers, in the order
  and from the generators the eager step uses (inductor's own RNG was measured ~7× slower on the
  CPU), so compiled and eager runs of one seed draw the same numbers and a state alone still
  determines its future;
* **the scalars**: temperature, step size, schedule values and the step count enter as 0-dim tensors,
  so schedules never recompile. A new transform (another float lr) traces its own plans, whose C++ kernels
  inductor's cache already holds (≈ 0.06 s for a small model, against seconds for a first compile).

Plans keep the parameters' own leaves (one fused loop per leaf, :data:`INDUCTOR_SETTINGS`), not flat
buffers: gradients arrive as separate tensors, and gathering them into a flat buffer costs a pass of its
own (measured at 1e7 over 200 leaves: ``torch.cat`` of the gradient 5.7 ms, gather + one flat Adam pass
1.31× torch's fused step, the per-leaf plan 1.04×: benchmarks/bench_compiled.py). Many leaves lengthen
the first step's compile instead (≈ 0.1 s per leaf, once per layout).

A configuration the tracer cannot follow (an operator that reads tensor values in Python) falls back to
the eager step with a warning naming why; so does compilation without a C++ compiler.

Example (Adam at T = 0, the plan replayed; the same numbers as the eager step):
    >>> import torch
    >>> from bayesflow.optim import adam
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> eager = adam.build(log_posterior, lr=0.1)
    >>> replayed = adam.build(log_posterior, lr=0.1, compile="replay")
    >>> a, b = eager.init(torch.ones(3)), replayed.init(torch.ones(3))
    >>> for _ in range(3):
    ...     a, _ = eager.update(a, None)
    ...     b, _ = replayed.update(b, None)
    >>> torch.allclose(a.params, b.params)
    True
"""

from __future__ import annotations

import itertools
import time
import warnings

import torch

from bayesflow.engine.accumulator import Accumulator
from bayesflow.engine.context import Context
from bayesflow.engine.groups import LeafTemperature, is_hot
from bayesflow.engine.hoist import HoistedStep
from bayesflow.engine.inductor import INDUCTOR_SETTINGS, compile_graph
from bayesflow.engine.noise import STEP, views_of
from bayesflow.engine.plan_inputs import (
    ACTIVE,
    Given,
    Recorder,
    Replay,
    active,
    copy_like,
    flat_shape,
    given_gradient,
    memory_layout,
    zero_gradient,
)
from bayesflow.engine.rollback import guarded, refused
from bayesflow.engine.schedules import Constant
from bayesflow.engine.step import accumulators, arithmetic, cached, finish, gradient_cache, scalars, scale_values
from bayesflow.engine.system import StepInputs
from bayesflow.engine.validation import Rejected, checked_gradient
from bayesflow.tree import flatten, unflatten

__all__ = ["AUTO_NUMEL", "INDUCTOR_SETTINGS", "MODES", "CompiledStep", "stats"]

MODES = (False, True, "auto", "replay")
"""Values of ``compile``: eager (False), compiled (True), compiled from AUTO_NUMEL on ("auto"), replayed."""

AUTO_NUMEL = 100_000
"""``compile="auto"`` compiles layouts of at least this many scalars (summed over chains) and runs the
eager step below: a compiled call costs tens of µs of fixed overhead (guards, wrappers), more than the
eager step of a small model (benchmarks/bench_compiled.py)."""


_STATS = {"traces": 0, "compiles": 0, "fallbacks": 0}


def stats() -> dict:
    """Counts of plans traced, compiled and fallen back to eager in this process (a copy).

    Example:
        >>> from bayesflow.engine.compiled import stats
        >>> sorted(stats())
        ['compiles', 'fallbacks', 'traces']
    """
    return dict(_STATS)


_UNTRACEABLE = object()  # the plan of a kind of step that could not be traced


class Plan:
    """One traced step: the callable, the noise it reads, and where its outputs go."""

    __slots__ = ("draws", "fn", "outputs", "seconds", "views")

    def __init__(self, fn, draws, outputs, seconds, views):
        self.fn, self.draws, self.outputs, self.seconds, self.views = fn, draws, outputs, seconds, views


class CompiledStep:
    """The plans of one transform (see the module docstring) and the step that runs them.

    Args:
        mode: ``True``, ``"auto"`` or ``"replay"`` (:data:`MODES`).
        options: keyword arguments of ``torch.compile`` (e.g. ``{"mode": "reduce-overhead"}`` on a GPU).
    """

    def __init__(self, mode, options: dict | None = None):
        if mode not in MODES or mode is False:
            raise ValueError(f"unknown compile mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.options = dict(options or {})
        self.first_seconds = None  # trace + compile time of the first plan (the benchmark table's column)

    def advance(self, engine, state, params, gradient_fn, inplace, caller_gradient, value_given, step, draw):
        if self.mode == "auto" and engine.numel * (engine.chains or 1) < AUTO_NUMEL:
            return self._eager(engine, state, params, gradient_fn, inplace, caller_gradient, value_given, None)
        temperature, h = scalars(engine, step)
        if isinstance(temperature, LeafTemperature):
            return self._eager(engine, state, params, gradient_fn, inplace, caller_gradient, value_given,
                               "per-group temperatures are not traced yet")
        hot = is_hot(temperature)
        checked = checked_gradient(gradient_fn, engine.config, engine.spec, engine.layout.small, draw,
                                   caller_gradient, value_given)
        given = None
        integrator = engine.config.integrator
        if caller_gradient or (integrator.evaluates_at_start() and not integrator.caches_gradient):
            # the step's one gradient is taken at its start: evaluated (or the caller's checked) here
            # and handed to the plan as an input; only words that evaluate after moving call back
            # into Python from inside the plan (bayesflow::gradient)
            try:
                grads, value, _ = checked(params)
            except Rejected:
                return refused(state, inplace)
            given = (list(grads), value)
        momenta = engine._flatten_like_params(state.momenta, "state.momenta") if state.momenta is not None else []
        xi = [state.xi] if state.xi is not None else []
        statistics, statistics_spec = flatten(state.preconditioner)
        cache = cached(state, caller_gradient) or []
        # the kernels assume the shapes, strides and dtypes they were traced with (inductor's size and stride
        # asserts are off: they cost more than a small step), so these key the plan: a hand-edited state whose
        # momenta do not fit its params is traced anew and fails as the eager step does
        layouts = tuple(map(memory_layout, itertools.chain(params, momenta, statistics, cache,
                                                            given[0] if given else ())))
        key = (inplace, hot, len(cache), given is not None, given is not None and given[1] is not None,
               statistics_spec, layouts)
        plans = engine.layout.plans  # a layout's plans go with it (engine.layout's bounded cache)
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = self._plan(engine, state, params, momenta, xi, statistics, statistics_spec, cache,
                                           given, temperature, h, step, hot, inplace) or _UNTRACEABLE
        if plan is _UNTRACEABLE:  # warned once, when tracing failed: this kind of step runs eagerly
            if given is not None:  # the gradient this step already took is reused, not taken again
                gradient_fn = given_gradient(given, owned=not caller_gradient)
            return self._eager(engine, state, params, gradient_fn, inplace, caller_gradient, value_given, None)
        noise = []
        if hot:
            engine.noise.begin(state.rng, draw, STEP)
            for kind, name, like in plan.draws:
                buffer, views = getattr(engine.noise, kind)(like, name)
                noise += [buffer, *views] if plan.views else [buffer]
        inputs = self._inputs(engine, params, momenta, xi, statistics, cache, state.log_posterior, given,
                              noise, temperature, h, step)
        ctx = Context(accumulators(params, momenta, xi, inplace), step, {}, engine.numel, engine.buffers)
        # an in-place plan that evaluates after moving hands the gradient operator copies of the state as
        # it was (see _plan); a failed evaluation writes them back (engine.rollback)
        stash: list = []
        saved = [(list(itertools.chain(params, momenta, xi)), stash)] if inplace and given is None else None
        ACTIVE.append(active(checked, stash))
        try:
            outputs, refusal = guarded(lambda: plan.fn(inputs, self._python_values(engine, temperature, h, step)),
                                       saved, state, inplace)
        finally:
            ACTIVE.pop()
        if refusal is not None:
            return refusal
        return self._state(engine, state, ctx, plan, inputs, outputs, statistics_spec, inplace, draw)

    # ----- tracing --------------------------------------------------------------------------------
    def _plan(self, engine, state, params, momenta, xi, statistics, statistics_spec, cache, given, temperature,
              h, step, hot, inplace):
        from torch.fx.experimental.proxy_tensor import make_fx

        started = time.perf_counter()
        draws = self._draws(engine, state, params, momenta, xi, cache, temperature, h, step, hot)
        # A compiled plan reads each draw's flat buffer (views of it are free inside a kernel); a replayed
        # plan also takes the stream's views of it, so that it does not make them again every step
        compiling = self.mode != "replay"
        noise = []
        for _, _, like in draws:  # example values from a generator of their own: torch's global RNG stays
            buffer = torch.empty(flat_shape(like, engine.chains), dtype=like[0].dtype, device=like[0].device)
            buffer.normal_(generator=torch.Generator(buffer.device).manual_seed(0))
            noise += [buffer] if compiling else [buffer, *views_of(buffer, like, engine.chains)]
        example = [copy_like(t) for t in self._inputs(engine, params, momenta, xi, statistics, cache,
                                                   state.log_posterior, given, noise, temperature, h, step)]
        counts = (len(params), len(momenta), len(xi), len(statistics), len(cache), 1, 0 if given is None else
                  len(given[0]) + (given[1] is not None), len(noise))
        outputs: list = []

        def traced(*flat):
            parts = _split(flat, counts)
            p, m, x, stats_, cache_, (value_like,), given_, noise_, scalars_ = parts
            T, step_size, count, scales = _scalars_of(engine, temperature, h, scalars_)
            if given is None:
                # the state before the step moves it, as inputs of the evaluation that may fail: they
                # hold the old values whenever it runs, and a failure writes them back. Inductor writes
                # an input it mutates in the plan's last loop, after the evaluation, and so hands the
                # state's own tensors here instead of copies (no pass at all, where copying before the
                # plan read and wrote θ and m once more); a replayed plan makes the copies
                before = [t.clone() for t in (*p, *m, *x)] if inplace else []

                def gradient_fn(leaves):
                    out = torch.ops.bayesflow.gradient(list(leaves), value_like, before)
                    return out[:-1], out[-1], True
            else:
                grads_, value_ = list(given_[:len(p)]), (given_[len(p)] if len(given_) > len(p) else None)

                def gradient_fn(leaves):
                    return grads_, value_, False
            ctx = Context(accumulators(list(p), list(m), list(x), inplace), count, {}, engine.numel, None)
            record = state._replace(preconditioner=unflatten(statistics_spec, list(stats_)),
                                    gradient=tuple(cache_))
            replay = Replay(noise_, [len(like) for _, _, like in draws] if not compiling else None, engine.chains)
            inputs = StepInputs(T, step_size, replay, gradient_fn, list(cache_) or None, hot)
            preconditioner = arithmetic(engine, record, ctx, inputs, scales, inplace)
            gradient = gradient_cache(engine, ctx, inputs)
            results = [*ctx.z["params"].leaves, *(ctx.z["momenta"].leaves if m else []),
                       *(ctx.z["xi"].leaves if x else []), *flatten(preconditioner)[0], *gradient]
            if inputs.value is not None:
                results.append(inputs.value)
            # outputs that are inputs (written in place, or a given value) are not returned: the
            # caller has them; a graph returning its own inputs would only be aliasing to undo
            outputs.clear()
            outputs.append((len(gradient), inputs.value is not None))
            returned = []
            for tensor in results:
                index = next((i for i, t in enumerate(flat) if t is tensor), None)
                outputs.append(index)
                if index is None:
                    returned.append(tensor)
            return tuple(returned)

        ACTIVE.append(active(zero_gradient))
        try:
            graph = make_fx(traced, tracing_mode="real")(*example)
        except Exception as error:
            _STATS["fallbacks"] += 1
            warnings.warn(f"bayesflow: this configuration's step could not be traced ({type(error).__name__}: "
                          f"{error}); running it eagerly", RuntimeWarning, stacklevel=5)
            return None
        finally:
            ACTIVE.pop()
        _STATS["traces"] += 1
        first_scalar = len(example) - 3 - len(engine.scales)
        fn = HoistedStep(graph, example, first_scalar, self._python_values(engine, temperature, h, step))
        if compiling:
            self._compile(fn, example, self._python_values(engine, temperature, h, step))
        seconds = time.perf_counter() - started
        if self.first_seconds is None:
            self.first_seconds = seconds
        return Plan(fn, draws, list(outputs), seconds, not compiling)

    def _draws(self, engine, state, params, momenta, xi, cache, temperature, h, step, hot):
        """The noise draws of one step, in order, found by running it once eagerly on copies."""
        if not hot:
            return []
        recorder = Recorder(engine.noise)
        copies = [t.clone() for t in params], [t.clone() for t in momenta], [t.clone() for t in xi]
        ctx = Context(accumulators(*copies, False), step, {}, engine.numel, None)
        inputs = StepInputs(temperature, h, recorder, zero_gradient, [t.clone() for t in cache] or None)
        engine.noise.begin(state.rng, step, STEP)
        arithmetic(engine, state, ctx, inputs, engine.scales, False)
        return recorder.draws

    def _compile(self, fn, example, values) -> None:
        """Compile ``fn``'s main graph with inductor (in place), or leave it replayed with a warning."""
        replayed = fn.main
        try:
            hoisted = [t.clone() for t in fn.hoisted(example, values)]
            with warnings.catch_warnings():  # torch's own deprecations inside inductor are not the user's
                warnings.simplefilter("ignore", DeprecationWarning)
                fn.main = compile_graph(replayed, [copy_like(t) for t in example] + hoisted, self.options)
            ACTIVE.append(active(zero_gradient))
            try:
                fn([copy_like(t) for t in example], values)  # compile now, on copies: the step's time stays the step's
            finally:
                ACTIVE.pop()
        except Exception as error:
            fn.main = replayed
            _STATS["fallbacks"] += 1
            reason = str(error).splitlines()[0] if str(error) else ""
            warnings.warn(f"bayesflow: compilation (torch inductor) is unavailable for this step "
                          f"({type(error).__name__}: {reason}); replaying the traced step eagerly instead",
                          RuntimeWarning, stacklevel=6)
            return
        _STATS["compiles"] += 1

    @staticmethod
    def _python_values(engine, temperature, h, step) -> list:
        """The step's scalar inputs as Python numbers (tensors where they are per-chain values)."""
        return [temperature, h, float(step), *scale_values(engine, step)]

    # ----- inputs and outputs ---------------------------------------------------------------------
    def _inputs(self, engine, params, momenta, xi, statistics, cache, value_like, given, noise, temperature, h, step):
        scalars_ = self._scalar_tensors(engine, temperature, h, step, params[0])
        extra = [] if given is None else [*given[0], *([] if given[1] is None else [given[1]])]
        return [*params, *momenta, *xi, *statistics, *cache, value_like, *extra, *noise, *scalars_]

    def _scalar_tensors(self, engine, temperature, h, step, like):
        """Temperature, step size, step count and step scales as tensors (one reused buffer per value)."""
        buffers = getattr(engine, "_compiled_scalars", None)
        if buffers is None or buffers[0].device != like.device:
            count = 3 + len(engine.scales)
            buffers = engine._compiled_scalars = [torch.zeros((), dtype=torch.float64, device=like.device)
                                                  for _ in range(count)]
        values = [temperature, h, float(step), *scale_values(engine, step)]
        out = []
        for buffer, value in zip(buffers, values):
            if isinstance(value, torch.Tensor):  # per-chain values are inputs as they are
                out.append(value)
            else:
                buffer.fill_(value)
                out.append(buffer)
        return out

    def _state(self, engine, state, ctx, plan, inputs, outputs, statistics_spec, inplace, draw):
        (gradient_count, has_value), *where = plan.outputs
        returned = iter(outputs)
        results = [inputs[i] if i is not None else next(returned) for i in where]
        value = results.pop() if has_value else None
        z, at = ctx.z, 0
        for component in ("params", "momenta", "xi"):
            if component in z:
                n = len(z[component].leaves)
                z[component] = Accumulator(results[at:at + n], True)
                at += n
        statistics = results[at:len(results) - gradient_count]
        preconditioner = unflatten(statistics_spec, statistics) if statistics else state.preconditioner
        gradient = tuple(results[len(results) - gradient_count:]) if gradient_count else ()
        return finish(state, engine.spec, ctx, gradient, value, preconditioner, inplace, draw)

    def _eager(self, engine, state, params, gradient_fn, inplace, caller_gradient, value_given, reason):
        from bayesflow.engine.step import advance

        if reason is not None and not getattr(engine, "_compile_warned", False):
            engine._compile_warned = True
            warnings.warn(f"bayesflow: compile={self.mode!r} runs this step eagerly: {reason}", RuntimeWarning,
                          stacklevel=5)
        compiled, engine.compiled = engine.compiled, None
        try:
            return advance(engine, state, params, gradient_fn, inplace, caller_gradient, value_given)
        finally:
            engine.compiled = compiled


def _split(flat, counts):
    parts, at = [], 0
    for n in counts:
        parts.append(flat[at:at + n])
        at += n
    parts.append(flat[at:])
    return parts


def _scalars_of(engine, temperature, h, tensors):
    """The traced step's temperature, step size, step count and scales.

    A transform's fixed temperature or step size (a float) is a constant of its plans; a schedule's
    values and per-chain tensors are tensor inputs, so a changing value never retraces.
    """
    T = engine._fixed_temperature if isinstance(engine._fixed_temperature, float) else tensors[0]
    step_size = engine._fixed_step_size if isinstance(engine._fixed_step_size, float) else tensors[1]
    scales = {name: scale if type(scale) is Constant else Given(value)
              for (name, scale), value in zip(engine.scales.items(), tensors[3:])}
    return T, step_size, tensors[2], scales
