"""The documentation site: ``mkdocs build --strict`` passes (a broken reference, a griffe warning or a page
left out of the nav fails it), its pages exist, and every code block of the hand-written pages runs as
written (in order, one namespace per page) and shows what the page says it shows."""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = ("index.md", "from-posteriors.md", "custom-operators.md")


def _run_page(page: str, tmp_path, monkeypatch, capsys) -> tuple[dict, str]:
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert blocks, f"docs/{page} has no python blocks"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/{page} block {i}", "exec"), namespace)
    return namespace, capsys.readouterr().out


def test_index_blocks_run(tmp_path, monkeypatch, capsys):
    namespace, _ = _run_page("index.md", tmp_path, monkeypatch, capsys)
    assert int(namespace["state"].step) == 8  # 256 data in batches of 32


def test_from_posteriors_blocks_run(tmp_path, monkeypatch, capsys):
    _, out = _run_page("from-posteriors.md", tmp_path, monkeypatch, capsys)
    # exact stationary variances of the two SGHMC orderings (a linear solve: no Monte-Carlo error)
    assert "Var θ: bayesflow 1.0026, posteriors 1.1140, exact 1" in out


def test_custom_operators_blocks_run(tmp_path, monkeypatch, capsys):
    namespace, out = _run_page("custom-operators.md", tmp_path, monkeypatch, capsys)
    assert "rejected: curl" in out
    ess, slow = namespace["ess"], namespace["slow"]
    reversible, curl = ess(slow["Q = 0"]).item(), ess(slow["Q = 3J"]).item()
    assert curl > 3 * reversible  # the page reports 6.5x
    for name, draws in slow.items():  # Var x1 = 1 within 4 Monte-Carlo sd (sd of a variance: sqrt(2/ESS))
        assert abs(draws.var().item() - 1.0) < 4 * (2 / ess(draws).item()) ** 0.5, name
    # with Γ the target N(0, 1), without it exp(-x²/2)/(1 + x²): the two references are 0.475 apart, so
    # each check rejects the other's value
    variance = namespace["variance"]
    assert abs(variance[True] - 1.0) < 0.1 and abs(variance[False] - 0.525) < 0.1
    first, second = namespace["trajectories"]
    assert torch.allclose(first, second, rtol=0, atol=1e-12)  # the protocol class = the dense matrix
    per_chain, temperatures = namespace["per_chain"], namespace["temperatures"]
    assert per_chain[0] == 0 and torch.allclose(per_chain[1:], temperatures[1:], rtol=0.1)


def _extension():
    spec = importlib.util.spec_from_file_location("rst_docstrings", DOCS / "_griffe" / "rst_docstrings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("griffe") is None, reason="griffe is not installed (the docs extra)")
def test_docstring_references_are_checked(caplog):
    import griffe

    extension = _extension()
    package = griffe.GriffeLoader(search_paths=[str(ROOT / "src")]).load("bayesflow")
    module = package["sgmcmc.sghmc"]
    with caplog.at_level(logging.WARNING):
        good = extension.convert(module, ":func:`build`, :class:`~bayesflow.engine.SDEState`, :func:`fnmatch.fnmatch`, "
                                         ":data:`bayesflow.engine.noise.STEP`")  # STEP: a tuple assignment, in __all__
    assert 'identifier="bayesflow.sgmcmc.sghmc.build"' in good
    assert 'identifier="bayesflow.engine.SDEState" optional><code>SDEState</code>' in good
    assert "<code>fnmatch.fnmatch</code>" in good and "broken reference" not in caplog.text
    with caplog.at_level(logging.WARNING):
        extension.convert(module, ":func:`biuld` and :class:`bayesflow.engine.NoSuchState`")
    assert caplog.text.count("broken reference") == 2
    text = "Args:\n    lr, alpha: as :func:`config`.\n\n.. math::\n    a &= b \\\\\n    c &= d\n"
    converted = extension.convert(module, text)
    assert "    lr: as" in converted and "    alpha: as" in converted
    assert "$$\n\\begin{aligned}\na &= b \\\\" in converted


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (the docs extra)")
def test_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    print(f"mkdocs build --strict: {elapsed:.1f} s")
    for page in ("index.html", "from-posteriors/index.html", "custom-operators/index.html",
                 "posteriors-differences/index.html", "ENGINE_API/index.html", "api/engine/index.html",
                 "api/sgmcmc/index.html", "api/laplace/index.html", "api/predictive/index.html"):
        assert (site / page).is_file(), page
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):  # each one rendered (the nav lists it)
        assert (site / "notebooks" / notebook.stem / "index.html").is_file(), notebook.name
    sgmcmc = (site / "api" / "sgmcmc" / "index.html").read_text()
    assert 'id="bayesflow.sgmcmc.sghmc.build"' in sgmcmc
    assert 'class="arithmatex"' in sgmcmc  # the docstrings' RST math, rendered by MathJax
    assert 'href="../engine/#bayesflow.engine.SDEState"' in sgmcmc  # a :class: role became a link
