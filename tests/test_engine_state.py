"""The engine's state: reproducibility, checkpoint/resume, in-place vs functional, T = 0, schedules.

Every comparison here is exact (bitwise): the engine promises identical trajectories, not close ones.
"""

from __future__ import annotations

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import bayesflow
from bayesflow.engine import (
    BiasCorrection,
    Block,
    Cyclical,
    Preconditioned,
    Scalar,
    SDEConfig,
    SemiImplicitEuler,
    Splitting,
    SquaredGradientAverage,
    ThermostatCoupling,
    build,
    hamiltonian_curl,
)
from bayesflow.engine.noise import NoiseStream
from bayesflow.tree import flatten

DTYPE = torch.float64


def log_posterior(params, batch):
    """A stochastic mini-batch objective on a dict of parameters (batch: a (3,) tensor)."""
    value = -0.5 * ((params["w"] - batch) ** 2).sum() - 0.5 * params["b"] ** 2 - 0.1 * (params["w"] ** 4).sum()
    return value, batch.sum()


def batch_at(step):
    return torch.randn(3, dtype=DTYPE, generator=torch.Generator().manual_seed(1000 + step))


def make_params(seed=0, chains=None):
    generator = torch.Generator().manual_seed(seed)
    lead = () if chains is None else (chains,)
    return {"w": torch.randn(*lead, 3, dtype=DTYPE, generator=generator),
            "b": torch.randn(lead, dtype=DTYPE, generator=generator)}


def momentum_config(integrator, **fields):
    return SDEConfig(step_size=0.1, diffusion=Block({("momenta", "momenta"): Scalar(0.7)}),
                     curl=hamiltonian_curl(1.0), integrator=integrator, **fields)


RMS = SquaredGradientAverage(0.9, 1e-2)
CONFIGS = {
    "SGLD": lambda: SDEConfig(step_size=0.05, temperature=0.5),
    "SGHMC": lambda: momentum_config(SemiImplicitEuler(), temperature=0.5),
    "BAOAB": lambda: momentum_config(Splitting("BAOAB"), temperature=0.5),
    "ABOBA": lambda: momentum_config(Splitting("ABOBA"), temperature=0.5),
    "pSGLD": lambda: SDEConfig(step_size=0.05, temperature=0.5, diffusion=Preconditioned(RMS, power=-1.0)),
    "SGNHT": lambda: SDEConfig(step_size=0.05, temperature=0.5, integrator=SemiImplicitEuler(),
                               diffusion=Block({("momenta", "momenta"): Scalar(1.0)}),
                               curl=Block({("params", "momenta"): Scalar(-1.0), ("momenta", "params"): Scalar(1.0),
                                           ("momenta", "xi"): ThermostatCoupling(+1),
                                           ("xi", "momenta"): ThermostatCoupling(-1)})),
    "chains": lambda: SDEConfig(step_size=0.05, temperature=torch.tensor([0.1, 0.5, 1.0], dtype=DTYPE)),
}


def new_transform(name):
    return build(log_posterior, CONFIGS[name](), chains=3 if name == "chains" else None)


def new_state(name, transform, seed=7, params_seed=0):
    return transform.init(make_params(params_seed, chains=3 if name == "chains" else None), seed=seed)


def run(transform, state, start, stop, inplace=False):
    for step in range(start, stop):
        state, _ = transform.update(state, batch_at(step), inplace=inplace)
    return state


def snapshot(state):
    return {key: value.clone() for key, value in bayesflow.state_dict(state).items()}


def assert_identical(a, b):
    """Bitwise equality of two states (or snapshots): same structure, dtypes and values (NaN = NaN)."""
    a_leaves, a_spec = flatten(a)
    b_leaves, b_spec = flatten(b)
    assert a_spec == b_spec
    for x, y in zip(a_leaves, b_leaves):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_seed_reproduces_and_another_seed_differs(name):
    separate = new_transform(name)
    first = run(separate, new_state(name, separate), 0, 6)
    transform = new_transform(name)
    second = run(transform, new_state(name, transform), 0, 6)
    assert_identical(first, second)
    other = run(transform, new_state(name, transform, seed=8), 0, 6)
    assert not torch.equal(first.params["w"], other.params["w"])


