"""Control variates with the mode's per-datum gradients stored (sgmcmc.control_variate_table).

References are exact: the two-gradient control variate of sgmcmc.control_variate on the same batch,
and the full-data gradient as the mean over every single-datum batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow.sgmcmc import baoab, noise_corrected, sgld
from bayesflow.sgmcmc.control_variate import control_variate
from bayesflow.sgmcmc.control_variate_table import control_variate_table

DTYPE = torch.float64
N, D = 60, 3
GEN = torch.Generator().manual_seed(0)
X = torch.randn(N, D, generator=GEN, dtype=DTYPE)
Y = (torch.rand(N, generator=GEN, dtype=DTYPE) < torch.sigmoid(X @ torch.ones(D, dtype=DTYPE))).to(DTYPE)


def log_posterior(w, batch):
    """Logistic regression per datum; w (d,) or (K, d); batch: indices (b,) / (K, b), None: all data."""
    x, y = (X, Y) if batch is None else (X[batch], Y[batch])
    z = (x @ w) if w.ndim == 1 else torch.einsum("kbd,kd->kb", x, w)
    return (y * z - torch.nn.functional.softplus(z)).mean(-1) - 0.5 * (w**2).sum(-1) / N, None


def gradient(fn, w, batch):
    w = w.clone().requires_grad_(True)
    return torch.autograd.grad(fn(w, batch)[0].sum(), w)[0]


def test_every_batch_gives_the_two_gradient_estimate_and_single_data_average_to_the_full_gradient():
    mode = torch.tensor([0.8, 1.1, 0.9], dtype=DTYPE)
    table = control_variate_table(log_posterior, mode, num_data=N)
    pair = control_variate(log_posterior, mode, None)
    w = torch.tensor([0.3, -0.2, 1.5], dtype=DTYPE)
    for batch in (torch.tensor([0, 5, 5, 59]), torch.arange(N), torch.randint(N, (17,), generator=GEN)):
        torch.testing.assert_close(gradient(table, w, batch), gradient(pair, w, batch))
        torch.testing.assert_close(table(w, batch)[0], pair(w, batch)[0])
    singles = torch.stack([gradient(table, w, torch.tensor([i])) for i in range(N)]).mean(0)
    torch.testing.assert_close(singles, gradient(log_posterior, w, None))  # unbiased, exactly
    torch.testing.assert_close(table.full_gradient, gradient(log_posterior, mode, None))
    wrong = control_variate_table(log_posterior, mode + 0.5, num_data=N)  # another mode, another estimate
    assert not torch.allclose(gradient(wrong, w, torch.tensor([0, 5])), gradient(table, w, torch.tensor([0, 5])))


def test_chains_with_their_own_batches_and_per_sample_noise_correction():
    mode = torch.tensor([0.8, 1.1, 0.9], dtype=DTYPE)
    table = control_variate_table(log_posterior, mode, num_data=N)
    pair = control_variate(log_posterior, mode, None)
    K = 4
    w = torch.randn(K, D, generator=GEN, dtype=DTYPE)
    batch = torch.randint(N, (K, 8), generator=GEN)
    torch.testing.assert_close(gradient(table, w, batch), gradient(pair, w, batch))
    sampler = sgld.build(table, lr=1e-2, temperature=1.0 / N)
    state, _ = sampler.update(sampler.init(mode.clone(), seed=0), batch[0])
    assert bool(torch.isfinite(state.params).all())
    config = noise_corrected.config(baoab.config(lr=0.05, alpha=1.0, temperature=1.0 / N))
    corrected = noise_corrected.build(table, config, chains=K, chain_batches=True)
    state = corrected.init(mode.expand(K, D).clone(), seed=0)
    for _ in range(3):
        state, _ = corrected.update(state, torch.randint(N, (K, 8), generator=GEN), inplace=True)
    report = noise_corrected.noise_report(state)
    assert bool(torch.isfinite(state.params).all()) and math.isfinite(float(report.ratio[0]))


def test_bad_inputs_raise():
    mode = torch.zeros(D, dtype=DTYPE)
    with pytest.raises(TypeError, match="callable"):
        control_variate_table("lp", mode, num_data=N)
    with pytest.raises(TypeError, match="1-D floating-point"):
        control_variate_table(log_posterior, mode[None], num_data=N)
    with pytest.raises(ValueError, match="non-finite"):
        control_variate_table(log_posterior, torch.full((D,), math.nan, dtype=DTYPE), num_data=N)
    with pytest.raises(ValueError, match="positive integer"):
        control_variate_table(log_posterior, mode, num_data=0)
    with pytest.raises(ValueError, match="not finite"):
        control_variate_table(lambda w, b: (torch.log(w.sum() - 10.0) + 0 * w.sum(), None), mode, num_data=N)
    table = control_variate_table(log_posterior, mode, num_data=N)
    with pytest.raises(TypeError, match="data indices"):
        table(mode, X[:4])
