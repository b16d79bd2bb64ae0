"""Shared benchmark machinery: one thread, interleaved timing, memory accounting, JSON and tables.

Import this module before anything else that touches torch: it pins torch to one thread (the
project's benchmarks and CI run single-threaded; on a shared 2-core machine two threads collapse).

Timing protocol (:func:`compare`):

* every contender is warmed up, then the contenders run interleaved in one process,
  ``A, B, C, A, B, C, ...`` with the order rotated every round, so slow drifts of the machine
  (thermal, other tenants) hit all contenders alike;
* a sample is a block of ``inner`` back-to-back calls (``inner`` chosen so a block lasts about
  ``block_s``), divided by ``inner``: the per-call time; the garbage collector is off inside blocks;
* the reported time is the median of the per-call samples; a ratio is computed from the same run,
  as the median over rounds of the per-round ratio (paired, which cancels drift between rounds).

Memory protocol (:func:`peak_extra_bytes`): torch's profiler records every CPU allocation and free
of tensor storage; the peak of their running sum while a callable runs is the extra memory that
callable needed on top of what existed before it (the parameters). :func:`storage_bytes` adds up
the unique tensor storages reachable from a state (persistent memory).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import contextlib
import dataclasses
import datetime
import gc
import io
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"

__all__ = [
    "RESULTS",
    "Row",
    "compare",
    "fastest",
    "fmt_size",
    "fmt_time",
    "freeze_imports",
    "machine_info",
    "markdown_table",
    "paired_ratio",
    "peak_extra_bytes",
    "quiet_import",
    "row_ratio",
    "storage_bytes",
    "tensor_bytes",
    "write_json",
    "write_payload",
]


# ----- timing ---------------------------------------------------------------------------------
def _calibrate(fn: Callable[[], Any], block_s: float) -> int:
    """Calls per block so a block lasts about ``block_s`` (at least one call)."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    if once >= block_s:
        return 1
    calls = 1
    while True:  # grow geometrically: one slow first call must not pin ``inner`` at 1
        calls *= 4
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= block_s / 4 or calls >= 4096:
            return max(1, min(4096, round(calls * block_s / max(elapsed, 1e-9))))


CLOCK = os.environ.get("BENCH_CLOCK", "cpu")
"""``"cpu"`` (default): the thread's CPU time (``time.thread_time``), which on a shared machine leaves
out the time other processes hold the core — the computation is single-threaded, so this is its
wall time on an idle core. ``"wall"``: ``time.perf_counter``. Both are recorded in every result."""


def compare(contenders: dict[str, Callable[[], Any]], *, repeats: int = 15, warmup: int = 3,
            block_s: float = 0.02, ratios: dict[str, tuple[str, str]] | None = None,
            clock: str | None = None) -> dict[str, Any]:
    """Time contenders interleaved in this process.

    Args:
        contenders: name -> zero-argument callable doing one call of the thing measured.
        repeats: rounds; every round times one block of every contender (order rotated per round).
        warmup: untimed calls of every contender before calibration.
        block_s: target duration of one timed block (calls per block are calibrated per contender).
        ratios: label -> (numerator, denominator) contender names.
        clock: ``"cpu"`` or ``"wall"`` for ``median_s`` and the ratios (default :data:`CLOCK`).

    Returns:
        ``{"clock", "times": {name: {"median_s", "min_s", "q1_s", "q3_s", "wall_median_s",
        "cpu_median_s", "inner", "samples"}}, "samples": {name: [...]}, "samples_wall", "samples_cpu",
        "ratios": {label: {"ratio", "ratio_of_medians", "q1", "q3"}}}`` — ``ratio`` is the median of
        per-round paired ratios, ``ratio_of_medians`` the ratio of the medians.
    """
    clock = clock or CLOCK
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    torch.set_num_threads(1)
    names = list(contenders)
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    inner = {name: _calibrate(fn, block_s) for name, fn in contenders.items()}
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                fn, calls = contenders[name], inner[name]
                start, start_cpu = time.perf_counter(), time.thread_time()
                for _ in range(calls):
                    fn()
                cpu[name].append((time.thread_time() - start_cpu) / calls)
                wall[name].append((time.perf_counter() - start) / calls)
            if enabled:
                gc.enable()
                gc.collect()
                gc.disable()
    finally:
        if enabled:
            gc.enable()
    samples = cpu if clock == "cpu" else wall
    times = {}
    for name in names:
        s = samples[name]
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        times[name] = {"median_s": statistics.median(s), "min_s": min(s), "q1_s": q[0], "q3_s": q[2],
                       "wall_median_s": statistics.median(wall[name]), "cpu_median_s": statistics.median(cpu[name]),
                       "inner": inner[name], "samples": len(s)}
    out: dict[str, Any] = {"clock": clock, "times": times, "samples": samples, "samples_wall": wall,
                           "samples_cpu": cpu, "ratios": {}}
    for label, (a, b) in (ratios or {}).items():
        out["ratios"][label] = paired_ratio(out, a, b)
    return out


