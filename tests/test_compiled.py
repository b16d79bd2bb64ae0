"""The compiled step (issue 13): ``compile=True / "replay" / "auto"`` on the engine and every preset.

* Replayed plans (the traced step without the engine's Python) equal the eager step bitwise for every
  preset, in and out of place, and the T = 0 presets equal torch.optim on the hypothesis strategies of
  test_optim_equivalence (the same tolerances: the replayed plan is the eager step's ATen calls).
* Compiled plans (inductor) equal torch.optim within FLOAT32_RTOL: the fused loop reorders the same
  float32 operations (and may contract a·b + c into one FMA), a few units of roundoff per step.
* Compiled samplers draw the eager step's noise (same seed: the same trajectory within float32
  rounding) and keep their stationary law; schedules never retrace or recompile.
* A step the tracer cannot follow, or a machine without a compiler, runs eagerly with a warning.
"""

from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bayesflow.engine.compiled as compiled
from bayesflow.engine import SDEConfig, build
from bayesflow.engine.integrators import Integrator
from bayesflow.optim import adam, sgd
from bayesflow.sgmcmc import baoab, sghmc, sgld
from test_optim_equivalence import (
    FLOAT32_RTOL,
    FLOAT64_RTOL,
    OPTIMIZERS,
    assert_trajectories_close,
    engine_trajectory,
    problems,
    rounding_sensitivity,
    torch_trajectory,
)


def log_posterior(params, batch):
    return -0.5 * (params["a"] ** 2).sum() - 0.25 * (params["b"] ** 4).sum(), None


def gaussian(params, batch):
    return -0.5 * (params**2).sum(), None


PRESETS = {
    "sgmcmc.sgld": dict(lr=0.05, temperature=1.0), "sgmcmc.sghmc": dict(lr=0.05, temperature=1.0),
    "sgmcmc.baoab": dict(lr=0.05, temperature=1.0), "sgmcmc.baoa": dict(lr=0.05, temperature=1.0),
    "sgmcmc.obabo": dict(lr=0.05, temperature=1.0), "sgmcmc.sgnht": dict(lr=0.05, temperature=1.0),
    "sgmcmc.psgld": dict(lr=0.05, temperature=1.0), "sgmcmc.adam_sghmc": dict(lr=0.05, temperature=1.0),
    "sgmcmc.csgld": dict(lr=0.05, temperature=1.0, cycle_length=3),
    "sgmcmc.csghmc": dict(lr=0.05, temperature=1.0, cycle_length=3),
    "sgmcmc.sglrw": dict(lr=0.05, temperature=1.0),
    "optim.adam": dict(lr=0.05), "optim.adamw": dict(lr=0.05),
    "optim.rmsprop": dict(lr=0.05, momentum=0.5, centered=True),
    "optim.sgd": dict(lr=0.05, momentum=0.9, nesterov=True),
}


def start():
    return {"a": torch.linspace(-1.0, 1.0, 3), "b": torch.full((2, 2), 0.5)}


