"""State records that act like tensors: ``torch.stack``, ``torch.cat``, ``unsqueeze`` and indexing, leaf by leaf.

bayesflow's states are immutable ``typing.NamedTuple`` records (optree flattens them at no cost).
posteriors' states are tensordict classes, and code written for posteriors treats them as batched
tensors: ``torch.stack(states)``, ``torch.cat((trace, torch.unsqueeze(state, 0)))``,
``trace[burn_in:].params``. :func:`record` gives a NamedTuple class the same behaviour through
``__torch_function__`` (every torch function applied to every tensor leaf, the record rebuilt
around the results) and a leaf-wise ``__getitem__``, plus ``to_dict()`` and ``replace(**fields)``.
Fields that are None or empty tuples (no leaves) pass through; non-tensor leaves are left as they
are in the first record.

A stack of K single-chain engine states *is* a K-chain state (every leaf gains the leading chain
dimension the K-chain engine expects), and indexing a K-chain state gives back a single chain.

Example:
    >>> import torch
    >>> from typing import NamedTuple
    >>> from bayesflow.records import record
    >>> @record
    ... class Point(NamedTuple):
    ...     x: torch.Tensor
    ...     label: str = "p"
    >>> trace = torch.stack([Point(torch.zeros(2)), Point(torch.ones(2))])
    >>> trace.x.shape, trace[1].x, torch.unsqueeze(Point(torch.zeros(2)), 0).x.shape
    (torch.Size([2, 2]), tensor([1., 1.]), torch.Size([1, 2]))
"""

from __future__ import annotations

from typing import Any

import optree
import torch

__all__ = ["is_record", "record"]

_NAMESPACE = "bayesflow"


def is_record(value: Any) -> bool:
    """Whether ``value`` is an instance of a class decorated with :func:`record`."""
    return getattr(type(value), "__bayesflow_record__", False)


def _flatten(value):
    return optree.tree_flatten(value, none_is_leaf=False, namespace=_NAMESPACE)


def _torch_function(cls, func, types, args=(), kwargs=None):
    """Apply ``func`` leaf-wise to the records among ``args`` (directly, or inside a list/tuple argument)."""
    kwargs = kwargs or {}
    template = spec = None
    flat: dict[int, list] = {}

    def collect(value):
        nonlocal template, spec
        leaves, value_spec = _flatten(value)
        if spec is None:
            template, spec = value, value_spec
        elif value_spec != spec:
            raise ValueError(f"{func.__name__}: the states have different structures ({spec} and {value_spec}); "
                             "they come from different methods or parameter trees")
        flat[id(value)] = leaves

    for arg in (*args, *kwargs.values()):
        if is_record(arg):
            collect(arg)
        elif isinstance(arg, (list, tuple)):
            for item in arg:
                if is_record(item):
                    collect(item)
    if spec is None:
        return NotImplemented
    first = flat[id(template)]

    def substitute(value, i):
        if is_record(value):
            return flat[id(value)][i]
        if isinstance(value, (list, tuple)) and not is_record(value) and any(map(is_record, value)):
            return type(value)(substitute(item, i) for item in value)
        return value

    out = []
    for i, leaf in enumerate(first):
        if not isinstance(leaf, torch.Tensor):
            out.append(leaf)
            continue
        out.append(func(*(substitute(a, i) for a in args), **{k: substitute(v, i) for k, v in kwargs.items()}))
    return optree.tree_unflatten(spec, out)


def _getitem(self, index):
    """Leaf-wise indexing (``state[k]``, ``trace[burn_in:]``); field access stays ``state.params``."""
    leaves, spec = _flatten(self)
    return optree.tree_unflatten(spec, [leaf[index] if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])


def _to_dict(self) -> dict[str, Any]:
    """The fields as a dict (posteriors' ``state.to_dict()``)."""
    return self._asdict()


def _replace_fields(self, **fields):
    """A new record with ``fields`` replaced (posteriors' ``state.replace(...)``; NamedTuple's ``_replace``)."""
    return self._replace(**fields)


def record(cls):
    """Give a NamedTuple class tensor-like behaviour (see the module docstring) and register it as a
    safe global of ``torch.load(weights_only=True)``.

    Example:
        >>> import torch
        >>> from typing import NamedTuple
        >>> from bayesflow.records import record
        >>> @record
        ... class Draw(NamedTuple):
        ...     params: torch.Tensor
        >>> torch.cat([Draw(torch.zeros(1, 3)), Draw(torch.ones(2, 3))]).params.shape
        torch.Size([3, 3])
    """
    cls.__torch_function__ = classmethod(_torch_function)
    cls.__getitem__ = _getitem
    cls.to_dict = _to_dict
    cls.replace = _replace_fields
    cls.__bayesflow_record__ = True
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([cls])
    return cls
