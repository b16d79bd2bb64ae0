"""The torch.optim face of the engine (bayesflow.integrations.as_optimizer), checked by numbers.

* T = 0: the face of every optimizer preset equals its torch.optim namesake step for step (property
  tests over the problems and hyper-parameters of tests/test_optim_equivalence.py, same tolerances),
  also through a closure and split into param groups, and under torch's lr schedulers (OneCycleLR
  cycles momentum / betas too); SGHMC at T = 0 is SGD with momentum.
* lr = 0 (written, CosineAnnealingLR's end, a warm-up from 0, also inside the HF Trainer): torch's
  statistics advance and θ stays at T = 0; a sampler's lr = 0 step is skipped, bitwise.
* checkpoint → resume continues bitwise, random stream included (samplers at T > 0).
* sampling through the face: SGLD and SGHMC moments on a conjugate Gaussian model equal the exact
  stationary moments of the discretised chain, within Monte-Carlo error; a 10 % wrong temperature fails.
* schedules of h and T equal the engine's own schedules bitwise; param groups are independent chains.
* .grad is what is read: clipping, accumulation, GradScaler, None gradients (skipped as torch does).
* bad inputs raise clear errors.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bayesflow
from bayesflow.integrations import EngineOptimizer, as_optimizer
from bayesflow.optim import adam, adamw, rmsprop, sgd
from bayesflow.sgmcmc import adam_sghmc, baoab, sghmc, sgld, sgnht
from test_optim_equivalence import (
    FLOAT64_RTOL,
    OPTIMIZERS,
    assert_trajectories_close,
    problems,
    rounding_sensitivity,
    torch_trajectory,
)


def _copy(params):
    return {k: v.detach().clone() for k, v in params.items()}


def face_trajectory(module, problem, hyper, closure=False, split=False):
    """The face on loss = -log_posterior, optionally through step(closure) and in two param groups."""
    params = {k: v.clone().requires_grad_(True) for k, v in problem.params.items()}
    leaves = list(params.values())
    groups = [{"params": leaves[::2]}, {"params": leaves[1::2]}] if split and len(leaves) > 1 else leaves
    optimizer = as_optimizer(module.build, groups, **hyper)
    trajectory = []
    for step in range(problem.steps):
        def evaluate(step=step):
            optimizer.zero_grad()
            loss = problem.loss(params, step)
            loss.backward()
            return loss

        if closure:
            optimizer.step(evaluate)
        else:
            evaluate()
            optimizer.step()
        trajectory.append(_copy(params))
    return trajectory


# ----- T = 0: torch.optim, step for step --------------------------------------------------------
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_face_equals_torch_optim_at_zero_temperature(name):
    module, optimizer_class, hyper_strategy = OPTIMIZERS[name]

    @settings(max_examples=10)  # test_optim_equivalence runs these problems 25 times per preset already
    @given(problem=problems(torch.float64), hyper=hyper_strategy, closure=st.booleans(), split=st.booleans())
    def check(problem, hyper, closure, split):
        reference = torch_trajectory(problem, optimizer_class, hyper)
        dev = rounding_sensitivity(problem, optimizer_class, hyper, reference)
        ours = face_trajectory(module, problem, hyper, closure=closure, split=split)
        assert_trajectories_close(ours, reference, FLOAT64_RTOL, f"{name} face", dev)

    check()


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()


def _data(seed=1, n=32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randn(n, 2, generator=generator,
                                                                                   dtype=torch.float64)


def _max_relative_error(a: torch.nn.Module, b: torch.nn.Module) -> float:
    error = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    return error / max(q.abs().max().item() for q in b.parameters())


SCHEDULED = [
    (sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    (sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.8, nesterov=True)),
    (sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.3)),
    (adam, torch.optim.Adam, dict(lr=0.02, amsgrad=True)),
    (adamw, torch.optim.AdamW, dict(lr=0.02, weight_decay=0.1)),
    (rmsprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5)),
    (rmsprop, torch.optim.RMSprop, dict(lr=0.01)),
]
SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.3),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30),
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(  # cycles momentum / betas[0] as well
        opt, max_lr=opt.param_groups[0]["lr"], total_steps=30,
        cycle_momentum=("momentum" in opt.defaults and opt.defaults["momentum"] > 0) or "betas" in opt.defaults),
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize(("module", "optimizer_class", "hyper"), SCHEDULED,
                         ids=[f"{m.__name__.rsplit('.', 1)[-1]}-{i}" for i, (m, _, _) in enumerate(SCHEDULED)])
def test_scheduled_face_equals_scheduled_torch_optim(module, optimizer_class, hyper, scheduler):
    """A scheduler writes group['lr'] (and momentum / betas): the face follows it exactly as torch does,
    momenta rescaled where the engine's h is √lr·… (momentum SGD, Adam, RMSprop with momentum)."""
    x, y = _data()
    ours, theirs = _mlp(), _mlp()
    face, reference = as_optimizer(module.build, ours.parameters(), **hyper), optimizer_class(theirs.parameters(),
                                                                                            **hyper)
    schedules = SCHEDULERS[scheduler](face), SCHEDULERS[scheduler](reference)
    for step in range(30):
        for model, optimizer in ((ours, face), (theirs, reference)):
            optimizer.zero_grad()
            F.mse_loss(model(x[step % 4::4]), y[step % 4::4]).backward()
            optimizer.step()
        for schedule in schedules:
            schedule.step()
        assert face.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
        assert _max_relative_error(ours, theirs) <= FLOAT64_RTOL, f"step {step}"
    unscheduled = _mlp()
    plain = as_optimizer(module.build, unscheduled.parameters(), **hyper)
    for step in range(30):
        plain.zero_grad()
        F.mse_loss(unscheduled(x[step % 4::4]), y[step % 4::4]).backward()
        plain.step()
    assert _max_relative_error(unscheduled, theirs) > 1e-3  # the schedule did change the trajectory