@pytest.mark.parametrize("name", ["SGLD", "chains"])
def test_a_torch_generator_as_seed_reproduces_and_advances(name):
    """A seeded torch.Generator reproduces the run; two inits from one generator get different
    streams (the seed is drawn from it); a numpy or tensor integer is an int seed."""
    transform = new_transform(name)
    first = run(transform, new_state(name, transform, seed=torch.Generator().manual_seed(11)), 0, 4)
    assert_identical(first, run(transform, new_state(name, transform, seed=torch.Generator().manual_seed(11)), 0, 4))
    shared = torch.Generator().manual_seed(11)
    a, b = new_state(name, transform, seed=shared), new_state(name, transform, seed=shared)
    assert not torch.equal(a.rng, b.rng)
    assert_identical(new_state(name, transform, seed=np.int64(4)), new_state(name, transform, seed=4))
    assert_identical(new_state(name, transform, seed=torch.tensor(4)), new_state(name, transform, seed=4))


@pytest.mark.parametrize("seed", [3.0, "7", True, [1.5], torch.tensor(2.0)])
def test_a_seed_of_another_type_is_a_type_error_naming_it(seed):
    transform = new_transform("SGLD")
    with pytest.raises(TypeError, match="seed must be an int, a list of ints"):
        new_state("SGLD", transform, seed=seed)


@pytest.mark.parametrize("name", ["SGLD", "BAOAB", "chains"])
def test_interleaved_states_of_one_transform_do_not_share_noise(name):
    transform = new_transform(name)
    reference = run(transform, new_state(name, transform), 0, 5)
    a, b = new_state(name, transform), new_state(name, transform, seed=9)
    for step in range(5):
        a, _ = transform.update(a, batch_at(step))
        b, _ = transform.update(b, batch_at(step))
    assert_identical(a, reference)
    assert_identical(b, run(transform, new_state(name, transform, seed=9), 0, 5))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("inplace", [False, True])
def test_checkpoint_resume_continues_the_identical_trajectory(name, inplace):
    transform = new_transform(name)
    state = run(transform, new_state(name, transform), 0, 4, inplace)
    buffer = io.BytesIO()
    torch.save(bayesflow.state_dict(state), buffer)
    reference = snapshot(run(transform, state, 4, 9, inplace))
    for fresh in (new_transform(name), transform):  # a new process, and the transform that ran on
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        template = new_state(name, fresh, seed=123, params_seed=5)
        resumed = run(fresh, bayesflow.load_state_dict(template, saved), 4, 9, inplace)
        assert_identical(snapshot(resumed), reference)


@pytest.mark.parametrize("name", ["SGHMC", "pSGLD", "SGNHT", "BAOAB"])
def test_one_transform_drives_states_of_different_parameter_layouts(name):
    """init with one model, then another: both states keep advancing exactly as with their own
    transform (a transform is a pair of functions, not bound to the last init)."""
    def generic(params, batch):
        return -sum(0.5 * (v**2).sum() + 0.1 * (v**4).sum() for v in flatten(params)[0]), None

    small = {"w": torch.linspace(-1, 1, 3, dtype=DTYPE), "b": torch.tensor(0.5, dtype=DTYPE)}
    large = {"layer": {"weight": torch.linspace(-2, 2, 12, dtype=DTYPE).view(3, 4),
                       "bias": torch.zeros(4, dtype=DTYPE)}}
    shared = build(generic, CONFIGS[name]())
    a, b = shared.init(small, seed=1), shared.init(large, seed=2)
    alone_a, alone_b = build(generic, CONFIGS[name]()), build(generic, CONFIGS[name]())
    ref_a, ref_b = alone_a.init(small, seed=1), alone_b.init(large, seed=2)
    for inplace in (False, True, False):
        a, _ = shared.update(a, None, inplace=inplace)
        b, _ = shared.update(b, None, inplace=inplace)
        ref_a, _ = alone_a.update(ref_a, None, inplace=inplace)
        ref_b, _ = alone_b.update(ref_b, None, inplace=inplace)
        assert_identical(a, ref_a)
        assert_identical(b, ref_b)


def test_layouts_are_bounded_and_an_evicted_layout_is_rebuilt():
    from bayesflow.engine.sde import MAX_LAYOUTS

    def generic(params, batch):
        return -0.5 * (params["w"] ** 2).sum(), None

    shared = build(generic, CONFIGS["SGHMC"]())
    alone = build(generic, CONFIGS["SGHMC"]())
    first = {"w": torch.linspace(-1, 1, 2, dtype=DTYPE)}
    a, ref = shared.init(first, seed=1), alone.init(first, seed=1)
    for size in range(3, 3 + MAX_LAYOUTS + 2):  # more layouts than are kept: the first is evicted
        shared.init({"w": torch.zeros(size, dtype=DTYPE)}, seed=0)
    assert len(shared.update.__self__._layouts) == MAX_LAYOUTS
    for _ in range(3):
        a, _ = shared.update(a, None)
        ref, _ = alone.update(ref, None)
    assert_identical(a, ref)


