"""Regression tests for the engine audit of stop 26: shared tensors, half-written states, unchecked flags."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import bayesflow
from bayesflow import load_state_dict, state_dict
from bayesflow.ensemble import replicate
from bayesflow.optim import adam, sgd
from bayesflow.sgmcmc import sghmc, sgld

F64 = torch.float64
TARGET = torch.tensor([1.0, -2.0, 0.5], dtype=F64)


def log_posterior(p, batch):
    if isinstance(batch, str):
        return -0.5 * (p * p).sum() * torch.tensor(float("nan"), dtype=p.dtype), None
    return -0.5 * ((p - batch) ** 2).sum(), None


def test_a_refused_functional_step_owns_its_tensors():
    transform = sgd.build(log_posterior, lr=0.1, momentum=0.9, on_nonfinite="reject")
    first, _ = transform.update(transform.init(torch.zeros(3, dtype=F64)), TARGET)
    kept = [t.clone() for t in (first.params, first.momenta, first.log_posterior)]
    refused, _ = transform.update(first, "nan")
    transform.update(refused, TARGET, inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(kept, (first.params, first.momenta, first.log_posterior)))


def test_a_step_without_a_value_does_not_share_the_log_posterior():
    transform = adam.build(log_posterior, lr=0.1)
    first = transform.step(transform.init(torch.zeros(3, dtype=F64)), grads=TARGET.clone(), log_posterior=-1.0)
    second = transform.step(first, grads=TARGET.clone())
    transform.step(second, grads=TARGET.clone(), inplace=True, log_posterior=-7.0)
    assert float(first.log_posterior) == -1.0


def test_a_caller_value_of_the_wrong_shape_is_refused_before_anything_is_written():
    transform = adam.build(log_posterior, lr=0.1)
    state = transform.init(torch.zeros(3, dtype=F64))
    before = [t.clone() for t in bayesflow.tree.tree_leaves(state)]
    with pytest.raises(ValueError, match=r"log_posterior must have shape \(\)"):
        transform.step(state, grads=TARGET.clone(), inplace=True, log_posterior=torch.tensor([1.0, 2.0]))
    for a, b in zip(before, bayesflow.tree.tree_leaves(state)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_a_functional_state_keeps_the_dtype_of_its_log_posterior_and_reloads(tmp_path):
    transform = adam.build(log_posterior, lr=0.1)
    state = transform.step(transform.init(torch.zeros(3, dtype=F64)), grads=TARGET.clone(), log_posterior=-1.5)
    assert state.log_posterior.dtype == F64 and float(state.log_posterior) == -1.5
    torch.save(state_dict(state), tmp_path / "s.pt")
    loaded = load_state_dict(transform.init(torch.zeros(3, dtype=F64)), torch.load(tmp_path / "s.pt"))
    assert torch.equal(loaded.log_posterior, state.log_posterior)


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_inplace_must_be_a_bool(flag):
    transform = sgld.build(log_posterior, lr=0.1, temperature=0.0)
    state = transform.init(torch.zeros(3, dtype=F64))
    with pytest.raises(TypeError, match="inplace must be True or False"):
        transform.update(state, TARGET, inplace=flag)
    with pytest.raises(TypeError, match="inplace must be True or False"):
        transform.step(state, TARGET.clone(), inplace=flag)


def test_gamma_and_step_scales_are_checked_by_the_config():
    config = sghmc.config(lr=0.1, alpha=0.5, temperature=0.0)
    with pytest.raises(TypeError, match="gamma must be True or False"):
        replace(config, gamma="no")
    with pytest.raises(TypeError, match=r"step_scales\['params'\] must be a schedule"):
        replace(config, step_scales=(("params", 2.0),))


def test_a_bad_temperature_pattern_leaves_no_half_built_layout():
    def tree_posterior(p, batch):
        return -0.5 * (p["a"] ** 2).sum() - 0.5 * (p["b"] ** 2).sum(), None

    transform = sgld.build(tree_posterior, lr=0.1, temperature={"haed*": 1.0, "*": 0.0})
    params = {"a": torch.zeros(2), "b": torch.zeros(2)}
    for _ in range(2):  # the second init says the same, not an AttributeError
        with pytest.raises(ValueError, match="matches no parameter"):
            transform.init(params, seed=0)


def test_num_data_as_a_numpy_scalar_or_a_one_element_tensor():
    np = pytest.importorskip("numpy")

    def tree_posterior(p, batch):
        return -0.5 * (p["a"] ** 2).sum() - 0.5 * (p["b"] ** 2).sum(), None

    params = {"a": torch.ones(2, dtype=F64), "b": torch.ones(2, dtype=F64)}
    reference = sgld.build(tree_posterior, lr=0.1, num_data=100, temperature=0.0)
    expected, _ = reference.update(reference.init(params, seed=0), None)
    for num_data in (np.int64(100), torch.tensor(100.0)):
        transform = sgld.build(tree_posterior, lr=0.1, num_data=num_data, temperature=0.0)
        state, _ = transform.update(transform.init(params, seed=0), None)
        assert torch.equal(state.params["a"], expected.params["a"])


def test_a_zero_dim_tensor_schedule_value_is_checked():
    transform = sghmc.build(log_posterior, lr=lambda step: torch.tensor(float("nan")), temperature=0.0)
    state = transform.init(torch.zeros(3, dtype=F64), seed=0)
    with pytest.raises(ValueError, match="the step size schedule returned nan at step 0"):
        transform.update(state, TARGET)


def test_replicate_draws_from_torchs_generator_only_when_it_perturbs():
    before = torch.get_rng_state()
    replicate(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="non-negative standard deviation"):
        replicate(torch.zeros(3), 2, perturbation=-1.0)
    assert torch.equal(torch.get_rng_state(), before)


def _face_with_two_groups():
    model = torch.nn.Linear(3, 2).double()
    face = bayesflow.integrations.as_optimizer(sgd.build, [{"params": [model.weight]}, {"params": [model.bias]}],
                                               lr=0.1, momentum=0.9)
    return model, face


def test_the_face_checks_every_group_before_moving_any():
    model, face = _face_with_two_groups()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()
    face.step()
    before = [p.detach().clone() for p in model.parameters()]
    steps = int(face.param_groups[0]["engine"]["step"])
    face.param_groups[1]["lr"] = float("nan")
    with pytest.raises(ValueError, match="param group 1"):
        face.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert int(face.param_groups[0]["engine"]["step"]) == steps


def test_the_face_refuses_a_seed_outside_torchs_range_at_construction():
    model = torch.nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match="param group 1 the seed"):
        bayesflow.integrations.as_optimizer(sgd.build, [{"params": [model.weight]}, {"params": [model.bias]}],
                                            lr=0.1, seed=2**64 - 1)


@pytest.mark.parametrize("compile", [False, "replay"])
@pytest.mark.parametrize("inplace", [False, True])
def test_a_step_scale_schedules_value_is_checked_before_the_step_writes(compile, inplace):
    def scale(step):
        return float("nan") if step == 2 else (-1.0 if step == 3 else 2.0)

    config = sghmc.config(lr=0.1, alpha=0.5, temperature=0.0)
    constant = (("momenta", bayesflow.engine.Constant(2.0)),)
    reference = bayesflow.engine.build(log_posterior, replace(config, step_scales=constant))
    transform = bayesflow.engine.build(log_posterior, replace(config, step_scales=(("momenta", scale),),
                                                              compile=compile))
    state, expected = transform.init(torch.zeros(3, dtype=F64)), reference.init(torch.zeros(3, dtype=F64))
    for _ in range(2):  # a user schedule's valid values are used as they are
        state, _ = transform.update(state, TARGET, inplace=inplace)
        expected, _ = reference.update(expected, TARGET)
    assert torch.equal(state.params, expected.params) and torch.equal(state.momenta, expected.momenta)
    kept = [t.clone() for t in (state.params, state.momenta)]
    with pytest.raises(ValueError, match=r"step_scales\['momenta'\] schedule returned nan at step 2"):
        transform.update(state, TARGET, inplace=inplace)
    assert torch.equal(state.params, kept[0]) and torch.equal(state.momenta, kept[1]) and int(state.step) == 2
