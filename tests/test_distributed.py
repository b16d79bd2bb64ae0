"""bayesflow.distributed: 2-process gloo runs (spawned here, file:// rendezvous) against one process.

Each launch starts fresh interpreters (multiprocessing "spawn"), so every worker below is a module-
level function and writes what it computed to files the test reads back; every launch runs under a
wall-clock limit and a hung process fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from bayesflow.distributed import (
    CollectiveFailed,
    RankDivergence,
    all_reduce_mean,
    chain_block,
    chain_diagnostics,
    check_replicas,
    data_parallel,
    digest,
    gather_chains,
    lift_block,
    reduced_log_posterior,
    world,
)
from bayesflow.ensemble import ess, lift, replicate, rhat
from bayesflow.optim import adam
from bayesflow.sgmcmc import baoab, obabo, sghmc, sgld

WORLD = 2
STEPS = 6
BATCH = 8  # per step; each of the 2 ranks gets 4 rows
LAUNCH_TIMEOUT = 90.0


# ----------------------------------------------------------------------------------- the model


def log_posterior(params, batch):
    """Linear regression, per datum: a Gaussian likelihood averaged over the batch and the prior / N."""
    x, y = batch
    residual = x @ params["w"] + params["b"] - y
    return -0.5 * (residual**2).sum(-1).mean() - 0.5e-2 * ((params["w"] ** 2).sum() + (params["b"] ** 2).sum()), None


def batched_log_posterior(params, batch):
    """The same for K chains at once (params lead with the chain dimension): K values."""
    x, y = batch
    residual = torch.einsum("nd,kde->kne", x, params["w"]) + params["b"][:, None] - y
    prior = (params["w"] ** 2).sum((1, 2)) + (params["b"] ** 2).sum(1)
    return -0.5 * (residual**2).sum(-1).mean(-1) - 0.5e-2 * prior, None


def batch_of(step: int):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 3, generator=generator, dtype=torch.float64)
    return x, x @ torch.tensor([[1.0, -1.0], [0.5, 0.0], [0.0, 2.0]], dtype=torch.float64) + 0.3


def shard(batch, rank: int, size: int):
    n = BATCH // size
    return tuple(t[rank * n:(rank + 1) * n] for t in batch)


def initial_params():
    return {"w": torch.full((3, 2), 0.1, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}


METHODS = {
    "sgld": lambda lp: sgld.build(lp, lr=1e-2, temperature=0.05),
    "sghmc": lambda lp: sghmc.build(lp, lr=1e-2, temperature=0.05),
    "baoab": lambda lp: baoab.build(lp, lr=1e-1, temperature=0.05),
    "obabo": lambda lp: obabo.build(lp, lr=1e-1, temperature=0.05),
    "adam": lambda lp: adam.build(lp, lr=1e-2),  # T = 0
}
K, SEED = 5, 11  # chain-parallel: 5 chains over 2 ranks, blocks of 2 and 3


def ensemble_single():
    return sghmc.build(log_posterior, lr=1e-2, temperature=0.2)


# --------------------------------------------------------------------------------- the launcher


def _worker(rank: int, size: int, init_file: str, out: str):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=20))
        try:
            results = _data_parallel_job(rank, size)
            torch.save(results, os.path.join(out, f"rank{rank}.pt"))
            results.update(_failure_job(rank, size))  # rank 1 raises in there: the last collectives
            torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def launch(tmp_path, size: int = WORLD):
    """Run the jobs on ``size`` spawned processes; returns (results, errors, exit codes) per rank.

    One launch for everything: each costs two fresh interpreters importing torch (seconds)."""
    context = multiprocessing.get_context("spawn")
    init_file = str(tmp_path / "rendezvous")
    processes = [context.Process(target=_worker, args=(rank, size, init_file, str(tmp_path)))
                 for rank in range(size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(LAUNCH_TIMEOUT)
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} still running after {LAUNCH_TIMEOUT} s: a hang"
    results, errors = [], []
    for rank in range(size):
        path = tmp_path / f"rank{rank}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else None)
        err = tmp_path / f"rank{rank}.err"
        errors.append(err.read_text() if err.exists() else None)
    return results, errors, [process.exitcode for process in processes]


# ------------------------------------------------------------------------------------- the jobs


def _data_parallel_job(rank: int, size: int):
    out = {}
    for name, make in METHODS.items():
        transform = data_parallel(make(log_posterior), check_every=1)
        state = transform.init(initial_params(), seed=3)
        trace = []
        for step in range(STEPS):
            state, _ = transform.update(state, shard(batch_of(step), rank, size))
            trace.append({k: v.clone() for k, v in state.params.items()})
        out[name] = trace
    # the caller's-gradient path: step(state, grads) with each rank's own gradient, averaged
    transform = data_parallel(sgld.build(log_posterior, lr=1e-2, temperature=0.05))
    state = transform.init(initial_params(), seed=3)
    for step in range(STEPS):
        params = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
        value, _ = log_posterior(params, shard(batch_of(step), rank, size))
        grads = dict(zip(params, torch.autograd.grad(value, list(params.values()))))
        state = transform.step(state, grads)
    out["sgld_step"] = state.params
    # K chains, data parallel too (the batched log posterior): chains x data
    ensemble = data_parallel(lift(METHODS["baoab"](batched_log_posterior), 3, vectorize="batched"),
                             vectorize="batched", check_every=1)
    state = ensemble.init(replicate(initial_params(), 3, perturbation=0.1, seed=1), seed=SEED)
    for step in range(STEPS):
        state, _ = ensemble.update(state, shard(batch_of(step), rank, size))
    out["baoab_chains"] = state.params
    # a diverged rank is caught by the check, on every rank, naming the step
    params = initial_params()
    if rank == 1:
        params["b"][0] += 1e-12
    try:
        check_replicas(params, step=42)
    except RankDivergence as error:
        out["divergence"] = str(error)
    # chain-parallel: this rank's block of K chains, then gathered
    block = chain_block(K)
    local = lift_block(ensemble_single(), K)
    state = local.init(replicate(initial_params(), K, perturbation=0.5, seed=2), seed=SEED)
    trace = []
    for step in range(40):
        state, _ = local.update(state, batch_of(step % 3))
        trace.append(state.params["w"][:, 0, 0].clone())
    trace = torch.stack(trace, dim=1)  # (block, draws)
    out["block"] = block
    out["chains"] = gather_chains(state.params, K)
    out["state_step"] = gather_chains(state, K).step
    out["diagnostics"] = chain_diagnostics(trace, K)
    out["ddp_face"] = _ddp_face_run(shard, rank, size)
    return out


class _Regression(torch.nn.Module):
    """log_posterior's model as a module: DDP reduces its .grad, the optimizer face reads it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(initial_params()["w"])
        self.b = torch.nn.Parameter(initial_params()["b"])

    def forward(self, x):
        return x @ self.w + self.b