@pytest.mark.parametrize("name", ["SGHMC", "pSGLD", "chains"])
def test_torch_save_of_the_state_itself_loads_with_weights_only_and_resumes(name):
    """``torch.save(state)`` — the record, not only its state_dict — loads back with
    ``weights_only=True`` (the record is a registered safe global) and resumes bitwise."""
    transform = new_transform(name)
    state = run(transform, new_state(name, transform), 0, 3)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    reference = snapshot(run(transform, state, 3, 6))
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert type(loaded) is type(state)
    assert_identical(snapshot(run(new_transform(name), loaded, 3, 6)), reference)


@pytest.mark.parametrize("name", ["SGHMC", "pSGLD", "chains"])
def test_a_loaded_state_resumes_in_a_transform_that_never_ran_init(name):
    transform = new_transform(name)
    state = run(transform, new_state(name, transform), 0, 3)
    buffer = io.BytesIO()
    torch.save(bayesflow.state_dict(state), buffer)
    reference = snapshot(run(transform, state, 3, 6))
    buffer.seek(0)
    template = new_state(name, new_transform(name), seed=5, params_seed=4)
    resumed = run(new_transform(name), bayesflow.load_state_dict(template, torch.load(buffer, weights_only=True)), 3, 6)
    assert_identical(snapshot(resumed), reference)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_inplace_equals_functional_and_mutates_only_when_asked(name):
    functional_transform, inplace_transform = new_transform(name), new_transform(name)
    functional = new_state(name, functional_transform)
    mutable = new_state(name, inplace_transform)
    pointers = [t.data_ptr() for t in flatten((mutable.params, mutable.momenta, mutable.xi))[0]]
    for step in range(6):
        before = snapshot(functional)
        advanced, aux = functional_transform.update(functional, batch_at(step))
        assert_identical(snapshot(functional), before)  # the input state is untouched
        assert (aux == batch_at(step).sum()).all()
        input_params = mutable.params["w"]
        mutable, _ = inplace_transform.update(mutable, batch_at(step), inplace=True)
        assert mutable.params["w"] is input_params  # the same tensors, updated where they lie
        assert_identical(snapshot(mutable), snapshot(advanced))
        functional = advanced
    assert [t.data_ptr() for t in flatten((mutable.params, mutable.momenta, mutable.xi))[0]] == pointers
    assert not torch.equal(mutable.params["w"], make_params(0, chains=3 if name == "chains" else None)["w"])


ZERO_T = {
    "SGD": lambda: SDEConfig(step_size=0.05, temperature=0.0),
    "SGHMC": lambda: momentum_config(SemiImplicitEuler(), temperature=0.0),
    "BAOAB": lambda: momentum_config(Splitting("BAOAB"), temperature=0.0),
    "OBABO": lambda: momentum_config(Splitting("OBABO"), temperature=0.0),
    "RMSprop": lambda: SDEConfig(step_size=0.05, temperature=0.0, diffusion=Preconditioned(RMS, power=-1.0)),
    "SGNHT": lambda: replace(CONFIGS["SGNHT"](), temperature=0.0),
}


@pytest.mark.parametrize("name", sorted(ZERO_T))
@pytest.mark.parametrize("inplace", [False, True])
def test_zero_temperature_draws_no_random_numbers(name, inplace, monkeypatch):
    transform = build(log_posterior, ZERO_T[name]())
    state = transform.init(make_params(), seed=3)
    if state.momenta is not None:
        assert all(torch.equal(m, torch.zeros_like(m)) for m in state.momenta.values())
    rng, global_rng = state.rng.clone(), torch.random.get_rng_state()

    def forbidden(*args, **kwargs):
        raise AssertionError("random numbers drawn at T = 0")

    start = state.params["w"].clone()
    batches = [batch_at(step) for step in range(5)]
    for module, attribute in ((torch, "randn"), (torch, "randn_like"), (torch, "normal"), (torch.Tensor, "normal_"),
                              (NoiseStream, "normal"), (NoiseStream, "uniform"), (NoiseStream, "begin")):
        monkeypatch.setattr(module, attribute, forbidden)
    for batch in batches:
        state, _ = transform.update(state, batch, inplace=inplace)
    monkeypatch.undo()
    assert torch.equal(state.rng, rng)
    assert torch.equal(torch.random.get_rng_state(), global_rng)
    assert not torch.equal(state.params["w"], start)


