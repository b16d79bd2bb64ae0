"""Markdown from result files: one section per benchmark, the full page block and a short summary.

Every section names the date, machine and versions of its own measurement (sections measured at
different times sit side by side). :func:`replace_between` rewrites the text between two markers.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from common import markdown_table
from harness.suite import Benchmark

SUMMARY_START, SUMMARY_END = "<!-- benchmarks-summary:start -->", "<!-- benchmarks-summary:end -->"

INTRO = (
    "Reproduce with `python -m benchmarks` (every benchmark at full size, one torch thread; `--only NAME,...` "
    "reruns some, `--tables-only` rebuilds these tables and the plots from `results/*.json`, `--quick --out DIR` "
    "is the CI smoke run). Contenders run interleaved in one process (order rotated every round); times are "
    "medians over rounds and a ratio is the median over rounds of the per-round ratio ours / baseline (paired, "
    "so the machine's drift between rounds cancels; a note gives the ratio of the medians where the two differ "
    "by over 10 %). Memory rows give extra tensor memory as a multiple of the parameter bytes. Raw samples: "
    "`results/*.json`; each section says when and where it was measured."
)


def machine_line(machine: dict[str, Any]) -> str:
    """``measured <date> on <cpu> (<n> cores, <t> torch thread), torch <v>[, posteriors <v>]``."""
    if not machine:
        return "date and machine not recorded in its JSON"
    text = f"measured {machine.get('date', '?')} on {machine.get('cpu', '?')}"
    if "cpu_count" in machine:
        text += f" ({machine['cpu_count']} cores, {machine.get('torch_threads', '?')} torch thread)"
    text += f", torch {machine.get('torch', '?')}"
    if "posteriors" in machine:
        text += f", posteriors {machine['posteriors']}"
    if "loadavg" in machine:
        text += f"; load average {', '.join(f'{x:.1f}' for x in machine['loadavg'])}"
    return text


def targets_met(payload: dict[str, Any]) -> tuple[int, int]:
    """``(met, with a target)`` over a Row-table payload's rows."""
    verdicts = [row["passed"] for row in payload.get("rows", []) if row.get("passed") is not None]
    return sum(verdicts), len(verdicts)


def _pm(value, se) -> str:
    return "—" if value is None else f"{value:.4f} ± {se:.4f}"


def accuracy_table(payload: dict[str, Any]) -> str:
    lines = [f"Target {payload.get('target', 'N(0,1)')} (true Var θ = 1), friction α = 1, {payload['chains']:,} "
             f"chains" + (f", {payload['steps']:,} steps ({payload['burn_in']:,} burn-in)" if "steps" in payload
                          else "") + "; the same code for both libraries but the import.", "",
             "| sampler | h | bayesflow Var θ | exact for bayesflow's scheme | posteriors Var θ |",
             "|---|---|---:|---:|---:|"]
    for r in payload["rows"]:
        lines.append(f"| {r['sampler']} | {r['lr']} | {_pm(r['bayesflow'], r['bayesflow_se'])} | "
                     f"{r['bayesflow_exact']:.4f} | {_pm(r['posteriors'], r['posteriors_se'])} |")
    return "\n".join(lines)


def curvlinops_table(payload: dict[str, Any]) -> str:
    base = payload["adam_step_s"]
    lines = [f"One torch Adam training step: {base * 1e3:.1f} ms (the unit of the ratios); curvlinops "
             f"{payload.get('curvlinops_version', '?')}; KFAC factors agree to a max relative difference of "
             f"{payload['kfac_max_rel_difference']:.1e}.", "",
             "| what | bayesflow | curvlinops | bayesflow / step | curvlinops / step |", "|---|---:|---:|---:|---:|"]
    for key, what in (("kfac", "KFAC factors of one batch"), ("ggnvp", "one GGN-vector product")):
        ours, theirs = payload[f"{key}_ours_s"], payload[f"{key}_curvlinops_s"]
        lines.append(f"| {what} | {ours * 1e3:.1f} ms | {theirs * 1e3:.1f} ms | {ours / base:.2f}× | "
                     f"{theirs / base:.2f}× |")
    return "\n".join(lines)


def gpu_table(payload: dict[str, Any]) -> str:
    checks = {k: v for k, v in payload.items() if isinstance(v, dict) and "ok" in v}
    passed = sum(bool(v["ok"]) for v in checks.values())
    lines = [f"{payload['device']}, torch {payload['torch']}: {passed}/{len(checks)} checks passed.", "",
             "| check | ok | detail |", "|---|:---:|---|"]
    lines += [f"| {name} | {'✅' if v['ok'] else '❌'} | {v.get('detail', '')} |" for name, v in checks.items()]
    timings = payload.get("timings_ms", {})
    if timings:
        lines += ["", "Timings (ms, CUDA-synchronised medians): "
                  + "; ".join(f"{k} {v:.3f}" for k, v in timings.items()) + "."]
    return "\n".join(lines)


