"""Configurations are data: they print, compare, and rebuild the same transform."""

import dataclasses

import torch

from bayesflow.engine import Block, Dense, Diagonal, Scalar, SquaredGradientAverage, build
from bayesflow.optim import adam, rmsprop, sgd


def test_equal_configurations_compare_equal_and_different_ones_do_not():
    assert adam.config(1e-3, amsgrad=True) == adam.config(1e-3, amsgrad=True)
    assert adam.config(1e-3) != adam.config(1e-3, amsgrad=True)
    assert rmsprop.config(1e-2, momentum=0.9, centered=True) == rmsprop.config(1e-2, momentum=0.9, centered=True)
    assert sgd.config(0.1, momentum=0.9, nesterov=True) != sgd.config(0.1, momentum=0.9)
    assert SquaredGradientAverage(0.9, 1e-8) == SquaredGradientAverage(0.9, 1e-8)
    assert Block({("momenta", "momenta"): Scalar(2.0)}) != Block({("momenta", "momenta"): Scalar(1.0)})
    assert Dense(torch.eye(2)) == Dense(torch.eye(2)) and Dense(torch.eye(2)) != Dense(2 * torch.eye(2))
    assert Diagonal({"a": torch.ones(3)}) == Diagonal({"a": torch.ones(3)})
    assert "Preconditioned" in repr(adam.config(1e-3))


def test_replaced_temperature_turns_a_sampler_configuration_into_its_optimizer():
    def log_posterior(params, batch):
        return -0.5 * (params**2).sum(), None

    sampler = sgd.config(0.1, momentum=0.9, temperature=1.0)
    optimizer = dataclasses.replace(sampler, temperature=0.0)
    assert optimizer == sgd.config(0.1, momentum=0.9)
    a = build(log_posterior, optimizer)
    b = sgd.build(log_posterior, 0.1, momentum=0.9)
    state_a, state_b = a.init(torch.ones(3)), b.init(torch.ones(3))
    for _ in range(5):
        state_a, _ = a.update(state_a, None)
        state_b, _ = b.update(state_b, None)
    assert torch.equal(state_a.params, state_b.params)
