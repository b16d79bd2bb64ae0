"""Smoke test of the benchmark machinery and of ``python -m benchmarks --quick`` (no timing assertions).

The quick run is a subprocess (the harness pins torch to one thread and freezes the garbage collector's
view of the imports: neither must leak into this process); every JSON it writes is checked against
``harness.schema``, as are the committed results, and the tables are rebuilt from those.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

# importing the benchmark helpers pins torch to one thread: undo that for the rest of the suite
_threads, _environ = torch.get_num_threads(), dict(os.environ)
import common  # noqa: E402  (benchmarks/ is on sys.path above)
from harness import cli, schema, suite, tables  # noqa: E402

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
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{common.START}\nold\n{common.END}\nrest\n")
    assert tables.replace_between(readme, common.START, common.END, "| new |")
    text = readme.read_text()
    assert "| new |" in text and "old" not in text and text.startswith("intro") and text.endswith("rest\n")
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not tables.replace_between(plain, common.START, common.END, "| t |")
    assert plain.read_text() == "no markers\n"
    assert not tables.replace_between(tmp_path / "missing.md", common.START, common.END, "| t |")


def test_schema_rejects_malformed_results(tmp_path):
    good = {"benchmark": "x", "machine": {}, "rows": [common.Row("step", "1e3", 1e-4, 5e-5, 2.0).as_dict()]}
    assert schema.problems("rows", good) == []
    bad_row = {**good, "rows": [{**good["rows"][0], "ours": -1.0, "unit": "ms"}]}
    assert len(schema.problems("rows", bad_row)) == 2
    assert schema.problems("rows", {**good, "rows": []}) and schema.problems("rows", [1, 2])
    assert schema.problems("accuracy", {"rows": [{"sampler": "sgld"}]})
    nan = tmp_path / "nan.json"
    nan.write_text('{"benchmark": "x", "machine": {}, "rows": [], "v": NaN}')
    assert "NaN" in schema.check_file("rows", nan)[0]
    with pytest.raises(ValueError, match="kind must be one of"):
        schema.problems("speed", good)


def test_unknown_benchmark_names_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.parse(["--only", "engine,nope"])
    assert "unknown benchmarks ['nope']" in capsys.readouterr().err


def test_committed_results_are_well_formed():
    results = BENCHMARKS / "results"
    checked = 0
    for bench in suite.registry():
        path = bench.result_path(results, quick=False)
        if path.exists():
            assert schema.check_file(bench.kind, path) == [], path.name
            checked += 1
    assert checked >= 4


def test_tables_and_plots_rebuild_from_committed_results(tmp_path):
    for path in (BENCHMARKS / "results").glob("*.json"):
        shutil.copy(path, tmp_path)
    try:
        assert cli.main(["--tables-only", "--out", str(tmp_path)]) == 0
    finally:
        gc.unfreeze()  # the harness froze this process's objects out of the collector's scans
        torch.set_num_threads(_threads)
    page = (tmp_path / "README_tables.md").read_text()
    assert "Targets met" in page and "| what | size | ours |" in page
    assert (tmp_path / "speed_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| benchmark | targets met |" in (tmp_path / "summary.md").read_text()


def test_quick_harness_runs_every_benchmark_and_writes_well_formed_json(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    def committed():  # what a quick run could clobber (other writers may update full results meanwhile)
        paths = [*(BENCHMARKS / "results").glob("*_quick*"), BENCHMARKS / "README.md",
                 BENCHMARKS / "results" / "summary.md", BENCHMARKS / "results" / "README_tables.md"]
        return {p.name: p.stat().st_mtime_ns for p in paths if p.exists()}

    before, start = committed(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--quiet", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = [b for b in suite.registry() if suite.skip_reason(b, quick=True) is None]
    assert {"engine", "presets", "ensemble", "toolkit", "accuracy"} <= {b.name for b in expected}
    for bench in expected:
        path = bench.result_path(tmp_path, quick=True)
        assert path.exists(), f"{bench.name} wrote no {path.name}"
        assert schema.check_file(bench.kind, path) == [], path.name
        assert schema.load(path, strict=False)["quick"] is True
    kinds = {b.result_name(True): b.kind for b in suite.registry()}
    for path in tmp_path.glob("*.json"):  # nothing else, nothing malformed
        assert path.stem in kinds, path.name
    page = (tmp_path / "README_tables.md").read_text()
    for bench in expected:
        assert f"**{bench.title}**" in page
    for plot in ("speed_vs_size.png", "accuracy_vs_gradients.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    after = committed()
    assert not [n for n in after if after[n] != before.get(n)], "a quick run wrote into benchmarks/results"
    print(f"python -m benchmarks --quick: {elapsed:.1f} s")


def test_mixing_benchmark_quick_mode_writes_json_table_and_metrics_are_right(tmp_path):
    import bench_mixing
    from mixing_metrics import ess, gaussian_w2

    # the metrics on known answers: W2 of N(0, 4I) vs N(0, I) in 3-D is √3; an AR(1) chain with
    # coefficient ρ has ESS ≈ n(1 − ρ)/(1 + ρ) (1/3 of n at ρ = 0.5), iid draws ≈ n
    eye, zero = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    assert abs(float(gaussian_w2(zero, 4 * eye, zero, eye)) - 3**0.5) < 1e-9
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 20000, generator=g, dtype=torch.float64)
    ar = torch.zeros_like(noise)
    for t in range(1, noise.shape[1]):
        ar[:, t] = 0.5 * ar[:, t - 1] + noise[:, t]
    assert 0.28 < float(ess(ar)) / 80000 < 0.39 and 0.9 < float(ess(noise)) / 80000 < 1.1

    names = ["bayesflow/sgld", "bayesflow/baoab", "bayesflow/sgnht", "posteriors/baoa"]
    payload = bench_mixing.run(quick=True, out_dir=tmp_path, verbose=False, configurations=names)
    saved = schema.load(tmp_path / "mixing_quick.json")  # strict JSON: diverged settings are null + a flag
    assert schema.problems("mixing", saved) == [] and saved["quick"] is True and set(saved["targets"]) == {"a", "c"}
    for target in saved["targets"].values():
        assert 0 < target["floor"]["w2"] < 1
        assert {"bayesflow/sgld", "bayesflow/baoab", "bayesflow/sgnht"} <= set(target["configurations"])
        for config in target["configurations"].values():
            best = config["best"]
            assert best is not None and best["w2"] > 0 and best["ess_per_gradient"] > 0
            assert len(config["settings"]) == 2  # 2 steps × 1 friction in quick mode
    table = (tmp_path / "mixing_quick.md").read_text()
    assert "| target | bayesflow best, per chain |" in table and "| bayesflow/baoab |" in table
    assert payload["targets"]["a"]["floor"]["w2"] == saved["targets"]["a"]["floor"]["w2"]


def test_mixing_update_replaces_only_the_named_configurations(tmp_path):
    import bench_mixing

    with pytest.raises(FileNotFoundError, match="run the full benchmark first"):
        bench_mixing.run(quick=True, out_dir=tmp_path, verbose=False, configurations=["bayesflow/sgld"], update=True)
    first = bench_mixing.run(quick=True, out_dir=tmp_path, verbose=False, targets=["a"],
                             configurations=["bayesflow/sgld", "bayesflow/baoab"])
    updated = bench_mixing.run(quick=True, out_dir=tmp_path, verbose=False, targets=["a"],
                               configurations=["bayesflow/baoab+grad-mass"], update=True)
    configs = updated["targets"]["a"]["configurations"]
    assert set(configs) == {"bayesflow/sgld", "bayesflow/baoab", "bayesflow/baoab+grad-mass"}
    assert configs["bayesflow/sgld"] == first["targets"]["a"]["configurations"]["bayesflow/sgld"]  # kept as is
    assert updated["targets"]["a"]["floor"] == first["targets"]["a"]["floor"]
    assert "measured" in configs["bayesflow/baoab+grad-mass"] and len(updated["updates"]) == 1
    assert "Re-measured" in (tmp_path / "mixing_quick.md").read_text()
    payload = json.loads((tmp_path / "mixing_quick.json").read_text())
    payload["protocol"]["chains"] = 3
    (tmp_path / "mixing_quick.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="another protocol"):
        bench_mixing.run(quick=True, out_dir=tmp_path, verbose=False, configurations=["bayesflow/sgld"], update=True)
