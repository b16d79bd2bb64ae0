"""posteriors' own test suite, unchanged but for the import, against bayesflow.

The suite (posteriors 0.1.2-dev tests, Apache-2.0) and its runner live in ``../shared/peer/`` beside
the repository (CI lays a copy of shared/ there). The runner copies the tests, renames ``posteriors``
to ``bayesflow`` and runs pytest: all of it (sgmcmc, optim, torchopt, types, tree_utils, utils, vi,
laplace, ekf). Peer tests that encode a posteriors bug, or whose outcome is chance, are listed in
``EXPECTED_DIFFERENCES`` (deselected, each with its reason; see docs/posteriors-differences.md).

The suite takes ~10 minutes (four 100 000-step sampler runs), so it starts in a subprocess as soon as
collection has selected this test (``tests/conftest.py``) and runs on the second core while the rest
of the suite runs; the test waits for it.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import re
import signal
import subprocess

import pytest

RUNNER = pathlib.Path(__file__).resolve().parents[2] / "shared" / "peer" / "run-posteriors-suite.sh"

EXPECTED_DIFFERENCES: dict[str, str] = {
    "tests/sgmcmc/test_sgnht.py::test_sgnht": (
        "its last check ('the KL of the running Gaussian fit decreases in > 50 % of 100-step spaced pairs "
        "before its minimum') is a coin flip at its threshold for any correct SGNHT on this target: "
        "posteriors 0.1.3 itself scores 0.63, 0.48, 0.44 for torch seeds 42, 1, 2 (bayesflow 0.44, 0.44 for "
        "42, 1), because the thermostat mixes slowly here (friction rate 1, mass 10, d = 2); its mean, "
        "covariance and KL checks pass. The noise is keyed by the state (not torch's global generator), so "
        "seed 42 draws other numbers than posteriors'"),
}
"""Peer test id -> why bayesflow answers differently (deselected; docs/posteriors-differences.md)."""

_RUN: list = []


def start() -> None:
    """Start the peer suite in the background (once); :func:`finish` waits for it."""
    if _RUN or not RUNNER.exists():
        return
    arguments = ["-k", _deselection()] if EXPECTED_DIFFERENCES else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    _RUN.append(subprocess.Popen(["bash", str(RUNNER), *arguments], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True))
    atexit.register(_stop)  # a session that ends before the test (-x, ^C) leaves no suite running


def _stop() -> None:
    for process in _RUN:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the runner and the pytest it started


def _deselection() -> str:
    """A ``-k`` expression leaving out exactly the listed tests. (``--deselect`` matches node-id
    prefixes: ``...::test_sgnht`` would drop ``...::test_sgnht_inplace_step`` too; ``-k`` matches
    substrings of names, so a name followed by ``_`` is kept.)"""
    names = [test.rsplit("::", 1)[1] for test in EXPECTED_DIFFERENCES]
    return "not (" + " or ".join(f"({name} and not {name}_)" for name in names) + ")"


def finish() -> tuple[int, str]:
    start()
    process = _RUN[0]
    output, _ = process.communicate(timeout=2400)
    return process.returncode, output


@pytest.mark.skipif(not RUNNER.exists(), reason=f"posteriors' suite is not beside the repository ({RUNNER})")
def test_posteriors_own_tests_pass_with_the_import_renamed():
    returncode, output = finish()
    tail = output[-3000:]
    assert returncode == 0, tail
    last = output.strip().splitlines()[-1]
    summary = re.search(r"(\d+) passed", last)
    assert summary is not None and int(summary.group(1)) == 71 - len(EXPECTED_DIFFERENCES), tail
    assert "failed" not in last and "error" not in last, tail
