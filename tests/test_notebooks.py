"""The notebooks: each executes top to bottom in a fresh kernel (nbclient, ``notebooks/execute.py``),
and the committed files carry the outputs and plots a reader sees on the repository page.

After changing a notebook (or what it calls), refresh the committed outputs with
``python notebooks/execute.py [name]``.
"""

import importlib.util
import pathlib
import re

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("notebooks_execute", ROOT / "notebooks" / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)

NOTEBOOKS = execute.notebooks()
NUMBERED = ["01_quickstart", "02_custom_operators", "03_temperature_sweep", "04_language_model_uncertainty",
            "05_continual_learning", "06_accuracy_per_gradient"]
NOTEBOOK_SECONDS = 240  # each notebook is meant to take under ~2 minutes on one CPU thread; twice that fails
PRINTS = re.compile(r"\bprint\(")
PLOTS = re.compile(r"\bplt\.subplots?\(|\bplt\.figure\(|\w_plot\(")
REFRESH = "run `python notebooks/execute.py {}` and commit the notebook with its outputs"


def _code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def _shows(cell) -> set[str]:
    """What a code cell shows a reader: 'stdout' for printed text, 'image' for an embedded plot."""
    kinds = set()
    for output in cell.get("outputs", []):
        if output.output_type == "stream" and output.name == "stdout":
            kinds.add("stdout")
        if "image/png" in output.get("data", {}):
            kinds.add("image")
    return kinds


def test_the_numbered_notebooks_exist():
    names = [path.stem for path in NOTEBOOKS]
    assert names[: len(NUMBERED)] == NUMBERED, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_carries_its_outputs(path):
    """Every code cell ran, in order, in one kernel; no error is saved; a cell that prints shows its
    text and a cell that plots shows its image (PNG); the file stays under ~1 MB."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    cells = _code_cells(notebook)
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..{len(cells)}: {REFRESH.format(path.stem)}")
    for number, cell in enumerate(cells, start=1):
        assert not any(output.output_type == "error" for output in cell.outputs), (
            f"{path.name}, code cell {number}: an error is saved")
        shows = _shows(cell)
        refresh = REFRESH.format(path.stem)
        if PRINTS.search(cell.source):
            assert "stdout" in shows, f"{path.name}, code cell {number} prints but has no saved text: {refresh}"
        if PLOTS.search(cell.source):
            assert "image" in shows, f"{path.name}, code cell {number} plots but has no saved image: {refresh}"
    assert path.stat().st_size < execute.MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes (limit ~1 MB)"


def test_output_checks_reject_a_notebook_without_outputs(tmp_path):
    """The check above fails on a notebook whose outputs were stripped (so it does check something)."""
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    for cell in _code_cells(notebook):
        cell.outputs, cell.execution_count = [], None
    stripped = tmp_path / NOTEBOOKS[0].name
    nbformat.write(notebook, stripped)
    with pytest.raises(AssertionError, match="execution counts"):
        test_committed_notebook_carries_its_outputs(stripped)
    for number, cell in enumerate(_code_cells(notebook), start=1):
        cell.execution_count = number
    nbformat.write(notebook, stripped)
    with pytest.raises(AssertionError, match="has no saved"):
        test_committed_notebook_carries_its_outputs(stripped)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
    """A fresh kernel runs the notebook without an error, within the time budget, and every cell that
    shows text or a plot now has it saved in the committed file too (in memory: the file is unchanged)."""
    executed, seconds = execute.execute(path, write=False)  # raises CellExecutionError on a failing cell
    assert seconds < NOTEBOOK_SECONDS, f"{path.name} took {seconds:.0f} s (budget ~120 s)"
    committed = nbformat.read(path, as_version=4)
    fresh_cells, saved_cells = _code_cells(executed), _code_cells(committed)
    assert len(fresh_cells) == len(saved_cells)
    for number, (fresh, saved) in enumerate(zip(fresh_cells, saved_cells), start=1):
        missing = _shows(fresh) - _shows(saved)
        assert not missing, f"{path.name}, code cell {number}: {missing} not saved: " + REFRESH.format(path.stem)


def test_execute_reports_a_failing_cell(tmp_path):
    """The executor fails on a cell that raises (a notebook with an error cannot pass), and leaves the file alone."""
    import nbclient

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("print('fine')"), nbformat.v4.new_code_cell("1 / 0")]
    path = tmp_path / "broken.ipynb"
    nbformat.write(notebook, path)
    before = path.read_text()
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="ZeroDivisionError"):
        execute.execute(path, write=False, timeout=60)
    assert path.read_text() == before
