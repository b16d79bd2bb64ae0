"""Boundary checks: parameters, the data-size operator N, non-finite gradients."""

from __future__ import annotations

import math

import optree
import torch

from bayesflow.tree import flatten


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


def mismatched_leaves(grads: list, leaves: list, spec) -> str:
    """A message naming the first gradient leaf whose shape or dtype differs from its parameter."""
    paths = [".".join(map(str, p)) or "<root>" for p in
             optree.tree_paths(optree.tree_unflatten(spec, leaves), none_is_leaf=False, namespace="bayesflow")]
    for path, g, p in zip(paths, grads, leaves):
        if g.shape != p.shape or g.dtype != p.dtype:
            return (f"grads leaf {path!r} has shape {tuple(g.shape)} and dtype {g.dtype}; the parameter has "
                    f"shape {tuple(p.shape)} and dtype {p.dtype}")
    return "grads do not match params"


def resolve_num_data(num_data, leaves: list):
    """N as one float, or a list of one float per leaf (per-group data sizes)."""
    if isinstance(num_data, (int, float)):
        if not num_data > 0 or not math.isfinite(num_data):
            raise ValueError(f"num_data must be a positive number, got {num_data}")
        return float(num_data)
    values, _ = flatten(num_data)
    values = [float(v) for v in values]
    if len(values) != len(leaves):
        raise ValueError(f"num_data has {len(values)} entries but params has {len(leaves)} leaves; "
                         "give one number or one per leaf")
    if any(not v > 0 for v in values):
        raise ValueError(f"num_data entries must be positive, got {values}")
    return values


SMALL_CHECK_NUMEL = 1 << 17
"""Up to this many gradient entries the finiteness test copies them into one buffer and sums it:
at small sizes per-leaf kernel launches, not arithmetic, dominate the test."""


def check_finite(value: torch.Tensor | None, grads: list | None, spec, step: int,
                 buffer: tuple | None = None) -> str | None:
    """A message naming the step and the first non-finite quantity, or None if all are finite.

    ``buffer`` (optional) is ``(flat, views)``: a flat scratch tensor with room for every gradient
    entry and its views shaped like the leaves; with it the cheap test is one foreach copy and one
    sum instead of a norm per leaf.
    """
    if value is not None and not (math.isfinite(value.item()) if value.numel() == 1 and not value.is_complex()
                                  else bool(torch.isfinite(value).all())):  # .item(): no kernel launches
        return f"log posterior is {value.tolist()} at step {step}"
    if grads is None:
        return None
    # One cheap reduction whose result is finite only if every entry is (NaN and ±inf propagate);
    # a sum or norm of huge but finite values can overflow, so a non-finite result falls through to
    # the exact per-leaf test, which decides.
    if buffer is not None:
        flat, views = buffer
        torch._foreach_copy_(views, grads)
        if math.isfinite(flat.sum().item()):
            return None
    elif math.isfinite(sum(norm.item() for norm in torch._foreach_norm(grads))):
        return None
    bad_leaves = [i for i, g in enumerate(grads) if not bool(torch.isfinite(g).all())]
    if not bad_leaves:
        return None
    paths = [".".join(map(str, p)) or "<root>" for p in
             optree.tree_paths(optree.tree_unflatten(spec, grads), none_is_leaf=False, namespace="bayesflow")]
    bad = [paths[i] for i in bad_leaves]
    return f"gradient of the log posterior is not finite at step {step} in leaf {bad[0]!r} (all: {bad})"