def run(transform, steps, inplace, seed=1):
    state = transform.init(start(), seed=seed)
    for _ in range(steps):
        state, _ = transform.update(state, None, inplace=inplace)
    return state


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", list(PRESETS))
def test_replayed_plan_equals_the_eager_step(name, inplace):
    module = importlib.import_module(f"bayesflow.{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to eager
        eager = run(module.build(log_posterior, **PRESETS[name]), 7, inplace)
        replayed = run(module.build(log_posterior, **PRESETS[name], compile="replay"), 7, inplace)
    for key in ("a", "b"):
        # cSGLD's cyclical step size enters the plan as a tensor (one rounding of lr(t) to float32)
        torch.testing.assert_close(replayed.params[key], eager.params[key], rtol=2e-7, atol=2e-7)
    assert int(replayed.step) == 7
    assert replayed.log_posterior == pytest.approx(float(eager.log_posterior), rel=1e-6)


# replayed plans run the eager step's ATen calls (float64, test_optim_equivalence's tolerance, 15
# examples); compiled ones reorder float32 roundings (FLOAT32_RTOL) and compile once per example (3)
TRACED_CHECKS = {"replay": (torch.float64, FLOAT64_RTOL, 15), True: (torch.float32, FLOAT32_RTOL, 3)}


@pytest.mark.parametrize("mode", list(TRACED_CHECKS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_traced_presets_equal_torch_optim_on_the_hypothesis_strategies(name, mode):
    """Every T = 0 preset replayed and compiled (inductor) on test_optim_equivalence's problems and
    hyper-parameters, against torch.optim within the tolerance plus torch.optim's own rounding sensitivity."""
    module, optimizer_class, hyper_strategy = OPTIMIZERS[name]
    dtype, rtol, examples = TRACED_CHECKS[mode]

    @settings(max_examples=examples, deadline=None)
    @given(problem=problems(dtype), hyper=hyper_strategy, inplace=st.booleans())
    def check(problem, hyper, inplace):
        reference = torch_trajectory(problem, optimizer_class, hyper)
        dev = rounding_sensitivity(problem, optimizer_class, hyper, reference)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
            ours = engine_trajectory(module.build(problem.log_posterior, **hyper, compile=mode), problem, inplace)
        assert_trajectories_close(ours, reference, rtol, f"{name} compile={mode!r}", dev)

    check()


def test_a_state_continues_across_eager_and_replayed_transforms():
    """A state alone determines its future: half a run replayed, the rest eager (and back)."""
    eager, replayed = (sghmc.build(log_posterior, lr=0.05, temperature=1.0, compile=mode) for mode in (False, "replay"))
    reference = run(eager, 10, inplace=False)
    state = run(replayed, 5, inplace=False)
    for _ in range(5):
        state, _ = eager.update(state, None)
    torch.testing.assert_close(state.params, reference.params, rtol=0, atol=0)


def test_replayed_chains_per_chain_values_and_caller_gradients():
    config = sghmc.config(lr=torch.tensor([0.05, 0.1, 0.2]), temperature=torch.tensor([0.0, 1.0, 2.0]))
    eager, replayed = build(gaussian, config, chains=3), build(gaussian, replace(config, compile="replay"), chains=3)
    a, b = eager.init(torch.ones(3, 4), seed=0), replayed.init(torch.ones(3, 4), seed=0)
    for _ in range(5):
        a, _ = eager.update(a, None)
        b, _ = replayed.update(b, None)
    torch.testing.assert_close(b.params, a.params, rtol=0, atol=0)

    eager, replayed = adam.build(gaussian, lr=0.1), adam.build(gaussian, lr=0.1, compile="replay")
    a, b = eager.init(torch.ones(4)), replayed.init(torch.ones(4))
    for _ in range(5):
        a = eager.step(a, -a.params, inplace=True)
        b = replayed.step(b, -b.params, inplace=True, log_posterior=torch.tensor(-2.0))
    torch.testing.assert_close(b.params, a.params, rtol=0, atol=0)
    assert float(b.log_posterior) == -2.0


@pytest.mark.parametrize("mode", ["replay", True])
@pytest.mark.parametrize("name", ["baoab", "obabo"])
def test_refused_steps_leave_the_state_as_it_was(name, mode):
    """BAOAB / OBABO evaluate after moving: an in-place step has written θ and m when the evaluation
    fails, and puts back the copies the plan took (compiled: fused into its first loop)."""
    def nan_when_asked(params, batch):
        if batch == "raise":
            raise ValueError("the user's log posterior failed")
        return -0.5 * (params**2).sum() * (math.nan if batch else 1.0), None

    module = importlib.import_module(f"bayesflow.sgmcmc.{name}")
    for policy in ("reject", "raise"):
        transform = module.build(nan_when_asked, lr=0.1, temperature=1.0, on_nonfinite=policy, compile=mode)
        state = transform.init(torch.linspace(-1.0, 1.0, 5), seed=0)
        for _ in range(2):
            state, _ = transform.update(state, False, inplace=True)
        before = (state.params.clone(), state.momenta.clone())
        if policy == "reject":
            state, _ = transform.update(state, True, inplace=True)
            assert int(state.rejected) == 1 and int(state.step) == 3
        else:
            with pytest.raises(FloatingPointError, match="not finite"):
                transform.update(state, True, inplace=True)
        assert torch.equal(state.params, before[0]) and torch.equal(state.momenta, before[1])
        with pytest.raises(ValueError, match="failed"):
            transform.update(state, "raise", inplace=True)
        assert torch.equal(state.params, before[0]) and torch.equal(state.momenta, before[1])
        state, _ = transform.update(state, False, inplace=True)  # and the chain goes on
        assert not torch.equal(state.params, before[0]) and torch.isfinite(state.params).all()


def test_schedules_never_retrace():
    lr = lambda t: 0.1 / (1 + t)  # noqa: E731
    temperature = lambda t: 1.0 if t % 2 else 0.5  # noqa: E731
    eager = sgld.build(gaussian, lr=lr, temperature=temperature)
    replayed = sgld.build(gaussian, lr=lr, temperature=temperature, compile="replay")
    before = compiled.stats()["traces"]
    a, b = eager.init(torch.ones(4), seed=3), replayed.init(torch.ones(4), seed=3)
    for _ in range(200):
        a, _ = eager.update(a, None, inplace=True)
        b, _ = replayed.update(b, None, inplace=True)
    assert compiled.stats()["traces"] - before == 1
    torch.testing.assert_close(b.params, a.params, rtol=1e-6, atol=1e-6)


def test_untraceable_steps_fall_back_to_eager_with_a_warning():
    class ReadsValues(Integrator):  # a Python branch on a tensor's value cannot be traced
        def advance(self, system, ctx, inputs, scales):
            if float(ctx.z["params"].leaves[0].sum()) > -1e9:
                system.row(ctx, inputs, "params", inputs.h)

    config = SDEConfig(step_size=0.1, temperature=0.0, integrator=ReadsValues())
    eager, traced = build(gaussian, config), build(gaussian, replace(config, compile="replay"))
    with pytest.warns(RuntimeWarning, match="could not be traced") as caught:
        state, _ = traced.update(traced.init(torch.ones(2)), None)
    assert [w.filename for w in caught] == [__file__]  # the warning names the caller's line
    reference, _ = eager.update(eager.init(torch.ones(2)), None)
    assert torch.equal(state.params, reference.params)


def test_unknown_compile_modes_are_refused():
    with pytest.raises(ValueError, match="unknown compile"):
        sgld.build(gaussian, lr=0.1, compile="fast")
    with pytest.raises(ValueError, match="unknown compile"):
        SDEConfig(step_size=0.1, compile=1)


def test_compile_options_reach_torch_compile_and_bad_ones_are_refused(monkeypatch):
    """``compile_options`` go to ``torch.compile`` (here its ``eager`` backend: no C++ build in CI) and the
    step computes what the eager step computes; unknown keys or modes, a non-dict, and options where
    nothing is compiled are refused at build time."""
    seen = []
    real = torch.compile

    def spy(fn, **kwargs):
        seen.append(kwargs)
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    eager = sgld.build(gaussian, lr=0.1, temperature=1.0)
    fused = sgld.build(gaussian, lr=0.1, temperature=1.0, compile=True,
                       compile_options={"backend": "eager", "mode": "default"})
    a, b = eager.init(torch.ones(6), seed=3), fused.init(torch.ones(6), seed=3)
    for _ in range(3):
        a, _ = eager.update(a, None)
        b, _ = fused.update(b, None)
    torch.testing.assert_close(b.params, a.params)
    assert seen and seen[0]["backend"] == "eager" and seen[0]["mode"] == "default"
    assert seen[0]["fullgraph"] is True and seen[0]["dynamic"] is False
    assert adam.build(gaussian, lr=0.1, compile="auto", compile_options={"mode": "reduce-overhead"})
    for bad, error, match in (({"mode": "fast"}, ValueError, "mode 'fast'"),
                              ({"fullgraph": False}, ValueError, r"unknown compile_options \['fullgraph'\]"),
                              (["reduce-overhead"], TypeError, "must be a dict"),
                              ({"options": "max"}, TypeError, "inductor settings")):
        with pytest.raises(error, match=match):
            adam.build(gaussian, lr=0.1, compile=True, compile_options=bad)
    for compile in (False, "replay"):
        with pytest.raises(ValueError, match="need compile=True or 'auto'"):
            sgld.build(gaussian, lr=0.1, compile=compile, compile_options={"mode": "reduce-overhead"})


def test_inductor_settings_reach_every_compile_and_the_users_win(monkeypatch):
    """Every compiled plan gets :data:`INDUCTOR_SETTINGS` (one leaf per C++ loop: see its docstring), through
    ``compile_fx`` by default and through ``torch.compile``'s ``options`` with ``compile_options``, where the
    user's own inductor settings override them and a ``mode`` (which torch.compile refuses with options)
    leaves them out. The spies run the graph as traced: nothing is built here."""
    import torch._inductor.compile_fx as inductor

    from bayesflow.engine.inductor import INDUCTOR_SETTINGS

    patches, compiles = [], []
    monkeypatch.setattr(inductor, "compile_fx", lambda graph, example, config_patches: patches.append(
        config_patches) or graph)
    monkeypatch.setattr(torch, "compile", lambda graph, **kwargs: compiles.append(kwargs) or graph)
    cases = (None, {"backend": "inductor"}, {"options": {"cpp.max_horizontal_fusion_size": 4}},
             {"mode": "max-autotune-no-cudagraphs"})
    for options in cases:
        transform = adam.build(gaussian, lr=0.1, compile=True, compile_options=options)
        state, _ = transform.update(transform.init(torch.ones(4)), None)
        assert torch.isfinite(state.params).all()
    assert patches == [{"size_asserts": False, **INDUCTOR_SETTINGS}]
    assert compiles[0]["options"] == INDUCTOR_SETTINGS
    assert compiles[1]["options"] == {"cpp.max_horizontal_fusion_size": 4}
    assert "options" not in compiles[2] and compiles[2]["mode"] == "max-autotune-no-cudagraphs"


# ----- compiled with inductor: a few small graphs ---------------------------------------------------
def test_compiled_adam_and_nesterov_equal_torch_optim():
    torch.manual_seed(0)
    targets = {"w": torch.randn(40), "v": torch.randn(3, 5)}

    def objective(params, step):
        return -sum(((params[k] - targets[k]) ** 2 * (1.0 + 0.1 * step)).sum() for k in targets), None

    for module, hyper, optimizer in ((adam, dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.01), torch.optim.Adam),
                                     (sgd, dict(lr=0.02, momentum=0.9, nesterov=True), torch.optim.SGD)):
        transform = module.build(objective, **hyper, compile=True)
        state = transform.init({k: torch.zeros_like(v) for k, v in targets.items()})
        params = {k: torch.zeros_like(v).requires_grad_(True) for k, v in targets.items()}
        reference = optimizer(list(params.values()), **hyper)
        for step in range(20):
            state, _ = transform.update(state, step, inplace=True)
            reference.zero_grad()
            (-objective(params, step)[0]).backward()
            reference.step()
            for k in targets:
                # fused float32 loops reorder a handful of roundings per step: FLOAT32_RTOL (see
                # test_optim_equivalence) relative to the parameters' scale
                scale = params[k].detach().abs().max()
                torch.testing.assert_close(state.params[k], params[k].detach(), rtol=0, atol=FLOAT32_RTOL * scale)


def test_compiled_sampler_draws_the_eager_noise_and_keeps_its_law():
    """BAOAB on N(0, 1) is exact in θ at any step size: Var θ = 1 (ENGINE.md). 20 000 coordinates are
    20 000 independent chains; the variance of 20 000 N(0, 1) draws has standard error sqrt(2/n) = 0.01
    per snapshot. SGLD's Euler step at the same h would give 2/(2 - h) = 1.33 (rejected below)."""
    h, n = 0.5, 20_000
    eager = baoab.build(gaussian, lr=h, alpha=1.0, temperature=1.0)
    fused = baoab.build(gaussian, lr=h, alpha=1.0, temperature=1.0, compile=True)
    a, b = eager.init(torch.zeros(n), seed=5), fused.init(torch.zeros(n), seed=5)
    variances = []
    for step in range(60):
        a, _ = eager.update(a, None, inplace=True)
        b, _ = fused.update(b, None, inplace=True)
        if step >= 30:
            variances.append(float(b.params.var()))
    torch.testing.assert_close(b.params, a.params, rtol=1e-5, atol=1e-5)  # the same noise, step for step
    variance = sum(variances) / len(variances)
    tolerance = 4 * math.sqrt(2 / n)  # snapshots are correlated: no better than one snapshot's error
    assert abs(variance - 1.0) < tolerance
    assert abs(variance - 2 / (2 - h)) > tolerance  # the check tells an Euler step's law apart


def test_compiled_schedules_compile_once_over_1000_steps():
    before, traces = compiled.stats()["compiles"], compiled.stats()["traces"]
    transform = sgld.build(gaussian, lr=lambda t: 0.01 * (1 + math.cos(t / 50)) + 1e-3,
                           temperature=lambda t: 1.0 + 0.5 * math.sin(t), compile=True)
    state = transform.init(torch.zeros(16), seed=0)
    for _ in range(1000):
        state, _ = transform.update(state, None, inplace=True)
    assert compiled.stats()["compiles"] - before == 1
    assert compiled.stats()["traces"] - traces == 1
    assert int(state.step) == 1000 and torch.isfinite(state.params).all()


def test_no_compiler_falls_back_with_a_warning(monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    import torch._inductor.compile_fx

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", unavailable)
    transform = sghmc.build(gaussian, lr=0.1, temperature=1.0, compile=True)
    with pytest.warns(RuntimeWarning, match="compilation .* is unavailable") as caught:
        state, _ = transform.update(transform.init(torch.ones(3), seed=0), None)
    assert [w.filename for w in caught] == [__file__]
    reference = sghmc.build(gaussian, lr=0.1, temperature=1.0)
    expected, _ = reference.update(reference.init(torch.ones(3), seed=0), None)
    assert torch.equal(state.params, expected.params)


def test_compiled_plans_follow_the_strides_of_their_inputs():
    """A strided first state (a view) and the contiguous states the plan returns get a plan each."""
    base = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)
    eager, fused = sgd.build(gaussian, lr=0.1, momentum=0.5), sgd.build(gaussian, lr=0.1, momentum=0.5, compile=True)
    a, b = eager.init(base[:, ::2]), fused.init(base[:, ::2])
    for _ in range(3):
        a, _ = eager.update(a, None)
        b, _ = fused.update(b, None)
    torch.testing.assert_close(b.params, a.params, rtol=1e-6, atol=1e-7)


def test_a_gradient_evaluated_inside_the_plan_keeps_a_strided_leafs_layout():
    """BAOAB evaluates ∇ℓ inside its plan (the opaque gradient operator): at a transposed leaf
    autograd's gradient has the leaf's strides, the operator's declared output is contiguous, and the
    kernels after it must read the copy it makes, not the raw strides (a wrong read moved θ wrongly)."""
    def quartic(params, batch):
        return -0.5 * (params**2).sum() - 0.1 * (params**4).sum(), None

    leaf = torch.linspace(-1.0, 1.0, 6).reshape(2, 3).t()  # strides (1, 3): dense, not contiguous
    eager = baoab.build(quartic, lr=0.05, temperature=0.0)
    fused = baoab.build(quartic, lr=0.05, temperature=0.0, compile=True)
    a, b = eager.init(leaf.clone().t().contiguous().t()), fused.init(leaf.clone().t().contiguous().t())
    for _ in range(3):
        a, _ = eager.update(a, None)
        b, _ = fused.update(b, None)
    torch.testing.assert_close(b.params, a.params, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.momenta, a.momenta, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", [False, "replay"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_refuses_a_non_finite_step_in_place_without_writing(name, mode):
    """Raised or rejected, a non-finite gradient leaves every tensor of an in-place state as it was
    (Nesterov's momenta row wrote m before it read the gradient, until the gradient came first)."""
    from bayesflow.tree import tree_leaves

    def nan_when_asked(params, batch):
        value = log_posterior(params, batch)[0]
        return value * (math.nan if batch else 1.0), None

    module = importlib.import_module(f"bayesflow.{name}")
    for policy in ("raise", "reject"):
        transform = module.build(nan_when_asked, **PRESETS[name], on_nonfinite=policy, compile=mode)
        state = transform.init(start(), seed=0)
        for _ in range(2):
            state, _ = transform.update(state, False, inplace=True)
        held = [t for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
        before = [t.clone() for t in held]
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="not finite"):
                transform.update(state, True, inplace=True)
        else:
            state, _ = transform.update(state, True, inplace=True)
            assert int(state.rejected) == 1
        changed = [i for i, (old, new) in enumerate(zip(before, held)) if not torch.equal(old, new)]
        counters = {i for i, t in enumerate(held) if t is state.step or t is state.rejected}
        assert set(changed) <= counters, f"{name} ({policy}) wrote state tensors {changed}"


def test_a_state_whose_tensors_do_not_fit_the_plan_is_not_read_with_its_layout():
    """Shapes and dtypes are part of a plan's key (its kernels index memory without size checks): momenta
    of another size fail as in the eager step, not as reads past the end of a buffer."""
    eager, fused = sghmc.build(gaussian, lr=0.1, temperature=0.0), sghmc.build(gaussian, lr=0.1, temperature=0.0,
                                                                             compile=True)
    for transform in (eager, fused):
        state, _ = transform.update(transform.init(torch.ones(5)), None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the compiled transform: the new layout cannot be traced)
            with pytest.raises(RuntimeError, match="size of tensor"):
                transform.update(state._replace(momenta=torch.ones(3)), None)
