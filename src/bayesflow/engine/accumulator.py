"""Copy-on-first-write leaf lists: functional updates without a separate copy pass.

A component of the state (params, momenta, xi) is held as an :class:`Accumulator`. The first write
into a component that the caller still owns (``inplace=False``) is done out of place with the same
foreach kernel, so a functional step costs no extra pass over memory compared with an in-place one.
"""

from __future__ import annotations

import math

import torch

Leaves = list[torch.Tensor]


def sqrt(value):
    """The square root of a float (``math.sqrt``) or of a tensor of scalars (a traced step's
    temperature, step size or step count: see :mod:`bayesflow.engine.compiled`)."""
    return value.sqrt() if isinstance(value, torch.Tensor) else math.sqrt(value)


def per_chain(values: torch.Tensor, like: Leaves) -> Leaves:
    """Views of one value per chain, broadcastable against leaves with a leading chain dimension.

    A 0-dim ``values`` (a single chain, e.g. SGNHT's ξ) broadcasts as it is, also against 0-dim leaves.
    """
    if values.ndim == 0:
        return [values.to(leaf.dtype) for leaf in like]
    return [values.view(-1, *([1] * (leaf.ndim - 1))).to(leaf.dtype) for leaf in like]


def flat_leaves(leaves: Leaves, chains: int | None) -> torch.Tensor:
    """The leaves as one (d,) vector, or (K, d) with K chains (a copy, except for one leaf)."""
    if len(leaves) == 1:
        return leaves[0].reshape(-1) if chains is None else leaves[0].reshape(chains, -1)
    if chains is None:
        return torch.cat([leaf.reshape(-1) for leaf in leaves])
    return torch.cat([leaf.reshape(chains, -1) for leaf in leaves], 1)


def leaf_views(vector: torch.Tensor, like: Leaves) -> Leaves:
    """A (d,) or (K, d) vector cut into pieces shaped like ``like`` (views where the strides allow)."""
    if len(like) == 1:
        return [vector.reshape(like[0].shape)]
    sizes = [leaf[0].numel() if vector.ndim == 2 else leaf.numel() for leaf in like]
    return [part.reshape(leaf.shape) for part, leaf in zip(vector.split(sizes, dim=-1), like)]


class Accumulator:
    """Leaves of one state component, updated with ``torch._foreach_*`` kernels.

    Args:
        leaves: the component's tensors.
        owned: whether these tensors may be written in place (``inplace=True`` or our own copies).
    """

    __slots__ = ("leaves", "owned")

    def __init__(self, leaves: Leaves, owned: bool):
        self.leaves = leaves
        self.owned = owned

    def add(self, other: Leaves, alpha: float = 1.0) -> None:
        """``self += alpha * other`` (alpha a float, or a tensor with one value per chain)."""
        if isinstance(alpha, torch.Tensor):
            self.addcmul(other, per_chain(alpha, other))
            return
        if self.owned:
            torch._foreach_add_(self.leaves, other, alpha=alpha)
        else:
            self.leaves = torch._foreach_add(self.leaves, other, alpha=alpha)
            self.owned = True

    def addcmul(self, a: Leaves, b: Leaves, value: float = 1.0) -> None:
        """``self += value * a * b``."""
        if isinstance(value, torch.Tensor):
            b = torch._foreach_mul(b, per_chain(value, b))
            value = 1.0
        if self.owned:
            torch._foreach_addcmul_(self.leaves, a, b, value=value)
        else:
            self.leaves = torch._foreach_addcmul(self.leaves, a, b, value=value)
            self.owned = True

    def addcdiv(self, a: Leaves, b: Leaves, value: float = 1.0) -> None:
        """``self += value * a / b``."""
        if isinstance(value, torch.Tensor):
            a = torch._foreach_mul(a, per_chain(value, a))
            value = 1.0
        if self.owned:
            torch._foreach_addcdiv_(self.leaves, a, b, value=value)
        else:
            self.leaves = torch._foreach_addcdiv(self.leaves, a, b, value=value)
            self.owned = True

    def lerp(self, end: Leaves, weight: float) -> None:
        """``self += weight * (end - self)`` (a float weight), rounded as ``torch.lerp``: torch.optim's
        running means."""
        if self.owned:
            torch._foreach_lerp_(self.leaves, end, weight)
        else:
            self.leaves = torch._foreach_lerp(self.leaves, end, weight)
            self.owned = True

    def mul(self, factor: float | Leaves) -> None:
        """``self *= factor`` (a float, one tensor per leaf, or a tensor with one value per chain)."""
        if isinstance(factor, torch.Tensor):
            factor = per_chain(factor, self.leaves)
        if self.owned:
            torch._foreach_mul_(self.leaves, factor)
        else:
            self.leaves = torch._foreach_mul(self.leaves, factor)
            self.owned = True

    def assign(self, leaves: Leaves) -> None:
        """Replace the values (in place where owned, so ``inplace=True`` keeps tensor identity)."""
        if self.owned:
            torch._foreach_copy_(self.leaves, leaves)
        else:
            self.leaves = list(leaves)
            self.owned = True

    def snapshot(self) -> Leaves:
        """The current values, safe from later in-place writes."""
        return [t.clone() for t in self.leaves] if self.owned else list(self.leaves)