def test_zero_temperature_init_without_seed_leaves_torch_rng_untouched():
    transform = build(log_posterior, ZERO_T["SGHMC"]())
    global_rng = torch.random.get_rng_state()
    state = transform.init(make_params())
    assert torch.equal(torch.random.get_rng_state(), global_rng)
    assert all(torch.equal(m, torch.zeros_like(m)) for m in state.momenta.values())


def test_temperature_schedule_is_honored(monkeypatch):
    """T(t) = 0 for t < 3: those steps equal the optimizer and draw nothing; then noise."""
    schedule = lambda step: 0.0 if step < 3 else 0.5  # noqa: E731
    hot = build(log_posterior, SDEConfig(step_size=0.05, temperature=schedule))
    cold = build(log_posterior, SDEConfig(step_size=0.05, temperature=0.0))
    state, optimizer = hot.init(make_params(), seed=1), cold.init(make_params(), seed=1)
    draws = []
    monkeypatch.setattr(NoiseStream, "begin", lambda self, keys, step, purpose=0: draws.append(step))
    for step in range(3):
        state, _ = hot.update(state, batch_at(step))
        optimizer, _ = cold.update(optimizer, batch_at(step))
        assert_identical(state.params, optimizer.params)
    assert draws == []
    monkeypatch.undo()
    state, _ = hot.update(state, batch_at(3))
    optimizer, _ = cold.update(optimizer, batch_at(3))
    assert not torch.equal(state.params["w"], optimizer.params["w"])


def quadratic(x, batch):
    return -0.5 * (x * x).sum(), None


@pytest.mark.parametrize("schedule", [lambda step: 0.3 / (1 + step), Cyclical(initial=0.4, period=4)],
                         ids=["callable", "Cyclical"])
def test_step_size_schedule_is_honored(schedule):
    """At T = 0 on -x²/2: x_{t+1} = (1 - h_t) x_t."""
    transform = build(quadratic, SDEConfig(step_size=schedule, temperature=0.0))
    state = transform.init(torch.tensor([1.0, -2.0], dtype=DTYPE), seed=0)
    expected = state.params.clone()
    for step in range(10):
        state, _ = transform.update(state, None)
        expected = expected * (1 - schedule(step))
        torch.testing.assert_close(state.params, expected, rtol=1e-14, atol=0)
    assert int(state.step) == 10


def test_cyclical_values_and_exploration_temperature(monkeypatch):
    cyc = Cyclical(initial=0.4, period=4)
    assert [cyc(t) for t in range(5)] == pytest.approx([0.4, 0.2 * (math.cos(math.pi / 4) + 1), 0.2,
                                                        0.2 * (math.cos(3 * math.pi / 4) + 1), 0.4], abs=1e-15)
    temperature = Cyclical(initial=1.0, period=4, exploration=0.5)  # T = 0 in the first half of each cycle
    transform = build(quadratic, SDEConfig(step_size=0.1, temperature=temperature))
    state = transform.init(torch.zeros(4, dtype=DTYPE), seed=0)
    draws, begin = [], NoiseStream.begin
    monkeypatch.setattr(NoiseStream, "begin", lambda self, *args: draws.append(args[1]) or begin(self, *args))
    for _ in range(8):
        state, _ = transform.update(state, None)
    assert draws == [step for step in range(8) if temperature(step) != 0.0] and len(draws) == 4


def test_bias_correction_step_scale_is_honored():
    beta, h = 0.9, 0.05
    scales = (("params", BiasCorrection(beta)),)
    transform = build(quadratic, SDEConfig(step_size=h, temperature=0.0, step_scales=scales))
    state = transform.init(torch.tensor([2.0], dtype=DTYPE), seed=0)
    expected = state.params.clone()
    for step in range(5):
        state, _ = transform.update(state, None)
        expected = expected * (1 - h / (1 - beta ** (step + 1)))
    torch.testing.assert_close(state.params, expected, rtol=1e-14, atol=0)
