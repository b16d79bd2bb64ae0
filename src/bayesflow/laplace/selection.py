r"""Choosing parameter leaves by name: the selections of :mod:`bayesflow.laplace.subset`.

A selection is an exact dotted leaf name (``model.named_parameters()``'s), a module prefix (``"head"``
picks ``head.*``), an :func:`fnmatch` glob, a list of these, or a predicate ``(name, leaf) -> bool``;
:func:`take` keeps the chosen leaves (the others become empty tensors, which torch.func accepts),
:func:`complete` fills a sub-tree back out, :func:`last_layer` names the last parameterised module.

Example:
    >>> import torch
    >>> from bayesflow.laplace.selection import names, take
    >>> params = {"body.weight": torch.ones(2), "head.weight": torch.ones(3)}
    >>> names(params), take(params, "head")["body.weight"].shape
    (['body.weight', 'head.weight'], torch.Size([0]))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import optree
import torch

from bayesflow.laplace._common import ONE_DRAW, flat_layout
from bayesflow.tree import flatten
from bayesflow.types import TensorTree
from bayesflow.utils.gaussian import sample_size

__all__ = ["complete", "last_layer", "names", "take"]

Select = str | Sequence[str] | Callable[[str, Any], bool]
_GLOB = "*?["


def names(params: TensorTree) -> list[str]:
    """The dotted names of the leaves of ``params``, in optree order (the order of the ravelled vector).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import subset
        >>> subset.names({"head": {"w": torch.zeros(2), "b": torch.zeros(1)}, "body": [torch.zeros(3)]})
        ['body.0', 'head.b', 'head.w']
    """
    paths, _, _ = optree.tree_flatten_with_path(params, none_is_leaf=False, namespace="bayesflow")
    return [".".join(str(part) for part in path) for path in paths]


def _mask(params: TensorTree, select: Select) -> list[bool]:
    """Which leaves of ``params`` ``select`` chooses; errors for a pattern or name that matches nothing."""
    leaves, _ = flatten(params)
    all_names = names(params)
    shown = ", ".join(repr(n) for n in all_names[:12]) + (", ..." if len(all_names) > 12 else "")
    if callable(select):
        mask = []
        for name, leaf in zip(all_names, leaves):
            chosen = select(name, leaf)
            if not isinstance(chosen, bool):
                raise TypeError(f"select({name!r}, leaf) must return a bool, got {type(chosen).__name__}")
            mask.append(chosen)
    else:
        patterns = [select] if isinstance(select, str) else select
        if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
            raise TypeError("select must be a name or glob, a list of them, or a predicate select(name, leaf) -> bool; "
                            f"got {select!r}")
        mask = [False] * len(all_names)
        for pattern in patterns:
            hits = [i for i, name in enumerate(all_names)
                    if name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)]
            if not hits:
                what = "pattern" if any(c in pattern for c in _GLOB) else "name"
                raise ValueError(f"select {what} {pattern!r} matches no parameter (neither a name, a module prefix "
                                 f"nor a glob of one); the parameters are {shown}")
            for i in hits:
                mask[i] = True
    if not any(mask):
        raise ValueError(f"select {select!r} chooses no parameter; the parameters are {shown}")
    for name, leaf, chosen in zip(all_names, leaves, mask):
        if chosen and not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
            what = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(f"select chooses {name!r}, which is {what}; only floating-point tensors can be "
                            "approximated")
    return mask


def take(params: TensorTree, select: Select) -> TensorTree:
    """The sub-tree of the selected leaves: ``params``' structure, an empty tensor in place of every other leaf.

    The empty tensors take the selected leaves' (promoted) dtype and the first one's device, so the
    sub-tree ravels to the selected entries alone, in their dtype and on their device.

    Args:
        params: a tree of tensors (the fixed leaves may be anything).
        select: exact dotted names, module prefixes or globs (a string or a list of them), or a predicate
            ``select(name, leaf) -> bool``.

    Returns:
        The sub-tree (the selected leaves themselves, not copies).

    Raises:
        ValueError: a name or glob matches no leaf, or nothing is selected.
        TypeError: ``select`` has another type, or selects a leaf that is not a floating-point tensor.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import subset
        >>> params = {"body.weight": torch.zeros(2, 2), "head.weight": torch.ones(1, 2), "head.bias": torch.ones(1)}
        >>> subset.take(params, "head.*")
        {'body.weight': tensor([]), 'head.weight': tensor([[1., 1.]]), 'head.bias': tensor([1.])}
        >>> subset.take(params, ["haed"])
        Traceback (most recent call last):
            ...
        ValueError: select name 'haed' matches no parameter (neither a name, a module prefix nor a glob of one); \