def paired_ratio(result: dict[str, Any], a: str, b: str) -> dict[str, float]:
    """Median over rounds of time(a) / time(b) from one :func:`compare` run, with quartiles."""
    paired = [x / y for x, y in zip(result["samples"][a], result["samples"][b])]
    q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
    times = result["times"]
    return {"ratio": statistics.median(paired), "q1": q[0], "q3": q[2],
            "ratio_of_medians": times[a]["median_s"] / times[b]["median_s"]}


def row_ratio(result: dict[str, Any], a: str, b: str) -> tuple[float, str]:
    """``(ratio, note)`` for a table row: the paired ratio (median over rounds of the per-round ratio
    time(a) / time(b), which cancels the machine's drift between rounds) and, when the ratio of the
    two medians disagrees by more than 10 % (a noisy machine), a note with it and the quartiles."""
    r = paired_ratio(result, a, b)
    note = ""
    if abs(r["ratio"] / r["ratio_of_medians"] - 1) > 0.10:
        note = (f"noisy: ratio of medians {r['ratio_of_medians']:.2f}×, paired IQR "
                f"{r['q1']:.2f}–{r['q3']:.2f}")
    return r["ratio"], note


def fastest(result: dict[str, Any], names: list[str]) -> str:
    """The contender among ``names`` with the smallest median time."""
    return min(names, key=lambda n: result["times"][n]["median_s"])


def freeze_imports() -> None:
    """Take every object alive now out of the cyclic garbage collector's scans (``gc.freeze``).

    :func:`compare` collects garbage between rounds and :func:`peak_extra_bytes` before profiling. A
    full collection walks every tracked object: after ``import torch`` and ``torch._dynamo`` (which
    ``torch.optim`` imports on its first optimizer) that is ~300 000 objects, ~0.3 s a collection —
    most of a quick run. Modules, functions and tables made at import never become garbage, so freezing
    them changes nothing measured: later collections still free everything a benchmark makes (frozen
    objects are still freed by reference counting). Called once after the imports (by :func:`cli` and
    the harness), again after each benchmark.
    """
    with contextlib.suppress(Exception):
        import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: load it before freezing)
    gc.collect()
    gc.freeze()


# ----- memory ---------------------------------------------------------------------------------
def tensor_bytes(tree: Any) -> int:
    """Bytes of the unique storages of the tensors in ``tree`` (see :func:`storage_bytes`)."""
    return storage_bytes(tree)


def _tensors(obj: Any, seen: set[int], out: list[torch.Tensor], depth: int = 0) -> None:
    if depth > 50 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return
    if isinstance(obj, (str, bytes, int, float, complex, bool, type(None))):
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, seen, out, depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _tensors(v, seen, out, depth + 1)
        return
    items = getattr(obj, "items", None)  # tensordict / TensorClass (posteriors' states)
    if callable(items) and hasattr(obj, "batch_size"):
        with contextlib.suppress(Exception):
            for _, v in obj.items(include_nested=True, leaves_only=True):
                _tensors(v, seen, out, depth + 1)
            return
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _tensors(getattr(obj, f.name, None), seen, out, depth + 1)
        return
    slots = getattr(type(obj), "__slots__", ())
    for name in (slots if isinstance(slots, (tuple, list)) else (slots,)):
        _tensors(getattr(obj, name, None), seen, out, depth + 1)
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        for v in vars(obj).values():
            _tensors(v, seen, out, depth + 1)