def _ddp_face_run(split, rank: int, size: int):
    """SGHMC through as_optimizer on a DistributedDataParallel model (DDP averages .grad over ranks);
    with ``split`` the identity and one rank, the single-process reference on the full batch."""
    from torch.nn.parallel import DistributedDataParallel

    from bayesflow.integrations import as_optimizer

    model = _Regression()
    wrapped = DistributedDataParallel(model) if size > 1 else model
    face = as_optimizer(sghmc.build, wrapped.parameters(), lr=1e-2, alpha=1.0, temperature=0.05, seed=3)
    for step in range(STEPS):
        x, y = split(batch_of(step), rank, size)
        face.zero_grad()
        loss = 0.5 * ((wrapped(x) - y) ** 2).sum(-1).mean()   # −ℓ per datum (flat prior)
        loss.backward()
        face.step()
    return {"w": model.w.detach().clone(), "b": model.b.detach().clone()}


def _failure_job(rank: int, size: int):
    """Rank 1 raises before step 3; rank 0's all-reduce of step 3 must fail, not hang."""
    start = time.perf_counter()
    transform = data_parallel(sgld.build(log_posterior, lr=1e-2, temperature=0.05))
    state = transform.init(initial_params(), seed=3)
    for step in range(STEPS):
        if rank == 1 and step == 3:
            raise ValueError("rank 1 fails at step 3")
        try:
            state, _ = transform.update(state, shard(batch_of(step), rank, size))
        except CollectiveFailed as error:
            return {"error": str(error), "step": step, "seconds": time.perf_counter() - start}
    return {"error": None}



