"""Old name of the harness: ``python benchmarks/run_all.py [args]`` is ``python -m benchmarks [args]``."""

import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
