"""Data-parallel step (issue 14): the 784-512-512-10 MLP on 1 and 2 gloo processes, ours vs DDP + SGD.

Model: an ``nn.Sequential`` MLP 784-512-512-10 (ReLU, 669 706 float32 parameters, 2.7 MB), a global
batch of 256 random inputs and labels split evenly over the R processes (R = 1, 2; gloo on
localhost, processes spawned here, one torch thread each), loss the mean cross-entropy (the negative
per-datum log posterior with a flat prior). Contenders, timed in every process in lockstep:

* ``ours``: ``data_parallel(bayesflow.optim.sgd.build(log_posterior, lr)).update(state, shard,
  inplace=True)`` — backward through the bucketed log posterior, each bucket's all-reduce started
  asynchronously as backward produces it (1 MiB first bucket, then 25 MiB: DDP's), then the engine's
  SGD step;
* ``ours, no overlap``: the gradient by ``torch.autograd.grad`` first, then
  ``data_parallel(...).step(state, grads, log_posterior=value)`` — one flat all-reduce after backward;
* ``DDP + torch.optim.SGD``: ``DistributedDataParallel`` (its bucketed all-reduce overlapped with
  backward) with ``torch.optim.SGD(foreach=True)``: ``zero_grad``, ``backward``, ``step`` — the
  baseline (target: ours ≤ 1.1×);
* ``local``: the same update on the shard without any reduction (the compute alone);
* ``all-reduce``: one ``all_reduce`` of a 669 706-float buffer (the communication alone).

Beside the wall clock, each block's process CPU time (``time.process_time``: the main thread and
gloo's worker threads) is recorded — the step's cost in CPU, which the machine's other tenants do
not inflate the way they inflate waiting (the JSON's ``process_cpu_s`` and ``cpu_ratio_vs_ddp``).

Communication fraction of our step: exposed = (ours − local) / ours (what the collectives add to
the step, after overlap), and raw = all-reduce / ours (the collective's own time, as if none of it
overlapped). Timing: wall clock (collectives wait on the peer; thread CPU time would miss that), a
barrier before every block of ``inner`` calls, contenders interleaved with the order rotated every
round, medians of the per-call block times; the ratio is the median of the per-round ratios (paired).

Run: ``python benchmarks/bench_distributed.py [--quick]`` (results/distributed.json and a table).
"""

from __future__ import annotations

import datetime
import itertools
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import Row, cli, fmt_time, markdown_table, write_json

SIZES = {False: (784, 512, 512, 10), True: (32, 16, 16, 4)}
BATCH, LR = 256, 1e-3


def _settings(quick: bool) -> dict:
    return {"sizes": SIZES[quick], "rounds": 2 if quick else 30, "inner": 1 if quick else 3,
            "warmup": 1 if quick else 3, "worlds": (1, 2)}


def _mlp(sizes) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _contenders(rank: int, size: int, cfg: dict) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bayesflow.distributed import data_parallel
    from bayesflow.optim import sgd

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, cfg["sizes"][0], generator=generator)
    y = torch.randint(0, cfg["sizes"][-1], (BATCH,), generator=generator)
    n = BATCH // size
    shard = (x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n])
    model = _mlp(cfg["sizes"])

    def log_posterior(params, batch):
        inputs, labels = batch
        logits = torch.func.functional_call(model, params, (inputs,))
        return -torch.nn.functional.cross_entropy(logits, labels), None

    def engine_state():
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    ours = data_parallel(sgd.build(log_posterior, lr=LR))
    ours_state = ours.init(engine_state(), seed=0)
    plain = sgd.build(log_posterior, lr=LR)
    plain_state = plain.init(engine_state(), seed=0)
    step_state = [ours.init(engine_state(), seed=0)]

    def ours_update():
        ours.update(ours_state, shard, inplace=True)

    def ours_no_overlap():
        state = step_state[0]
        leaves = {k: v.detach().requires_grad_(True) for k, v in state.params.items()}
        value, _ = log_posterior(leaves, shard)
        grads = dict(zip(leaves, torch.autograd.grad(value, list(leaves.values()))))
        step_state[0] = ours.step(state, grads, inplace=True, log_posterior=value.detach())

    def local():
        plain.update(plain_state, shard, inplace=True)

    ddp = DistributedDataParallel(_mlp(cfg["sizes"]))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR, foreach=True)

    def ddp_sgd():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(ddp(shard[0]), shard[1]).backward()
        optimizer.step()

    flat = torch.zeros(sum(p.numel() for p in model.parameters()))

    def all_reduce():
        dist.all_reduce(flat)

    return {"ours": ours_update, "ours, no overlap": ours_no_overlap, "DDP + torch.optim.SGD": ddp_sgd,
            "local": local, "all-reduce": all_reduce}, ddp


