"""``python -m benchmarks [--quick] [--out DIR] [--only a,b] [--tables-only] ...``: see :mod:`harness.cli`."""

import sys

import benchmarks  # noqa: F401  (puts benchmarks/ on sys.path: ``common`` and ``harness`` import as top level)
from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