the parameters are 'body.weight', 'head.bias', 'head.weight'
    """
    leaves, spec = flatten(params)
    return _keep(leaves, spec, _mask(params, select))


def _keep(leaves: list, spec: optree.PyTreeSpec, mask: list[bool]) -> TensorTree:
    """The tree of ``leaves`` with the unmasked ones replaced by empty tensors."""
    chosen = [leaf for leaf, keep in zip(leaves, mask) if keep]
    dtype, device = flat_layout(chosen)
    empty = torch.empty(0, dtype=dtype, device=device)
    return spec.unflatten([leaf if keep else empty for leaf, keep in zip(leaves, mask)])


def complete(sub: TensorTree, params: TensorTree, sample_shape: torch.Size = ONE_DRAW) -> TensorTree:
    """The full tree: ``sub``'s leaves, but ``params``' (broadcast views) where ``sub``'s leaf is empty.

    Args:
        sub: a sub-tree of ``params`` (its structure; a leaf with no entries where ``params``' has
            some is a fixed one), e.g. draws of a subset state, whose leaves may carry a leading
            ``sample_shape``.
        params: the full tree the fixed values are taken from.
        sample_shape: expand every fixed leaf to ``sample_shape + leaf.shape`` (a view: no copy).

    Raises:
        ValueError: ``sub`` does not have the structure of ``params``.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import subset
        >>> params = {"a": torch.zeros(2), "b": torch.ones(1)}
        >>> subset.complete({"a": torch.zeros(3, 0), "b": torch.full((3, 1), 5.0)}, params, (3,))["a"]
        tensor([[0., 0.],
                [0., 0.],
                [0., 0.]])
    """
    leaves, spec = flatten(params)
    try:
        given = spec.flatten_up_to(sub)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the sub-tree must have the structure of params ({spec}): {error}") from None
    shape = sample_size(sample_shape)
    return spec.unflatten([_fill(item, leaf, shape) for item, leaf in zip(given, leaves)])


def _fill(item: Any, leaf: Any, shape: torch.Size) -> Any:
    if not isinstance(item, torch.Tensor) or item.numel() or not isinstance(leaf, torch.Tensor) or not leaf.numel():
        return item  # a selected leaf (or a fixed one with no entries either: nothing to tell apart)
    return leaf.expand(shape + leaf.shape) if shape else leaf


def last_layer(model: torch.nn.Module | TensorTree) -> list[str]:
    """The names of the last layer's parameters: of a module, or of a parameter tree.

    For a module, the last submodule (in registration order, as ``named_modules``) that has parameters
    of its own; for a tree, the leaves sharing the last leaf's prefix (its name up to the last ``.``),
    *last* in insertion order (a ``dict(model.named_parameters())`` lists the layers in registration
    order; optree's own order sorts dict keys, which would put ``"10.weight"`` before ``"2.weight"``).
    Registration order is the forward order for ``nn.Sequential`` and for models that define the head
    last; otherwise name the layer.

    Returns:
        The dotted names, for ``select``.

    Raises:
        ValueError: the module has no parameters, or the tree no leaves.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import subset
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> subset.last_layer(model)
        ['2.weight', '2.bias']
        >>> subset.last_layer({"body": {"w": torch.zeros(2)}, "head": {"w": torch.zeros(1), "b": torch.zeros(1)}})
        ['head.w', 'head.b']
    """
    if isinstance(model, torch.nn.Module):
        owners = [(prefix, module) for prefix, module in model.named_modules()
                  if any(True for _ in module.parameters(recurse=False))]
        if not owners:
            raise ValueError(f"last_layer: the {type(model).__name__} has no parameters")
        prefix, module = owners[-1]
        return [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)]
    ordered = _insertion_order_names(model)
    if not ordered:
        raise ValueError("last_layer: the parameter tree has no leaves")
    layer = ordered[-1].rpartition(".")[0]
    return [name for name in ordered if layer and name.startswith(layer + ".")] or [ordered[-1]]


def _insertion_order_names(tree: Any, prefix: str = "") -> list[str]:
    """Dotted leaf names, mappings in their insertion order, lists and tuples in theirs, leaves as named."""
    if isinstance(tree, Mapping):
        return [name for key, value in tree.items() for name in _insertion_order_names(value, f"{prefix}{key}.")]
    if isinstance(tree, (list, tuple)):
        return [name for i, value in enumerate(tree) for name in _insertion_order_names(value, f"{prefix}{i}.")]
    return [f"{prefix}{name}" if name else prefix[:-1] for name in names(tree)]
