"""bayesflow's benchmarks: ``python -m benchmarks`` (see :mod:`harness.cli`) or one script at a time.

The scripts import their helpers as top-level modules (``from common import ...``), as they do when run
as ``python benchmarks/bench_engine.py``; importing this package puts its directory on ``sys.path`` so
the same imports work for ``python -m benchmarks`` and ``python -m benchmarks.bench_engine``.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
