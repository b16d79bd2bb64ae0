"""How a step plan is compiled: inductor's settings and the call that compiles a traced ATen graph.

:mod:`bayesflow.engine.compiled` traces a step into a graph; this module hands the graph to inductor
(C++/OpenMP on the CPU, Triton on GPUs), with the settings every plan shares.
"""

from __future__ import annotations

import torch

__all__ = ["INDUCTOR_SETTINGS", "compile_graph"]

INDUCTOR_SETTINGS = {"cpp.max_horizontal_fusion_size": 1}
"""Inductor settings of every compiled plan (``compile_options["options"]`` overrides them).

Inductor's C++ backend fuses loops of equal length that share no data into one loop (up to 16 by
default): the per-leaf loops of a model whose layers have equal sizes. Each iteration of such a loop
then reads and writes a few streams per leaf — 4 × 50 = 200 concurrent memory streams for Adam over 50
leaves — which the hardware prefetchers cannot follow. Measured (Adam, 1e7 parameters in 200 equal
leaves, 1 thread): 1.49× torch's fused step with the default, 0.96–1.05× over runs with one leaf per
loop; 10 leaves of 1e6: 1.03× and 1.01× (benchmarks/bench_compiled.py's many-leaves row)."""


def compile_graph(graph, example, options: dict):
    """Inductor's compiled callable of an ATen graph.

    ``compile_fx`` takes the traced graph directly: no dynamo frame, guards or module call around it
    (measured: 28 µs per call against 83–160 µs for ``torch.compile(graph)`` on a 1e4-parameter Adam
    step, the difference between 1.5× and 1.1× of torch's fused step at 1e6 parameters). The plan is
    its own guard: it is looked up by layout and kind of step before it is called. A transform's
    ``compile_options`` go through ``torch.compile`` instead, with :data:`INDUCTOR_SETTINGS` under the
    user's own inductor ``options`` unless a ``mode`` (which brings its own settings) is given.
    """
    from torch._inductor.compile_fx import compile_fx

    if options:
        if "mode" not in options and options.get("backend", "inductor") == "inductor":
            options = dict(options, options={**INDUCTOR_SETTINGS, **options.get("options", {})})
        return torch.compile(graph, fullgraph=True, dynamic=False, **options)
    return compile_fx(graph, example, config_patches={"size_asserts": False, **INDUCTOR_SETTINGS})
