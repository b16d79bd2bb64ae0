"""Run every benchmark and write the results table into README.md.

    python benchmarks/run_all.py            # full sizes (~10-15 min on one thread), rewrites README
    python benchmarks/run_all.py --quick    # tiny smoke run: *_quick.json only, README untouched
    python benchmarks/run_all.py --only engine,presets

Results go to ``benchmarks/results/<name>.json`` (torch version, machine, date, every raw sample);
the markdown table goes between ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->`` in
README.md, and always to ``benchmarks/results/README_table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import re
import sys
import time
from pathlib import Path

from common import END, README, RESULTS, START, Row, machine_info, markdown_table

BENCHMARKS = {
    "engine": ("bench_engine", "Engine (issue 2): SGLD step, update, T = 0 vs torch SGD"),
    "presets": ("bench_presets", "Presets (issue 3): optimizers vs torch.optim, samplers vs hand-written, memory"),
    "ensemble": ("bench_ensemble", "Ensembles (issue 4): K chains of an MLP 64-100-32-10, batch 64"),
    "toolkit": ("bench_toolkit", "Toolkit (issue 10): VI, Laplace, EKF per batch vs a torch Adam training step, "
                "784-512-512-10 MLP, batch 128"),
}


def render(sections: list[tuple[str, list[Row]]], info: dict, quick: bool = False) -> str:
    """The README section: how to reproduce, the machine, one table per benchmark."""
    passed = [r.passed for _, rows in sections for r in rows if r.passed is not None]
    lines = [
        "Reproduce with `python benchmarks/run_all.py` (one torch thread; `--quick` for a smoke run). "
        "Contenders run interleaved in one process (order rotated every round); times are medians over "
        "rounds and a ratio is the median over rounds of the per-round ratio ours / baseline (paired, so "
        "the machine's drift between rounds cancels; a note gives the ratio of the medians where the two "
        "differ by over 10 %). Memory rows give extra tensor memory as a multiple of the parameter bytes. "
        "Raw samples: `benchmarks/results/*.json`.",
        "",
        f"Measured {info['date']} on {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch "
        f"thread), torch {info['torch']}, Python {info['python']}"
        + (f", posteriors {info['posteriors']}" if "posteriors" in info else "")
        + (f"; load average at the end {', '.join(f'{x:.1f}' for x in info['loadavg'])}" if "loadavg" in info
           else "")
        + f". Targets met: {sum(passed)}/{len(passed)}." + (" (QUICK smoke run: sizes too small to judge.)"
                                                            if quick else ""),
    ]
    for title, rows in sections:
        lines += ["", f"**{title}**", "", markdown_table(rows)]
    return "\n".join(lines)


def update_readme(table: str, readme: Path = README, fallback: Path | None = None) -> Path:
    """Replace the text between the markers in ``readme``; without markers write ``fallback``."""
    fallback = fallback if fallback is not None else RESULTS / "README_table.md"
    fallback.parent.mkdir(parents=True, exist_ok=True)
    fallback.write_text(table + "\n")
    if not readme.exists():
        return fallback
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        return fallback
    readme.write_text(pattern.sub(lambda _: f"{START}\n{table}\n{END}", text, count=1))
    return readme


def _saved(name: str, directory: Path) -> tuple[str, list[Row]]:
    """A section from a benchmark's saved JSON, its title saying when and where it was measured."""
    payload = json.loads((directory / f"{name}.json").read_text())
    fields = {f.name for f in dataclasses.fields(Row)}
    rows = [Row(**{k: v for k, v in row.items() if k in fields}) for row in payload["rows"]]
    machine = payload.get("machine", {})
    title = (f"{BENCHMARKS[name][1]} (saved results, measured {machine.get('date', '?')} on "
             f"{machine.get('cpu', '?')})")
    return title, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke run)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of "
                        + ", ".join(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--readme", type=Path, default=README, help="README to rewrite between the markers")
    parser.add_argument("--no-readme", action="store_true", help="do not touch the README")
    parser.add_argument("--reuse", default="", help="comma-separated benchmarks whose saved results "
                        "(results/<name>.json) go into the table as they are, each labelled with its own "
                        "measurement date and machine, instead of being run again")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    reused = [n.strip() for n in args.reuse.split(",") if n.strip()]
    names = [n for n in names if n not in reused]
    unknown = (set(names) | set(reused)) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; choose from {list(BENCHMARKS)}")
    sections = []
    out_dir = args.out if args.out is not None else RESULTS
    for name in BENCHMARKS:
        if name in reused:
            sections.append(_saved(name, out_dir))
            continue
        if name not in names:
            continue
        module_name, title = BENCHMARKS[name]
        start = time.perf_counter()
        print(f"== {name}: {title}", flush=True)
        module = importlib.import_module(module_name)
        rows = module.run(quick=args.quick, out_dir=args.out)
        print(f"== {name} took {time.perf_counter() - start:.0f} s", flush=True)
        sections.append((title, rows))
    table = render(sections, machine_info(), quick=args.quick)
    print(table)
    suffix = "_quick" if args.quick else ""
    if args.quick or args.no_readme or set(names) | set(reused) != set(BENCHMARKS):
        path = out_dir / f"README_table{suffix}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table + "\n")
    else:
        path = update_readme(table, args.readme, out_dir / "README_table.md")
    print(f"table written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
