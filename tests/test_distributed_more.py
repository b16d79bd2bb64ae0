"""bayesflow.distributed beyond the engine presets: VI, Laplace/EKF curvature, unequal shards, overlapped
buckets, gathered moments and predictives, a 2 x 2 process mesh, a SIGKILLed rank and a resumed checkpoint.

Two launches (gloo, file:// rendezvous, processes spawned here, each under a wall-clock limit): two
ranks run every job and write what they computed; then four fresh ranks run the 2 x 2 mesh and resume
the checkpoint the first launch wrote before its rank 1 was killed. Every result is compared with the
one-process run on the concatenated data, and each comparison is shown able to fail.
"""

from __future__ import annotations

import datetime
import itertools
import math
import multiprocessing
import os
import signal
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torchopt

from bayesflow import ekf, laplace, vi
from bayesflow.distributed import (
    CollectiveFailed,
    chain_block,
    chain_diagnostics,
    data_parallel,
    data_parallel_ekf,
    data_parallel_laplace,
    flat_shard,
    gather_chains,
    gather_moments,
    lift_block,
    process_mesh,
    reduce_predictive,
    reduced_log_posterior,
    shard_normal,
)
from bayesflow.engine.noise import STEP, NoiseStream
from bayesflow.ensemble import ess, lift, replicate, rhat, running_moments
from bayesflow.predictive import classification_uncertainty, predictive_sums, regression_uncertainty
from bayesflow.sgmcmc import baoab, sghmc, sgld
from bayesflow.tree import flatten, tree_map

STEPS, BATCH, CUT = 6, 8, 3  # unequal shards: rank 0 gets rows [0, 3), rank 1 rows [3, 8)
LAUNCH_TIMEOUT, GROUP_TIMEOUT = 90.0, 10.0
K, SEED, CHECKPOINT_AFTER, KILLED_AT = 4, 11, 2, 4
TOL = {"rtol": 1e-12, "atol": 1e-13}  # float64: two shard sums against one sum


# ----------------------------------------------------------------------------------- the model


def log_posterior(params, batch):
    """Per datum: a Gaussian likelihood averaged over the batch plus the prior over N = 100."""
    x, y = batch
    residual = x @ params["w"] + params["b"] - y
    return -0.5 * (residual**2).sum(-1).mean() - 0.5e-2 * ((params["w"] ** 2).sum() + (params["b"] ** 2).sum()), None


def log_likelihood_sum(params, batch):
    """Laplace / EKF convention: summed over the rows given (one row when mapped per sample)."""
    x, y = batch
    return -0.5 * ((x @ params["w"] + params["b"] - y) ** 2).sum(), torch.tensor([])


def with_unused_leaf(params, batch):
    """The same log posterior; leaf "unused" never reaches it (its bucket never fires in backward)."""
    return log_posterior({"w": params["w"], "b": params["b"]}, batch)


def batch_of(step: int):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 3, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([[1.0, -1.0], [0.5, 0.0], [0.0, 2.0]], dtype=torch.float64) + 0.3
    return x, y + 0.1 * torch.randn(BATCH, 2, generator=generator, dtype=torch.float64)


def equal_shard(batch, rank: int, size: int):
    n = BATCH // size
    return tuple(t[rank * n:(rank + 1) * n] for t in batch)


def unequal_shard(batch, rank: int, size: int):
    assert size == 2
    return tuple(t[:CUT] if rank == 0 else t[CUT:] for t in batch)


