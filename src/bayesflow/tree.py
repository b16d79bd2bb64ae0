"""Tree helpers: flatten once, work on leaf lists with ``torch._foreach_*``, rebuild at the edge."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import optree
import torch

from bayesflow.types import TensorTree

__all__ = [
    "batch_leaves",
    "flat_layout",
    "flatten",
    "load_state_dict",
    "ravel",
    "state_dict",
    "tree_map",
    "unflatten",
    "unraveller",
]

NONE_IS_LEAF = False


def flatten(tree: TensorTree) -> tuple[list[torch.Tensor], optree.PyTreeSpec]:
    """Leaves (in optree order) and the spec to rebuild the tree."""
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=NONE_IS_LEAF, namespace="bayesflow")
    return leaves, spec


def unflatten(spec: optree.PyTreeSpec, leaves: list[torch.Tensor]) -> TensorTree:
    return spec.unflatten(leaves)


def tree_leaves(tree) -> list:
    return optree.tree_leaves(tree, none_is_leaf=NONE_IS_LEAF, namespace="bayesflow")


def tree_map(fn, tree: TensorTree, *rest: TensorTree) -> TensorTree:
    return optree.tree_map(fn, tree, *rest, none_is_leaf=NONE_IS_LEAF, namespace="bayesflow")


def batch_leaves(batch: Any, lead: int = 1, what: str = "a batch") -> tuple[list, optree.PyTreeSpec, tuple]:
    """The tensors of a batch, its spec and the leading sizes they share (``lead`` dimensions), checked.

    Raises:
        TypeError: the batch holds no tensors, or a leaf that is not a tensor.
        ValueError: a tensor with fewer than ``lead`` dimensions, or tensors of different leading sizes.

    Example:
        >>> import torch
        >>> from bayesflow.tree import batch_leaves
        >>> batch_leaves((torch.ones(4, 2), torch.zeros(4)))[2]
        (4,)
    """
    leaves, spec = flatten(batch)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        kinds = sorted({type(leaf).__name__ for leaf in leaves if not isinstance(leaf, torch.Tensor)})
        raise TypeError(f"{what} must be a tensor or a tree of tensors with a leading sample dimension, got {spec}"
                        + (f" (leaves of type {kinds})" if kinds else " (no tensors)"))
    if any(leaf.ndim < lead for leaf in leaves):
        raise ValueError(f"every tensor of {what} needs {lead} leading dimension(s); got shapes "
                         f"{[tuple(leaf.shape) for leaf in leaves]}")
    heads = {tuple(leaf.shape[:lead]) for leaf in leaves}
    if len(heads) != 1:
        raise ValueError(f"the tensors of {what} must share their leading size(s), got {sorted(heads)}")
    return leaves, spec, heads.pop()


def flat_layout(leaves: list[torch.Tensor]) -> tuple[torch.dtype, torch.device]:
    """The dtype (all leaves' promoted) and device (the first leaf's) of the ravelled leaves."""
    return functools.reduce(torch.promote_types, (leaf.dtype for leaf in leaves)), leaves[0].device


def ravel(leaves: list[torch.Tensor]) -> torch.Tensor:
    """The leaves detached, flattened and concatenated (optree order), in the flat dtype, on the first
    leaf's device: the vector dense curvatures and covariances act on.

    Example:
        >>> import torch
        >>> from bayesflow.tree import flatten, ravel, unraveller
        >>> leaves, spec = flatten({"a": torch.ones(2), "b": torch.zeros(1, 2)})
        >>> ravel(leaves)
        tensor([1., 1., 0., 0.])
        >>> unraveller(leaves, spec)(torch.arange(8.0).reshape(2, 4))["b"].shape   # a batch of two
        torch.Size([2, 1, 2])
    """
    dtype, device = flat_layout(leaves)
    return torch.cat([leaf.detach().reshape(-1).to(dtype=dtype, device=device) for leaf in leaves])


def unraveller(leaves: list[torch.Tensor], spec: optree.PyTreeSpec) -> Callable[[torch.Tensor], TensorTree]:
    """The inverse of :func:`ravel` for trees shaped like ``leaves``: a flat ``(..., d)`` tensor to a tree
    of ``(..., *leaf.shape)`` tensors in each leaf's dtype (differentiable, so torch.func can trace it)."""
    sizes = [leaf.numel() for leaf in leaves]
    shapes = [leaf.shape for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]

    def unravel(flat: torch.Tensor) -> TensorTree:
        batch = flat.shape[:-1]
        pieces = torch.split(flat, sizes, dim=-1)
        return spec.unflatten([piece.reshape(batch + shape).to(dtype)
                               for piece, shape, dtype in zip(pieces, shapes, dtypes)])

    return unravel


