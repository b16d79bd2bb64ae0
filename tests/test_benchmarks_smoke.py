"""Smoke test of the benchmark machinery: it runs and writes JSON (no timing assertions)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

# importing the benchmark helpers pins torch to one thread: undo that for the rest of the suite
_threads, _environ = torch.get_num_threads(), dict(os.environ)
import common  # noqa: E402  (benchmarks/ is on sys.path above)

torch.set_num_threads(_threads)
os.environ.clear()
os.environ.update(_environ)


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    torch.set_num_threads(_threads)


def test_compare_interleaves_and_reports_ratios():
    calls = []
    a = torch.zeros(100)

    def fa():
        calls.append("a")
        a.add_(1.0)

    def fb():
        calls.append("b")
        a.mul_(1.0)

    res = common.compare({"a": fa, "b": fb}, repeats=3, warmup=1, block_s=1e-4, ratios={"a/b": ("a", "b")})
    assert set(res["times"]) == {"a", "b"}
    assert all(len(res["samples"][k]) == 3 for k in "ab")
    assert res["ratios"]["a/b"]["ratio"] > 0
    ratio, note = common.row_ratio(res, "a", "b")
    assert ratio > 0 and isinstance(note, str)
    assert torch.get_num_threads() == 1


def test_memory_helpers_count_tensor_storage():
    p = torch.zeros(1000)
    assert common.storage_bytes({"a": p, "view": p[:10]}) == 4000
    assert common.storage_bytes({"a": p, "b": torch.zeros(10)}, exclude=p) == 40

    def allocate():
        tmp = torch.ones(1000)  # freed: counts in the peak, not in net
        kept = torch.ones(500)
        del tmp
        return kept

    mem = common.peak_extra_bytes(allocate)
    assert mem["peak"] >= 6000
    assert mem["net"] <= mem["peak"]


def test_json_and_table(tmp_path):
    rows = [common.Row("step", "1e4", 1e-4, 5e-5, 2.0, 1.5, baseline_name="hand"),
            common.Row("memory", "1e4", 2.0, 3.0, 2 / 3, 2.0, unit="x")]
    assert rows[0].passed is False and rows[1].passed is True
    path = common.write_json("smoke", rows, {"x": torch.tensor([1.0])}, directory=tmp_path)
    payload = json.loads(path.read_text())
    assert payload["machine"]["torch"] == torch.__version__
    assert len(payload["rows"]) == 2
    table = common.markdown_table(rows)
    assert table.count("\n") == 3 and "❌" in table and "✅" in table


def test_readme_section_is_replaced_between_markers(tmp_path):
    import run_all
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{common.START}\nold\n{common.END}\nrest\n")
    run_all.update_readme("| new |", readme, tmp_path / "table.md")
    text = readme.read_text()
    assert "| new |" in text and "old" not in text and text.startswith("intro") and text.endswith("rest\n")
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert run_all.update_readme("| t |", plain, tmp_path / "t.md") == tmp_path / "t.md"
    assert plain.read_text() == "no markers\n"


def test_engine_benchmark_quick_mode_runs_and_writes_json(tmp_path):
    import bench_engine
    rows = bench_engine.run(quick=True, out_dir=tmp_path, verbose=False)
    assert rows and all(r.ours > 0 for r in rows)
    payload = json.loads((tmp_path / "engine_quick.json").read_text())
    assert payload["quick"] is True and payload["rows"]


def test_toolkit_benchmark_quick_mode_runs_and_writes_json(tmp_path):
    import bench_toolkit
    rows = bench_toolkit.run(quick=True, out_dir=tmp_path, verbose=False)
    assert rows and all(r.ours > 0 for r in rows)
    payload = json.loads((tmp_path / "toolkit_quick.json").read_text())
    assert payload["quick"] is True and payload["rows"]