def test_sghmc_face_at_zero_temperature_is_sgd_with_momentum():
    """sghmc with h = √η, α = (1 - μ)/√η at T = 0 is SGD(lr=η, momentum=μ) (sgmcmc.sghmc's docstring)."""
    eta, mu = 0.05, 0.9
    x, y = _data()
    ours, theirs = _mlp(), _mlp()
    face = as_optimizer(sghmc.build, ours.parameters(), lr=math.sqrt(eta), alpha=(1 - mu) / math.sqrt(eta),
                        temperature=0.0)
    reference = torch.optim.SGD(theirs.parameters(), lr=eta, momentum=mu)
    for _ in range(25):
        for model, optimizer in ((ours, face), (theirs, reference)):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            optimizer.step()
    assert _max_relative_error(ours, theirs) <= FLOAT64_RTOL


# ----- lr = 0: torch's statistics advance at T = 0, a sampler's step is skipped ----------------------
ZERO_LR = [
    (sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.8, nesterov=True)),
    (sgd, torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=0.01)),
    (adam, torch.optim.Adam, dict(lr=0.02)),
    (adamw, torch.optim.AdamW, dict(lr=0.02, weight_decay=0.1)),
    (rmsprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5)),
    (rmsprop, torch.optim.RMSprop, dict(lr=0.01, centered=True)),  # no momenta: square_avg advances at lr = 0
    (sgd, torch.optim.SGD, dict(lr=0.1)),
]
ZERO_LR_IDS = [f"{m.__name__.rsplit('.', 1)[-1]}-{i}" for i, (m, _, _) in enumerate(ZERO_LR)]
LRS_WITH_ZEROS = [0.0, 0.1, 0.05, 0.0, 0.02, 0.0, 0.0, 0.03, 0.0]  # at the start, in the middle, at the end


def _lockstep(models_and_optimizers, x, y, step):
    for model, optimizer in models_and_optimizers:
        optimizer.zero_grad()
        F.mse_loss(model(x[step % 4::4]), y[step % 4::4]).backward()
        optimizer.step()


@pytest.mark.parametrize(("module", "optimizer_class", "hyper"), ZERO_LR, ids=ZERO_LR_IDS)
def test_zero_lr_steps_equal_torch_optim(module, optimizer_class, hyper):
    """lr = 0 written into the group: the parameters stay and every statistic advances as torch's, so
    that the steps with lr > 0 after it equal torch's step for step (the proxy-lr step, θ put back)."""
    x, y = _data()
    ours, theirs = _mlp(), _mlp()
    face, reference = as_optimizer(module.build, ours.parameters(), **hyper), optimizer_class(theirs.parameters(),
                                                                                            **hyper)
    for step, lr in enumerate(LRS_WITH_ZEROS):
        face.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = lr
        before = [p.detach().clone() for p in ours.parameters()]
        _lockstep(((ours, face), (theirs, reference)), x, y, step)
        assert _max_relative_error(ours, theirs) <= FLOAT64_RTOL, f"step {step} (lr {lr})"
        if lr == 0:
            assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), before)), f"step {step} moved"
    assert int(face.param_groups[0]["engine"]["step"]) == len(LRS_WITH_ZEROS)  # counted as torch counts


