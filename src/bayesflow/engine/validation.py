"""Boundary checks: parameters, the data-size operator N, non-finite gradients."""

from __future__ import annotations

import math
import numbers

import optree
import torch

from bayesflow.tree import flatten


def check_bool(value, name: str) -> bool:
    """``value`` if it is a bool: a flag given as ``"no"`` or ``0`` would be read as its truth value.

    Example:
        >>> from bayesflow.engine.validation import check_bool
        >>> check_bool(True, "inplace")
        True
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def param_leaves(name: str, params) -> tuple[list[torch.Tensor], optree.PyTreeSpec]:
    """The leaves and spec of ``params``: a TypeError naming the first leaf that is not a floating-point
    tensor (``name``: the function that asks, for the message)."""
    leaves, spec = flatten(params)
    if not leaves:
        raise ValueError(f"{name}: params has no tensors to approximate a distribution over")
    for path, leaf in zip(param_paths(params), leaves):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            what = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(f"{name}: every leaf of params must be a floating-point tensor; "
                            f"params{path} is {what}")
    return leaves, spec


def param_paths(tree) -> list[str]:
    """Each leaf's path in subscript form (``['layer']['weight']``), for messages."""
    return ["".join(f"[{p!r}]" for p in path) for path in optree.tree_paths(tree, namespace="bayesflow")]


def check_params(leaves: list) -> None:
    """Parameters must be floating-point tensors on one device."""
    if not leaves:
        raise ValueError("params has no tensors")
    devices = set()
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"params leaf {i} is a {type(leaf).__name__}, expected a torch.Tensor")
        if not leaf.is_floating_point():
            raise TypeError(f"params leaf {i} has dtype {leaf.dtype}; parameters must be floating point")
        devices.add(leaf.device)
    if len(devices) > 1:
        raise ValueError(f"params live on several devices {sorted(map(str, devices))}; move them to one")
    dtypes = {leaf.dtype for leaf in leaves}
    if len(dtypes) > 1:
        raise ValueError(f"params have several dtypes {sorted(map(str, dtypes))}; cast them to one (the noise "
                         "and the operators of a step share one dtype)")


def leaf_paths(spec, leaves: list) -> list[str]:
    """Dotted tree paths of the leaves (``"layer.weight"``; ``"<root>"`` for a bare tensor)."""
    return [".".join(map(str, p)) or "<root>" for p in
            optree.tree_paths(optree.tree_unflatten(spec, leaves), none_is_leaf=False, namespace="bayesflow")]


def check_finite_params(leaves: list, spec) -> None:
    """Initial parameters must be finite: a ValueError naming the leaves that are not (one host read)."""
    finite = torch.stack([torch.isfinite(leaf).all() for leaf in leaves]).tolist()
    if not all(finite):
        bad = [path for path, ok in zip(leaf_paths(spec, leaves), finite) if not ok]
        raise ValueError(f"params leaf {bad[0]!r} holds NaN or infinite values (all such leaves: {bad}); "
                         "initial parameters must be finite")


def mismatched_leaves(grads: list, leaves: list, spec) -> str:
    """A message naming the first gradient leaf whose shape or dtype differs from its parameter."""
    paths = leaf_paths(spec, leaves)
    for path, g, p in zip(paths, grads, leaves):
        if g.shape != p.shape or g.dtype != p.dtype:
            return (f"grads leaf {path!r} has shape {tuple(g.shape)} and dtype {g.dtype}; the parameter has "
                    f"shape {tuple(p.shape)} and dtype {p.dtype}")
    return "grads do not match params"


def resolve_num_data(num_data, leaves: list):
    """N as one float, or a list of one float per leaf (per-group data sizes)."""
    if isinstance(num_data, torch.Tensor) and num_data.numel() == 1:
        num_data = num_data.item()
    if isinstance(num_data, numbers.Real) and not isinstance(num_data, bool):
        if not num_data > 0 or not math.isfinite(num_data):
            raise ValueError(f"num_data must be a positive finite number, got {num_data}")
        return float(num_data)
    values, _ = flatten(num_data)
    values = [float(v) for v in values]
    if len(values) != len(leaves):
        raise ValueError(f"num_data has {len(values)} entries but params has {len(leaves)} leaves; "
                         "give one number or one per leaf")
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"num_data entries must be positive and finite, got {values}")
    return values


SMALL_CHECK_NUMEL = 1 << 17
"""Up to this many gradient entries the finiteness test concatenates them (and the value) into one
vector and sums it: at small sizes per-leaf kernel launches, not arithmetic, dominate the test."""

_concatenate = getattr(torch._C._nn, "flatten_dense_tensors", None) or (
    lambda tensors: torch.cat([t.reshape(-1) for t in tensors]))
