"""posteriors-compatible tree utilities: sizes, sub-trees of the trainable leaves, in-place maps.

The names, signatures and semantics are those of ``posteriors.tree_utils`` (normal-computing/posteriors), so
code ported from posteriors runs unchanged; the implementations are bayesflow's. A *sub-tree* has the
structure of the full tree, with an empty tensor in place of every leaf that a predicate ``f`` rejects.
*In place* means the leaf tensor objects of the input tree are kept and their ``.data`` is replaced (so
the shape may change, and ``requires_grad`` and every other reference to the tensor are kept).

The trees are optree pytrees; ``none_is_leaf`` and ``namespace`` default to bayesflow's (``False``,
``"bayesflow"``: every globally registered node type, plus bayesflow's).

Example:
    >>> import torch
    >>> from bayesflow.tree_utils import extract_requires_grad_and_func, tree_size
    >>> params = {"w": torch.ones(2, 3, requires_grad=True), "scale": torch.tensor(2.0)}
    >>> tree_size(params)
    7
    >>> sub, f = extract_requires_grad_and_func(params, lambda p: (p["scale"] * p["w"]).sum())
    >>> sub["scale"].shape, f(sub)
    (torch.Size([0]), tensor(12., grad_fn=<SumBackward0>))
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import optree
import torch

from bayesflow.tree import NONE_IS_LEAF, flatten, tree_leaves, tree_map
from bayesflow.types import TensorTree

__all__ = ["extract_requires_grad", "extract_requires_grad_and_func", "flexi_tree_map", "inplacify",
           "insert_requires_grad", "insert_requires_grad_", "tree_extract", "tree_insert", "tree_insert_",
           "tree_map_inplacify_", "tree_size"]

NAMESPACE = "bayesflow"
_requires_grad = operator.attrgetter("requires_grad")


def tree_size(tree: TensorTree) -> int:
    r"""Total number of elements :math:`\sum_{\ell} \mathrm{numel}(\ell)` over the leaves (not the leaf count).

    Args:
        tree: a tree of tensors; Python numbers count as one element each. Returns an ``int`` (0 if empty).

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import tree_size
        >>> tree_size({"a": 3.0, "b": torch.zeros(2, 4)}), tree_size(1.5), tree_size({})
        (9, 1, 0)
    """
    return sum(int(torch.as_tensor(leaf).numel()) for leaf in tree_leaves(tree))


def tree_extract(tree: TensorTree, f: Callable[[torch.Tensor], bool]) -> TensorTree:
    r"""The sub-tree of the leaves :math:`\ell` with :math:`f(\ell)` true; the others become empty tensors.

    Args:
        tree: a tree of tensors.
        f: the predicate applied to every leaf.

    Returns:
        A tree of ``tree``'s structure: each leaf itself (no copy) where ``f`` holds, else an empty tensor
        (shape ``(0,)``) of the leaf's dtype and device.

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import tree_extract
        >>> tree_extract({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}, lambda x: x[0] < 2)
        {'a': tensor([1., 2.]), 'b': tensor([])}
    """
    return tree_map(lambda x: x if f(x) else torch.as_tensor(x).new_empty(0), tree)


def tree_insert(full_tree: TensorTree, sub_tree: TensorTree, f: Callable = lambda _: True) -> TensorTree:
    r"""A new tree: ``sub_tree``'s leaf where ``f(full_tree's leaf)`` holds, ``full_tree``'s leaf elsewhere.

    The inverse of :func:`tree_extract`: ``tree_insert(t, tree_extract(t, f), f)`` has ``t``'s leaves.
    Neither input is modified.

    Args:
        full_tree: the tree to insert into.
        sub_tree: a tree of the same structure (rejected places may hold empty tensors).
        f: the predicate, applied to the leaves of ``full_tree``; by default every leaf is replaced.

    Returns:
        The merged tree (its leaves are the input tensors themselves, not copies).

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import tree_insert
        >>> full = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
        >>> tree_insert(full, {"a": torch.tensor([5.0, 6.0]), "b": torch.tensor([])}, lambda x: x[0] < 2)
        {'a': tensor([5., 6.]), 'b': tensor([3., 4.])}
    """
    return tree_map(lambda sub, full: sub if f(full) else full, sub_tree, full_tree)


def tree_insert_(full_tree: TensorTree, sub_tree: TensorTree, f: Callable = lambda _: True) -> TensorTree:
    r"""In-place :func:`tree_insert`: ``full.data = sub.data`` for each leaf pair where ``f(full)`` holds.

    The leaf tensors of ``full_tree`` stay the same objects (``requires_grad`` kept); their data now is
    (shares the storage of) ``sub_tree``'s, whatever its shape.

    Args:
        full_tree: the tree modified in place.
        sub_tree: a tree of the same structure.
        f: the predicate, applied to the leaves of ``full_tree``; by default every leaf is replaced.

    Returns:
        ``full_tree`` itself.

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import tree_insert_
        >>> full = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])}
        >>> a = full["a"]
        >>> out = tree_insert_(full, {"a": torch.tensor([5.0, 6.0]), "b": torch.tensor([])}, lambda x: x[0] < 2)
        >>> out is full, a, full["b"]
        (True, tensor([5., 6.]), tensor([3., 4.]))
    """
    full_leaves, spec = flatten(full_tree)
    sub_leaves = spec.flatten_up_to(sub_tree)
    for full, sub in zip(full_leaves, sub_leaves):
        if f(full):
            full.data = sub.data
    return full_tree


def extract_requires_grad(tree: TensorTree) -> TensorTree:
    """:func:`tree_extract` with ``f = requires_grad``: the trainable leaves, empty tensors elsewhere.

    Args:
        tree: a tree of tensors; returns the sub-tree of its leaves with ``requires_grad=True``.

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import extract_requires_grad
        >>> extract_requires_grad({"a": torch.ones(2, requires_grad=True), "b": torch.ones(2)})
        {'a': tensor([1., 1.], requires_grad=True), 'b': tensor([])}
    """
    return tree_extract(tree, _requires_grad)


def insert_requires_grad(full_tree: TensorTree, sub_tree: TensorTree) -> TensorTree:
    """:func:`tree_insert` with ``f = requires_grad``: a new tree with ``sub_tree``'s trainable leaves.

    Args:
        full_tree: the tree to insert into (not modified).
        sub_tree: a tree of the same structure, as :func:`extract_requires_grad` returns.

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import insert_requires_grad
        >>> full = {"a": torch.ones(2, requires_grad=True), "b": torch.ones(2)}
        >>> insert_requires_grad(full, {"a": torch.zeros(2), "b": torch.tensor([])})
        {'a': tensor([0., 0.]), 'b': tensor([1., 1.])}
    """
    return tree_insert(full_tree, sub_tree, _requires_grad)


def insert_requires_grad_(full_tree: TensorTree, sub_tree: TensorTree) -> TensorTree:
    """:func:`tree_insert_` with ``f = requires_grad``: ``full.data = sub.data`` on the trainable leaves.

    Args:
        full_tree: the tree modified in place, and returned.
        sub_tree: a tree of the same structure, as :func:`extract_requires_grad` returns.

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import insert_requires_grad_
        >>> full = {"a": torch.ones(2, requires_grad=True), "b": torch.ones(2)}
        >>> insert_requires_grad_(full, {"a": torch.zeros(2), "b": torch.tensor([])})
        {'a': tensor([0., 0.], requires_grad=True), 'b': tensor([1., 1.])}
    """
    return tree_insert_(full_tree, sub_tree, _requires_grad)


def extract_requires_grad_and_func(tree: TensorTree, func: Callable, inplace: bool = False,
                                   ) -> tuple[TensorTree, Callable]:
    r"""The trainable sub-tree :math:`s` of ``tree`` and :math:`g(s, \ldots) = f(\mathrm{insert}(tree, s), \ldots)`.

    ``g`` takes the sub-tree in place of the full tree as its first argument (the frozen leaves come from
    ``tree``), so ``torch.func.grad(g)(s)`` differentiates with respect to the trainable leaves only.

    Args:
        tree: a tree of tensors.
        func: :math:`f`, a function taking the full tree as its first argument.
        inplace: if true, every call of ``g`` also writes its sub-tree into ``tree``
            (:func:`insert_requires_grad_`); otherwise ``tree`` is left alone (:func:`insert_requires_grad`).

    Returns:
        ``(sub_tree, g)``.

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import extract_requires_grad_and_func
        >>> params = {"w": torch.tensor([1.0, 2.0], requires_grad=True), "c": torch.tensor(3.0)}
        >>> sub, g = extract_requires_grad_and_func(params, lambda p: (p["c"] * p["w"] ** 2).sum())
        >>> g(sub).backward()
        >>> sub["w"].grad  # 2 c w (sub["w"] is params["w"] itself)
        tensor([ 6., 12.])
    """
    sub_tree = extract_requires_grad(tree)
    insert = insert_requires_grad_ if inplace else insert_requires_grad

    def sub_func(sub: TensorTree, *args: Any, **kwargs: Any) -> Any:
        return func(insert(tree, sub), *args, **kwargs)

    return sub_tree, sub_func


def inplacify(func: Callable) -> Callable:
    r"""Turn a pure :math:`y = \mathrm{func}(x, \ldots)` into :math:`x.\mathrm{data} \leftarrow y`, returning :math:`x`.

    Args:
        func: a function of a tensor (first argument) returning its new value (any shape).

    Returns:
        ``func_(tensor, *args, **kwargs)``, which sets ``tensor.data`` to ``func``'s output and returns
        ``tensor`` (the same object).

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import inplacify
        >>> x = torch.tensor(1.0)
        >>> inplacify(lambda t, k: t + k)(x, 2) is x, x
        (True, tensor(3.))
    """
    def func_(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        tensor.data = func(tensor, *args, **kwargs)
        return tensor

    return func_


def tree_map_inplacify_(func: Callable, tree: TensorTree, *rests: TensorTree, is_leaf: Callable | None = None,
                        none_is_leaf: bool = NONE_IS_LEAF, namespace: str = NAMESPACE) -> TensorTree:
    r""":math:`\ell.\mathrm{data} \leftarrow \mathrm{func}(\ell, r_1, \ldots)` for every leaf of ``tree``.

    Like ``optree.tree_map_`` but with a pure function: its output replaces each leaf's data in place.

    Args:
        func: a pure function of a leaf and the matching leaves of ``rests``.
        tree: the tree modified in place.
        *rests: trees with ``tree``'s structure (or having it as a prefix).
        is_leaf, none_is_leaf, namespace: as in ``optree.tree_map`` (a subtree where ``is_leaf`` holds is one
            leaf; ``None`` a leaf or an empty node; the registry namespace of custom node types).

    Returns:
        ``tree`` itself.

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import tree_map_inplacify_
        >>> tree = {"a": torch.tensor(1.0), "b": torch.tensor([1.0, 2.0])}
        >>> tree_map_inplacify_(lambda x, y: x + y, tree, {"a": 1.0, "b": torch.tensor(10.0)}) is tree, tree
        (True, {'a': tensor(2.), 'b': tensor([11., 12.])})
    """
    return optree.tree_map_(inplacify(func), tree, *rests, is_leaf=is_leaf, none_is_leaf=none_is_leaf,
                            namespace=namespace)


def flexi_tree_map(func: Callable, tree: TensorTree, *rests: TensorTree, inplace: bool = False,
                   is_leaf: Callable | None = None, none_is_leaf: bool = NONE_IS_LEAF, namespace: str = NAMESPACE,
                   ) -> TensorTree:
    r"""Map a pure ``func`` over the leaves: a new tree, or with ``inplace=True`` the same tree updated.

    ``inplace=False``: ``optree.tree_map(func, tree, *rests)``, :math:`\ell' = \mathrm{func}(\ell, r_1, \ldots)`;
    ``inplace=True``: :func:`tree_map_inplacify_`, :math:`\ell.\mathrm{data} \leftarrow \mathrm{func}(\ell, \ldots)`.

    Args:
        func: a pure function of a leaf and the matching leaves of ``rests``.
        tree: the tree to map over.
        *rests: trees with ``tree``'s structure (or having it as a prefix).
        inplace: update ``tree``'s leaves in place (and return ``tree``) instead of building a new tree.
        is_leaf, none_is_leaf, namespace: as in :func:`tree_map_inplacify_`.

    Returns:
        A new tree, or ``tree`` itself modified in place.

    Example:
        >>> import torch
        >>> from bayesflow.tree_utils import flexi_tree_map
        >>> x = torch.tensor(1.0)
        >>> flexi_tree_map(lambda t: t + 1, x), x
        (tensor(2.), tensor(1.))
        >>> flexi_tree_map(lambda t: t + 1, x, inplace=True) is x, x
        (True, tensor(2.))
    """
    mapper = tree_map_inplacify_ if inplace else optree.tree_map
    return mapper(func, tree, *rests, is_leaf=is_leaf, none_is_leaf=none_is_leaf, namespace=namespace)