@pytest.mark.parametrize(("module", "optimizer_class", "hyper"), ZERO_LR[:2], ids=ZERO_LR_IDS[:2])
def test_a_checkpoint_taken_at_lr_zero_resumes_bitwise(module, optimizer_class, hyper):
    """The proxy lr of an lr = 0 step (the momenta's units) is saved with the group: a run resumed from
    a checkpoint taken in an lr = 0 stretch equals the uninterrupted run bitwise."""
    x, y = _data()
    lrs = [0.1, 0.05, 0.0, 0.0, 0.02, 0.03]
    whole = _mlp()
    face = as_optimizer(module.build, whole.parameters(), **hyper)
    first = _mlp()
    half = as_optimizer(module.build, first.parameters(), **hyper)
    for step, lr in enumerate(lrs):
        face.param_groups[0]["lr"] = lr
        _lockstep(((whole, face),), x, y, step)
        if step < 3:
            half.param_groups[0]["lr"] = lr
            _lockstep(((first, half),), x, y, step)
    resumed_model = _mlp()
    resumed_model.load_state_dict(first.state_dict())
    resumed = as_optimizer(module.build, resumed_model.parameters(), **{**hyper, "lr": 0.7})
    resumed.load_state_dict(copy.deepcopy(half.state_dict()))
    for step, lr in list(enumerate(lrs))[3:]:
        resumed.param_groups[0]["lr"] = lr
        _lockstep(((resumed_model, resumed),), x, y, step)
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), whole.parameters()))


ZERO_LR_SCHEDULERS = {  # each writes lr = 0.0 exactly (asserted below)
    "cosine_to_zero": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.0),
    "linear_warmup_from_zero": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 3)),
}


@pytest.mark.parametrize("scheduler", list(ZERO_LR_SCHEDULERS))
@pytest.mark.parametrize(("module", "optimizer_class", "hyper"), ZERO_LR[:6], ids=ZERO_LR_IDS[:6])
def test_schedulers_through_zero_lr_equal_torch_optim(module, optimizer_class, hyper, scheduler):
    """CosineAnnealingLR(eta_min=0) past its zero point, and a linear warm-up from lr = 0 (HF's)."""
    x, y = _data()
    ours, theirs = _mlp(), _mlp()
    face, reference = as_optimizer(module.build, ours.parameters(), **hyper), optimizer_class(theirs.parameters(),
                                                                                            **hyper)
    schedules = ZERO_LR_SCHEDULERS[scheduler](face), ZERO_LR_SCHEDULERS[scheduler](reference)
    lrs = []
    for step in range(12):
        lrs.append(face.param_groups[0]["lr"])
        _lockstep(((ours, face), (theirs, reference)), x, y, step)
        for schedule in schedules:
            schedule.step()
        assert _max_relative_error(ours, theirs) <= FLOAT64_RTOL, f"step {step}"
    assert 0.0 in lrs and lrs.index(0.0) < 11 and face.param_groups[0]["lr"] == reference.param_groups[0]["lr"]


FROZEN_AT_ZERO_LR = {  # h = 0 is the frozen SDE: samplers (T > 0), and momenta with h ∝ lr at T = 0
    "sghmc": (sghmc.build, dict(lr=0.05, alpha=1.0, temperature=0.01)),
    "sgld": (sgld.build, dict(lr=0.01, temperature=0.01)),
    "psgld": (bayesflow.sgmcmc.psgld.build, dict(lr=0.01, temperature=1e-3)),
    "adam_sghmc": (adam_sghmc.build, dict(lr=0.01, temperature=1e-3)),
    "sgd_momentum_hot": (sgd.build, dict(lr=0.05, momentum=0.9, temperature=1e-3)),
    "sghmc_cold": (sghmc.build, dict(lr=0.05, alpha=1.0, temperature=0.0)),
}


@pytest.mark.parametrize("name", list(FROZEN_AT_ZERO_LR))
def test_a_zero_lr_step_of_a_sampler_is_skipped(name):
    """Parameters, momenta, statistics, step counter and noise key stay; afterwards the run equals, bitwise,
    the run that never had the lr = 0 step (the gradient is a function of θ, which did not move)."""
    builder, hyper = FROZEN_AT_ZERO_LR[name]
    x, y = _data()

    def run(lrs):
        model = _mlp()
        optimizer = as_optimizer(builder, model.parameters(), seed=3, **hyper)
        for lr in lrs:
            optimizer.param_groups[0]["lr"] = lr
            if lr == 0:
                before = copy.deepcopy(optimizer.state_dict())
                parameters = [p.detach().clone() for p in model.parameters()]
            _lockstep(((model, optimizer),), x, y, 0)
            if lr == 0:
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), parameters))
                _assert_equal_trees(optimizer.state_dict(), before)
        return [p.detach().clone() for p in model.parameters()]

    lr = hyper["lr"]
    skipped, never = run([lr, lr, 0.0, lr, 0.5 * lr, lr]), run([lr, lr, lr, 0.5 * lr, lr])
    assert all(torch.equal(p, q) for p, q in zip(skipped, never))
    assert not torch.equal(skipped[0], _mlp()[0].weight)  # (the run did move)
    run([0.0, lr])  # lr = 0 at the first step: no state yet, none created