def mixing_table(payload: dict[str, Any]) -> str:
    """bench_mixing's own tables (``mixing_report.markdown``)."""
    return importlib.import_module("mixing_report").markdown(payload)


def section(bench: Benchmark, payload: dict[str, Any]) -> str:
    """``**title** — measured ...`` and the benchmark's table(s)."""
    head = f"**{bench.title}** — {machine_line(payload.get('machine', {}))}"
    if bench.kind == "rows":
        met, total = targets_met(payload)
        head += f". Targets met: {met}/{total}." if total else "."
        body = markdown_table(payload["rows"])
    else:
        body = {"accuracy": accuracy_table, "curvlinops": curvlinops_table, "gpu": gpu_table,
                "mixing": mixing_table}[bench.kind](payload)
        head += "."
    if payload.get("quick"):
        head += " (QUICK smoke run: sizes too small to judge.)"
    return f"{head}\n\n{body}"


def render(found: list[tuple[Benchmark, dict[str, Any]]], plots: list[str] = ()) -> str:
    """The block between the markers of benchmarks/README.md: how to reproduce, plots, every section."""
    met = [targets_met(p) for b, p in found if b.kind == "rows"]
    lines = [INTRO, "", f"Targets met (timing and memory tables): {sum(m for m, _ in met)}/{sum(t for _, t in met)}."]
    if plots:
        lines += ["", " ".join(f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots)]
    for bench, payload in found:
        lines += ["", section(bench, payload)]
    return "\n".join(lines)


def _misses(payload: dict[str, Any]) -> str:
    out = []
    for r in payload["rows"]:
        if r.get("passed") is False:
            value = f"{r['ours']:.2f}×" if r["unit"] == "x" else f"{r['ratio']:.2f}×"
            out.append(f"{r['what'].split(' — ')[0]} at {r['size']} ({value}, target ≤ {r['target']:g}×)")
    return "; ".join(out) or "none"


def _summary_line(bench: Benchmark, payload: dict[str, Any]) -> str | None:
    name = bench.title.split(":")[0]
    if bench.kind == "rows":
        met, total = targets_met(payload)
        return f"| {name} | {met}/{total} | {_misses(payload)} |"
    if bench.kind == "accuracy":
        largest = max(r["lr"] for r in payload["rows"])
        cells = [f"{r['sampler']} {r['bayesflow']:.3f} (exact {r['bayesflow_exact']:.3f})"
                 + ("" if r["posteriors"] is None else f" vs posteriors {r['posteriors']:.3f}")
                 for r in payload["rows"] if r["lr"] == largest]
        return f"| {name} | — | Var θ at h = {largest} (target 1): {'; '.join(cells)} |"
    if bench.kind == "mixing":
        met, misses = 0, []
        for key, t in payload["targets"].items():
            # the goals are per-chain errors (its iid floors are the per-chain floors)
            ours = [(c.get("best_per_chain") or c["best"]).get("w2_chain", c["best"]["w2"])
                    for c in t["configurations"].values() if c.get("library") == "bayesflow" and c.get("best")]
            best = min(ours) if ours else float("inf")
            met += best <= t["goal"]
            if best > t["goal"]:
                misses.append(f"({key}) {best:.3g} vs ≤ {t['goal']:g}")
        return f"| {name} | {met}/{len(payload['targets'])} | {'; '.join(misses) or 'none'} |"
    return None


def summary(found: list[tuple[Benchmark, dict[str, Any]]], plots: list[str] = (), link: str = "") -> str:
    """A short block for the main README: targets met and misses per benchmark, the plots, a link to
    the full tables (``link``: the path of benchmarks/README.md from that README)."""
    lines = ["| benchmark | targets met | misses / headline |", "| --- | :---: | --- |"]
    lines += [line for b, p in found if (line := _summary_line(b, p)) is not None]
    if plots:
        lines += ["", " ".join(f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots)]
    if link:
        lines += ["", f"Full tables, machines and method: [{link}]({link})."]
    return "\n".join(lines)


def replace_between(path: Path, start: str, end: str, content: str) -> bool:
    """Replace the text between the markers ``start`` and ``end`` in the file at ``path``; False (file
    untouched) when it does not exist or lacks the markers."""
    path = Path(path)
    if not path.exists():
        return False
    text = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    path.write_text(pattern.sub(lambda _: f"{start}\n{content}\n{end}", text, count=1))
    return True
