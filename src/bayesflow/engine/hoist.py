"""Hoisting a traced step's scalar arithmetic out of its parameter loops.

A traced step computes per-step scalars from its scalar inputs: sqrt(2·T·h), Adam's bias corrections
1 − β^{t+1}, the OU decay exp(−γh). Left in the graph, the compiler inlines them into the fused loop
over the parameters, where they are recomputed for every vector of elements (measured: Adam's
compiled loop at 1e7 parameters ran at half the speed of torch's fused kernel, its time spent in
``pow``). :func:`hoist_scalars` splits the graph into a *prologue* of those scalar operations, run
eagerly once per step (a few 0-dim ops), and the *main* graph that reads their results as inputs.

Example:
    >>> import torch
    >>> from torch.fx.experimental.proxy_tensor import make_fx
    >>> from bayesflow.engine.hoist import hoist_scalars
    >>> def step(x, t):
    ...     return x * (1.0 - 0.9 ** (t + 1)).sqrt()
    >>> graph = make_fx(step)(torch.ones(4), torch.tensor(0.0))
    >>> prologue, main = hoist_scalars(graph, scalar_inputs={1})
    >>> x, t = torch.ones(4), torch.tensor(2.0)
    >>> torch.allclose(main(x, t, *prologue(x, t)), step(x, t))
    True
"""

from __future__ import annotations

import math
import struct

import torch
from torch import fx

__all__ = ["HoistedStep", "ScalarProgram", "hoist_scalars"]


