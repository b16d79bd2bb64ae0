"""posteriors' own test suite, unchanged but for the import, against bayesflow.

The suite (posteriors 0.1.2-dev tests, Apache-2.0) and its runner live in ``../shared/peer/`` beside
the repository (CI lays a copy of shared/ there). The runner copies the tests, renames ``posteriors``
to ``bayesflow`` and runs pytest: all of it (sgmcmc, optim, torchopt, types, tree_utils, utils, vi,
laplace, ekf). Peer tests that encode a posteriors bug are listed in ``EXPECTED_DIFFERENCES``
(deselected, each with its reason; see docs/posteriors-differences.md).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest

RUNNER = pathlib.Path(__file__).resolve().parents[2] / "shared" / "peer" / "run-posteriors-suite.sh"
NOT_YET: list[str] = []
"""Peer test folders or files bayesflow has no module for yet (none)."""

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


@pytest.mark.skipif(not RUNNER.exists(), reason=f"posteriors' suite is not beside the repository ({RUNNER})")
def test_posteriors_own_tests_pass_with_the_import_renamed():
    arguments = [f"--ignore={path}" for path in NOT_YET] + [f"--deselect={test}" for test in EXPECTED_DIFFERENCES]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(RUNNER), *arguments], capture_output=True, text=True, env=env,
                            timeout=1800)
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, tail
    summary = re.search(r"(\d+) passed", result.stdout)
    assert summary is not None and int(summary.group(1)) >= 71 - len(EXPECTED_DIFFERENCES), tail  # the whole suite
    assert "failed" not in result.stdout.splitlines()[-1] and "error" not in result.stdout.splitlines()[-1], tail
