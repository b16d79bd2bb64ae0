"""Randomness: a state alone determines its future, and every draw is independent of every other.

Regression tests for issue 9 (items 1, 2, 3, 8, 9): each failed on the generator-state design it
replaces. Statistical tolerances are k Monte-Carlo standard errors (k stated).
"""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow import load_state_dict, state_dict
from bayesflow.ensemble import lift, replicate
from bayesflow.sgmcmc import baoab, obabo, sghmc, sgld

F64 = torch.float64


def flat_zero(p, batch):
    return 0 * p.sum(), None


def quadratic(p, batch):
    if batch == "nan":
        return -0.5 * (p * p).sum() * torch.tensor(float("nan"), dtype=p.dtype), None
    return -0.5 * (p * p).sum(), None


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))


# ----- item 1: the first step does not reuse the initial momenta's numbers -------------------------
def test_first_step_noise_is_independent_of_the_initial_momenta():
    """The issue's example: with a flat log posterior, m₁ = 0.9·m₀ + sqrt(0.2)·ξ must keep Var 1 (not 1.9)
    and ξ must not equal m₀."""
    n = 20000
    t = sghmc.build(flat_zero, lr=0.1, alpha=1.0, temperature=1.0)
    s0 = t.init(torch.zeros(n, dtype=F64), seed=0)
    s1, _ = t.update(s0, None)
    xi = (s1.momenta - 0.9 * s0.momenta) / 0.2**0.5
    assert not torch.equal(xi, s0.momenta)
    se = math.sqrt(2 / n)  # standard error of a unit variance estimated from n normals
    assert abs(float(s1.momenta.var()) - 1.0) < 5 * se
    assert abs(correlation(xi, s0.momenta)) < 5 / math.sqrt(n)


def test_first_step_noise_is_independent_of_the_initial_momenta_in_chains():
    n, chains = 5000, 4
    t = lift(sghmc.build(flat_zero, lr=0.1, alpha=1.0, temperature=1.0), chains)
    s0 = t.init(torch.zeros(chains, n, dtype=F64), seed=0)
    s1, _ = t.update(s0, None)
    xi = (s1.momenta - 0.9 * s0.momenta) / 0.2**0.5
    assert abs(float(s1.momenta.var()) - 1.0) < 5 * math.sqrt(2 / (n * chains))
    assert abs(correlation(xi, s0.momenta)) < 5 / math.sqrt(n * chains)


# ----- item 2: after a refused step the state continues as a checkpoint of it would ---------------
@pytest.mark.parametrize("preset", [baoab, obabo], ids=["baoab", "obabo"])
@pytest.mark.parametrize("policy", ["raise", "reject"])
def test_a_refused_step_does_not_shift_the_noise(preset, policy, tmp_path):
    transform = preset.build(quadratic, lr=0.1, alpha=1.0, temperature=1.0, on_nonfinite=policy)
    state = transform.init(torch.randn(50, dtype=F64, generator=torch.Generator().manual_seed(1)), seed=3)
    state, _ = transform.update(state, None)
    torch.save(state_dict(state), tmp_path / "state.pt")
    if policy == "raise":
        with pytest.raises(FloatingPointError):
            transform.update(state, "nan")
        after, _ = transform.update(state, None)
    else:
        refused, _ = transform.update(state, "nan")
        assert int(refused.rejected) == 1 and int(refused.step) == int(state.step) + 1
        after, _ = transform.update(state, None)  # the caller's state itself, as it was
    fresh = preset.build(quadratic, lr=0.1, alpha=1.0, temperature=1.0, on_nonfinite=policy)
    resumed = load_state_dict(fresh.init(torch.zeros(50, dtype=F64)), torch.load(tmp_path / "state.pt",
                                                                                 weights_only=True))
    expected, _ = fresh.update(resumed, None)
    assert torch.equal(after.params, expected.params) and torch.equal(after.momenta, expected.momenta)


# ----- item 3: in place, a refused (or failed) step leaves the state as it was ------------------
@pytest.mark.parametrize("preset", [baoab, obabo], ids=["baoab", "obabo"])
@pytest.mark.parametrize("policy", ["raise", "reject"])
def test_in_place_refusal_of_a_mid_step_word_leaves_the_state_whole(preset, policy):
    transform = preset.build(quadratic, lr=0.1, alpha=1.0, temperature=1.0, on_nonfinite=policy)
    state = transform.init(torch.randn(20, dtype=F64, generator=torch.Generator().manual_seed(1)), seed=3)
    state, _ = transform.update(state, None, inplace=True)
    before = [t.clone() for t in (state.params, state.momenta, *state.gradient)]
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="not finite"):
            transform.update(state, "nan", inplace=True)
        returned = state
    else:
        returned, _ = transform.update(state, "nan", inplace=True)
        assert returned.params is state.params and int(returned.rejected) == 1
    for old, new in zip(before, (returned.params, returned.momenta, *returned.gradient)):
        assert torch.equal(old, new)
    # and the state goes on as its functional twin does
    twin = returned._replace(params=returned.params.clone(), momenta=returned.momenta.clone(),
                             step=returned.step.clone(), log_posterior=returned.log_posterior.clone())
    a, _ = transform.update(returned, None, inplace=True)
    b, _ = transform.update(twin, None)
    assert torch.equal(a.params, b.params)


