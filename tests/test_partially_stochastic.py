"""Per-parameter-group temperatures (engine.groups): optimize a backbone and sample a head in one step.

Checks: the T = 0 group follows torch.optim exactly; the sampled group draws exactly the numbers a
head-only chain draws (so the cold group draws none), and keeps its exact stationary law (SGLD's
Euler-discretised Gaussian law, closed form); bad configurations are refused.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bayesflow.engine import Block, Dense, build
from bayesflow.sgmcmc import baoab, psgld, sghmc, sgld, sglrw, sgnht

TARGET = torch.tensor([1.0, -2.0, 0.5])
HEAD_MEAN, HEAD_PREC = torch.tensor([0.3, -0.7]), 4.0


def _separable(params, batch):
    """body: a quadratic bowl around TARGET; head: N(HEAD_MEAN, I / HEAD_PREC). They do not interact."""
    body = -0.5 * ((params["body.weight"] - TARGET) ** 2).sum()
    head = -0.5 * HEAD_PREC * ((params["head.weight"] - HEAD_MEAN) ** 2).sum()
    return body + head, torch.tensor([])


def _params():
    return {"body.weight": torch.zeros(3), "head.weight": torch.zeros(2)}


@settings(max_examples=15, deadline=None)
@given(lr=st.floats(0.01, 0.5), momentum=st.floats(0.0, 0.95), steps=st.integers(1, 12))
def test_cold_group_is_torch_sgd_with_momentum(lr, momentum, steps):
    """SGD(lr=η, momentum=μ) = sghmc(lr=√η, alpha=(1 - μ)/√η, T=0) on the body, while the head samples."""
    h = math.sqrt(lr)
    transform = sghmc.build(_separable, lr=h, alpha=(1 - momentum) / h,
                            temperature={"head.*": 1.0, "*": 0.0})
    state = transform.init(_params(), seed=3)
    body = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.SGD([body], lr=lr, momentum=momentum)
    for _ in range(steps):
        state, _ = transform.update(state, None)
        optimizer.zero_grad()
        (0.5 * ((body - TARGET) ** 2).sum()).backward()
        optimizer.step()
        torch.testing.assert_close(state.params["body.weight"], body.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(state.params["head.weight"], torch.zeros(2))   # the head did move at random


def test_cold_group_draws_no_random_numbers():
    """The head's trajectory is bitwise the one of a head-only chain with the same seed."""
    mixed = sghmc.build(_separable, lr=0.1, alpha=1.0, temperature={"head.*": 0.5, "*": 0.0})
    alone = sghmc.build(lambda p, b: (-0.5 * HEAD_PREC * ((p["head.weight"] - HEAD_MEAN) ** 2).sum(),
                                      torch.tensor([])), lr=0.1, alpha=1.0, temperature=0.5)
    state = mixed.init(_params(), seed=11)
    head = alone.init({"head.weight": torch.zeros(2)}, seed=11)
    assert torch.equal(state.momenta["head.weight"], head.momenta["head.weight"])   # N(0, T M) at init
    assert torch.equal(state.momenta["body.weight"], torch.zeros(3))                # T = 0: at rest
    for _ in range(20):
        state, _ = mixed.update(state, None)
        head, _ = alone.update(head, None)
    assert torch.equal(state.params["head.weight"], head.params["head.weight"])


def test_all_cold_groups_are_the_optimizer():
    cold = sgld.build(_separable, lr=0.05, temperature={"*": 0.0})
    plain = sgld.build(_separable, lr=0.05, temperature=0.0)
    a, b = cold.init(_params()), plain.init(_params())
    for _ in range(5):
        a, _ = cold.update(a, None)
        b, _ = plain.update(b, None)
    for key in a.params:
        assert torch.equal(a.params[key], b.params[key])


