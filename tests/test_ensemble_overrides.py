"""Per-chain temperature and lr compose with what a preset does to them (issue 9, items 7, 8, 10, 11).

Chain k of ``lift(preset.build(...), K, temperature=T, step_size=lr)`` must be exactly the preset built
with ``temperature=T[k]`` and ``lr=lr[k]`` (and seeded ``seed + k``), or the override is refused.
"""

from __future__ import annotations

import pytest
import torch

from bayesflow.ensemble import bayesian_deep_ensemble, lift, sweep
from bayesflow.optim import adam, adamw, rmsprop, sgd
from bayesflow.sgmcmc import (
    adam_sghmc,
    baoa,
    baoab,
    csghmc,
    csgld,
    obabo,
    psgld,
    sghmc,
    sgld,
    sglrw,
    sgnht,
)

F64 = torch.float64
LRS = [0.02, 0.05, 0.08]
TEMPERATURES = [0.2, 1.0, 3.0]


def log_posterior(p, batch):
    return -0.5 * (p * p * torch.arange(1, p.shape[-1] + 1, dtype=p.dtype)).sum() + p.sum(), None


PRESETS = {
    "sgld": lambda **kw: sgld.build(log_posterior, **kw),
    "sgld beta": lambda **kw: sgld.build(log_posterior, beta=0.5, **kw),
    "sghmc": lambda **kw: sghmc.build(log_posterior, alpha=1.5, **kw),
    "sghmc beta": lambda **kw: sghmc.build(log_posterior, alpha=1.5, beta=0.5, **kw),
    "sgnht": lambda **kw: sgnht.build(log_posterior, alpha=1.5, **kw),
    "baoa": lambda **kw: baoa.build(log_posterior, alpha=1.5, **kw),
    "baoab": lambda **kw: baoab.build(log_posterior, alpha=1.5, **kw),
    "obabo": lambda **kw: obabo.build(log_posterior, alpha=1.5, **kw),
    "psgld": lambda **kw: psgld.build(log_posterior, **kw),
    "csgld": lambda **kw: csgld.build(log_posterior, cycle_length=4, exploration=0.5, **kw),
    "csghmc": lambda **kw: csghmc.build(log_posterior, cycle_length=4, exploration=0.5, alpha=1.5, **kw),
    "sglrw": lambda **kw: sglrw.build(log_posterior, **kw),
    "sgd": lambda **kw: sgd.build(log_posterior, **kw),
}
REFUSE_LR = {
    "adam_sghmc": lambda **kw: adam_sghmc.build(log_posterior, **kw),
    "sgd momentum": lambda **kw: sgd.build(log_posterior, momentum=0.9, **kw),
    "rmsprop": lambda **kw: rmsprop.build(log_posterior, **kw),
    "adam": lambda **kw: adam.build(log_posterior, **kw),
    "adamw": lambda **kw: adamw.build(log_posterior, **kw),
}


def run(transform, state, steps=8):
    for _ in range(steps):
        state, _ = transform.update(state, None)
    return state


def starts():
    return torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("name", "override"), [(name, override) for name in sorted(PRESETS)
                                                 for override in ("lr", "temperature", "both")
                                                 if name != "sgd" or override == "lr"])  # sgd has no T
def test_chain_k_is_the_preset_built_with_its_own_values(name, override):
    make = PRESETS[name]
    lr = torch.tensor(LRS, dtype=F64) if override in ("lr", "both") else None
    temperature = torch.tensor(TEMPERATURES, dtype=F64) if override in ("temperature", "both") else None
    ensemble = lift(make(lr=0.05, **({} if name == "sgd" else {"temperature": 1.0})), 3, temperature=temperature,
                    step_size=lr)
    batched = run(ensemble, ensemble.init(starts(), seed=7))
    for k in range(3):
        single_kw = {"lr": LRS[k] if lr is not None else 0.05}
        if name != "sgd":
            single_kw["temperature"] = TEMPERATURES[k] if temperature is not None else 1.0
        single = make(**single_kw)
        chain = run(single, single.init(starts()[k], seed=7 + k))
        torch.testing.assert_close(batched.params[k], chain.params, rtol=1e-12, atol=1e-14, msg=f"chain {k}")


@pytest.mark.parametrize("name", sorted(REFUSE_LR))
def test_presets_whose_operators_depend_on_lr_refuse_per_chain_lr(name):
    with pytest.raises(ValueError, match="per chain"):
        lift(REFUSE_LR[name](lr=0.01), 3, step_size=torch.tensor(LRS, dtype=F64))


