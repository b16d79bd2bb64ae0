r"""Mixing benchmark (issue 15): sample quality per gradient of every SG-MCMC configuration.

Protocol (a careful user's): for each target (:mod:`mixing_targets`) and configuration
(:mod:`mixing_configs`), 8 chains of 20 000 gradient evaluations each, the first 2 000 burn-in
(a configuration costing g gradients a step runs 20 000/g steps); the best setting over a
log-spaced step grid (× a friction grid for momentum methods) is reported. Metric: W2 between the
Gaussian fit of the pooled post-burn-in samples and the exact posterior, divided by √tr Σ
(:mod:`mixing_metrics`); also the mean over chains of each chain's own W2 (18 000 samples — the
scale of issue 15's numbers), ESS per gradient (multi-chain ESS, the minimum over four summaries —
the coordinates along the largest-, median- and smallest-variance principal axes and the squared
Mahalanobis radius — per post-burn-in gradient), and the pooled bias: |μ̂ − μ|/√tr Σ and
tr Σ̂/tr Σ − 1. The iid floor is the same metric of 8 × 18 000 exact draws (the mean of 5 repeats).
Every setting shares the same starting points, mini-batch streams and (bayesflow) noise seeds.

Run: ``python benchmarks/bench_mixing.py`` (≈ 90 min, one thread; writes
``results/mixing.json``, ``mixing.md``, ``mixing.png``); ``--quick`` (seconds, targets a and c,
writes ``mixing_quick.*`` under ``--out``); ``--update --configs A,B [--targets c,d]`` re-measures
only those configurations and replaces their entries in the existing results. posteriors' columns
need ``posteriors==0.1.3`` (the ``[bench]`` extra) and are skipped with a note without it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import common  # first: pins torch to one thread (imported for that and for RESULTS / machine_info)
import mixing_report
from mixing_configs import CONFIGURATIONS, Problem, available
from mixing_metrics import RunStatistics
from mixing_targets import ISSUE, TARGETS, make_target

__all__ = ["FULL", "QUICK", "iid_floor", "run", "run_configuration"]

FULL = {"budget": 20_000, "burn_in": 2_000, "chains": 8, "steps": 6, "frictions": (1.0, 4.0, 16.0),
        "targets": TARGETS, "floor_repeats": 5,
        "checkpoints": (2_500, 3_000, 4_000, 6_000, 8_000, 12_000, 16_000, 20_000)}
QUICK = {"budget": 500, "burn_in": 100, "chains": 2, "steps": 2, "frictions": (4.0,), "targets": ("a", "c"),
         "floor_repeats": 1, "checkpoints": (300, 500)}
SEED = 1500


def scales(target, config) -> tuple[float, float]:
    """(λ_min, λ_max) the grid is scaled by: the target's curvature, or the configuration's own."""
    return config.curvature(target) if config.curvature is not None else target.curvature


def step_grid(target, config, points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, h): the log-spaced dimensionless grid u (``target.step_range``, largest first) and the steps
    h = u/λ_max (first-order configurations) or u/√λ_max (momentum)."""
    hi, lo = config.step_range or target.step_range
    u = torch.logspace(math.log10(hi), math.log10(lo), points, dtype=torch.float64) if points > 1 else \
        torch.tensor([math.sqrt(hi * lo)], dtype=torch.float64)
    lam = scales(target, config)[1]
    return u, u / (lam if config.order == 1 else math.sqrt(lam))


def _groups(config, steps: int, frictions: list) -> list[list[tuple[int, object]]]:
    """The grid split into batched runs: (step index, friction) pairs that share one run."""
    grid = [(i, f) for f in frictions for i in range(steps)]
    keys = [(0 if config.per_chain_step else i, 0 if config.per_chain_friction else frictions.index(f))
            for i, f in grid]
    return [[g for g, k in zip(grid, keys) if k == key] for key in dict.fromkeys(keys)]


def friction_factors(config, protocol: dict) -> tuple:
    """The friction grid f (α = f·√λ_min): the configuration's own, else the protocol's."""
    return tuple(config.frictions) if config.frictions is not None else tuple(protocol["frictions"])