def initial_params():
    return {"w": torch.full((3, 2), 0.1, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}


def clone(tree):
    return tree_map(lambda v: v.detach().clone(), tree)


# ----------------------------------------------------------------------------------------- runs
# Each run takes ``split(batch, rank, size)``: the rank's shard under distribution, the identity for
# the one-process reference (rank 0 of 1).


def vi_run(split, rank, size, module, n_samples):
    transform = module.build(reduced_log_posterior(log_posterior, shard_size=lambda b: len(b[0])),
                             torchopt.adam(lr=5e-2), temperature=0.05, n_samples=n_samples)
    state = transform.init(initial_params(), seed=3)
    for step in range(STEPS):
        state, _ = transform.update(state, split(batch_of(step), rank, size))
    scale = state.log_sd_diag if module is vi.diag else state.L_factor
    return {"mean": clone(state.params), "scale": clone(scale), "nelbo": state.nelbo.clone()}


def laplace_run(split, rank, size, name):
    if name == "kfac":
        model = torch.nn.Linear(3, 2).double()
        params = {k: v.detach() for k, v in model.named_parameters()}
        transform = laplace.kfac.build(model, lambda z, b: -0.5 * ((z - b[1]) ** 2).sum(), prior_prec=1.0)
    else:
        params = initial_params()
        transform = getattr(laplace, name).build(log_likelihood_sum, **(
            {"init_prec_diag": 1.0} if name == "diag_fisher" else {"init_prec": 1.0}))
    transform = data_parallel_laplace(transform)
    state = transform.init(params)
    for step in range(3):
        state, _ = transform.update(state, split(batch_of(step), rank, size), inplace=step == 1)
    if name == "kfac":
        return {"A": clone(state.A), "G": clone(state.G), "n": state.num_data.clone(), "step": state.step.clone()}
    return {"prec": state.prec_diag if name == "diag_fisher" else state.prec, "step": state.step.clone()}


def ekf_run(split, rank, size, dense=False):
    if dense:  # the dense filter on a flat parameter vector (its covariance is one matrix)
        def flat_log_likelihood(theta, batch):
            return log_likelihood_sum({"w": theta[:6].reshape(3, 2), "b": theta[6:]}, batch)

        params = initial_params()
        transform = data_parallel_ekf(ekf.dense_fisher.build(flat_log_likelihood, lr=float(BATCH), transition_cov=1e-4))
        state = transform.init(torch.cat([params["w"].reshape(-1), params["b"]]))
    else:
        transform = data_parallel_ekf(ekf.diag_fisher.build(log_likelihood_sum, lr=float(BATCH), transition_sd=0.01))
        state = transform.init(initial_params())
    for step in range(3):
        state, _ = transform.update(state, split(batch_of(step), rank, size), inplace=step == 1)
    spread = state.cov if dense else state.sd_diag
    return {"mean": clone(state.params), "spread": clone(spread), "ll": state.log_likelihood.clone()}


def engine_run(split, rank, size, make, lp=log_posterior, params=None, **kwargs):
    transform = data_parallel(make(lp), **kwargs)
    state = transform.init(params if params is not None else initial_params(), seed=3)
    for step in range(STEPS):
        state, _ = transform.update(state, split(batch_of(step), rank, size))
    return clone(state.params)


MAKERS = {
    "sgld": lambda lp: sgld.build(lp, lr=1e-2, temperature=0.05),
    "baoab": lambda lp: baoab.build(lp, lr=1e-1, temperature=0.05),
    "sghmc": lambda lp: sghmc.build(lp, lr=1e-2, temperature=0.05),
    "baoab_chains": lambda lp: lift(baoab.build(lp, lr=1e-1, temperature=0.05), 3),
}
SHARD_SIZE = {"shard_size": lambda batch: len(batch[0])}


def ensemble_run(rank, size, group=None):
    """K chains of SGHMC (chain-parallel blocks when size > 1), running moments, predictive of the chains."""
    local = lift_block(sghmc.build(log_posterior, lr=1e-2, temperature=0.2), K, group) if size > 1 else (
        lift(sghmc.build(log_posterior, lr=1e-2, temperature=0.2), K))
    state = local.init(replicate(initial_params(), K, perturbation=0.5, seed=2), seed=SEED)
    moments = running_moments(max_rank=3, dtype=torch.float64)
    summary = moments.init(state.params)
    for step in range(12):
        state, _ = local.update(state, batch_of(step % 3))
        summary, _ = moments.update(summary, state.params)
    x = batch_of(99)[0]
    outputs = torch.einsum("nd,kde->kne", x, state.params["w"]) + state.params["b"][:, None]  # (chains, n, 2)
    sums = predictive_sums(torch.float64)
    sums_state, _ = sums.update(sums.init(outputs[0]), outputs)
    return {"moments": summary, "sums": sums_state, "classification": classification_uncertainty(outputs),
            "regression": regression_uncertainty(outputs, 0.5)}


def trace_run(transform, state, rank, size, steps, on_step=None):
    trace = []
    for step in steps:
        if on_step is not None:
            on_step(step, state)
        state, _ = transform.update(state, equal_shard(batch_of(step), rank, size))
        trace.append(clone(state.params))
    return trace


def resumable():
    return data_parallel(sghmc.build(log_posterior, lr=1e-2, temperature=0.05))


# ----------------------------------------------------------------------------------- the launcher


def _worker(rank: int, size: int, init_file: str, out: str, job: str):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
        try:
            if job == "pair":
                results = _pair_job(rank, size, out)
                torch.save(results, os.path.join(out, f"rank{rank}.pt"))
                results.update(_kill_job(rank, size, out))  # rank 1 is SIGKILLed in there
                torch.save(results, os.path.join(out, f"rank{rank}.pt"))
            else:
                torch.save(_mesh_job(rank, size, out), os.path.join(out, f"rank{rank}.pt"))
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def launch(path, size: int, job: str):
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker, args=(rank, size, str(path / "rendezvous"), str(path), job))
                 for rank in range(size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} still running after {LAUNCH_TIMEOUT} s: a hang"
    results, errors = [], []
    for rank in range(size):
        results.append(torch.load(path / f"rank{rank}.pt", weights_only=False) if (
            path / f"rank{rank}.pt").exists() else None)
        errors.append((path / f"rank{rank}.err").read_text() if (path / f"rank{rank}.err").exists() else None)
    return results, errors, [process.exitcode for process in processes]