def _paths(tree: TensorTree) -> list[str]:
    """Dotted paths of the leaves; a record's (NamedTuple's) field names replace its positions."""
    paths, _, _ = optree.tree_flatten_with_path(tree, none_is_leaf=NONE_IS_LEAF, namespace="bayesflow")
    fields = getattr(type(tree), "_fields", None)
    if fields is not None:
        paths = [(fields[path[0]], *path[1:]) if path else path for path in paths]
    return [".".join(str(p) for p in path) for path in paths]


def state_dict(state: Any) -> dict[str, torch.Tensor]:
    """A flat ``{path: tensor}`` dict of every tensor in a state, for ``torch.save``.

    Load it back with ``torch.load(f, weights_only=True)`` and :func:`load_state_dict`.

    Example:
        >>> import torch
        >>> from bayesflow import load_state_dict, state_dict
        >>> from bayesflow.sgmcmc import sgld
        >>> params = torch.zeros(3)
        >>> transform = sgld.build(lambda params, batch: (-0.5 * (params**2).sum(), None), lr=1e-2)
        >>> state = transform.init(params, seed=0)
        >>> torch.save(state_dict(state), "chain.pt")
        >>> state = load_state_dict(transform.init(params), torch.load("chain.pt", weights_only=True))
    """
    leaves, _ = flatten(state)
    return dict(zip(_paths(state), leaves))


def load_state_dict(template: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild a state shaped like ``template`` from :func:`state_dict` output.

    Empty tuples in the template (caches a run fills in, such as the engine's first-same-as-last
    gradient) take the saved entries under their path, so a fresh ``init`` state is a valid template.

    Raises:
        KeyError: a path of the template is missing from ``tensors``.
        ValueError: a saved tensor has another shape or dtype than the template's, or ``tensors`` holds
            entries the template has no place for.

    Example:
        >>> import torch
        >>> from bayesflow import load_state_dict, state_dict
        >>> from bayesflow.sgmcmc import sgld
        >>> transform = sgld.build(lambda params, batch: (-0.5 * (params**2).sum(), None), lr=1e-2)
        >>> state, _ = transform.update(transform.init(torch.ones(3), seed=0), None)
        >>> restored = load_state_dict(transform.init(torch.zeros(3), seed=1), state_dict(state))
        >>> torch.equal(restored.params, state.params)
        True
    """
    template = _restore_caches(template, tensors, "")
    leaves, spec = flatten(template)
    paths = _paths(template)
    unused = sorted(set(tensors) - set(paths))
    if unused:
        raise ValueError(f"state_dict entries {unused} have no place in the template; "
                         "was it saved from another configuration?")
    out = []
    for path, leaf in zip(paths, leaves):
        if path not in tensors:
            raise KeyError(f"state_dict has no entry {path!r}; it holds {sorted(tensors)}")
        saved = tensors[path]
        if saved.shape != leaf.shape or saved.dtype != leaf.dtype:
            raise ValueError(
                f"state_dict entry {path!r} has shape {tuple(saved.shape)} and dtype {saved.dtype}; "
                f"the state expects {tuple(leaf.shape)} and {leaf.dtype}"
            )
        out.append(saved.to(leaf.device))
    return unflatten(spec, out)


def _restore_caches(template: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Fill the template's empty tuples from ``tensors`` entries ``<path>.0``, ``<path>.1``, ..."""
    if not isinstance(template, tuple):
        return template
    items = []
    fields = getattr(type(template), "_fields", None)
    for i, item in enumerate(template):
        path = f"{prefix}{fields[i] if fields is not None and not prefix else i}"
        if type(item) is tuple and not item:
            item = tuple(tensors[f"{path}.{j}"] for j in range(sum(
                1 for key in tensors if key.startswith(f"{path}.") and key[len(path) + 1:].isdigit())))
        else:
            item = _restore_caches(item, tensors, f"{path}.")
        items.append(item)
    return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
