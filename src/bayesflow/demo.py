"""The main demo: one engine, three regimes — ``python -m bayesflow.demo``.

On Bayesian linear regression (exact Gaussian posterior known in closed form) it runs

1. SGHMC at T = 1/num_data with mini-batches: a posterior sampler, checked against the exact posterior;
2. the same preset at T = 0: proven step for step equal to ``torch.optim.SGD(momentum=...)``;
3. K chains in one batched state: a deep ensemble (T = 0) and a Bayesian deep ensemble (T = 1/N),
   comparing their predictive spread at a test input with the exact posterior predictive.
"""

from __future__ import annotations

import math
import time

import torch

from bayesflow.ensemble import bayesian_deep_ensemble, deep_ensemble, replicate
from bayesflow.sgmcmc import sghmc

NUM_DATA, DIM, NOISE, PRIOR = 512, 4, 0.5, 1.0


def make_problem(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(NUM_DATA, DIM, generator=generator, dtype=torch.float64)
    truth = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
    targets = inputs @ truth + NOISE * torch.randn(NUM_DATA, generator=generator, dtype=torch.float64)
    precision = inputs.T @ inputs / NOISE**2 + torch.eye(DIM, dtype=torch.float64) / PRIOR**2
    covariance = torch.linalg.inv(precision)
    mean = covariance @ inputs.T @ targets / NOISE**2
    return inputs, targets, mean, covariance


def main(seed: int = 0) -> dict:
    torch.set_num_threads(1)
    start = time.perf_counter()
    inputs, targets, exact_mean, exact_cov = make_problem(seed)

    def log_posterior(params, batch):
        """Per-datum log posterior: mean log-likelihood + log prior / num_data (posteriors' convention)."""
        x, y = inputs[batch], targets[batch]
        log_likelihood = -0.5 * ((x @ params - y) ** 2).mean() / NOISE**2
        return log_likelihood - 0.5 * (params**2).sum() / PRIOR**2 / NUM_DATA, None

    batches = torch.randperm(NUM_DATA, generator=torch.Generator().manual_seed(seed)).split(64)
    results = {}

    # 1. Posterior sampling: T = 1/N.
    sampler = sghmc.build(log_posterior, lr=0.05, alpha=2.0, temperature=1 / NUM_DATA)
    state = sampler.init(torch.zeros(DIM, dtype=torch.float64), seed=seed)
    samples = []
    for step in range(6000):
        state, _ = sampler.update(state, batches[step % len(batches)], inplace=True)
        if step >= 1000 and step % 5 == 0:
            samples.append(state.params.clone())
    samples = torch.stack(samples)
    print("1. SGHMC at T = 1/num_data vs the exact posterior")
    print("   param   exact mean  sampled mean   exact std  sampled std")
    for i in range(DIM):
        print(f"   θ[{i}]   {exact_mean[i]:+10.4f}  {samples[:, i].mean():+12.4f}  "
              f"{exact_cov[i, i].sqrt():10.4f}  {samples[:, i].std():11.4f}")
    results["std_ratio"] = (samples.std(0) / exact_cov.diagonal().sqrt()).tolist()

    # 2. The same preset at T = 0 is torch's SGD with momentum.
    lr, momentum = 0.01, 0.9
    optimizer_preset = sghmc.build(log_posterior, lr=math.sqrt(lr), alpha=(1 - momentum) / math.sqrt(lr),
                                   temperature=0.0)
    state = optimizer_preset.init(torch.zeros(DIM, dtype=torch.float64))
    weights = torch.zeros(DIM, dtype=torch.float64, requires_grad=True)
    torch_sgd = torch.optim.SGD([weights], lr=lr, momentum=momentum)
    difference = 0.0
    for step in range(200):
        batch = batches[step % len(batches)]
        state, _ = optimizer_preset.update(state, batch)
        torch_sgd.zero_grad()
        (-log_posterior(weights, batch)[0]).backward()
        torch_sgd.step()
        difference = max(difference, (state.params - weights.detach()).abs().max().item())
    print(f"\n2. sghmc(temperature=0) vs torch.optim.SGD(momentum={momentum}): "
          f"max |Δθ| over 200 steps = {difference:.2e}")
    results["sgd_difference"] = difference

    # 3. K chains in one batched state.
    chains, test_input = 16, torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    exact_predictive_std = (test_input @ exact_cov @ test_input).sqrt().item()
    starts = replicate(torch.zeros(DIM, dtype=torch.float64), chains, perturbation=1.0, seed=seed)
    print(f"\n3. {chains} chains in one batched step, predictive std of θ·x at x = 1 "
          f"(exact posterior: {exact_predictive_std:.4f})")
    for name, lift in (("deep ensemble (T = 0)", deep_ensemble),
                       ("Bayesian deep ensemble (T = 1/N)", bayesian_deep_ensemble)):
        kwargs = {"num_data": NUM_DATA} if lift is bayesian_deep_ensemble else {}
        ensemble = lift(sampler, chains, **kwargs)
        state = ensemble.init(starts.clone(), seed=seed)
        predictions = []
        for step in range(3000):
            state, _ = ensemble.update(state, batches[step % len(batches)], inplace=True)
            if step >= 1000 and step % 10 == 0:
                predictions.append(state.params @ test_input)
        spread = torch.stack(predictions).std().item()
        print(f"   {name:34s} predictive std {spread:.4f}")
        results[name] = spread
    print(f"\nDone in {time.perf_counter() - start:.1f} s.")
    return results


if __name__ == "__main__":
    main()
