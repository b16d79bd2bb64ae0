"""posteriors code runs after changing the import: module access, type names, states that act like
tensors, module-level init/update, state class names (issue 9)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import bayesflow
from bayesflow.ensemble import lift
from bayesflow.sgmcmc import baoa, sghmc, sgld, sglrw, sgnht

F64 = torch.float64


def quadratic(p, batch):
    return -0.5 * (p * p).sum(), torch.tensor([])


def test_import_bayesflow_makes_every_method_family_available():
    code = ("import bayesflow; bayesflow.sgmcmc.sgld.build; bayesflow.optim.build; bayesflow.torchopt.build; "
            "bayesflow.ensemble.lift; bayesflow.types.LogProbFn; bayesflow.tree_utils.tree_insert_; "
            "bayesflow.utils.cumulative_mean_and_cov")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_posteriors_type_names():
    assert bayesflow.types.LogProbFn is bayesflow.types.LogPosterior
    assert bayesflow.TensorTree is bayesflow.types.TensorTree and bayesflow.Transform is bayesflow.types.Transform
    assert (sgld.SGLDState is sghmc.SGHMCState is sgnht.SGNHTState is baoa.BAOAState is sglrw.SGLRWState
            is bayesflow.SDEState)


def test_states_stack_cat_unsqueeze_and_index_leafwise():
    transform = sghmc.build(quadratic, lr=0.1, alpha=1.0)
    states = [transform.init(torch.full((3,), float(k)), seed=k) for k in range(4)]
    stacked = torch.stack(states)
    assert stacked.params.shape == (4, 3) and stacked.momenta.shape == (4, 3) and stacked.step.shape == (4,)
    assert torch.equal(stacked[2].params, states[2].params) and torch.equal(stacked[2].rng, states[2].rng)
    trace = torch.unsqueeze(states[0], 0)
    for state in states[1:]:
        trace = torch.cat((trace, torch.unsqueeze(state, 0)), dim=0)
    assert trace.params.shape == (4, 3) and trace[1:].params.shape == (3, 3)
    assert set(states[0].to_dict()) == set(bayesflow.SDEState._fields)
    assert torch.equal(states[0].to_dict()["params"], states[0].params)
    with pytest.raises(ValueError, match="different structures"):
        torch.stack([states[0], sgld.build(quadratic, lr=0.1).init(torch.zeros(3), seed=0)])


def test_a_stack_of_single_chain_states_is_a_k_chain_state():
    """Advancing torch.stack of K single states with the lifted transform equals advancing each alone,
    and state[k] of the batched run continues in the single-chain transform as chain k."""
    single = sghmc.build(quadratic, lr=0.1, alpha=1.0, temperature=0.5)
    starts = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    states = [single.init(starts[k].clone(), seed=20 + k) for k in range(3)]
    batched = lift(single, 3)
    stacked = torch.stack(states)
    for _ in range(5):
        stacked, _ = batched.update(stacked, None)
    for k in range(3):
        chain = states[k]
        for _ in range(5):
            chain, _ = single.update(chain, None)
        torch.testing.assert_close(stacked.params[k], chain.params, rtol=1e-13, atol=1e-15)
        ahead, _ = single.update(stacked[k], None)
        chain, _ = single.update(chain, None)
        torch.testing.assert_close(ahead.params, chain.params, rtol=1e-13, atol=1e-15)


def test_chains_at_different_steps_are_refused():
    single = sgld.build(quadratic, lr=0.1)
    a = single.init(torch.zeros(2), seed=0)
    b, _ = single.update(single.init(torch.zeros(2), seed=1), None)
    with pytest.raises(ValueError, match=r"different steps \(step = \[0, 1\]\)"):
        lift(single, 2).update(torch.stack([a, b]), None)
    # at the same step, but one chain had a step refused: the message says so, not "different steps"
    a, _ = single.update(a, None)
    refused = b._replace(rejected=torch.ones_like(b.rejected))
    with pytest.raises(ValueError, match=r"different counts of refused steps \(rejected = \[0, 1\]\)"):
        lift(single, 2).update(torch.stack([a, refused]), None)


@pytest.mark.parametrize(("module", "arguments"), [
    (sgld, dict(lr=0.05, temperature=0.5)),
    (sghmc, dict(lr=0.05, alpha=1.0, temperature=0.5)),
    (sgnht, dict(lr=0.05, alpha=1.0, temperature=0.5)),
    (baoa, dict(lr=0.05, alpha=1.0, temperature=0.5)),
    (sglrw, dict(lr=0.05, temperature=0.5)),
])
def test_module_level_init_and_update_equal_the_transform(module, arguments):
    """posteriors' ``module.update(state, batch, log_posterior, **hyper)`` is ``build(...).update``;
    module init starts the momenta at zero (posteriors' convention)."""
    state = module.init(torch.ones(4, dtype=F64), seed=5)
    if state.momenta is not None:
        assert torch.equal(state.momenta, torch.zeros(4, dtype=F64))
    transform = module.build(quadratic, **arguments)
    expected = state
    for _ in range(3):
        state, _ = module.update(state, None, quadratic, **arguments)
        expected, _ = transform.update(expected, None)
    assert torch.equal(state.params, expected.params)
    inplace = module.init(torch.ones(4, dtype=F64), seed=5)
    out, _ = module.update(inplace, None, quadratic, inplace=True, **arguments)
    assert out.params is inplace.params and int(inplace.step) == 1


def test_module_level_init_without_seed_uses_torch_global_generator():
    torch.manual_seed(0)
    a = sgld.init(torch.zeros(2))
    torch.manual_seed(0)
    b = sgld.init(torch.zeros(2))
    c = sgld.init(torch.zeros(2))
    assert torch.equal(a.rng, b.rng) and not torch.equal(b.rng, c.rng)
