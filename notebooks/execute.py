"""Execute the notebooks in place with nbclient, so the committed files carry their outputs and plots.

    python notebooks/execute.py                          # every notebooks/*.ipynb, in order
    python notebooks/execute.py 03_temperature_sweep     # some of them (name, stem or path)

Each notebook runs top to bottom in a fresh ``python3`` kernel whose working directory is
``notebooks/``, on one CPU thread (``OMP_NUM_THREADS=1``, as CI), with matplotlib's inline backend
(figures embedded as PNG). Outputs are written back into the ``.ipynb``; timings are not recorded in
it (so re-running changes only what the code prints and draws). The script reports each notebook's
wall time and file size, and fails (exit status 1) on the first cell that raises. The test suite
(``tests/test_notebooks.py``) runs the same :func:`execute` on a temporary copy.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
CELL_TIMEOUT = 300  # seconds per cell
MAX_BYTES = 1_000_000  # a committed notebook stays under ~1 MB (plots included)
KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}
ENVIRONMENT = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYDEVD_DISABLE_FILE_VALIDATION": "1",
               # tqdm.auto's notice in a kernel without ipywidgets (transformers imports it): not an output
               "PYTHONWARNINGS": "ignore:IProgress not found"}


def notebooks() -> list[pathlib.Path]:
    """The notebooks of this folder, in their numbered order."""
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def execute(path: pathlib.Path, *, timeout: int = CELL_TIMEOUT, write: bool = True):
    """Run one notebook top to bottom in a fresh kernel; returns ``(notebook, seconds)``.

    Args:
        path: the ``.ipynb`` file; it runs with its own folder as the working directory.
        timeout: the limit, in seconds, for any one cell.
        write: write the executed notebook (outputs included) back to ``path``; with ``False`` the
            file is left as it is (the tests' way: the executed copy exists only in memory).

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised (the message shows the traceback).
        nbclient.exceptions.CellTimeoutError: a cell ran past ``timeout``.
    """
    import nbclient
    import nbformat

    for key, value in ENVIRONMENT.items():  # the kernel inherits this process's environment
        os.environ.setdefault(key, value)
    path = pathlib.Path(path)
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata["kernelspec"] = dict(KERNEL)
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name=KERNEL["name"], record_timing=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    notebook.metadata.pop("widgets", None)
    if write:
        nbformat.write(notebook, path)
    return notebook, seconds


def _resolve(name: str) -> pathlib.Path:
    candidate = pathlib.Path(name)
    if candidate.is_file():
        return candidate
    matches = [p for p in notebooks() if p.stem == name or p.name == name or p.stem.startswith(name)]
    if len(matches) != 1:
        found = [p.name for p in matches]
        raise SystemExit(f"{name!r} names {len(matches)} notebooks of {HERE} (expected one): {found}")
    return matches[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all, in order)")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    paths = [_resolve(name) for name in args.names] or notebooks()
    for path in paths:
        print(f"{path.name}: running ...", flush=True)
        try:
            _, seconds = execute(path, timeout=args.timeout)
        except Exception as error:  # nbclient's errors carry the cell and its traceback
            print(f"{path.name}: FAILED\n{error}", file=sys.stderr)
            return 1
        size = path.stat().st_size
        warning = f"  (over {MAX_BYTES / 1e6:.0f} MB: make the plots smaller)" if size > MAX_BYTES else ""
        print(f"{path.name}: {seconds:.1f} s, {size / 1e3:.0f} kB{warning}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