def _assert_equal_trees(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_equal_trees(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_equal_trees(u, v)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # (no log posterior yet: NaN)
    else:
        assert a == b or (a != a and b != b), (a, b)


def test_zero_lr_from_the_constructor_is_taken_and_bad_lrs_are_refused_naming_the_lr():
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    optimizer = as_optimizer(adam.build, [p], lr=0.0)
    p.grad = torch.ones_like(p)
    optimizer.step()
    assert torch.equal(p, torch.ones_like(p)) and int(optimizer.param_groups[0]["engine"]["step"]) == 1
    for builder in (adam.build, sgd.build, sghmc.build):
        for bad in (-0.1, math.nan, -math.inf):
            with pytest.raises(ValueError, match="lr"):
                as_optimizer(builder, [p], lr=bad)
            optimizer = as_optimizer(builder, [p], lr=0.1)
            optimizer.param_groups[0]["lr"] = bad
            with pytest.raises(ValueError, match=f"Invalid learning rate: {bad}"):
                optimizer.step()


def test_hugging_face_trainer_with_linear_warmup_from_zero_is_torch_adamw(tmp_path):
    """``get_linear_schedule_with_warmup`` sets lr = 0 for the first step: the Trainer runs and the face
    trains as torch's AdamW (a tiny Llama built from a config, nothing downloaded)."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    hf = pytest.importorskip("test_transformers")  # skipped with it where transformers is missing
    transformers = hf.transformers
    dataset = [{key: value[i] for key, value in hf.DATA.items()} for i in range(len(hf.DATA["input_ids"]))]
    steps = 5

    def train(make_optimizer):
        model = hf.tiny_llama()
        optimizer = make_optimizer(model.parameters())
        schedule = transformers.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2,
                                                                num_training_steps=steps)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                              max_steps=steps, seed=0, report_to=[], save_strategy="no",
                                              logging_strategy="no", use_cpu=True, disable_tqdm=True,
                                              dataloader_num_workers=0)
        transformers.Trainer(model=model, args=args, train_dataset=dataset,
                             optimizers=(optimizer, schedule)).train()
        return model, optimizer

    (ours, face), (theirs, _) = (train(lambda params: as_optimizer(adamw.build, params, lr=0.01, weight_decay=0.1)),
                                 train(lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)))
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-7, msg=name)
    assert int(face.param_groups[0]["engine"]["step"]) == steps
    start = hf.tiny_llama()
    assert max(float((a.detach() - s.detach()).abs().max()) for a, s in zip(ours.parameters(),
                                                                           start.parameters())) > 1e-3


# ----- checkpoints --------------------------------------------------------------------------------
RESUMABLE = {
    "sghmc": (sghmc.build, dict(lr=0.05, alpha=1.0, temperature=0.01)),
    "sgld": (sgld.build, dict(lr=0.01, temperature=0.01)),
    "sgnht": (sgnht.build, dict(lr=0.05, temperature=0.01)),
    "adam_sghmc": (adam_sghmc.build, dict(lr=0.01, temperature=1e-3)),
    "sgd_momentum_hot": (sgd.build, dict(lr=0.05, momentum=0.9, temperature=1e-3)),
}


def _run(model, optimizer, schedule, data, steps):
    x, y = data
    out = []
    for step in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(x[step % 4::4]), y[step % 4::4]).backward()
        optimizer.step()
        schedule.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_checkpoint_resume_continues_bitwise(name):
    builder, hyper = RESUMABLE[name]
    data = _data()
    model = _mlp()
    optimizer = as_optimizer(builder, model.parameters(), seed=3, **hyper)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.97)  # lr changes at every step
    _run(model, optimizer, schedule, data, 7)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict()}, buffer)
    continued = _run(model, optimizer, schedule, data, 8)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model = _mlp(seed=5)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = as_optimizer(builder, resumed_model.parameters(), seed=99, **hyper)  # the seed is overridden
    resumed_schedule = torch.optim.lr_scheduler.ExponentialLR(resumed, gamma=0.97)
    resumed_schedule.load_state_dict(checkpoint["schedule"])
    resumed.load_state_dict(checkpoint["optimizer"])
    after = _run(resumed_model, resumed, resumed_schedule, data, 8)
    for step, (a, b) in enumerate(zip(continued, after)):
        assert all(torch.equal(u, v) for u, v in zip(a, b)), f"step {step} after resuming differs"

    # without the optimizer's state the continuation differs (the check above can fail)
    restarted_model = _mlp(seed=5)
    restarted_model.load_state_dict(checkpoint["model"])
    restarted = as_optimizer(builder, restarted_model.parameters(), seed=99, **hyper)
    other = _run(restarted_model, restarted, torch.optim.lr_scheduler.ExponentialLR(restarted, gamma=0.97), data, 8)
    assert not all(torch.equal(u, v) for u, v in zip(other[-1], continued[-1]))


def test_deepcopy_of_model_and_optimizer_continues_identically():
    data = _data()
    model = _mlp()
    optimizer = as_optimizer(sghmc.build, model.parameters(), lr=0.05, alpha=1.0, temperature=0.01, seed=0)
    _run(model, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0), data, 3)
    model_copy, optimizer_copy = copy.deepcopy((model, optimizer))
    a = _run(model, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0), data, 4)
    b = _run(model_copy, optimizer_copy, torch.optim.lr_scheduler.ConstantLR(optimizer_copy, factor=1.0), data, 4)
    assert all(torch.equal(u, v) for u, v in zip(a[-1], b[-1]))


# ----- sampling through the face: exact stationary moments ----------------------------------------
NUM_DATA, PRIOR_VAR, NOISE_VAR = 50, 4.0, 1.0
_y = 0.7 + math.sqrt(NOISE_VAR) * torch.randn(NUM_DATA, generator=torch.Generator().manual_seed(11),
                                              dtype=torch.float64)
_Y_SUM, _Y_SQUARES = float(_y.sum()), float((_y**2).sum())
POSTERIOR_PRECISION = NUM_DATA / NOISE_VAR + 1 / PRIOR_VAR
POSTERIOR_MEAN = float(_y.sum()) / NOISE_VAR / POSTERIOR_PRECISION
CURVATURE = POSTERIOR_PRECISION / NUM_DATA  # λ: the per-datum loss is λ/2 (θ - mean)² + const


def conjugate_loss(theta: torch.Tensor) -> torch.Tensor:
    """-ℓ per datum of y_i ~ N(θ, 1), θ ~ N(0, 4), for every coordinate of θ (independent replicas);
    Σᵢ (yᵢ - θ)² through its sufficient statistics, N θ² - 2θ Σy + Σy²."""
    squares = NUM_DATA * theta**2 - 2 * theta * _Y_SUM + _Y_SQUARES
    log_likelihood = -0.5 * squares / NOISE_VAR
    log_prior = -0.5 * theta**2 / PRIOR_VAR
    return -((log_likelihood + log_prior) / NUM_DATA).sum()


def stationary_covariance(transition: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Σ = A Σ Aᵀ + B Bᵀ (the discrete Lyapunov equation of z' = A z + B ξ), solved exactly."""
    n = transition.shape[0]
    lhs = torch.eye(n * n, dtype=torch.float64) - torch.kron(transition, transition)
    return torch.linalg.solve(lhs, (noise @ noise.T).reshape(-1)).reshape(n, n)


def sgld_variance(h: float, temperature: float) -> float:
    """θ' = θ - hλ(θ - μ) + √(2hT) ξ."""
    return float(stationary_covariance(torch.tensor([[1 - h * CURVATURE]], dtype=torch.float64),
                                       torch.tensor([[math.sqrt(2 * h * temperature)]], dtype=torch.float64))[0, 0])


def sghmc_variance(h: float, alpha: float, temperature: float) -> float:
    """Semi-implicit SGHMC (mass 1): m' = (1 - hα)m - hλ(θ - μ) + √(2hαT) ξ, θ' = θ + h m'."""
    transition = torch.tensor([[1 - h * h * CURVATURE, h * (1 - h * alpha)], [-h * CURVATURE, 1 - h * alpha]],
                              dtype=torch.float64)
    noise = math.sqrt(2 * h * alpha * temperature) * torch.tensor([[h], [1.0]], dtype=torch.float64)
    return float(stationary_covariance(transition, noise)[0, 0])


def test_stationary_references_match_engine_md():
    """ENGINE.md §3 on N(0, 1) with γ = 1, h = 0.1: SGLD 1.0526, semi-implicit SGHMC 1.0026 (λ = 1, T = 1)."""
    global CURVATURE
    saved, CURVATURE = CURVATURE, 1.0
    try:
        assert sgld_variance(0.1, 1.0) == pytest.approx(1 / (1 - 0.05), rel=1e-12)
        assert sghmc_variance(0.1, 1.0, 1.0) == pytest.approx(1.0026, abs=5e-5)
    finally:
        CURVATURE = saved


def sample_moments(groups, builder, steps=1000, burn_in=150, **hyper):
    """Per-coordinate time averages of θ and of (θ - μ)² after burn-in, for each param group.

    The spread is measured about the exact stationary mean μ (the posterior mean: the chains are
    linear), not the time average: that estimate is unbiased, where the time average's own variance
    would be low by about τ_int/steps (2 % for SGHMC here).
    """
    thetas = [g["params"][0] for g in groups]
    optimizer = as_optimizer(builder, groups, seed=0, **hyper)
    sums = [torch.zeros_like(t) for t in thetas]
    squares = [torch.zeros_like(t) for t in thetas]
    for step in range(burn_in + steps):
        optimizer.zero_grad()
        sum(conjugate_loss(t) for t in thetas).backward()
        optimizer.step()
        if step >= burn_in:
            for t, s, q in zip(thetas, sums, squares):
                s += t.detach()
                q += (t.detach() - POSTERIOR_MEAN) ** 2
    return [(s / steps, q / steps) for s, q in zip(sums, squares)]


def within_monte_carlo_error(means: torch.Tensor, variances: torch.Tensor, variance: float) -> tuple[bool, str]:
    """The coordinates are independent replicas of one chain: the spread of their time averages is
    the Monte-Carlo error of the pooled estimate (4 standard errors: a false alarm about 1 in 16 000)."""
    d = means.numel()
    mean_error = abs(means.mean().item() - POSTERIOR_MEAN)
    mean_tolerance = 4 * means.std().item() / math.sqrt(d)
    variance_error = abs(variances.mean().item() - variance)
    variance_tolerance = 4 * variances.std().item() / math.sqrt(d)
    report = (f"mean error {mean_error:.3g} (tolerance {mean_tolerance:.3g}), variance {variances.mean().item():.4g} "
              f"vs exact {variance:.4g} (tolerance {variance_tolerance:.3g})")
    return mean_error <= mean_tolerance and variance_error <= variance_tolerance, report


def test_sgld_face_samples_the_conjugate_posterior_and_a_wrong_temperature_fails():
    h, temperature = 0.2, 1 / NUM_DATA
    exact = sgld_variance(h, temperature)
    assert exact == pytest.approx(1 / POSTERIOR_PRECISION, rel=0.15)  # the discretisation bias is visible
    theta = torch.zeros(2000, dtype=torch.float64, requires_grad=True)
    [(means, variances)] = sample_moments([{"params": [theta]}], sgld.build, lr=h, temperature=temperature)
    ok, report = within_monte_carlo_error(means, variances, exact)
    assert ok, report

    wrong = torch.zeros(2000, dtype=torch.float64, requires_grad=True)  # a 10 % too hot chain
    [(means, variances)] = sample_moments([{"params": [wrong]}], sgld.build, lr=h, temperature=1.1 * temperature)
    ok, report = within_monte_carlo_error(means, variances, exact)
    assert not ok, f"a 10% wrong temperature passed: {report}"


def test_sghmc_face_samples_each_param_group_at_its_own_temperature():
    h, alpha = 0.2, 1.5
    temperatures = (1 / NUM_DATA, 2 / NUM_DATA)  # the posterior, and a warm posterior for group 1
    groups = [{"params": [torch.zeros(1000, dtype=torch.float64, requires_grad=True)], "temperature": t}
              for t in temperatures]
    results = sample_moments(groups, sghmc.build, lr=h, alpha=alpha)
    for t, (means, variances) in zip(temperatures, results):
        ok, report = within_monte_carlo_error(means, variances, sghmc_variance(h, alpha, t))
        assert ok, f"T = {t}: {report}"
    ok, _ = within_monte_carlo_error(*results[1], sghmc_variance(h, alpha, temperatures[0]))
    assert not ok  # group 1 is not at group 0's temperature


# ----- schedules and groups are exact -------------------------------------------------------------
def _quadratic_loss(params):
    return sum(0.5 * ((p - 0.3) ** 2).sum() + 0.1 * (p**4).sum() for p in params)


def test_scheduled_lr_and_temperature_equal_the_engines_own_schedules():
    """group['lr'] from ExponentialLR and a hand-written group['temperature'] each step give, bitwise,
    the engine transform whose step size and temperature are schedules (no transform is rebuilt)."""
    lr0, gamma, T0 = 0.05, 0.98, 0.01
    temperature = lambda step: T0 * (1 + math.sin(step / 3)) / 2  # noqa: E731
    params = [torch.linspace(-1, 1, 5, dtype=torch.float64).requires_grad_(True),
              torch.ones(2, 3, dtype=torch.float64, requires_grad=True)]
    reference = [p.detach().clone() for p in params]
    optimizer = as_optimizer(sghmc.build, params, lr=lr0, alpha=0.5, temperature=T0, seed=7)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
    lrs = [lr0]
    for _ in range(25):
        lrs.append(lrs[-1] * gamma)  # ExponentialLR's recursion (lr0·γ^t rounds differently)
    transform = sghmc.build(lambda p, b: None, lr=lrs.__getitem__, alpha=0.5,
                            temperature=lambda step: T0 if step == 0 else temperature(step))
    state = transform.init(reference, seed=7)
    for step in range(25):
        if step > 0:
            optimizer.param_groups[0]["temperature"] = temperature(step)
        optimizer.zero_grad()
        _quadratic_loss(params).backward()
        optimizer.step()
        schedule.step()
        leaves = [p.detach().clone().requires_grad_(True) for p in state.params]
        grads = torch.autograd.grad(_quadratic_loss(leaves), leaves)
        state = transform.step(state, [-g for g in grads])
        assert all(torch.equal(p, q) for p, q in zip(params, state.params)), f"step {step}"
    assert optimizer._slots[0].rebuilds == 1  # only h and T changed: the transform was kept


PRESETS = {
    "sgld": (sgld.build, dict(lr=0.05, temperature=0.01)),
    "sghmc": (sghmc.build, dict(lr=0.05, alpha=0.5, temperature=0.01)),
    "sgnht": (sgnht.build, dict(lr=0.05, temperature=0.01)),
    "baoa": (bayesflow.sgmcmc.baoa.build, dict(lr=0.05, alpha=0.5, temperature=0.01)),
    "psgld": (bayesflow.sgmcmc.psgld.build, dict(lr=0.01, temperature=1e-3)),
    "adam_sghmc": (adam_sghmc.build, dict(lr=0.01, temperature=1e-3)),
    "csgld": (bayesflow.sgmcmc.csgld.build, dict(lr=0.05, cycle_length=6, temperature=0.01)),
    "csghmc": (bayesflow.sgmcmc.csghmc.build, dict(lr=0.05, cycle_length=6, temperature=0.01)),
    "sglrw": (bayesflow.sgmcmc.sglrw.build, dict(lr=0.05, temperature=0.01)),
    "sgd": (sgd.build, dict(lr=0.05, momentum=0.5, temperature=0.01)),
    "rmsprop": (rmsprop.build, dict(lr=0.01, momentum=0.5, temperature=1e-3)),
    "adam": (adam.build, dict(lr=0.01, temperature=1e-3)),
    "adamw": (adamw.build, dict(lr=0.01, temperature=1e-3)),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_one_gradient_preset_steps_as_its_transform(name):
    """The face of each preset at T > 0 is, bitwise, its own transform's step(state, -grad) with the same seed."""
    builder, hyper = PRESETS[name]
    params = [torch.linspace(-1, 1, 5, dtype=torch.float64).requires_grad_(True),
              torch.full((2, 2), 0.5, dtype=torch.float64, requires_grad=True)]
    transform = builder(lambda p, b: None, **hyper)
    state = transform.init([p.detach().clone() for p in params], seed=2)
    optimizer = as_optimizer(builder, params, seed=2, **hyper)
    for step in range(12):
        optimizer.zero_grad()
        _quadratic_loss(params).backward()
        optimizer.step()
        leaves = [p.detach().clone().requires_grad_(True) for p in state.params]
        state = transform.step(state, [-g for g in torch.autograd.grad(_quadratic_loss(leaves), leaves)])
        assert all(torch.equal(p, q) for p, q in zip(params, state.params)), f"step {step}"
    assert not torch.equal(params[1], torch.full((2, 2), 0.5, dtype=torch.float64))


def test_param_groups_are_independent_chains():
    """Two groups (their own lr and temperature) equal two one-group optimizers seeded seed and seed + 1."""
    def make():
        return [torch.linspace(0, 1, 4, dtype=torch.float64).requires_grad_(True),
                torch.full((3,), -0.5, dtype=torch.float64, requires_grad=True)]

    joint = make()
    optimizer = as_optimizer(sghmc.build, [{"params": [joint[0]]}, {"params": [joint[1]], "lr": 0.02,
                                                                    "temperature": 0.1}],
                             lr=0.05, alpha=1.0, temperature=0.01, seed=4)
    first, second = make(), make()
    alone = [as_optimizer(sghmc.build, [first[0]], lr=0.05, alpha=1.0, temperature=0.01, seed=4),
             as_optimizer(sghmc.build, [second[1]], lr=0.02, alpha=1.0, temperature=0.1, seed=5)]
    for _ in range(15):
        for opt, params in ((optimizer, joint), (alone[0], first[:1]), (alone[1], second[1:])):
            opt.zero_grad()
            _quadratic_loss(params).backward()
            opt.step()
    assert torch.equal(joint[0], first[0]) and torch.equal(joint[1], second[1])
    assert not torch.equal(joint[0], second[0])  # (group 0 did move)


# ----- what is read is .grad ------------------------------------------------------------------------
def test_clipping_accumulation_and_grad_scaler_act_through_grad():
    x, y = _data(n=64)
    ours, theirs = _mlp(), _mlp()
    face = as_optimizer(adam.build, ours.parameters(), lr=0.01)
    reference = torch.optim.Adam(theirs.parameters(), lr=0.01)
    scalers = torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(12):
        for model, optimizer, scaler in ((ours, face, scalers[0]), (theirs, reference, scalers[1])):
            optimizer.zero_grad()
            for micro in range(2):  # accumulation over two micro-batches
                rows = slice(16 * micro + 32 * (step % 2), 16 * micro + 32 * (step % 2) + 16)
                scaler.scale(F.mse_loss(model(x[rows]), y[rows]) / 2).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            scaler.step(optimizer)
            scaler.update()
    assert _max_relative_error(ours, theirs) <= FLOAT64_RTOL


def test_parameters_without_grad_are_skipped_as_torch_skips_them():
    """SGD with momentum: a parameter whose grad is None on some steps keeps its momentum untouched
    (as torch's buffer) and gets its state at its first gradient; a frozen parameter gets none at all."""
    ours, theirs = _mlp(), _mlp()
    ours[0].bias.requires_grad_(False)
    theirs[0].bias.requires_grad_(False)
    face = as_optimizer(sgd.build, ours.parameters(), lr=0.05, momentum=0.9)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    x, y = _data()
    for step in range(20):
        for model, optimizer in ((ours, face), (theirs, reference)):
            optimizer.zero_grad()
            F.mse_loss(model(x), y).backward()
            if step % 3 == 1 or step == 0:
                model[2].weight.grad = None  # a branch this batch did not use (first used at step 2)
            optimizer.step()
    assert _max_relative_error(ours, theirs) <= FLOAT64_RTOL
    assert ours[0].bias not in face.state and len(face.state) == 3


def test_closure_returns_the_loss_and_the_state_records_the_log_posterior():
    model = _mlp()
    x, y = _data()
    optimizer = as_optimizer(adam.build, model.parameters(), lr=0.01)

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert optimizer.param_groups[0]["engine"]["log_posterior"].item() == -loss.item()
    assert int(optimizer.param_groups[0]["engine"]["step"]) == 1


# ----- bad input --------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match="momentun"):
        as_optimizer(sgd.build, params, lr=0.1, momentun=0.9)
    with pytest.raises(ValueError, match="learning rate"):
        as_optimizer(sgd.build, params, lr=-0.1)
    with pytest.raises(ValueError, match="lr must be"):
        as_optimizer(sghmc.build, params, lr=-0.1)
    with pytest.raises(TypeError, match="Tensors"):
        as_optimizer(adam.build, [1.0, 2.0], lr=0.1)
    with pytest.raises(TypeError, match="iterable of Tensors"):
        as_optimizer(adam.build, torch.zeros(3), lr=0.1)
    with pytest.raises(TypeError, match="floating point"):
        as_optimizer(adam.build, [torch.zeros(3, dtype=torch.int64)], lr=0.1)
    with pytest.raises(ValueError, match="second point"):
        as_optimizer(baoab.build, params, lr=0.1)
    with pytest.raises(TypeError, match="build function"):
        as_optimizer("sghmc", params, lr=0.1)
    with pytest.raises(TypeError, match="engine transform"):
        as_optimizer(lambda log_posterior, lr, temperature=0.0: (lr, temperature), params, lr=0.1)
    with pytest.raises(TypeError, match="param group 1"):
        as_optimizer(sgd.build, [{"params": params}, {"params": [torch.ones(2, requires_grad=True)], "betas": 1}],
                     lr=0.1)
    with pytest.raises(ValueError, match="mixes dtypes"):
        as_optimizer(sgd.build, [torch.zeros(2), torch.zeros(2, dtype=torch.float64)], lr=0.1)
    with pytest.raises(TypeError, match="seed"):
        as_optimizer(sgd.build, params, lr=0.1, seed=0.5)
    optimizer = as_optimizer(sgd.build, params, lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # a bad value written into a group
        optimizer.param_groups[0]["lr"] = -1.0
        params[0].grad = torch.ones(3)
        optimizer.step()
    assert isinstance(optimizer, EngineOptimizer) and isinstance(optimizer, torch.optim.Optimizer)
    assert "engine" not in repr(optimizer) and "lr: -1.0" in repr(optimizer)


def test_momentum_switched_off_mid_run_is_refused():
    p = torch.zeros(3, requires_grad=True)
    optimizer = as_optimizer(sgd.build, [p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    optimizer.step()
    optimizer.param_groups[0]["momentum"] = 0.0
    with pytest.raises(ValueError, match="extended state"):
        optimizer.step()


def test_face_is_exported():
    assert bayesflow.integrations.as_optimizer is as_optimizer