def test_the_cyclical_exploration_stage_survives_a_bayesian_deep_ensemble():
    """cSGLD runs at T = 0 while exploring: before, the override T = 1/N replaced the whole schedule."""
    ensemble = bayesian_deep_ensemble(csgld.build(log_posterior, lr=0.1, cycle_length=10, exploration=0.5),
                                      num_chains=2, num_data=100)
    assert ensemble.config.temperature(0) == 0.0 and ensemble.config.temperature(6) == pytest.approx(0.01)
    state = ensemble.init(starts()[:2], seed=0)
    optimizer = lift(csgld.build(log_posterior, lr=0.1, cycle_length=10, exploration=0.5), 2, temperature=0.0)
    reference = optimizer.init(starts()[:2], seed=0)
    for _ in range(5):  # the exploration stage: exactly the optimizer
        state, _ = ensemble.update(state, None)
        reference, _ = optimizer.update(reference, None)
    assert torch.equal(state.params, reference.params)
    state, _ = ensemble.update(state, None)
    reference, _ = optimizer.update(reference, None)
    assert not torch.equal(state.params, reference.params)


def test_an_edited_config_is_replaced_not_rebuilt():
    """A config edited after the preset made it has no recipe to follow: lift replaces the field."""
    from dataclasses import replace

    from bayesflow.engine import build

    config = replace(csgld.config(lr=0.1, cycle_length=10), temperature=0.5)
    ensemble = lift(build(log_posterior, config), 2, temperature=2.0)
    assert ensemble.config.temperature == 2.0


@pytest.mark.parametrize("num_data", [0, -5, 0.0, float("nan"), True])
def test_bayesian_deep_ensemble_validates_num_data_by_name(num_data):
    with pytest.raises(ValueError, match="num_data"):
        bayesian_deep_ensemble(sgld.build(log_posterior, lr=0.1), 2, num_data=num_data)


# ----- sweep ------------------------------------------------------------------------------------------
def toy_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 2, generator=g, dtype=F64)
    return x, (x[:, 0] > 0).long()


def class_log_posterior(w, batch):
    return -torch.nn.functional.cross_entropy(batch[0] @ w, batch[1]) - 0.005 * (w * w).sum(), None


def predict(w, inputs):
    return inputs @ w


def test_sweep_equal_temperatures_give_identical_rows_under_common_random_numbers():
    x, y = toy_data()
    rows = sweep(sghmc.build(class_log_posterior, lr=0.05, alpha=1.0), [0.01, 0.05, 0.01],
                 torch.zeros(2, 2, dtype=F64), train=[(x[:24], y[:24]), (x[24:], y[24:])], steps=40,
                 predict=predict, validation=[(x, y)], perturbation=0.3, progress=False)
    assert torch.equal(rows[0]["predictive"], rows[2]["predictive"])
    assert not torch.equal(rows[0]["predictive"], rows[1]["predictive"])
    independent = sweep(sghmc.build(class_log_posterior, lr=0.05, alpha=1.0), [0.01, 0.01],
                        torch.zeros(2, 2, dtype=F64), train=[(x, y)], steps=40, predict=predict,
                        validation=[(x, y)], perturbation=0.3, common_random_numbers=False, progress=False)
    assert not torch.equal(independent[0]["predictive"], independent[1]["predictive"])


def test_sweep_iterates_the_training_data_afresh_every_epoch():
    class Epochs:
        """A re-iterable that yields a different batch order every epoch (as a shuffling DataLoader)."""

        def __init__(self):
            self.epochs = 0

        def __iter__(self):
            self.epochs += 1
            x, y = toy_data(self.epochs)
            return iter([(x[:24], y[:24]), (x[24:], y[24:])])

    train = Epochs()
    x, y = toy_data()
    sweep(sgld.build(class_log_posterior, lr=0.05), [0.0], torch.zeros(2, 2, dtype=F64), train=train, steps=9,
          predict=predict, validation=[(x, y)], progress=False)
    assert train.epochs == 5  # 9 steps of 2 batches per epoch; itertools.cycle would have read it once
    with pytest.raises(ValueError, match="no batches"):
        sweep(sgld.build(class_log_posterior, lr=0.05), [0.0], torch.zeros(2, 2, dtype=F64),
              train=iter([(x, y)]), steps=3, predict=predict, validation=[(x, y)], progress=False)


def test_sweep_honours_beta():
    """posteriors' beta lowers the injected noise; sweep used to drop it (its rows equal beta = 0's)."""
    x, y = toy_data()
    kwargs = dict(params=torch.zeros(2, 2, dtype=F64), train=[(x, y)], steps=30, predict=predict,
                  validation=[(x, y)], progress=False)
    plain = sweep(sgld.build(class_log_posterior, lr=0.1), [0.5], **kwargs)
    corrected = sweep(sgld.build(class_log_posterior, lr=0.1, beta=5.0), [0.5], **kwargs)
    assert not torch.equal(plain[0]["predictive"], corrected[0]["predictive"])
    single = sgld.build(class_log_posterior, lr=0.1, beta=5.0, temperature=0.5)
    assert lift(single, 1, temperature=torch.tensor([0.5], dtype=F64)).config.temperature == pytest.approx(
        [single.config.temperature])