def test_a_log_posterior_that_raises_mid_step_leaves_an_in_place_state_whole():
    calls = []

    def flaky(p, batch):
        calls.append(1)
        if len(calls) == 3:  # the first step evaluates at its start and end, the second at its end
            raise RuntimeError("the data loader broke")
        return -0.5 * (p * p).sum(), None

    transform = baoab.build(flaky, lr=0.1, alpha=1.0, temperature=1.0)
    state = transform.init(torch.ones(5, dtype=F64), seed=0)
    state, _ = transform.update(state, None, inplace=True)
    before = state.params.clone(), state.momenta.clone()
    with pytest.raises(RuntimeError, match="loader"):
        transform.update(state, None, inplace=True)
    assert torch.equal(state.params, before[0]) and torch.equal(state.momenta, before[1])


# ----- item 8: starting points and dynamics draw independent numbers from one seed ---------------
def test_replicate_and_init_with_one_seed_draw_independent_numbers():
    n, sigma, h = 20000, 0.1, 0.5
    ensemble = lift(sgld.build(flat_zero, lr=h, temperature=1.0), 2)
    start = replicate(torch.zeros(n, dtype=F64), 2, perturbation=sigma, seed=0)
    state = ensemble.init(start, seed=0)
    after, _ = ensemble.update(state, None)
    perturbation = start[0] / sigma
    first_noise = (after.params[0] - start[0]) / math.sqrt(2 * h)
    assert not torch.allclose(perturbation, first_noise)
    assert abs(correlation(perturbation, first_noise)) < 5 / math.sqrt(n)


# ----- item 9: per-chain float64 runs keep float64 precision -------------------------------------
@pytest.mark.parametrize("per_chain_lr", [False, True])
@pytest.mark.parametrize("preset", [sgld, sghmc], ids=["sgld", "sghmc"])
def test_per_chain_float64_chains_equal_single_chains(preset, per_chain_lr):
    """A float step size with per-chain temperatures used to enter the noise scale as a float32 tensor
    (chains off by ~1e-9 from single float64 runs)."""
    temperatures = torch.tensor([0.3, 1.0, 2.5], dtype=F64)
    steps = [0.05, 0.1, 0.02] if per_chain_lr else [0.1] * 3
    lr = torch.tensor(steps, dtype=F64) if per_chain_lr else None
    ensemble = lift(preset.build(quadratic, lr=0.1, temperature=1.0), 3, temperature=temperatures, step_size=lr)
    start = torch.randn(3, 7, dtype=F64, generator=torch.Generator().manual_seed(0))
    state = ensemble.init(start.clone(), seed=10)
    for _ in range(20):
        state, _ = ensemble.update(state, None)
    for k in range(3):
        single = preset.build(quadratic, lr=steps[k], temperature=float(temperatures[k]))
        chain = single.init(start[k].clone(), seed=10 + k)
        for _ in range(20):
            chain, _ = single.update(chain, None)
        torch.testing.assert_close(state.params[k], chain.params, rtol=1e-13, atol=1e-15)


# ----- a state determines its future ----------------------------------------------------------------
def test_the_same_state_twice_gives_the_same_step_and_a_copy_continues_identically():
    transform = sghmc.build(quadratic, lr=0.1, alpha=1.0, temperature=1.0)
    state = transform.init(torch.zeros(10, dtype=F64), seed=4)
    a, _ = transform.update(state, None)
    b, _ = transform.update(state, None)
    assert torch.equal(a.params, b.params)
    other = sghmc.build(quadratic, lr=0.1, alpha=1.0, temperature=1.0)  # another transform, same state
    c, _ = other.update(state, None)
    assert torch.equal(a.params, c.params)


def test_consecutive_steps_draw_different_numbers():
    transform = sgld.build(flat_zero, lr=0.5, temperature=1.0)
    state = transform.init(torch.zeros(1000, dtype=F64), seed=0)
    increments = []
    for _ in range(3):
        new, _ = transform.update(state, None)
        increments.append(new.params - state.params)
        state = new
    assert abs(correlation(increments[0], increments[1])) < 5 / math.sqrt(1000)
    assert not torch.equal(increments[1], increments[2])


# ----- seeds: torch's range, and None means torch's global generator everywhere -------------------
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_seeds_outside_torchs_range_are_refused_not_wrapped(seed):
    transform = sgld.build(quadratic, lr=0.1)
    with pytest.raises(ValueError, match=r"outside \[-2\*\*63, 2\*\*64\)"):
        transform.init(torch.zeros(2), seed=seed)
    with pytest.raises(ValueError, match="outside"):
        replicate(torch.zeros(2), 2, perturbation=1.0, seed=seed)
    with pytest.raises(ValueError, match="chain k's seed is seed \\+ k"):  # the last chain's seed is out
        lift(transform, 3).init(torch.zeros(3, 2), seed=2**64 - 2)


def test_the_ends_of_torchs_seed_range_are_seeds():
    transform = sgld.build(quadratic, lr=0.1)
    for seed in (2**64 - 1, -(2**63)):
        transform.init(torch.zeros(2), seed=seed)
    # two's complement, as torch.manual_seed: -1 and 2**64 - 1 are one seed
    assert torch.equal(transform.init(torch.zeros(2), seed=-1).rng, transform.init(torch.zeros(2), seed=2**64 - 1).rng)


def test_replicate_without_a_seed_draws_it_from_torchs_global_generator():
    def spread():
        return replicate(torch.zeros(4, dtype=F64), 3, perturbation=1.0)

    torch.manual_seed(5)
    first = spread()
    torch.manual_seed(5)
    assert torch.equal(spread(), first)  # reproducible from torch's seed, as init(seed=None)
    assert not torch.equal(spread(), first)  # and not one fixed seed for every call
    with pytest.raises(TypeError, match="seed must be an int or None"):
        replicate(torch.zeros(2), 2, perturbation=1.0, seed=1.5)