# ------------------------------------------------------------------------------------- the jobs


def _pair_job(rank, size, out):
    got = {}
    for module, samples in ((vi.diag, 1), (vi.diag, 3), (vi.dense, 1)):
        got[f"vi_{module.__name__.rsplit('.', 1)[-1]}_{samples}"] = vi_run(unequal_shard, rank, size, module, samples)
    for name in ("diag_fisher", "dense_fisher", "kfac"):
        got[f"laplace_{name}"] = laplace_run(unequal_shard, rank, size, name)
    got["ekf_equal"] = ekf_run(equal_shard, rank, size)
    got["ekf_unequal"] = ekf_run(unequal_shard, rank, size)
    got["ekf_dense_unequal"] = ekf_run(unequal_shard, rank, size, dense=True)
    for name in ("sgld", "baoab"):
        got[f"{name}_weighted"] = engine_run(unequal_shard, rank, size, MAKERS[name], **SHARD_SIZE)
        got[f"{name}_unweighted"] = engine_run(unequal_shard, rank, size, MAKERS[name])
    got["baoab_chains"] = engine_run(equal_shard, rank, size, MAKERS["baoab_chains"],
                                     params=replicate(initial_params(), 3, perturbation=0.1, seed=1), check_every=1)
    got["buckets"] = engine_run(equal_shard, rank, size, MAKERS["sghmc"], lp=with_unused_leaf,
                                params={**initial_params(), "unused": torch.ones(5, dtype=torch.float64)},
                                bucket_mb=1e-5, check_every=1)  # ~10-byte buckets: one per leaf
    ensemble = ensemble_run(rank, size)
    got["moments"] = gather_moments(ensemble["moments"], K)
    for key in ("sums", "classification", "regression"):
        got[key] = reduce_predictive(ensemble[key])
    got["regression_local"] = ensemble["regression"]
    low_rank = laplace.low_rank.build(lambda p, b: (b @ p, torch.tensor([])), lambda z, b: -0.5 * (z**2).sum(), rank=1)
    try:
        data_parallel_laplace(low_rank).update(low_rank.init(torch.zeros(3, dtype=torch.float64)), torch.eye(3))
    except TypeError as error:
        got["low_rank_error"] = str(error)
    got["block"] = chain_block(K)
    transform = resumable()
    got["uninterrupted"] = trace_run(transform, transform.init(initial_params(), seed=3), rank, size, range(STEPS))
    return got