def hoist_scalars(graph: fx.GraphModule, scalar_inputs: set[int]):
    """``(prologue, main)`` with ``main(*inputs, *prologue(*inputs)) == graph(*inputs)``.

    Args:
        graph: a traced step (``make_fx``), whose placeholders are its inputs in order.
        scalar_inputs: positions of the inputs that are per-step scalars (0-dim tensors: temperature,
            step size, step count, schedule values). Everything computed from them and from 0-dim
            constants alone is scalar arithmetic; the values of it that the rest of the graph reads
            are the prologue's outputs.

    Returns ``(None, graph)`` when there is nothing to hoist.
    """
    nodes = list(graph.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    scalar = {placeholders[i] for i in scalar_inputs}
    for node in nodes:
        if node.op == "get_attr":
            value = getattr(graph, node.target, None)
            if isinstance(value, torch.Tensor) and value.ndim == 0:
                scalar.add(node)
        elif node.op == "call_function" and node.all_input_nodes and all(a in scalar for a in node.all_input_nodes):
            scalar.add(node)
    _deduplicate(graph, [n for n in nodes if n in scalar and n.op == "call_function"])
    nodes = list(graph.graph.nodes)
    boundary = [n for n in nodes if n in scalar and n.op == "call_function"
                and any(user not in scalar for user in n.users)]
    if not boundary:
        return None, graph

    prologue = fx.Graph()
    env: dict = {}
    for node in nodes:
        if node.op == "placeholder":
            env[node] = prologue.placeholder(node.name)
        elif node in scalar:
            env[node] = prologue.node_copy(node, env.__getitem__)
    prologue.output(tuple(env[n] for n in boundary))

    main = fx.Graph()
    env = {}
    for node in placeholders:
        env[node] = main.placeholder(node.name)
    for i, node in enumerate(boundary):
        env[node] = main.placeholder(f"hoisted_{i}")
    for node in nodes:
        if node in env or (node in scalar and node.op == "call_function"):
            continue
        env[node] = main.node_copy(node, env.__getitem__)
    return fx.GraphModule(graph, prologue), fx.GraphModule(graph, main)


def _deduplicate(graph: fx.GraphModule, scalar_nodes: list) -> None:
    """Merge scalar nodes computing the same thing (per-leaf copies of one scalar, one per leaf)."""
    seen: dict = {}
    for node in scalar_nodes:
        key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.graph.erase_node(node)
        else:
            seen[key] = node


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value if isinstance(value, fx.Node) else repr(value)


_aten = torch.ops.aten
_PYTHON_OPS = {
    _aten.mul.Tensor: lambda a, b: a * b,
    _aten.mul.Scalar: lambda a, b: a * b,
    _aten.div.Tensor: lambda a, b: a / b,
    _aten.div.Scalar: lambda a, b: a / b,
    _aten.add.Tensor: lambda a, b, alpha=1: a + alpha * b,
    _aten.add.Scalar: lambda a, b, alpha=1: a + alpha * b,
    _aten.sub.Tensor: lambda a, b, alpha=1: a - alpha * b,
    _aten.sub.Scalar: lambda a, b, alpha=1: a - alpha * b,
    _aten.rsub.Scalar: lambda a, b, alpha=1: b - alpha * a,
    _aten.rsub.Tensor: lambda a, b, alpha=1: b - alpha * a,
    _aten.neg.default: lambda a: -a,
    _aten.reciprocal.default: lambda a: 1.0 / a,
    _aten.pow.Scalar: lambda a, b: a**b,
    _aten.pow.Tensor_Scalar: lambda a, b: a**b,
    _aten.pow.Tensor_Tensor: lambda a, b: a**b,
    _aten.sqrt.default: math.sqrt,
    _aten.rsqrt.default: lambda a: 1.0 / math.sqrt(a),
    _aten.exp.default: math.exp,
    _aten.log.default: math.log,
    _aten.expm1.default: math.expm1,
    _aten.log1p.default: math.log1p,
    _aten.sin.default: math.sin,
    _aten.cos.default: math.cos,
    _aten.clone.default: lambda a, **_: a,
    _aten.lift_fresh_copy.default: lambda a: a,
    _aten.detach.default: lambda a: a,
    _aten.alias.default: lambda a: a,
}


def _round(value: float, dtype) -> float:
    """``value`` rounded to ``dtype`` (what a 0-dim ``_to_copy`` does to a Python number)."""
    if dtype is None or dtype == torch.float64:
        return float(value)
    if dtype == torch.float32:
        return struct.unpack("f", struct.pack("f", value))[0]
    if dtype.is_floating_point:
        return torch.tensor(value, dtype=dtype).item()
    return int(value)


class ScalarProgram:
    """A prologue of 0-dim arithmetic evaluated with Python numbers: no kernel per scalar operation.

    Evaluating the dozen scalar operations of a step (bias corrections, noise scales) as 0-dim tensor
    kernels costs a few µs each, more than a small model's whole step; as Python floats they cost
    well under one. ``__call__(values)`` takes the prologue's inputs (Python numbers where the inputs
    are scalars) and returns its outputs as Python numbers. :meth:`of` returns None for a prologue
    with an operation it does not know (it is then run as the tensor graph it is).
    """

    def __init__(self, steps: list, outputs: list, constants: dict):
        self.steps, self.outputs, self.constants = steps, outputs, constants

    @classmethod
    def of(cls, prologue: fx.GraphModule):
        steps, constants, position, outputs = [], {}, 0, []
        for node in prologue.graph.nodes:
            if node.op == "placeholder":
                if node.users:  # only the inputs the scalar arithmetic reads are looked up each step
                    constants[node] = ("input", position)
                position += 1
            elif node.op == "get_attr":
                constants[node] = ("constant", getattr(prologue, node.target).item())
            elif node.op == "call_function":
                if node.target is _aten._to_copy.default:
                    dtype = node.kwargs.get("dtype")
                    steps.append((node, lambda a, dtype=dtype, **_: _round(a, dtype), node.args, {}))
                elif node.target in _PYTHON_OPS:
                    steps.append((node, _PYTHON_OPS[node.target], node.args, dict(node.kwargs)))
                else:
                    return None
            elif node.op == "output":
                outputs = list(node.args[0])
        return cls(steps, outputs, constants)

    def __call__(self, values: list) -> list:
        env = {node: (values[where] if kind == "input" else where) for node, (kind, where) in self.constants.items()}

        def read(arg):
            return env[arg] if isinstance(arg, fx.Node) else arg

        for node, fn, args, kwargs in self.steps:
            env[node] = fn(*map(read, args), **{k: read(v) for k, v in kwargs.items()})
        return [env[node] for node in self.outputs]


class HoistedStep:
    """A traced step split by :func:`~bayesflow.engine.hoist.hoist_scalars`: its scalar prologue (Python
    numbers where every scalar input is one, else the 0-dim tensor graph) and its main graph."""

    def __init__(self, graph, example, first_scalar: int, values: list):
        self.prologue, self.main = hoist_scalars(graph, set(range(first_scalar, len(example))))
        self.first_scalar, self.program, self.buffers = first_scalar, None, []
        if self.prologue is not None and not any(isinstance(v, torch.Tensor) for v in values):
            self.program = ScalarProgram.of(self.prologue)
            if self.program is not None:  # the buffers the main graph reads, shaped as the graph made them
                self.buffers = [torch.empty_like(t) for t in self.prologue(*example)]

    def hoisted(self, inputs: list, values: list):
        """The prologue's values for the main graph (its trailing inputs)."""
        if self.program is not None:
            for buffer, value in zip(self.buffers, self.program([None] * self.first_scalar + values)):
                buffer.fill_(value)
            return self.buffers
        return () if self.prologue is None else self.prologue(*inputs)

    def __call__(self, inputs: list, values: list):
        return self.main(*inputs, *self.hoisted(inputs, values))