def _sgld_variance(h: float, precision: float, temperature: float) -> float:
    """Euler–Maruyama on N(μ, T/λ): x' = x - hλ(x - μ) + √(2hT) ξ has stationary variance 2hT/(1 - (1 - hλ)²)."""
    return 2 * h * temperature / (1 - (1 - h * precision) ** 2)


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_sampled_group_keeps_its_exact_law(temperature):
    """K independent chains of SGLD: the head's mean and variance match the closed form within MC error."""
    K, h, steps = 500, 0.1, 60
    transform = build(_separable, sgld.config(lr=h, temperature={"head.*": temperature, "*": 0.0}), chains=K)
    params = {"body.weight": torch.zeros(K, 3), "head.weight": torch.zeros(K, 2)}
    state = transform.init(params, seed=0)
    for _ in range(steps):   # (1 - hλ)^60 = 0.6^60 ≈ 5e-14: the start is forgotten
        state, _ = transform.update(state, None)
    head = state.params["head.weight"]
    var = _sgld_variance(h, HEAD_PREC, temperature)
    # chains are independent: the sample mean has s.e. √(var/K), the sample variance √(2/K)·var
    assert ((head.mean(0) - HEAD_MEAN).abs() < 4 * math.sqrt(var / K)).all()
    assert ((head.var(0) / var - 1).abs() < 4 * math.sqrt(2 / K)).all()
    wrong = _sgld_variance(h, HEAD_PREC, 2 * temperature)   # a wrong temperature is caught
    assert ((head.var(0) / wrong - 1).abs() > 4 * math.sqrt(2 / K)).all()
    body = TARGET * (1 - (1 - h) ** steps)   # gradient descent on the bowl, no noise at all
    torch.testing.assert_close(state.params["body.weight"], body.expand(K, 3), rtol=1e-5, atol=1e-6)


def test_groups_with_different_temperatures_and_psgld():
    transform = psgld.build(_separable, lr=0.01, temperature={"head.*": 0.5, "body.*": 0.1})
    state = transform.init(_params(), seed=0)
    for _ in range(3):
        state, _ = transform.update(state, None)
    assert all(bool(torch.isfinite(v).all()) for v in state.params.values())
    # an OU step (BAOAB) per group: cold momenta stay deterministic
    transform = baoab.build(_separable, lr=0.1, temperature={"head.*": 1.0, "*": 0.0})
    state = transform.init(_params(), seed=0)
    state, _ = transform.update(state, None)
    ref = baoab.build(_separable, lr=0.1, temperature=0.0)
    cold = ref.init(_params(), seed=0)
    cold, _ = ref.update(cold, None)
    assert torch.equal(state.params["body.weight"], cold.params["body.weight"])


def test_bad_group_configurations():
    with pytest.raises(ValueError, match=r"no temperature pattern matches the parameter 'body\.weight'"):
        sgld.build(_separable, lr=0.1, temperature={"head.*": 1.0}).init(_params())
    with pytest.raises(ValueError, match=r"temperature\['head.\*'\] must be a finite non-negative"):
        sgld.build(_separable, lr=0.1, temperature={"head.*": -1.0, "*": 0.0})
    with pytest.raises(TypeError, match="patterns must be strings"):
        sgld.build(_separable, lr=0.1, temperature={1: 1.0})
    with pytest.raises(TypeError, match="non-empty dict"):
        sgld.build(_separable, lr=0.1, temperature={})
    with pytest.raises(ValueError, match="not supported by this preset"):
        sgnht.build(_separable, lr=0.1, temperature={"*": 1.0})
    with pytest.raises(ValueError, match="not supported by this preset"):
        sglrw.build(_separable, lr=0.1, temperature={"*": 1.0})
    with pytest.raises(ValueError, match="one temperature, not per-group"):
        sghmc.build(_separable, lr=0.1, beta=0.1, temperature={"*": 1.0})
    dense = Block({("params", "params"): Dense(torch.eye(5))})
    with pytest.raises(ValueError, match="act leaf by leaf"):
        build(_separable, step_size=0.1, diffusion=dense, temperature={"*": 1.0})


def test_per_group_temperatures_with_per_chain_step_sizes_are_refused_at_build():
    """Refused when the transform is built, not in the step's noise draw (after θ is half-written)."""
    from bayesflow.ensemble import lift
    single = sgld.build(_separable, lr=0.1, temperature={"head.*": 1.0, "*": 0.0})
    with pytest.raises(ValueError, match="per-group temperatures take a scalar step size"):
        lift(single, 2, step_size=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="per-group temperatures take a scalar step size"):
        build(_separable, step_size=torch.tensor([0.1, 0.2]), temperature={"*": 1.0}, chains=2)
    lift(single, 2, step_size=0.2)   # one step size for every chain is fine
