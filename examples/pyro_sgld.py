"""A pyro model sampled by bayesflow: 32 SGLD chains on mini-batches, checked against the exact posterior.

The model is Normal–Gamma — precision τ ~ Gamma(2, 2), mean μ | τ ~ N(0, 1/τ), y_i ~ N(μ, 1/τ) — so the
posterior is known in closed form (τ | y is Gamma, μ | y a Student t). pyro writes the model; bayesflow
samples it in unconstrained space (log τ, μ) with its per-datum log posterior:

* ``bf_pyro.log_posterior(model, ..., num_data=N)`` divides pyro's log joint by N, so the samplers run at
  temperature 1/N (``bayesian_deep_ensemble(..., num_data=N)``);
* mini-batches are the model's own arguments: each batch carries its data indices, and
  ``pyro.plate("data", size=N, subsample=index)`` scales its likelihood by N/B (unbiased; no random
  draw inside the model, so the 32 chains run as one ``vmap``-ed step);
* ``posterior.constrain`` maps the unconstrained samples back to (τ, μ).

Run: ``python examples/pyro_sgld.py`` (a few seconds). SGLD has no accept/reject step: its stationary
law is off by its step (Euler: ≈ hω²/2 on the variance, ω² the per-datum curvature) and by the
mini-batch gradient noise (smaller with reshuffled epochs, whose batches' errors cancel over an epoch):
a few percent of the sd at h = 0.05, as printed.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from bayesflow.ensemble import bayesian_deep_ensemble, ess, replicate
from bayesflow.integrations import pyro as bf_pyro
from bayesflow.sgmcmc import sgld


def model(index, y, *, num_data):
    tau = pyro.sample("tau", dist.Gamma(2.0, 2.0))
    mu = pyro.sample("mu", dist.Normal(0.0, tau.rsqrt()))
    with pyro.plate("data", size=num_data, subsample=index):  # scales the batch's log-likelihood by N/B
        pyro.sample("y", dist.Normal(mu, tau.rsqrt()), obs=y)


def exact_posterior(y: torch.Tensor) -> dict:
    """Posterior (mean, sd) of τ and μ of the Normal–Gamma model (prior a0 = b0 = 2, κ0 = 1, m0 = 0)."""
    n, ybar = len(y), float(y.mean())
    kappa, a = 1.0 + n, 2.0 + n / 2
    b = 2.0 + 0.5 * float(((y - ybar) ** 2).sum()) + n * ybar**2 / (2 * kappa)
    return {"tau": (a / b, math.sqrt(a) / b), "mu": (n * ybar / kappa, math.sqrt(b / (kappa * (a - 1))))}


def main(num_data: int = 200, batch_size: int = 50, num_chains: int = 32, epochs: int = 300, lr: float = 0.05,
         seed: int = 0, verbose: bool = True) -> dict:
    """Sample the posterior; return {"sgld": {site: (mean, sd)}, "exact": ..., "ess": {site: ESS}}."""
    generator = torch.Generator().manual_seed(seed)
    y = 1.0 + 0.8 * torch.randn(num_data, generator=generator)
    index = torch.arange(num_data)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(index, y), batch_size=batch_size,
                                         shuffle=True, generator=generator)

    pyro.set_rng_seed(seed)
    posterior = bf_pyro.log_posterior(model, (index[:batch_size], y[:batch_size]), {"num_data": num_data},
                                      num_data=num_data)
    ensemble = bayesian_deep_ensemble(sgld.build(posterior.log_posterior, lr=lr), num_chains, num_data=num_data)
    state = ensemble.init(replicate(posterior.params, num_chains, perturbation=0.5, seed=seed), seed=seed)

    trace = []
    for epoch in range(epochs):
        for batch in loader:  # [index, y]: the model's positional arguments
            state, _ = ensemble.update(state, batch, inplace=True)
        if epoch >= epochs // 2:  # the second half, one draw per epoch per chain
            trace.append(posterior.constrain(state.params))
    draws = {name: torch.stack([draw[name] for draw in trace], 1) for name in trace[0]}  # (chains, draws)

    result = {"sgld": {name: (float(x.mean()), float(x.std())) for name, x in draws.items()},
              "exact": exact_posterior(y), "ess": {name: float(value) for name, value in ess(draws).items()}}
    if verbose:
        for name in ("mu", "tau"):
            (mean, sd), (exact_mean, exact_sd) = result["sgld"][name], result["exact"][name]
            print(f"{name:>3}: SGLD {mean:.3f} ± {sd:.3f}   exact {exact_mean:.3f} ± {exact_sd:.3f}   "
                  f"(ESS {result['ess'][name]:.0f} of {draws[name].numel()} draws)")
    return result


if __name__ == "__main__":
    main()