# ---------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    results, errors, codes = launch(tmp_path_factory.mktemp("dp"))
    assert errors[0] is None and codes[0] == 0, errors[0]
    assert codes[1] != 0 and "rank 1 fails at step 3" in errors[1], errors[1]  # the planned failure only
    return results


def _single_run(name: str):
    transform = METHODS[name](log_posterior)
    state = transform.init(initial_params(), seed=3)
    trace = []
    for step in range(STEPS):
        state, _ = transform.update(state, batch_of(step))
        trace.append(state.params)
    return trace


@pytest.mark.parametrize("name", list(METHODS))
def test_data_parallel_equals_the_full_batch_run(two_ranks, name):
    reference = _single_run(name)
    moved = False
    for step in range(STEPS):
        for key in ("w", "b"):
            a, b = two_ranks[0][name][step][key], two_ranks[1][name][step][key]
            assert torch.equal(a, b), f"{name}: ranks differ at step {step}"
            # the mean of two shard means vs one mean of 8: a few ulps of float64
            torch.testing.assert_close(a, reference[step][key], rtol=1e-12, atol=1e-13)
            moved |= not torch.allclose(a, initial_params()[key])
    assert moved
    # and the test can fail: a rank using only its own shard would give another run
    assert not torch.allclose(two_ranks[0][name][-1]["w"], _shard_only_run(name)["w"], atol=1e-6)


def _shard_only_run(name: str):
    transform = METHODS[name](log_posterior)
    state = transform.init(initial_params(), seed=3)
    for step in range(STEPS):
        state, _ = transform.update(state, shard(batch_of(step), 0, WORLD))
    return state.params


def test_caller_gradients_are_averaged(two_ranks):
    reference = _single_run("sgld")[-1]
    for rank in range(WORLD):
        for key in ("w", "b"):
            torch.testing.assert_close(two_ranks[rank]["sgld_step"][key], reference[key], rtol=1e-12, atol=1e-13)


def test_chains_times_data_parallel(two_ranks):
    ensemble = lift(METHODS["baoab"](batched_log_posterior), 3, vectorize="batched")
    state = ensemble.init(replicate(initial_params(), 3, perturbation=0.1, seed=1), seed=SEED)
    for step in range(STEPS):
        state, _ = ensemble.update(state, batch_of(step))
    for rank in range(WORLD):
        for key in ("w", "b"):
            torch.testing.assert_close(two_ranks[rank]["baoab_chains"][key], state.params[key],
                                       rtol=1e-12, atol=1e-13)


def test_divergence_is_caught_on_every_rank_naming_the_step(two_ranks):
    for rank in range(WORLD):
        assert "step 42" in two_ranks[rank]["divergence"] and "ranks [1]" in two_ranks[rank]["divergence"]


def test_chain_parallel_equals_the_one_process_ensemble(two_ranks):
    assert [two_ranks[r]["block"] for r in range(WORLD)] == [range(0, 2), range(2, 5)]
    ensemble = lift(ensemble_single(), K)
    state = ensemble.init(replicate(initial_params(), K, perturbation=0.5, seed=2), seed=SEED)
    trace = []
    for step in range(40):
        state, _ = ensemble.update(state, batch_of(step % 3))
        trace.append(state.params["w"][:, 0, 0].clone())
    trace = torch.stack(trace, dim=1)
    for rank in range(WORLD):
        got = two_ranks[rank]
        for key in ("w", "b"):  # vmap over 2 or 3 chains vs over 5: the same per-chain arithmetic
            torch.testing.assert_close(got["chains"][key], state.params[key], rtol=1e-12, atol=1e-13)
        assert torch.equal(got["state_step"], state.step)
        torch.testing.assert_close(got["diagnostics"]["rhat"], rhat(trace), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["diagnostics"]["ess"], ess(trace), rtol=1e-10, atol=1e-10)
    # and the chains differ from one another (the seeds s + k are used, not one seed per rank)
    assert not torch.allclose(state.params["w"][0], state.params["w"][2])