def _kill_job(rank, size, out):
    """Rank 0 checkpoints after step CHECKPOINT_AFTER; rank 1 is SIGKILLed at step KILLED_AT."""
    def on_step(step, state):
        if rank == 1 and step == KILLED_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 0 and step == CHECKPOINT_AFTER + 1:
            torch.save(state, os.path.join(out, "checkpoint.pt"))

    transform = resumable()
    start = time.perf_counter()
    try:
        trace_run(transform, transform.init(initial_params(), seed=3), rank, size, range(STEPS), on_step)
    except CollectiveFailed as error:
        return {"error": str(error), "seconds": time.perf_counter() - start}
    return {"error": None}


def _mesh_job(rank, size, out):
    mesh = process_mesh(chain_blocks=2, data_shards=2)
    got = {"mesh": (mesh.chain_rank, mesh.data_rank)}
    ensemble = data_parallel(lift_block(MAKERS["sghmc"](log_posterior), K, group=mesh.chains), group=mesh.data,
                             check_every=1)
    state = ensemble.init(replicate(initial_params(), K, perturbation=0.5, seed=2), seed=SEED)
    trace = []
    for step in range(STEPS):
        state, _ = ensemble.update(state, equal_shard(batch_of(step), mesh.data_rank, mesh.data_shards))
        trace.append(state.params["w"][:, 0, 0].clone())
    got["chains"] = gather_chains(state.params, K, group=mesh.chains)
    got["diagnostics"] = chain_diagnostics(torch.stack(trace, dim=1), K, group=mesh.chains)
    # a new group of processes resumes the checkpoint of the killed run: each data pair on its own
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    transform = data_parallel(sghmc.build(log_posterior, lr=1e-2, temperature=0.05), group=mesh.data)
    got["resumed"] = trace_run(transform, state, mesh.data_rank, mesh.data_shards,
                               range(CHECKPOINT_AFTER + 1, STEPS))
    return got


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("pair")
    results, errors, codes = launch(path, 2, "pair")
    assert errors[0] is None and codes[0] == 0, errors[0]
    assert codes[1] == -signal.SIGKILL, (codes, errors[1])  # killed, as planned, and nothing else failed
    return results, path


@pytest.fixture(scope="module")
def mesh(pair):
    _, path = pair
    for name in ("rendezvous", "rank0.pt", "rank1.pt"):
        (path / name).unlink(missing_ok=True)
    results, errors, codes = launch(path, 4, "mesh")
    assert all(e is None for e in errors) and codes == [0] * 4, errors
    return results


def fields(record):
    """A record (a NamedTuple that indexes like a batch) as a dict, for assert_close."""
    return dict(zip(record._fields, record)) if hasattr(record, "_fields") else record


def one(pair, key):
    """Both ranks' results for ``key``, checked bit-identical across the ranks."""
    a, b = fields(pair[0][0][key]), fields(pair[0][1][key])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    return a


def identity(batch, rank, size):
    return batch


def flat(tree) -> torch.Tensor:
    return torch.cat([leaf.reshape(-1) for leaf in flatten(tree)[0]])


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("key, module, samples", [("vi_diag_1", vi.diag, 1), ("vi_diag_3", vi.diag, 3),
                                                  ("vi_dense_1", vi.dense, 1)])
def test_vi_on_unequal_shards_equals_one_process(pair, key, module, samples):
    got, reference = one(pair, key), vi_run(identity, 0, 1, module, samples)
    torch.testing.assert_close(got, reference, **TOL)
    # and the check can fail: a rank on its own rows takes another path
    alone = vi_run(unequal_shard, 0, 2, module, samples)
    assert not torch.allclose(got["mean"]["w"], alone["mean"]["w"], atol=1e-6)