def _worker(rank: int, size: int, init_file: str, out: str, cfg: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    contenders, ddp = _contenders(rank, size, cfg)
    names = list(contenders)
    samples = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for name in names:  # warm-up
        for _ in range(cfg["warmup"]):
            contenders[name]()
    for r in range(cfg["rounds"]):
        for name in names[r % len(names):] + names[:r % len(names)]:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(cfg["inner"]):
                contenders[name]()
            samples[name].append((time.perf_counter() - start) / cfg["inner"])
            cpu[name].append((time.process_time() - start_cpu) / cfg["inner"])
    dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps({"wall": samples, "cpu": cpu}))
    del ddp
    dist.destroy_process_group()


def _measure(size: int, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "samples.json")
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_worker, args=(rank, size, os.path.join(tmp, "rdv"), out, cfg))
                     for rank in range(size)]
        for p in processes:
            p.start()
        for p in processes:
            p.join(900)
        if any(p.exitcode != 0 for p in processes):
            raise RuntimeError(f"a benchmark process failed: exit codes {[p.exitcode for p in processes]}")
        return json.loads(Path(out).read_text())


def _paired(samples: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))


def run(quick: bool = False, out_dir: Path | None = None, verbose: bool = True) -> list[Row]:
    cfg = _settings(quick)
    rows, raw, summary = [], {}, {}
    size_label = "-".join(map(str, cfg["sizes"])) + f", batch {BATCH}"
    for world in cfg["worlds"]:
        measured = _measure(world, cfg)
        raw[f"R={world}"] = measured
        samples, cpu = measured["wall"], measured["cpu"]
        median = {name: statistics.median(values) for name, values in samples.items()}
        cpu_median = {name: statistics.median(values) for name, values in cpu.items()}
        ours, local = median["ours"], median["local"]
        info = {"median_s": median, "ratio_vs_ddp": _paired(samples, "ours", "DDP + torch.optim.SGD"),
                "ratio_no_overlap_vs_ddp": _paired(samples, "ours, no overlap", "DDP + torch.optim.SGD"),
                "exposed_comm_fraction": max(0.0, (ours - local) / ours) if world > 1 else 0.0,
                "raw_comm_fraction": median["all-reduce"] / ours if world > 1 else 0.0,
                "overlap_saving_s": median["ours, no overlap"] - ours,
                "process_cpu_s": cpu_median, "cpu_ratio_vs_ddp": _paired(cpu, "ours", "DDP + torch.optim.SGD")}
        summary[f"R={world}"] = info
        target = None if quick else (1.1 if world > 1 else None)
        note = (f"comm {100 * info['exposed_comm_fraction']:.0f}% of the step exposed, all-reduce alone "
                f"{fmt_time(median['all-reduce'])} = {100 * info['raw_comm_fraction']:.0f}%") if world > 1 else ""
        rows.append(Row(f"data-parallel SGD update, {world} process(es)", size_label, ours,
                        median["DDP + torch.optim.SGD"], info["ratio_vs_ddp"], target,
                        baseline_name="DDP + torch.optim.SGD", note=note))
        rows.append(Row(f"same, gradient first, then `step` (no overlap), {world} process(es)", size_label,
                        median["ours, no overlap"], median["DDP + torch.optim.SGD"], info["ratio_no_overlap_vs_ddp"],
                        None, baseline_name="DDP + torch.optim.SGD"))
        if world > 1:
            rows.append(Row(f"same update, process CPU time (main + gloo threads), {world} process(es)", size_label,
                            cpu_median["ours"], cpu_median["DDP + torch.optim.SGD"], info["cpu_ratio_vs_ddp"], None,
                            baseline_name="DDP + torch.optim.SGD"))
        if verbose:
            print(f"R={world}: " + ", ".join(f"{k} {fmt_time(v)}" for k, v in median.items())
                  + f"; ours/DDP {info['ratio_vs_ddp']:.3f} (process CPU time: "
                  + ", ".join(f"{k} {fmt_time(v)}" for k, v in cpu_median.items())
                  + f"; ours/DDP {info['cpu_ratio_vs_ddp']:.3f})", flush=True)
    write_json("distributed_quick" if quick else "distributed", rows, raw, directory=out_dir, quick=quick,
               summary=summary, timing="wall clock, median of per-call block times; ratios paired per round")
    table = markdown_table(rows)
    directory = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parent / "results"
    (directory / ("distributed_quick.md" if quick else "distributed.md")).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    cli(run, "Data-parallel step of the 784-512-512-10 MLP: ours vs DDP + torch.optim.SGD, 1 and 2 processes")