def test_a_failing_rank_surfaces_as_an_error_without_a_hang(two_ranks):
    # (rank 1's own ValueError and exit code are checked in the fixture)
    got = two_ranks[0]
    assert got["step"] == 3, got
    assert "rank 0" in got["error"] and "another rank" in got["error"] and "step 3" in got["error"]
    assert got["seconds"] < 20.0  # the peer's exit is noticed, not the collective timeout


# ------------------------------------------------------------------------ one process, no group


def test_ddp_with_the_optimizer_face_equals_the_full_batch_run(two_ranks):
    """DDP's averaged .grad through as_optimizer: both ranks identical, equal to one process on all rows."""
    reference = _ddp_face_run(lambda batch, rank, size: batch, 0, 1)
    for key in ("w", "b"):
        assert torch.equal(two_ranks[0]["ddp_face"][key], two_ranks[1]["ddp_face"][key])
        torch.testing.assert_close(two_ranks[0]["ddp_face"][key], reference[key], rtol=1e-12, atol=1e-13)
    one_shard = _ddp_face_run(lambda batch, rank, size: shard(batch, 0, WORLD), 0, 1)   # rank 0's rows only
    assert not torch.allclose(two_ranks[0]["ddp_face"]["w"], one_shard["w"], rtol=1e-9, atol=1e-10)


def test_without_a_process_group_the_world_is_one_process():
    assert world() == (0, 1)
    tensors = [torch.ones(2), torch.zeros(3, dtype=torch.float64)]
    assert all(a is b for a, b in zip(all_reduce_mean(tensors), tensors))
    transform = data_parallel(METHODS["sghmc"](log_posterior))
    reference = METHODS["sghmc"](log_posterior)
    a, b = transform.init(initial_params(), seed=0), reference.init(initial_params(), seed=0)
    for step in range(3):
        a, _ = transform.update(a, batch_of(step))
        b, _ = reference.update(b, batch_of(step))
    assert all(torch.equal(a.params[k], b.params[k]) for k in ("w", "b"))
    with pytest.raises(ValueError, match="not initialised"):
        world(group=object())


def test_reduced_log_posterior_keeps_value_and_gradient_in_one_process():
    params = {k: v.requires_grad_(True) for k, v in initial_params().items()}
    value, _ = reduced_log_posterior(log_posterior)(params, batch_of(0))
    expected, _ = log_posterior(params, batch_of(0))
    assert torch.equal(value, expected)
    got = torch.autograd.grad(value, list(params.values()))
    want = torch.autograd.grad(expected, list(params.values()))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_digest_is_exact_and_sensitive():
    a = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(digest([a, a[:3].float()]), digest([a.clone(), a[:3].float().clone()]))
    b = a.clone()
    b[500] = torch.nextafter(b[500], torch.tensor(1.0, dtype=torch.float64))
    assert not torch.equal(digest([a]), digest([b]))
    assert not torch.equal(digest([a]), digest([a.flip(0)]))  # a permutation changes the weighted sum


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="engine"):
        data_parallel((lambda p: p, lambda s, b: (s, None)))
    with pytest.raises(ValueError, match="check_every"):
        data_parallel(METHODS["sgld"](log_posterior), check_every=0)
    with pytest.raises(TypeError, match="shard_size"):
        data_parallel(METHODS["sgld"](log_posterior), shard_size=3)
    with pytest.raises(ValueError, match="bucket_mb"):
        data_parallel(METHODS["sgld"](log_posterior), bucket_mb=0)
    with pytest.raises(ValueError, match="num_chains"):
        chain_block(0)
    local = lift_block(ensemble_single(), 3)
    with pytest.raises(TypeError, match="seed"):
        local.init(replicate(initial_params(), 3), seed=None)
    with pytest.raises(ValueError, match="leads with 2 chains"):
        local.init(replicate(initial_params(), 2), seed=0)
    with pytest.raises(ValueError, match="lead with"):
        gather_chains(torch.zeros(2, 4), num_chains=3)
