"""The benchmark harness behind ``python -m benchmarks``.

* :mod:`harness.suite`: the benchmarks, when each can run, running one in this process;
* :mod:`harness.schema`: what a well-formed result file is;
* :mod:`harness.tables`: markdown sections, the full block of benchmarks/README.md, the short summary;
* :mod:`harness.plots`: speed vs size and accuracy vs gradients (PNG);
* :mod:`harness.cli`: the command line.
"""