def storage_bytes(obj: Any, exclude: Any = None) -> int:
    """Bytes of the unique tensor storages reachable from ``obj`` (minus those reachable from ``exclude``).

    Views sharing one storage count once; a storage reachable from ``exclude`` (e.g. the parameters)
    does not count at all.
    """
    def storages(o):
        found: list[torch.Tensor] = []
        _tensors(o, set(), found)
        out = {}
        for t in found:
            s = t.untyped_storage()
            out[(s.data_ptr(), t.device)] = s.nbytes()
        return out

    own = storages(obj)
    if exclude is not None:
        for key in storages(exclude):
            own.pop(key, None)
    return sum(own.values())


def peak_extra_bytes(fn: Callable[[], Any]) -> dict[str, int]:
    """Peak and net bytes of tensor storage allocated on the CPU while ``fn()`` runs.

    Uses the profiler's allocator events (``profile_memory=True``): the running sum of allocations
    and frees, in time order. Memory that existed before the call (parameters, data) is not counted;
    memory ``fn`` keeps alive (a returned state, cached buffers) counts in ``net``.

    Returns:
        ``{"peak": bytes, "net": bytes}``.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    # the profiler's start/stop lines go to the C-level stderr: silence them (fd 2) around it
    with _silenced_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    events.sort()
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    del result
    return {"peak": peak, "net": live}


@contextlib.contextmanager
def _silenced_fd2():
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


# ----- environment ----------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_import():
    """Silence the FutureWarnings some reference libraries print at import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Versions and machine facts recorded with every result file."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    with contextlib.suppress(OSError):
        info["loadavg"] = os.getloadavg()
    for name in ("posteriors", "torchopt", "optree", "numpy"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            info[name] = version(name)
    return info


# ----- results --------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One line of the results table: ``ours`` and ``baseline`` in seconds (or memory multiples)."""

    what: str
    size: str
    ours: float
    baseline: float | None
    ratio: float | None
    target: float | None = None
    unit: str = "s"  # "s": times; "x": memory as multiples of the parameter bytes
    baseline_name: str = ""
    note: str = ""

    @property
    def passed(self) -> bool | None:
        """Times: ``ratio <= target``. Memory (unit "x"): ``ours <= target`` — the target bounds the
        extra memory itself (reported to two decimals, so 2.001× of an exact 2× design passes)."""
        if self.target is None:
            return None
        if self.unit == "x":
            return self.ours <= self.target + 0.005
        return None if self.ratio is None else self.ratio <= self.target

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d


def write_json(name: str, rows: list[Row], raw: dict[str, Any] | None = None,
               directory: Path | None = None, **extra: Any) -> Path:
    """Write ``<directory or RESULTS>/<name>.json`` with machine info, rows and raw measurements."""
    payload = {"benchmark": name, "machine": machine_info(), **extra,
               "rows": [r.as_dict() for r in rows], "raw": raw or {}}
    return write_payload(name, payload, directory)


def write_payload(name: str, payload: dict[str, Any], directory: Path | None = None) -> Path:
    """Write ``payload`` as ``<directory or RESULTS>/<name>.json`` (tensors as lists) and return the path."""
    directory = Path(directory) if directory is not None else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    return path


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_size(n: int) -> str:
    exp = len(str(int(n))) - 1
    return f"1e{exp}" if n == 10**exp else f"{n:,}"


def _fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return fmt_time(value) if unit == "s" else f"{value:.2f}×"


def markdown_table(rows: list[Row | dict[str, Any]]) -> str:
    """A markdown table: what, size, ours, baseline, ratio, target, pass/fail."""
    lines = ["| what | size | ours | baseline | ratio | target | pass |",
             "| --- | --- | ---: | ---: | ---: | ---: | :---: |"]
    for row in rows:
        r = row if isinstance(row, Row) else Row(**{k: v for k, v in row.items() if k != "passed"})
        base = _fmt_value(r.baseline, r.unit)
        if r.baseline_name:
            base = f"{base} ({r.baseline_name})"
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
        target = "—" if r.target is None else f"≤ {r.target:g}×" + (" (ours)" if r.unit == "x" else "")
        verdict = {True: "✅", False: "❌", None: "ref"}[r.passed]
        what = r.what + (f" — {r.note}" if r.note else "")
        lines.append(f"| {what} | {r.size} | {_fmt_value(r.ours, r.unit)} | {base} | {ratio} | {target} | {verdict} |")
    return "\n".join(lines)


def cli(run: Callable[..., list[Row]], description: str, argv=None) -> None:
    """The command line every benchmark module shares: ``--quick`` and ``--out``, then print the table."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    freeze_imports()
    print(markdown_table(run(args.quick, args.out)))
