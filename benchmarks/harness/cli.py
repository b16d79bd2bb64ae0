"""``python -m benchmarks``: run the benchmarks, check their JSON, draw the plots, rewrite the tables.

    python -m benchmarks                          # every benchmark at full size -> results/*.json, plots,
                                                  # the tables in benchmarks/README.md, results/summary.md
    python -m benchmarks --quick --out DIR        # CI smoke run (tiny sizes): DIR/*_quick.json, plots and
                                                  # DIR/README_tables.md; nothing committed is touched
    python -m benchmarks --only engine,presets    # rerun these; the other sections come from their saved JSON
    python -m benchmarks --skip toolkit           # everything but these (``--reuse`` is the old name)
    python -m benchmarks --tables-only            # no runs: tables and plots from results/*.json
    python -m benchmarks --list                   # the benchmarks and whether each can run here

Everything runs in this one process on one torch thread (``common`` pins it); each comparison inside a
benchmark is interleaved side by side (``common.compare``). Exit status 1 when a benchmark failed or a
result file is malformed (:mod:`harness.schema`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import END, README, RESULTS, START, freeze_imports
from harness import plots, schema, suite, tables

PAGE = Path(suite.HERE) / "README.md"
"""benchmarks/README.md: the full tables go between its ``<!-- benchmarks:start/end -->`` markers."""


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: checks that every "
                        "benchmark runs and writes well-formed JSON (seconds; results not to be judged)")
    parser.add_argument("--out", type=Path, default=None, help="results directory, read and written (default "
                        "benchmarks/results; with --quick a new temporary directory)")
    parser.add_argument("--only", default="", help="comma-separated benchmarks to run (default all)")
    parser.add_argument("--skip", "--reuse", dest="skip", default="", help="comma-separated benchmarks not to "
                        "run: their saved results enter the tables as they are, with their own date")
    parser.add_argument("--tables-only", action="store_true", help="run nothing: rebuild tables and plots "
                        "from the JSON in the results directory")
    parser.add_argument("--with-slow", action="store_true", help="also the toolkit's slow reference rows")
    parser.add_argument("--no-readme", action="store_true", help="write DIR/README_tables.md instead of "
                        "rewriting benchmarks/README.md and the main README's summary")
    parser.add_argument("--readme", type=Path, default=README, help="README whose text between "
                        f"{tables.SUMMARY_START} and {tables.SUMMARY_END} gets the summary (default ./README.md)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--quiet", action="store_true", help="only the harness's own lines")
    args = parser.parse_args(argv)
    known = suite.by_name()
    unknown = sorted((set(_names(args.only)) | set(_names(args.skip))) - set(known))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {list(known)}")
    return args


def _links(paths: list[Path], start: Path) -> list[str]:
    return [os.path.relpath(p, start).replace(os.sep, "/") for p in paths]


def collect(out_dir: Path, quick: bool) -> tuple[list[tuple[suite.Benchmark, dict]], dict[str, list[str]]]:
    """The result files present in ``out_dir`` (in table order) and the problems of each malformed one."""
    found, bad = [], {}
    for bench in suite.registry():
        path = bench.result_path(out_dir, quick)
        if not path.exists():
            continue
        problems = schema.check_file(bench.kind, path)
        if problems:
            bad[path.name] = problems
        else:
            found.append((bench, schema.load(path)))
    return found, bad


def write_tables(found, figures: list[Path], out_dir: Path, args) -> list[Path]:
    """The full block into benchmarks/README.md (full runs into benchmarks/results) or DIR/README_tables.md."""
    in_place = not (args.quick or args.no_readme) and out_dir.resolve() == RESULTS.resolve()
    if not in_place:
        page = out_dir / "README_tables.md"
        page.write_text(tables.render(found, _links(figures, out_dir)) + "\n")
        summary = out_dir / "summary.md"
        summary.write_text(tables.summary(found, _links(figures, out_dir), "README_tables.md") + "\n")
        return [page, summary]
    written = []
    if tables.replace_between(PAGE, START, END, tables.render(found, _links(figures, PAGE.parent))):
        written.append(PAGE)
    else:
        print(f"warning: {PAGE} has no {START} ... {END} markers: tables not written", file=sys.stderr)
    root = args.readme.resolve().parent
    text = tables.summary(found, _links(figures, root), os.path.relpath(PAGE, root).replace(os.sep, "/"))
    summary = RESULTS / "summary.md"
    summary.write_text(text + "\n")
    written.append(summary)
    if tables.replace_between(args.readme, tables.SUMMARY_START, tables.SUMMARY_END, text):
        written.append(args.readme)
    return written


def main(argv=None) -> int:
    args = parse(argv)
    benches = suite.registry()
    if args.list:
        for b in benches:
            reason = suite.skip_reason(b, args.quick)
            print(f"{b.name:11s} {b.module + '.py':20s} {'runs' if reason is None else 'skipped: ' + reason}")
        return 0
    out_dir = args.out if args.out is not None else (
        Path(tempfile.mkdtemp(prefix="benchmarks_quick_")) if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    only, skip = set(_names(args.only)), set(_names(args.skip))
    selected = [] if args.tables_only else [b for b in benches if (not only or b.name in only) and b.name not in skip]
    freeze_imports()
    start, cpu, outcomes = time.perf_counter(), time.process_time(), []
    for bench in selected:
        print(f"== {bench.name}: {bench.title}", flush=True)
        outcome = suite.run_benchmark(bench, args.quick, out_dir, args.with_slow, verbose=not args.quiet,
                                      named=bench.name in only)
        if outcome.status == "ok":
            problems = schema.check_file(bench.kind, bench.result_path(out_dir, args.quick))
            if problems:
                outcome.status, outcome.detail = "failed", "malformed JSON: " + "; ".join(problems[:5])
        print(f"== {bench.name}: {outcome.status} in {outcome.seconds:.1f} s (CPU {outcome.cpu_seconds:.1f} s) "
              f"{outcome.detail}", flush=True)
        outcomes.append(outcome)
    found, bad = collect(out_dir, args.quick)
    payloads = {b.name: p for b, p in found}
    figures = plots.draw_all(payloads, out_dir)
    figures += [p for b in benches if b.kind == "mixing"
                if (p := out_dir / f"{b.result_name(args.quick)}.png").exists() and b.name in payloads]
    written = write_tables(found, figures, out_dir, args)
    print(f"\nresults in {out_dir}; wrote {', '.join(str(p) for p in [*figures, *written])}")
    for o in outcomes:
        print(f"  {o.name:11s} {o.status:8s} {o.seconds:6.1f} s  (CPU {o.cpu_seconds:5.1f} s)  {o.detail}")
    for name, problems in bad.items():
        print(f"  malformed {name}: {'; '.join(problems[:5])}")
    print(f"total {time.perf_counter() - start:.1f} s (CPU {time.process_time() - cpu:.1f} s)")
    failed = [o for o in outcomes if o.status == "failed"]
    return 1 if failed or bad else 0
