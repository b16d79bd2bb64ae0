"""The benchmarks the harness knows, when each can run, and running one in this process.

Every benchmark module has ``run(quick, out_dir, verbose)`` that writes ``<name>[_quick].json`` into
``out_dir`` (``verbose`` and toolkit's ``skip_slow`` passed where accepted); ``gpu_check`` has only
``main(["--out", dir])`` and runs where CUDA is. A benchmark whose optional dependency is missing
(curvlinops, CUDA) is *skipped* with the reason; ``bench_compiled`` and ``bench_mixing`` (written in
other issues) are registered only while their files exist and have a ``--quick`` mode.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import time
import traceback
from pathlib import Path

import torch

from common import freeze_imports

HERE = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark: its module, its table's title and how to read its JSON (``kind``)."""

    name: str
    module: str
    title: str
    kind: str  # "rows" (common.Row tables), "accuracy", "curvlinops", "mixing", "gpu"
    requires: tuple[str, ...] = ()  # modules that must be importable, else skipped
    cuda: bool = False  # needs a CUDA device, else skipped
    quick: bool = True  # has a quick mode (the GPU check has none: not part of --quick)
    optional: bool = False  # registered only while its file exists with a --quick mode (written elsewhere)
    in_quick: bool = True  # part of a plain --quick run (False: only with --quick --only NAME)

    def result_name(self, quick: bool) -> str:
        """The stem of the JSON file it writes: ``gpu_check``, ``<name>`` or ``<name>_quick``."""
        if self.kind == "gpu":
            return self.name
        return f"{self.name}_quick" if quick else self.name

    def result_path(self, directory: Path, quick: bool) -> Path:
        return Path(directory) / f"{self.result_name(quick)}.json"


_ALL = [
    Benchmark("engine", "bench_engine", "Engine (issue 2): SGLD step, update, T = 0 vs torch SGD", "rows"),
    Benchmark("presets", "bench_presets",
              "Presets (issue 3): optimizers vs torch.optim, samplers vs hand-written, memory", "rows"),
    Benchmark("compiled", "bench_compiled", "Compiled step (issue 13): every preset as one fused pass vs the "
              "fastest torch", "rows", optional=True),
    Benchmark("ensemble", "bench_ensemble", "Ensembles (issue 4): K chains of an MLP 64-100-32-10, batch 64", "rows"),
    Benchmark("toolkit", "bench_toolkit", "Toolkit (issue 10): VI, Laplace, EKF per batch vs a torch Adam "
              "training step, 784-512-512-10 MLP, batch 128", "rows"),
    Benchmark("distributed", "bench_distributed", "Data-parallel step (issue 14): 784-512-512-10 MLP on 1 and 2 "
              "gloo processes, ours vs DDP + SGD", "rows", optional=True, in_quick=False),
    Benchmark("accuracy", "bench_accuracy", "Accuracy against posteriors: stationary Var θ on N(0, 1) at equal "
              "step size (α = 1)", "accuracy"),
    Benchmark("mixing", "bench_mixing", "Mixing (issue 15): sample quality per gradient on four targets", "mixing",
              optional=True),
    Benchmark("curvlinops", "bench_curvlinops", "Curvature against curvlinops-for-pytorch (docs/curvature.md)",
              "curvlinops", requires=("curvlinops",)),
    Benchmark("gpu_check", "gpu_check", "GPU check (not in CI): every preset on CUDA, exactness, timings at 1e7",
              "gpu", cuda=True, quick=False),
]


def _file_has_quick(module: str) -> bool:
    path = HERE / f"{module}.py"
    return path.exists() and "--quick" in path.read_text(errors="replace")


def registry() -> list[Benchmark]:
    """The benchmarks present in this checkout, in table order (an optional one only while its file
    exists and has a ``--quick`` mode)."""
    return [b for b in _ALL if not b.optional or _file_has_quick(b.module)]


def by_name() -> dict[str, Benchmark]:
    return {b.name: b for b in registry()}


def skip_reason(bench: Benchmark, quick: bool, named: bool = False) -> str | None:
    """Why ``bench`` cannot run here (a missing optional dependency, no CUDA, no quick mode), or None;
    ``named``: asked for by name (``--only``), which a benchmark left out of plain quick runs needs."""
    if quick and not bench.quick:
        return "no quick mode"
    if quick and not bench.in_quick and not named:
        return "not in plain --quick runs (it spawns processes, ~45 s): --quick --only " + bench.name
    if bench.cuda and not torch.cuda.is_available():
        return "no CUDA device"
    for module in bench.requires:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        try:
            importlib.import_module(module)
        except ImportError as error:  # installed without its own dependencies
            return f"{module} is not importable ({error})"
    return None


@dataclasses.dataclass
class Outcome:
    """What running one benchmark gave: ``status`` is "ok", "skipped" or "failed"."""

    name: str
    status: str
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time (a loaded machine stretches the wall clock, not this)
    detail: str = ""


def run_benchmark(bench: Benchmark, quick: bool, out_dir: Path, with_slow: bool = False,
                  verbose: bool = True, named: bool = False) -> Outcome:
    """Run ``bench`` in this process on one torch thread, writing its JSON into ``out_dir``."""
    reason = skip_reason(bench, quick, named)
    if reason is not None:
        return Outcome(bench.name, "skipped", detail=reason)
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        module = importlib.import_module(bench.module)
        freeze_imports()
        if bench.kind == "gpu":
            module.main(["--out", str(out_dir)])
        else:
            accepted = inspect.signature(module.run).parameters
            kwargs = {"quick": quick, "out_dir": out_dir, "verbose": verbose, "skip_slow": not with_slow}
            module.run(**{k: v for k, v in kwargs.items() if k in accepted})
    except Exception as error:  # one failing benchmark must not hide the others' results
        detail = f"{type(error).__name__}: {error}"
        if verbose:
            traceback.print_exc()
        return Outcome(bench.name, "failed", time.perf_counter() - start, time.process_time() - cpu, detail)
    finally:
        torch.set_num_threads(1)
        freeze_imports()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if not bench.result_path(out_dir, quick).exists():
        return Outcome(bench.name, "failed", seconds, cpu, f"wrote no {bench.result_name(quick)}.json")
    return Outcome(bench.name, "ok", seconds, cpu)
