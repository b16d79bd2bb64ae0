r"""Data-parallel SGLD and a chain-parallel ensemble on ``torch.distributed``, checked against the exact posterior.

Bayesian linear regression, :math:`y_i ∼ N(x_i^\top θ, σ^2)`, :math:`θ ∼ N(0, I)`, has the Gaussian
posterior :math:`N(Λ^{-1} X^\top y / σ^2, Λ^{-1})`, :math:`Λ = X^\top X/σ^2 + I`. bayesflow samples it with
the per-datum log posterior :math:`ℓ(θ) = \frac1B\sum_{i∈B} \log p(y_i | θ) + \frac1N \log p(θ)` at
temperature T = 1/N.

1. **Data parallel**: every rank holds the same θ and the same seed; each global mini-batch of B
   indices (drawn from a generator every rank seeds alike) is split into R shards of B/R rows;
   :func:`bayesflow.distributed.data_parallel` averages the shard gradients in one all-reduce per step,
   so every rank takes the step of the whole mini-batch, with the same noise (a function of the seed
   and the step): the ranks stay bit-identical, which ``check_every`` verifies.
2. **Chain parallel**: K = 8 chains split over the ranks (:func:`~bayesflow.distributed.lift_block`),
   each with the seed it has in one process; the traces are gathered for R-hat and ESS.
3. **Variational inference, data parallel**: ``vi.diag`` on
   :func:`~bayesflow.distributed.reduced_log_posterior` (value and gradient averaged over the ranks,
   weighted by the shard sizes); its noise comes from the state's key, the same on every rank. The
   best diagonal Gaussian has the posterior mean and the variances :math:`1/Λ_{ii}`.

Data- and chain-parallel at once (4 processes = 2 chain blocks × 2 data shards):
:func:`bayesflow.distributed.process_mesh` gives the two process groups, ``lift_block(...,
group=mesh.chains)`` wrapped in ``data_parallel(..., group=mesh.data)``.

Run on CPUs (gloo)::

    torchrun --nproc_per_node=2 examples/distributed_sgld.py
    python examples/distributed_sgld.py            # one process: the same numbers

The same script runs on GPUs (NCCL, one GPU per process: ``LOCAL_RANK`` picks the device) and on
several machines: ``torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d
--rdzv_endpoint=HOST:29500 examples/distributed_sgld.py``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from bayesflow import vi
from bayesflow.distributed import chain_diagnostics, data_parallel, lift_block, reduced_log_posterior, world
from bayesflow.ensemble import replicate
from bayesflow.optim import adam
from bayesflow.sgmcmc import sgld

N, D, SIGMA, BATCH, STEPS, BURN_IN, K = 2000, 4, 1.0, 400, 3000, 500, 8
LR, ENSEMBLE_LR = 0.03, 0.2  # the ensemble takes full-batch steps (Euler bias ≈ hλ/2 on the variance)


def setup() -> torch.device:
    """Join the process group torchrun describes in the environment (or stay one process)."""
    if "RANK" not in os.environ:
        return torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
        return device
    dist.init_process_group("gloo")
    return torch.device("cpu")


def data(device):
    generator = torch.Generator().manual_seed(0)  # the same data on every rank (each reads its shards)
    x = torch.randn(N, D, generator=generator, dtype=torch.float64)
    theta = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)
    y = x @ theta + SIGMA * torch.randn(N, generator=generator, dtype=torch.float64)
    return x.to(device), y.to(device)


def exact_posterior(x, y):
    precision = x.T @ x / SIGMA**2 + torch.eye(D, dtype=x.dtype, device=x.device)
    covariance = torch.linalg.inv(precision)
    return covariance @ x.T @ y / SIGMA**2, covariance


def log_posterior(theta, batch):
    """Per datum: the mini-batch's mean log-likelihood plus the log prior over N."""
    x, y = batch
    log_likelihood = -0.5 * ((y - x @ theta) / SIGMA) ** 2
    return log_likelihood.mean(-1) - 0.5 * (theta**2).sum(-1) / N, None


def main() -> None:
    device = setup()
    rank, size = world()
    x, y = data(device)
    mean, covariance = exact_posterior(x, y)
    if BATCH % size:
        raise ValueError(f"the mini-batch of {BATCH} does not split into {size} equal shards")
    shard = BATCH // size

    # 1. data parallel: the step of the whole mini-batch, from each rank's shard
    transform = data_parallel(sgld.build(log_posterior, lr=LR, temperature=1.0 / N), check_every=500)
    state = transform.init(torch.zeros(D, dtype=torch.float64, device=device), seed=0)
    batches = torch.Generator().manual_seed(1)  # seeded alike on every rank: the same global batches
    draws = []
    for step in range(STEPS):
        index = torch.randint(0, N, (BATCH,), generator=batches)[rank * shard:(rank + 1) * shard].to(device)
        state, _ = transform.update(state, (x[index], y[index]), inplace=True)
        if step >= BURN_IN:
            draws.append(state.params.clone())
    draws = torch.stack(draws)
    error = (draws.mean(0) - mean).abs().max() / covariance.diagonal().sqrt().max()
    if rank == 0:
        print(f"data parallel over {size} process(es): posterior mean error {float(error):.3f} posterior sd "
              f"(sd ratio {float((draws.std(0) / covariance.diagonal().sqrt()).mean()):.2f}; "
              "expected ≈ 1.04 up to Monte Carlo error: SGLD's mini-batch noise adds h N / (2B) to the variance)")

    # 2. chain parallel: K chains over the ranks, every rank on its own block, full-batch gradients
    ensemble = lift_block(sgld.build(log_posterior, lr=ENSEMBLE_LR, temperature=1.0 / N), K)
    start = replicate(torch.zeros(D, dtype=torch.float64, device=device), K, perturbation=0.5, seed=2)
    state = ensemble.init(start, seed=10)
    trace = []
    for step in range(500):
        state, _ = ensemble.update(state, (x, y), inplace=True)
        if step >= 100:
            trace.append(state.params.clone())
    diagnostics = chain_diagnostics(torch.stack(trace, dim=1), K)  # (K, draws, D) gathered on every rank
    if rank == 0:
        print(f"chain parallel: {K} chains over {size} process(es): max R-hat "
              f"{float(diagnostics['rhat'].max()):.3f}, min bulk ESS {float(diagnostics['ess'].min()):.0f}")

    # 3. VI, data parallel: every rank the same q, fitted to the whole mini-batches
    fit = vi.diag.build(reduced_log_posterior(log_posterior, shard_size=lambda batch: len(batch[1])),
                        adam.transformation(lr=3e-3), temperature=1.0 / N, init_log_sds=-3.0)
    q = fit.init(torch.zeros(D, dtype=torch.float64, device=device), seed=0)
    for _ in range(3000):
        index = torch.randint(0, N, (BATCH,), generator=batches)[rank * shard:(rank + 1) * shard].to(device)
        q, _ = fit.update(q, (x[index], y[index]), inplace=True)
    best_sd = torch.linalg.inv(covariance).diagonal().rsqrt()  # the best diagonal q: sd 1/sqrt(Λ_ii)
    if rank == 0:
        print(f"VI (diagonal) over {size} process(es): mean error "
              f"{float((q.params - mean).abs().max() / covariance.diagonal().sqrt().max()):.3f} posterior sd, "
              f"sd ratio to 1/sqrt(Λ_ii) {float((q.log_sd_diag.exp() / best_sd).mean()):.2f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
