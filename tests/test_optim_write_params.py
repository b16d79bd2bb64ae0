"""``init(share=True)`` / ``update(write_params=True)`` of bayesflow.optim's gradient transformations: the step
written straight into the caller's tensors (no increments), as ``bayesflow.vi`` uses it.

The written trajectory is the preset's own engine trajectory bitwise (the same step on the same θ), and the
increments route ``θ + (θ' - θ)`` stays within one rounding per step of it; bad calls are refused before
anything is written, a refused step writes nothing, and gradients that share memory with the parameters
are not written over.
"""

from __future__ import annotations

import optree
import pytest
import torch
import torchopt

from bayesflow import vi
from bayesflow.optim import adam, sgd

TARGET = torch.tensor([1.0, -2.0, 0.5, 3.0])


def loss_gradient(params):
    return {"w": params["w"] - TARGET, "b": 2.0 * params["b"]}   # ∇ of |w - t|²/2 + b²


def log_posterior(params, batch):
    return -0.5 * ((params["w"] - TARGET) ** 2).sum() - (params["b"] ** 2).sum(), None


def start():
    return {"w": torch.zeros(4), "b": torch.full((2, 3), 0.5)}


@pytest.mark.parametrize("module, hyper", [(adam, dict(lr=0.05, weight_decay=0.01)),
                                           (sgd, dict(lr=0.05, momentum=0.9, nesterov=True))])
def test_written_steps_are_the_presets_own_steps(module, hyper):
    tx = module.transformation(**hyper)
    params = start()
    state = tx.init(params, share=True)
    assert state.params["w"] is params["w"]          # shared, not copied
    engine = module.build(log_posterior, **hyper)
    reference = engine.init(start())
    increments_params = start()
    increments_state = tx.init(increments_params)
    for _ in range(25):
        updates, state = tx.update(loss_gradient(params), state, params=params, write_params=True)
        assert updates is None
        reference, _ = engine.update(reference, None)
        grads = loss_gradient(increments_params)
        steps, increments_state = tx.update(grads, increments_state, params=increments_params)
        increments_params = torchopt.apply_updates(increments_params, steps)
    for key in params:
        assert state.params[key] is params[key]
        assert torch.equal(params[key], reference.params[key])
        torch.testing.assert_close(increments_params[key], params[key], rtol=0, atol=1e-6)


def test_unshared_state_is_pointed_at_the_callers_tensors():
    tx = adam.transformation(lr=0.1)
    params = start()
    state = tx.init(params)                          # a copy
    assert state.params["w"] is not params["w"]
    before = {k: v.clone() for k, v in params.items()}
    _, new = tx.update(loss_gradient(params), state, params=params, write_params=True)
    assert new is not state and new.params["w"] is params["w"]
    assert not torch.equal(params["w"], before["w"])
    assert torch.equal(state.params["w"], before["w"])   # the old record's copy is not written


def test_bad_calls_are_refused_before_anything_is_written():
    tx = adam.transformation(lr=0.1)
    params = start()
    state = tx.init(params, share=True)
    before = {k: v.clone() for k, v in params.items()}
    grads = loss_gradient(params)
    with pytest.raises(ValueError, match="pass params= and inplace=True"):
        tx.update(grads, state, write_params=True)
    with pytest.raises(ValueError, match="pass params= and inplace=True"):
        tx.update(grads, state, params=params, inplace=False, write_params=True)
    with pytest.raises(TypeError, match="write_params must be True or False"):
        tx.update(grads, state, params=params, write_params="yes")
    with pytest.raises(ValueError, match="must match the optimizer state's leaves"):
        tx.update(grads, state, params={"w": torch.zeros(5), "b": torch.zeros(2, 3)}, write_params=True)
    with pytest.raises(ValueError, match="leaves"):
        tx.update({"w": grads["w"]}, state, params=params, write_params=True)
    with pytest.raises(TypeError, match="share must be True or False"):
        tx.init(params, share=1)
    for key in params:
        assert torch.equal(params[key], before[key])


def test_a_refused_step_writes_nothing_and_gradients_on_the_parameters_are_not_written_over():
    tx = adam.transformation(lr=0.1, check_finite="full", on_nonfinite="reject")
    params = start()
    state = tx.init(params, share=True)
    before = {k: v.clone() for k, v in params.items()}
    grads = loss_gradient(params)
    grads["w"][1] = float("nan")
    _, state = tx.update(grads, state, params=params, write_params=True)
    for key in params:
        assert torch.equal(params[key], before[key])
    # the gradient *is* a parameter tensor: it is negated into a new buffer, not in place
    twin = sgd.transformation(lr=0.1)
    p = {"w": torch.ones(3)}
    s = twin.init(p, share=True)
    twin.update({"w": p["w"]}, s, params=p, write_params=True)
    torch.testing.assert_close(p["w"], torch.full((3,), 0.9))   # 1 - 0.1 · 1


def test_vi_in_place_writes_through_and_equals_the_functional_steps():
    def target(params, batch):
        return -0.5 * (((params["w"] - TARGET) / 0.3) ** 2).sum(), None

    for module, shared_index in ((vi.diag, "log_sd_diag"), (vi.dense, "L_factor")):
        runs = []
        for inplace in (False, True):
            transform = module.build(target, adam.transformation(lr=0.05))
            state = transform.init({"w": torch.zeros(4)}, seed=1)
            mean = state.params["w"]
            for _ in range(60):
                state, _ = transform.update(state, None, inplace=inplace)
            runs.append(state)
        functional, written = runs
        assert written.params["w"] is mean                       # in place: the same tensors, written
        assert written.opt_state.params[0]["w"] is written.params["w"]
        assert torch.equal(functional.params["w"], written.params["w"])
        torch.testing.assert_close(getattr(functional, shared_index), getattr(written, shared_index),
                                   rtol=0, atol=0)
    # a state whose optimizer copy is not shared (e.g. cloned) still steps in place, to the same numbers
    transform = vi.diag.build(target, adam.transformation(lr=0.05))
    a = transform.init({"w": torch.zeros(4)}, seed=2)
    b = optree.tree_map(torch.clone, a, namespace="bayesflow")   # every tensor its own copy
    assert b.opt_state.params[0]["w"] is not b.params["w"]
    for _ in range(5):
        a, _ = transform.update(a, None, inplace=True)
        b, _ = transform.update(b, None, inplace=True)
    assert torch.equal(a.params["w"], b.params["w"]) and torch.equal(a.log_sd_diag["w"], b.log_sd_diag["w"])