"""One flat vector from tensors of any shapes, in one call (the flattening views are made in C++:
from Python they would cost more than the copy at small sizes)."""


def check_finite(value: torch.Tensor | None, grads: list | None, spec, step: int,
                 small: bool = False) -> str | None:
    """A message naming the step and the first non-finite quantity, or None if all are finite.

    The value and the gradient are tested with one read back to the host (one device sync on a
    GPU): a reduction that is finite only if every entry is (NaN and ±inf propagate). A sum or
    norm of huge but finite values can overflow, so a non-finite result falls through to the exact
    tests, which decide. ``small`` (at most :data:`SMALL_CHECK_NUMEL` gradient entries): the
    gradient and the value are concatenated into one vector and summed, instead of a norm per leaf.
    """
    if grads is None:
        if value is None or math.isfinite((value if value.numel() == 1 else value.sum()).item()):
            return None
    elif small and (value is None or value.device == grads[0].device):  # (a value moved to the CPU: below)
        if math.isfinite(_concatenate(grads if value is None else [*grads, value]).sum().item()):
            return None
    else:
        total = torch.stack(torch._foreach_norm(grads)).sum()
        if value is not None:
            total = total + value.sum()
        if math.isfinite(total.item()):
            return None
    if value is not None and not bool(torch.isfinite(value).all()):
        where = " (the params are finite: init checked them)" if step == 0 else ""
        return f"the log posterior's value is {value.tolist()} at step {step}{where}: the value is not finite"
    if grads is None:
        return None
    bad_leaves = [i for i, g in enumerate(grads) if not bool(torch.isfinite(g).all())]
    if not bad_leaves:
        return None
    paths = leaf_paths(spec, grads)
    bad = [paths[i] for i in bad_leaves]
    return f"gradient of the log posterior is not finite at step {step} in leaf {bad[0]!r} (all: {bad})"


class Untraceable(RuntimeError):
    """A step reads a value in Python that a traced (compiled) step only has as a tensor: the compiled
    step (:mod:`bayesflow.engine.compiled`) runs that kind of step eagerly, with a warning."""


class Rejected(Exception):
    """A non-finite step refused under ``on_nonfinite="reject"`` (the engine returns the input state)."""


def checked_gradient(gradient_fn, config, spec, small: bool, step: int, caller_gradient: bool,
                     value_given: bool = True):
    """``gradient_fn`` wrapped with the configured finiteness test (or itself when nothing is tested).

    ``check_finite="auto"`` tests the value and every gradient leaf in ``update`` and the value only
    in ``step`` (the caller computed the gradient); a failure raises a FloatingPointError naming the
    step and the leaf, or :class:`Rejected` under ``on_nonfinite="reject"``. (An in-place step of a
    word that evaluates mid-step restores the state it had already written: ``sde._Engine._snapshot``.)
    """
    mode, policy = config.check_finite, config.on_nonfinite
    if mode == "auto":
        mode = "value" if caller_gradient else "full"
    if mode == "none" or (mode == "value" and not value_given):  # nothing to test
        return gradient_fn
    full = mode == "full"

    def checked(leaves):
        grads, value, owned = gradient_fn(leaves)
        problem = check_finite(value, grads if full else None, spec, step, small)
        if problem is not None:
            if policy == "reject":
                raise Rejected()
            raise FloatingPointError(problem)
        return grads, value, owned

    return checked


def step_count(step: torch.Tensor, field: str = "step") -> int:
    """A count of a state (``step`` or ``rejected``: one count, or K equal counts of K chains) as an int."""
    if step.ndim == 0:
        return int(step)
    counts = step.tolist()
    if counts.count(counts[0]) != len(counts):
        what = "at different steps" if field == "step" else "with different counts of refused steps"
        raise ValueError(f"the chains of this state are {what} ({field} = {counts}): a K-chain state advances "
                         f"its chains together (stack states taken at the same step, with the same {field})")
    return counts[0]


def chain_mismatch(keys, chains: int | None) -> str:
    """What is wrong, in chain terms, with a state whose noise keys do not fit this transform."""
    if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or keys.ndim > 1:
        shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        return (f"state.rng must hold the int64 noise keys that init made (shape () or (chains,)), got {shape}; "
                "a state of another bayesflow version or a hand-made record cannot be advanced")
    held = None if keys.ndim == 0 else keys.shape[0]
    if chains is None:
        return (f"this state holds {held} chains but the transform advances a single chain; lift the transform "
                f"(bayesflow.ensemble.lift(transform, {held})) or take one chain with state[k]")
    if held is None:
        return (f"this state is a single chain but the transform advances {chains} chains; stack {chains} states "
                f"(torch.stack([...])) or init with params of leading dimension {chains}")
    return f"this state holds {held} chains but the transform advances {chains}"