def _run_group(target, config, grid, u, h, frictions, protocol, stream, start) -> list[dict]:
    replicates, gps = protocol["chains"], config.grads_per_step
    factors = friction_factors(config, protocol)
    samples = (protocol["budget"] - protocol["burn_in"]) // gps
    count = len(grid)
    step = torch.tensor([float(h[i]) for i, _ in grid for _ in range(replicates)], dtype=torch.float64)
    friction = None if grid[0][1] is None else (
        torch.tensor([f for _, f in grid for _ in range(replicates)], dtype=torch.float64)
        if config.per_chain_friction else grid[0][1])
    problem = Problem(target, count * replicates, [SEED + r for _ in range(count) for r in range(replicates)],
                      burn_in=protocol["burn_in"])
    try:
        sampler = config.factory(problem, step, friction)
        setup = float(getattr(sampler, "setup_gradients", 0))  # e.g. finding a mode: paid from the burn-in
        if setup > protocol["burn_in"]:
            raise ValueError(f"{config.name}: its setup costs {setup:g} gradients, more than the burn-in budget")
        burn = int(protocol["burn_in"] - setup) // gps
        checkpoints = [(g - protocol["burn_in"]) // gps for g in protocol["checkpoints"]]
        state = sampler.init(start.repeat(count, 1))
        stats = RunStatistics(count, replicates, target.mean, target.cov, samples, checkpoints)
        for t in range(burn + samples):
            batch = None if stream is None else stream[t].repeat(count, 1)
            state = sampler.update(state, batch)
            if t >= burn:
                stats.add(sampler.params(state).detach())
    except Exception as error:  # a setting that fails (a library error on diverged chains) is reported, not fatal
        message = f"{type(error).__name__}: {str(error)[:300]}"
        print(f"  {config.name}: a run failed ({message})", flush=True)
        return [{"u": float(u[i]), "step": float(h[i]), "step_index": i, "friction": f, "diverged": True,
                 "friction_factor": None if f is None else factors[frictions.index(f)],
                 "error": message, "w2": math.inf, "w2_chain": math.inf} for i, f in grid]
    result = stats.metrics()
    return [{"u": float(u[i]), "step": float(h[i]), "step_index": i,
             "friction_factor": None if f is None else factors[frictions.index(f)], "friction": f,
             "diverged": bool(result["diverged"][s]), "setup_gradients": setup,
             **{k: float(result[k][s]) for k in ("w2", "w2_chain", "mean_bias", "trace_bias", "ess_min")},
             "ess": result["ess"][s].tolist(), "ess_per_gradient": float(result["ess_min"][s]) / (
                 replicates * samples * gps),
             "curve": {str(c * gps + protocol["burn_in"]): float(v["w2"][s]) for c, v in stats.curve.items()}}
            for s, (i, f) in enumerate(grid)]


def run_configuration(target, name: str, protocol: dict, verbose: bool = True) -> dict:
    """Every grid setting of configuration ``name`` on ``target``; returns settings and the best."""
    config = CONFIGURATIONS[name]
    gps = config.grads_per_step
    u, h = step_grid(target, config, protocol["steps"])
    root = math.sqrt(scales(target, config)[0])
    frictions = [f * root for f in friction_factors(config, protocol)] if config.momentum else [None]
    stream = target.batches(protocol["budget"] // gps, protocol["chains"], SEED + 1)
    start = target.initial(protocol["chains"], SEED + 2)
    settings, started = [], time.perf_counter()
    for grid in _groups(config, len(h), frictions):
        settings += _run_group(target, config, grid, u, h, frictions, protocol, stream, start)
    finite = [s for s in settings if not s["diverged"]]
    best = min(finite, key=lambda s: s["w2"]) if finite else None
    best_chain = min(finite, key=lambda s: s["w2_chain"]) if finite else None
    notes = []
    if best is not None:
        if best["step_index"] in (0, len(h) - 1):
            notes.append("best step at the grid's " + ("largest" if best["step_index"] == 0 else "smallest") + " value")
        if config.momentum and len(frictions) > 1 and best["friction"] in (frictions[0], frictions[-1]):
            notes.append("best friction at the grid's edge")
    seconds = time.perf_counter() - started
    if verbose:
        shown = "all diverged" if best is None else (f"W2/√trΣ {best['w2']:.4f} (per chain {best['w2_chain']:.4f}) "
                                                     f"u={best['u']:.3g} f={best['friction_factor']} "
                                                     f"ESS/grad {best['ess_per_gradient']:.4f}")
        print(f"  {name:22s} {shown}  [{seconds:.0f} s]", flush=True)
    return {"library": config.library, "name": config.name, "grads_per_step": gps, "settings": settings,
            "best": best, "best_per_chain": best_chain, "notes": notes, "seconds": seconds}


def iid_floor(target, protocol: dict, seed: int = SEED + 3) -> dict:
    """The metric of ``chains × (budget − burn_in)`` exact draws, mean and spread over repeats."""
    replicates, samples = protocol["chains"], protocol["budget"] - protocol["burn_in"]
    checkpoints = [g - protocol["burn_in"] for g in protocol["checkpoints"]]
    generator = torch.Generator().manual_seed(seed)
    runs = []
    for _ in range(protocol["floor_repeats"]):
        draws = target.exact_draws(samples * replicates, generator).view(samples, replicates, -1)
        stats = RunStatistics(1, replicates, target.mean, target.cov, samples, checkpoints, chunk=1000)
        for row in draws:
            stats.add(row)
        out = stats.metrics(ess_too=False)
        runs.append({"w2": float(out["w2"][0]), "w2_chain": float(out["w2_chain"][0]),
                     "curve": {str(c + protocol["burn_in"]): float(v["w2"][0]) for c, v in stats.curve.items()}})
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("w2", "w2_chain")}
    spread = {f"{k}_sd": (sum((r[k] - mean[k]) ** 2 for r in runs) / max(len(runs) - 1, 1)) ** 0.5 for k in mean}
    curve = {c: sum(r["curve"][c] for r in runs) / len(runs) for c in runs[0]["curve"]}
    return {**mean, **spread, "repeats": len(runs), "curve": curve,
            "note": "exact draws" if target.reference == "closed form" else
            "draws from N(reference mean, reference covariance)"}


def _strict(obj):
    """``obj`` with every non-finite float replaced by None (strict JSON; diverged settings carry a flag)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _source() -> dict:
    """Where the bayesflow under test comes from (its path and the checkout's commit)."""
    import subprocess

    info = {}
    try:
        import bayesflow

        info["path"] = str(Path(bayesflow.__file__).parent)
    except ImportError as error:
        info["error"] = str(error)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                        cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _previous(path: Path, protocol: dict) -> dict:
    """The payload ``--update`` adds to: the same protocol, or a clear refusal."""
    if not path.is_file():
        raise FileNotFoundError(f"--update adds configurations to {path}, which does not exist: run the full "
                                "benchmark first")
    payload = json.loads(path.read_text())
    wanted = {k: list(v) if isinstance(v, tuple) else v for k, v in protocol.items() if k != "targets"}
    differs = [k for k, v in wanted.items() if payload.get("protocol", {}).get(k) != v]
    if differs:
        raise ValueError(f"{path} was measured with another protocol ({differs} differ): rerun it in full")
    return payload


def run(quick: bool = False, out_dir: Path | None = None, verbose: bool = True, targets=None,
        configurations=None, update: bool = False) -> dict:
    """Run the benchmark; write ``mixing[_quick].json``, ``.md`` and ``.png`` to ``out_dir``
    (default ``benchmarks/results``); return the JSON payload.

    ``update=True`` measures only ``configurations`` (on ``targets``) and replaces or adds their
    entries in the existing ``mixing[_quick].json`` (same protocol; every other entry, the floors
    included, is kept as measured); each configuration records its own date and commit."""
    protocol = dict(QUICK if quick else FULL)
    if targets is not None:
        protocol["targets"] = tuple(targets)
    names, skipped = available(configurations)
    out_dir = Path(out_dir) if out_dir is not None else common.RESULTS
    suffix = "_quick" if quick else ""
    source, machine = _source(), common.machine_info()
    if update:
        payload = _previous(out_dir / f"mixing{suffix}.json", protocol)
        payload.setdefault("updates", []).append({"date": machine["date"], "commit": source.get("commit"),
                                                  "configurations": names, "targets": list(protocol["targets"])})
    else:
        payload = {"benchmark": "mixing", "quick": quick, "machine": machine,
                   "protocol": {k: list(v) if isinstance(v, tuple) else v for k, v in protocol.items()},
                   "bayesflow": source, "skipped": skipped, "complete": False, "targets": {}}
    for note in skipped:
        print(f"note: {note}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in protocol["targets"]:
        target = make_target(name, verbose=verbose)
        if verbose:
            print(f"== ({name}) {target.title}", flush=True)
        if update and name in payload["targets"]:
            entry = payload["targets"][name]
        else:
            floor = iid_floor(target, protocol)
            if verbose:
                print(f"  {'iid floor':22s} W2/√trΣ {floor['w2']:.4f} (per chain {floor['w2_chain']:.4f})",
                      flush=True)
            entry = payload["targets"][name] = {
                "title": target.title, "reference": target.reference, "dim": target.dim, "goal": target.goal,
                "issue": dict(zip(("bayesflow_best", "posteriors_best", "iid_floor"), ISSUE[name])),
                "curvature": target.curvature, "step_range_u": target.step_range,
                "temperature": target.temperature, "spec": target.spec, "floor": floor, "configurations": {}}
        for config in names:
            applies = CONFIGURATIONS[config].applies
            if applies is None or applies(target):
                result = run_configuration(target, config, protocol, verbose)
                result["measured"] = {"date": machine["date"], "commit": source.get("commit")}
                entry["configurations"][config] = result
        (out_dir / f"mixing{suffix}.json").write_text(json.dumps(_strict(payload), indent=1) + "\n")  # partial
    payload["complete"] = True
    (out_dir / f"mixing{suffix}.json").write_text(json.dumps(_strict(payload), indent=1) + "\n")
    (out_dir / f"mixing{suffix}.md").write_text(mixing_report.markdown(payload) + "\n")
    mixing_report.plot(payload, out_dir / f"mixing{suffix}.png")
    return payload


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget, targets a and c (smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--targets", default=None, help="comma-separated subset of " + ",".join(TARGETS))
    parser.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    parser.add_argument("--update", action="store_true",
                        help="measure only --configs and replace or add them in the existing results")
    args = parser.parse_args(argv)

    def split(text):
        return [x.strip() for x in text.split(",") if x.strip()]

    payload = run(args.quick, args.out, targets=None if args.targets is None else split(args.targets),
                  configurations=None if args.configs is None else split(args.configs), update=args.update)
    print(mixing_report.markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