@pytest.mark.parametrize("name", ["diag_fisher", "dense_fisher", "kfac"])
def test_laplace_curvature_on_unequal_shards_equals_one_process(pair, name):
    got, reference = one(pair, f"laplace_{name}"), laplace_run(identity, 0, 1, name)
    torch.testing.assert_close(got, reference, **TOL)
    alone = laplace_run(unequal_shard, 1, 2, name)   # rank 1's five rows alone
    field = "A" if name == "kfac" else "prec"
    assert not torch.allclose(flat(alone[field]), flat(got[field]))


@pytest.mark.parametrize("key, split", [("ekf_equal", equal_shard), ("ekf_unequal", unequal_shard),
                                        ("ekf_dense_unequal", unequal_shard)])
def test_ekf_equals_one_process(pair, key, split):
    got, dense = one(pair, key), "dense" in key
    torch.testing.assert_close(got, ekf_run(identity, 0, 1, dense=dense), **TOL)
    mean = (lambda m: m) if dense else (lambda m: m["w"])
    assert not torch.allclose(mean(got["mean"]), mean(ekf_run(split, 1, 2, dense=dense)["mean"]), atol=1e-6)


@pytest.mark.parametrize("name", ["sgld", "baoab"])
def test_unequal_shards_are_weighted_by_their_sizes(pair, name):
    reference = engine_run(identity, 0, 1, MAKERS[name])
    torch.testing.assert_close(one(pair, f"{name}_weighted"), reference, **TOL)
    # without shard_size: the mean of the two shard means, another gradient (3 vs 5 rows)
    assert not torch.allclose(one(pair, f"{name}_unweighted")["w"], reference["w"], atol=1e-6)


def test_mid_step_integrator_with_vmapped_chains(pair):
    reference = engine_run(identity, 0, 1, MAKERS["baoab_chains"],
                           params=replicate(initial_params(), 3, perturbation=0.1, seed=1))
    torch.testing.assert_close(one(pair, "baoab_chains"), reference, **TOL)


def test_one_bucket_per_leaf_and_an_unused_leaf(pair):
    params = {**initial_params(), "unused": torch.ones(5, dtype=torch.float64)}
    reference = engine_run(identity, 0, 1, MAKERS["sghmc"], lp=with_unused_leaf, params=params)
    got = one(pair, "buckets")
    torch.testing.assert_close(got, reference, **TOL)
    assert not torch.allclose(got["w"], initial_params()["w"])


def test_gathered_moments_and_predictive_equal_one_process(pair):
    assert [pair[0][r]["block"] for r in range(2)] == [range(0, 2), range(2, 4)]
    reference = ensemble_run(0, 1)
    torch.testing.assert_close(one(pair, "moments"), fields(reference["moments"]), **TOL)
    for key in ("sums", "classification", "regression"):
        torch.testing.assert_close(one(pair, key), fields(reference[key]), rtol=1e-12, atol=1e-12)
    assert one(pair, "classification")["num_samples"] == K and one(pair, "regression")["num_samples"] == K
    # a rank's own two chains give another predictive
    local = pair[0][0]["regression_local"]
    assert local.num_samples == 2 and not torch.allclose(one(pair, "regression")["epistemic"], local.epistemic)


def test_a_low_rank_laplace_state_is_refused(pair):
    assert "low-rank" in pair[0][0]["low_rank_error"] and "LowRankLaplaceState" in pair[0][0]["low_rank_error"]


def test_a_killed_rank_surfaces_as_an_error_without_a_hang(pair):
    got = pair[0][0]
    assert got["error"] is not None and "rank 0" in got["error"] and "another rank" in got["error"], got
    assert f"step {KILLED_AT}" in got["error"]
    assert got["seconds"] < GROUP_TIMEOUT  # the dead peer's socket is noticed, not the collective timeout


