"""T = 0 is optimization: every optimizer preset equals its torch.optim namesake step for step.

Property tests (hypothesis) over random parameter trees (dicts of 1-5 leaves with random shapes),
random smooth objectives (quadratics with random SPD curvature and a per-step random linear term;
small tanh MLP classifiers on random data with a new mini-batch every step), random
hyper-parameters in each optimizer's valid range and 1-50 steps. For each example:

* the preset's ``build(...).update`` trajectory equals ``torch.optim.X`` on loss = -log_posterior
  (float64: 1e-10 relative; float32: see FLOAT32_RTOL);
* ``bayesflow.engine.build(log_posterior, preset.config(...))`` reproduces it bitwise (run in place);
* the preset's gradient transformation (torchopt protocol) driven with loss gradients gives the
  same trajectory, and matches torchopt's own optimizers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import torchopt
from hypothesis import given, note
from hypothesis import strategies as st

import bayesflow
from bayesflow.optim import adam, adamw, rmsprop, sgd

FLOAT64_RTOL = 1e-10
# float32: each step of either implementation rounds a handful of operations (unit roundoff
# u = 6e-8) in a different order (torch's lerp / mul-add vs the engine's foreach axpy, m·P/P for the
# adaptive mass). On a well-conditioned problem that grows at most linearly: ≲ 50 steps × a few u
# ≈ 1e-5 of the parameter scale (largest observed: ~1e-6). Any real difference in the update rule
# shows up at the size of lr (≥ 1e-4) after one step, far above it.
FLOAT32_RTOL = 1e-5
# Some valid hyper-parameters make the optimizer itself amplify rounding: Adam with β₂ ≈ 0 is a
# sign-like map of the current gradient, centered RMSprop takes the root of v - m̄², a cancellation.
# There even torch.optim cannot reproduce its own trajectory: perturbing θ by 4 machine epsilons
# after every step (``jitter``, the size of the rounding differences between two implementations)
# moves it by dev(t), up to O(1) after 50 steps. Both dtypes therefore allow rtol + SENSITIVITY ·
# dev(t): on well-conditioned problems dev(t) ≪ rtol, so this is rtol; it loosens only where torch's
# own trajectory is that sensitive, and after the first step it adds just 120 machine epsilons
# (dev(0) = 4 eps), so a wrong update rule is caught there. Observed error / dev(t) ≤ 7 while the
# map is tame. Where torch.optim amplifies its 4-eps jitter over CHAOTIC_GAIN-fold, the map is chaotic
# (seen: Adam with β₂ = 0 on an MLP, error / dev = 30–90 from dev ≈ 3e-4 on, in float64): two
# implementations that round differently then follow unrelated trajectories, and torch.optim's own
# does not define the values to compare, so the steps from there on are not compared. On tame
# problems dev(t) stays within a few hundred jitters over 50 steps, far below the cut.
SENSITIVITY = 30.0
CHAOTIC_GAIN = 1e4
JITTER_RUNS = 3  # one jittered run can happen to stay close where the map is chaotic: the largest of three


# ----- problems ---------------------------------------------------------------------------------
@dataclass
class Problem:
    params: dict[str, torch.Tensor]
    loss: callable  # loss(params, step) -> scalar tensor; the log posterior is its negative
    steps: int

    def log_posterior(self, params, step):
        return -self.loss(params, step), None


def _quadratic(draw, generator, dtype, steps):
    shapes = draw(st.lists(st.lists(st.integers(1, 4), max_size=3).map(tuple), min_size=1, max_size=5))
    params = {f"w{i}": torch.randn(shape, generator=generator, dtype=dtype) for i, shape in enumerate(shapes)}
    d = sum(math.prod(shape) for shape in shapes)
    eigenvalues = 0.05 + 1.95 * torch.rand(d, generator=generator, dtype=torch.float64)  # in [0.05, 2]
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    curvature = ((basis * eigenvalues) @ basis.T).to(dtype)
    curvature = 0.5 * (curvature + curvature.T)
    center = torch.randn(d, generator=generator, dtype=dtype)
    shifts = 0.1 * torch.randn(steps, d, generator=generator, dtype=dtype)  # a new "mini-batch" each step
    keys = list(params)

    def loss(p, step):
        x = torch.cat([p[k].reshape(-1) for k in keys])
        r = x - center
        return 0.5 * r @ (curvature @ r) + shifts[step] @ x

    return params, loss


def _mlp(draw, generator, dtype, steps):
    n_in, hidden, classes = draw(st.integers(1, 5)), draw(st.integers(1, 8)), draw(st.integers(2, 4))
    inputs = torch.randn(64, n_in, generator=generator, dtype=dtype)
    labels = torch.randint(0, classes, (64,), generator=generator)
    batches = torch.randint(0, 64, (steps, 16), generator=generator)  # mini-batch indices per step
    params = {
        "w1": torch.randn(n_in, hidden, generator=generator, dtype=dtype) / math.sqrt(n_in),
        "b1": 0.1 * torch.randn(hidden, generator=generator, dtype=dtype),
        "w2": torch.randn(hidden, classes, generator=generator, dtype=dtype) / math.sqrt(hidden),
        "b2": 0.1 * torch.randn(classes, generator=generator, dtype=dtype),
    }

    def loss(p, step):
        index = batches[step]
        logits = torch.tanh(inputs[index] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return F.cross_entropy(logits, labels[index])

    return params, loss


@st.composite
def problems(draw, dtype=torch.float64):
    steps = draw(st.integers(1, 50))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(("quadratic", "mlp")))
    params, loss = (_quadratic if kind == "quadratic" else _mlp)(draw, generator, dtype, steps)
    note(f"{kind} problem, {steps} steps, shapes {[tuple(v.shape) for v in params.values()]}")
    return Problem(params, loss, steps)


# ----- hyper-parameters within each optimizer's valid range -------------------------------------
def _maybe_zero(high):
    return st.one_of(st.just(0.0), st.floats(0.0, high))


@st.composite
def sgd_hyper(draw):
    momentum = draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)))
    dampening = draw(_maybe_zero(0.99))
    nesterov = momentum > 0 and dampening == 0 and draw(st.booleans())
    return dict(lr=draw(st.floats(1e-3, 0.5)), momentum=momentum, dampening=dampening, nesterov=nesterov,
                weight_decay=draw(_maybe_zero(0.1)))


@st.composite
def rmsprop_hyper(draw):
    centered = draw(st.booleans())
    # Centered RMSprop divides by sqrt(v - mean²) = sqrt(α(1-α)g²) after one step: for α → 0 that is
    # a difference of two equal numbers (both implementations may take the root of a rounding error,
    # even a negative one). α ≥ 0.1 keeps the variance well conditioned; plain RMSprop allows α = 0.
    alpha = draw(st.floats(0.1 if centered else 0.0, 0.999))
    return dict(lr=draw(st.floats(1e-4, 0.1)), alpha=alpha, eps=draw(st.floats(1e-8, 1e-3)),
                weight_decay=draw(_maybe_zero(0.1)), momentum=draw(_maybe_zero(1.0)), centered=centered)


@st.composite
def adam_hyper(draw, max_decay=0.1):
    return dict(lr=draw(st.floats(1e-4, 0.1)), betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.0, 0.9999))),
                eps=draw(st.floats(1e-8, 1e-3)), weight_decay=draw(_maybe_zero(max_decay)),
                amsgrad=draw(st.booleans()))


OPTIMIZERS = {
    "sgd": (sgd, torch.optim.SGD, sgd_hyper()),
    "rmsprop": (rmsprop, torch.optim.RMSprop, rmsprop_hyper()),
    "adam": (adam, torch.optim.Adam, adam_hyper()),
    "adamw": (adamw, torch.optim.AdamW, adam_hyper(max_decay=0.5)),
}


# ----- trajectories -----------------------------------------------------------------------------
def _copy(params):
    return {k: v.detach().clone() for k, v in params.items()}


def torch_trajectory(problem, optimizer_class, hyper, jitter=0.0, seed=0):
    """torch.optim's trajectory; ``jitter`` > 0 multiplies θ by (1 + jitter·r), r ~ N(0, 1), after
    every step (a rounding-sized perturbation: how much the optimizer itself amplifies rounding)."""
    params = {k: v.clone().requires_grad_(True) for k, v in problem.params.items()}
    optimizer = optimizer_class(list(params.values()), **hyper)
    generator = torch.Generator().manual_seed(seed)
    trajectory = []
    for step in range(problem.steps):
        optimizer.zero_grad()
        problem.loss(params, step).backward()
        optimizer.step()
        if jitter:
            with torch.no_grad():
                for v in params.values():
                    v.mul_(1.0 + jitter * torch.randn(v.shape, generator=generator, dtype=v.dtype))
        trajectory.append(_copy(params))
    return trajectory


def engine_trajectory(transform, problem, inplace):
    state = transform.init(_copy(problem.params))
    trajectory = []
    for step in range(problem.steps):
        state, _ = transform.update(state, step, inplace=inplace)
        trajectory.append(_copy(state.params))
    return trajectory


def transformation_trajectory(tx, problem, inplace=True, pass_params=True):
    """Drive a gradient transformation (ours or torchopt's) with loss gradients, torchopt style."""
    params = _copy(problem.params)
    opt_state = tx.init(params)
    trajectory = []
    for step in range(problem.steps):
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        grads = dict(zip(leaves, torch.autograd.grad(problem.loss(leaves, step), list(leaves.values()))))
        updates, opt_state = tx.update(grads, opt_state, params=params if pass_params else None, inplace=inplace)
        params = torchopt.apply_updates(params, updates, inplace=False)
        trajectory.append(_copy(params))
    return trajectory


def relative_error(ours, reference):
    """max |ours - reference| over all leaves, relative to max |reference| (∞-norm over the tree)."""
    error = max((ours[k] - reference[k]).abs().max().item() for k in reference)
    scale = max(reference[k].abs().max().item() for k in reference)
    return error / max(scale, 1e-30)


def assert_trajectories_close(ours, reference, rtol, what, sensitivity=None):
    """Step-by-step relative error ≤ rtol + SENSITIVITY · dev(t) (see SENSITIVITY)."""
    assert len(ours) == len(reference)
    for step, (a, b) in enumerate(zip(ours, reference)):
        for k in b:
            assert torch.isfinite(b[k]).all(), f"reference diverged at step {step}"
        if sensitivity and sensitivity[step] > CHAOTIC_GAIN * 4 * torch.finfo(next(iter(b.values())).dtype).eps:
            break  # torch.optim itself no longer reproduces its trajectory (see CHAOTIC_GAIN)
        tolerance = rtol + (SENSITIVITY * sensitivity[step] if sensitivity else 0.0)
        error = relative_error(a, b)
        assert error <= tolerance, f"{what}: step {step} relative error {error:.3g} > {tolerance:.3g}"


def rounding_sensitivity(problem, optimizer_class, hyper, reference, runs: int = JITTER_RUNS):
    """dev(t): how far torch.optim's own trajectory moves under rounding-sized jitter, the largest of
    ``runs`` jittered runs (independent jitter draws)."""
    dtype = next(iter(problem.params.values())).dtype
    devs = []
    for seed in range(runs):
        jittered = torch_trajectory(problem, optimizer_class, hyper, jitter=4 * torch.finfo(dtype).eps, seed=seed)
        devs.append([relative_error(a, b) for a, b in zip(jittered, reference)])
    return [max(step) for step in zip(*devs)]


def assert_bitwise(ours, reference, what):
    for step, (a, b) in enumerate(zip(ours, reference)):
        for k in b:
            assert torch.equal(a[k], b[k]), f"{what}: leaf {k!r} differs at step {step}"


# ----- the T = 0 limit against torch.optim ------------------------------------------------------
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_preset_equals_torch_optim_float64(name):
    module, optimizer_class, hyper_strategy = OPTIMIZERS[name]

    @given(problem=problems(torch.float64), hyper=hyper_strategy, inplace=st.booleans(),
           pass_params=st.booleans())
    def check(problem, hyper, inplace, pass_params):
        reference = torch_trajectory(problem, optimizer_class, hyper)
        dev = rounding_sensitivity(problem, optimizer_class, hyper, reference)
        preset = engine_trajectory(module.build(problem.log_posterior, **hyper), problem, inplace=False)
        assert_trajectories_close(preset, reference, FLOAT64_RTOL, f"{name} preset", dev)

        rebuilt = bayesflow.engine.build(problem.log_posterior, module.config(**hyper))
        assert_bitwise(engine_trajectory(rebuilt, problem, inplace=True), preset, f"{name} rebuilt from config")

        tx = module.transformation(**hyper)
        ours = transformation_trajectory(tx, problem, inplace=inplace, pass_params=pass_params)
        assert_trajectories_close(ours, reference, FLOAT64_RTOL, f"{name} gradient transformation", dev)

    check()


@pytest.mark.parametrize("name, hyper", [
    ("adam", dict(lr=1e-2, amsgrad=False)), ("adam", dict(lr=1e-2, amsgrad=True)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1)), ("rmsprop", dict(lr=1e-2, momentum=0.5)),
    ("rmsprop", dict(lr=1e-2, centered=True)),
])
def test_large_leaves_equal_torch_optim(name, hyper):
    """Leaves past LARGE_LEAVES take the preconditioner's root leaf by leaf (one memory pass): the
    small random problems above never reach that path."""
    from bayesflow.engine.preconditioners import LARGE_LEAVES

    module, optimizer_class, _ = OPTIMIZERS[name]
    generator = torch.Generator().manual_seed(3)
    targets = {"w": torch.randn(2 * LARGE_LEAVES, dtype=torch.float64, generator=generator),
               "v": torch.randn(LARGE_LEAVES // 64, 64, dtype=torch.float64, generator=generator)}

    def loss(params, step):
        return sum(((params[k] - targets[k] * (1 + 0.1 * step)) ** 2).mean() + 0.1 * (params[k] ** 4).mean()
                   for k in targets)

    problem = Problem({k: torch.zeros_like(t) for k, t in targets.items()}, loss, steps=8)
    reference = torch_trajectory(problem, optimizer_class, hyper)
    ours = engine_trajectory(module.build(problem.log_posterior, **hyper), problem, inplace=True)
    assert_trajectories_close(ours, reference, FLOAT64_RTOL, f"{name} large leaves")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_preset_equals_torch_optim_float32(name):
    module, optimizer_class, hyper_strategy = OPTIMIZERS[name]

    @given(problem=problems(torch.float32), hyper=hyper_strategy)
    def check(problem, hyper):
        reference = torch_trajectory(problem, optimizer_class, hyper)
        dev = rounding_sensitivity(problem, optimizer_class, hyper, reference)
        preset = engine_trajectory(module.build(problem.log_posterior, **hyper), problem, inplace=True)
        assert all(v.dtype == torch.float32 for v in preset[-1].values())
        assert_trajectories_close(preset, reference, FLOAT32_RTOL, f"{name} preset (float32)", dev)

    check()


# ----- the gradient-transformation protocol against torchopt ------------------------------------
@contextmanager
def float64_default():
    """torchopt computes Adam's bias corrections 1 - β^t in torch's default dtype (its step count is
    a tensor): in float32 that is a 1e-7..1e-5 relative deviation from torch.optim, which uses Python
    floats. Comparisons with torchopt run with a float64 default so both compute in double."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _torchopt(name, hyper):
    if name == "sgd":
        return torchopt.sgd(hyper["lr"], hyper["momentum"], hyper["dampening"], hyper["weight_decay"],
                            hyper["nesterov"])
    hyper = {k: v for k, v in hyper.items() if k != "amsgrad"}  # torchopt's Adam has no AMSGrad
    return (torchopt.adam if name == "adam" else torchopt.adamw)(**hyper)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_transformation_equals_torchopt(name):
    module, optimizer_class, hyper_strategy = OPTIMIZERS[name]

    @given(problem=problems(torch.float64), hyper=hyper_strategy)
    def check(problem, hyper):
        hyper = dict(hyper, amsgrad=False) if "amsgrad" in hyper else hyper
        # a fresh torchopt transformation per run: torchopt's SGD keeps its first-step flag in a closure
        with float64_default():
            reference = transformation_trajectory(_torchopt(name, hyper), problem)
        dev = rounding_sensitivity(problem, optimizer_class, hyper, torch_trajectory(problem, optimizer_class, hyper))
        ours = transformation_trajectory(module.transformation(**hyper), problem)
        assert_trajectories_close(ours, reference, FLOAT64_RTOL, f"{name} vs torchopt", dev)

    check()


def _fit(tx, model_params, data, steps=30):
    """A tiny training loop written against the protocol only: any (init, update) pair fits."""
    inputs, targets = data
    params = {k: v.detach().clone() for k, v in model_params.items()}
    opt_state = tx.init(params)
    for step in range(steps):
        batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
        leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = F.mse_loss(inputs[batch] @ leaves["w"] + leaves["b"], targets[batch])
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        updates, opt_state = tx.update(grads, opt_state, params=params)
        params = torchopt.apply_updates(params, updates)
    return params, F.mse_loss(inputs @ params["w"] + params["b"], targets).item()


def test_torchopt_and_bayesflow_optimizers_are_interchangeable():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(32, 3, generator=generator, dtype=torch.float64)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3
    params = {"w": torch.zeros(3, 1, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)}
    initial = F.mse_loss(inputs @ params["w"] + params["b"], targets).item()
    for ours, theirs in [(adam.transformation(lr=0.05), torchopt.adam(lr=0.05)),
                         (sgd.transformation(lr=0.05, momentum=0.9), torchopt.sgd(lr=0.05, momentum=0.9))]:
        fitted_ours, loss_ours = _fit(ours, params, (inputs, targets))
        with float64_default():
            fitted_theirs, loss_theirs = _fit(theirs, params, (inputs, targets))
        assert loss_ours < 0.5 * initial
        assert math.isclose(loss_ours, loss_theirs, rel_tol=1e-10)
        assert relative_error(fitted_ours, fitted_theirs) < 1e-10


def test_bayesflow_transformation_drives_torchopt_optimizer_object():
    """Ours inside torchopt's object tier (nn.Module parameters, p.grad) equals torch.optim.AdamW."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()

    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(16, 1, generator=generator, dtype=torch.float64)
    tx = adamw.transformation(lr=0.01, weight_decay=0.1, amsgrad=True)
    models = make(), make()
    wrapped = torchopt.base.GradientTransformation(tx.init, tx.update)  # torchopt.Optimizer checks the class
    optimizers = (torchopt.Optimizer(models[0].parameters(), wrapped),
                  torch.optim.AdamW(models[1].parameters(), lr=0.01, weight_decay=0.1, amsgrad=True))
    for _ in range(20):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            F.mse_loss(model(inputs), targets).backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert (a - b).abs().max().item() <= 1e-10 * b.abs().max().item()


def test_transformation_is_pure_and_leaves_params_untouched():
    """init copies the parameters; re-initialising restarts the trajectory (the step lives in the state)."""
    params = {"x": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    tx = sgd.transformation(lr=0.1, momentum=0.5, dampening=0.5)
    grads = {"x": torch.tensor([0.5, 0.25], dtype=torch.float64)}
    first = [tx.update({"x": grads["x"].clone()}, tx.init(params), inplace=False)[0]["x"] for _ in range(2)]
    assert torch.equal(first[0], first[1])
    torch.testing.assert_close(first[0], -0.1 * grads["x"], rtol=1e-14, atol=0)  # torch's undampened first step
    state = tx.init(params)
    tx.update({"x": grads["x"].clone()}, state, params=params, inplace=True)
    assert torch.equal(params["x"], torch.tensor([1.0, -2.0], dtype=torch.float64))


# ----- configuration as data, temperature, validation -------------------------------------------
def test_sgd_dampening_configures_first_step_scale_and_mass():
    config = sgd.config(lr=0.04, momentum=0.9, dampening=0.5)
    assert config.mass == bayesflow.engine.Scalar(0.5)
    assert config.step_size == pytest.approx(0.2 * 0.5)
    assert config.step_scales == (("momenta", bayesflow.engine.FirstStep(2.0)),)
    plain = sgd.config(lr=0.04, momentum=0.9)
    assert plain.step_scales == () and plain.mass == bayesflow.engine.Scalar(1.0)


@pytest.mark.parametrize("module, hyper", [
    (sgd, dict(lr=0.1, momentum=0.9)),
    (rmsprop, dict(lr=0.01, momentum=0.5)),
    (adam, dict(lr=0.01)),
])
def test_positive_temperature_samples(module, hyper):
    """temperature > 0 is the matching sampler: seeded noise moves a zero-gradient state."""
    def flat(params, batch):
        return params.sum() * 0.0, None

    runs = []
    for seed in (0, 0, 1):
        transform = module.build(flat, **hyper, temperature=0.1)
        state = transform.init(torch.zeros(4, dtype=torch.float64), seed=seed)
        for _ in range(3):
            state, _ = transform.update(state, None)
        runs.append(state.params)
    assert runs[0].abs().sum() > 0
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    transform = module.build(flat, **hyper)
    state, _ = transform.update(transform.init(torch.zeros(4, dtype=torch.float64)), None)
    assert torch.equal(state.params, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("make, bad", [
    (lambda: sgd.config(lr=-0.1), "-0.1"),
    (lambda: sgd.config(lr=0.0), "0.0"),
    (lambda: sgd.config(lr=float("nan")), "nan"),
    (lambda: sgd.config(lr=0.1, momentum=-0.5), "-0.5"),
    (lambda: sgd.config(lr=0.1, momentum=1.5), "1.5"),
    (lambda: sgd.config(lr=0.1, momentum=0.9, dampening=1.0), "1.0"),
    (lambda: sgd.config(lr=0.1, momentum=0.9, dampening=-0.25), "-0.25"),
    (lambda: sgd.config(lr=0.1, weight_decay=-1e-3), "-0.001"),
    (lambda: sgd.config(lr=0.1, nesterov=True), "momentum=0.0"),
    (lambda: sgd.config(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening=0.1"),
    (lambda: rmsprop.config(alpha=1.0), "1.0"),
    (lambda: rmsprop.config(alpha=-0.5), "-0.5"),
    (lambda: rmsprop.config(eps=-1e-8), "-1e-08"),
    (lambda: rmsprop.config(momentum=2.0), "2.0"),
    (lambda: rmsprop.config(weight_decay=-0.5), "-0.5"),
    (lambda: adam.config(betas=(1.0, 0.999)), "1.0"),
    (lambda: adam.config(betas=(0.9, -0.1)), "-0.1"),
    (lambda: adam.config(betas=(0.9,)), "(0.9,)"),
    (lambda: adam.config(eps=-1.0), "-1.0"),
    (lambda: adam.config(lr=-1e-3), "-0.001"),
    (lambda: adamw.config(weight_decay=-0.01), "-0.01"),
    (lambda: adamw.transformation(lr=0.0), "0.0"),
])
def test_invalid_hyper_parameters_raise_value_error_naming_the_value(make, bad):
    with pytest.raises(ValueError, match=f"(?s).*{bad.replace('(', '[(]').replace(')', '[)]')}"):
        make()


def test_sgd_without_momentum_ignores_dampening_like_torch():
    assert sgd.config(lr=0.1, dampening=1.0) == sgd.config(lr=0.1)


def test_presets_accept_only_engine_options_that_keep_the_optimizer():
    assert adam.config(check_finite="none").check_finite == "none"
    with pytest.raises(TypeError, match="step_size"):
        adam.config(step_size=0.1)


def test_transformation_rejects_integrators_needing_mid_step_gradients():
    config = bayesflow.engine.SDEConfig(step_size=0.1, diffusion=bayesflow.engine.Block(
        {("momenta", "momenta"): bayesflow.engine.Scalar(1.0)}), curl=bayesflow.engine.hamiltonian_curl(1.0),
        integrator=bayesflow.engine.Splitting("ABOBA"), temperature=0.0)
    with pytest.raises(ValueError, match="ABOBA"):
        bayesflow.optim.as_gradient_transformation(config)


@pytest.mark.parametrize("beta2", [0.999, 0.0])
def test_the_comparison_catches_a_slightly_wrong_update_rule(beta2):
    """A learning rate 0.1 % off fails assert_trajectories_close within its first steps, also where the
    trajectory is chaotic (β₂ = 0: a sign-like map, whose later steps CHAOTIC_GAIN leaves uncompared);
    the right one passes on the same problem."""
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(6, dtype=torch.float64, generator=generator)
    noise = 0.1 * torch.randn(50, 6, dtype=torch.float64, generator=generator)
    problem = Problem({"w": torch.randn(6, dtype=torch.float64, generator=generator)},
                      lambda p, step: ((p["w"] - target) ** 2).sum() + noise[step] @ p["w"], 50)
    hyper = dict(lr=0.01, betas=(0.5, beta2), eps=1e-8)
    reference = torch_trajectory(problem, torch.optim.Adam, hyper)
    dev = rounding_sensitivity(problem, torch.optim.Adam, hyper, reference)
    right = engine_trajectory(adam.build(problem.log_posterior, **hyper), problem, inplace=True)
    assert_trajectories_close(right, reference, FLOAT64_RTOL, "adam", dev)
    wrong = engine_trajectory(adam.build(problem.log_posterior, **dict(hyper, lr=0.01 * 1.001)), problem, True)
    with pytest.raises(AssertionError, match=r"step [0-4] relative error"):
        assert_trajectories_close(wrong, reference, FLOAT64_RTOL, "adam with lr 0.1 % off", dev)