def test_chains_times_data_on_a_2x2_mesh(mesh):
    assert sorted(r["mesh"] for r in mesh) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    single = lift(MAKERS["sghmc"](log_posterior), K)
    state = single.init(replicate(initial_params(), K, perturbation=0.5, seed=2), seed=SEED)
    trace = []
    for step in range(STEPS):
        state, _ = single.update(state, batch_of(step))
        trace.append(state.params["w"][:, 0, 0].clone())
    trace = torch.stack(trace, dim=1)
    for got in mesh:
        torch.testing.assert_close(got["chains"], state.params, **TOL)
        torch.testing.assert_close(got["diagnostics"]["rhat"], rhat(trace), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["diagnostics"]["ess"], ess(trace), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(state.params["w"][0], state.params["w"][1])


def test_a_checkpoint_resumes_on_a_new_group_identically(pair, mesh):
    uninterrupted = one(pair, "uninterrupted")[CHECKPOINT_AFTER + 1:]
    for got in mesh:
        for a, b in zip(got["resumed"], uninterrupted):
            assert all(torch.equal(a[k], b[k]) for k in ("w", "b"))
    assert not torch.equal(uninterrupted[0]["w"], uninterrupted[-1]["w"])


# ------------------------------------------------------------------------ sharded noise (one process)


def test_shard_normal_slices_are_the_full_draw():
    numel, block = 1000, 64
    full = shard_normal(5, 17, 0, numel, numel, block_size=block, dtype=torch.float64)
    for cuts in ([0, 1000], [0, 500, 1000], [0, 1, 63, 64, 65, 700, 999, 1000], [0, 333, 334, 1000]):
        parts = [shard_normal(5, 17, a, b, numel, block_size=block, dtype=torch.float64)
                 for a, b in itertools.pairwise(cuts)]
        assert torch.equal(torch.cat(parts), full)
    # keyed by key, step and block: other keys / steps / blocks are other numbers
    assert not torch.equal(full, shard_normal(6, 17, 0, numel, numel, block_size=block, dtype=torch.float64))
    assert not torch.equal(full, shard_normal(5, 18, 0, numel, numel, block_size=block, dtype=torch.float64))
    assert not torch.equal(full[:64], full[64:128])
    # standard normal: 200 000 draws, mean and variance within 5 standard errors
    big = shard_normal(1, 0, 0, 200_000, 200_000, block_size=4096, dtype=torch.float64)
    assert abs(float(big.mean())) < 5 / math.sqrt(2e5) and abs(float(big.var()) - 1) < 5 * math.sqrt(2 / 2e5)


def test_a_sharded_sgld_step_is_the_full_step():
    """ZeRO-style: two shards of θ updated separately with their own noise slices equal the full update."""
    theta, grad = torch.randn(300, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    key, step, h, T = NoiseStream(torch.device("cpu")).initial_state(0), 4, 1e-2, 0.5

    def sgld_step(start, stop):
        noise = shard_normal(key, step, start, stop, 300, block_size=32, dtype=torch.float64, purpose=STEP)
        return theta[start:stop] + h * grad[start:stop] + math.sqrt(2 * h * T) * noise

    assert flat_shard(300) == range(0, 300)
    assert torch.equal(torch.cat([sgld_step(0, 150), sgld_step(150, 300)]), sgld_step(0, 300))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="slice"):
        shard_normal(0, 0, 5, 3, 10)
    with pytest.raises(TypeError, match="step"):
        shard_normal(0, 1.5, 0, 3, 10)
    with pytest.raises(ValueError, match="block_size"):
        shard_normal(0, 0, 0, 3, 10, block_size=0)
    with pytest.raises(ValueError, match="world has 1"):
        process_mesh(2, 1)
    with pytest.raises(ValueError, match="data_shards"):
        process_mesh(1, 0)
    with pytest.raises(TypeError, match="Laplace transform"):
        data_parallel_laplace(lambda state, batch: state)
    with pytest.raises(TypeError, match="MomentsState"):
        gather_moments({"mean": torch.zeros(2)}, 2)
    with pytest.raises(TypeError, match="PredictiveSums"):
        reduce_predictive(torch.zeros(3))
    with pytest.raises(ValueError, match="shard_size"):
        reduced_log_posterior(log_posterior, shard_size=lambda b: -1)(initial_params(), batch_of(0))
    with pytest.raises(TypeError, match="shard_size"):
        reduced_log_posterior(log_posterior, shard_size=4)
