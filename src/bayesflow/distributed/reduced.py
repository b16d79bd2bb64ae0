r"""``reduced_log_posterior``: a log posterior whose value and gradient are the whole batch's, from shards.

Every rank evaluates the per-datum log posterior ℓ on its shard :math:`B_r`; forward averages the
values and backward averages the parameter gradients across the ranks (one flat all-reduce each):

.. math::
    ℓ_B = \frac{\sum_r w_r\, ℓ_{B_r}}{\sum_r w_r}, \qquad
    \nabla ℓ_B = \frac{\sum_r w_r \nabla ℓ_{B_r}}{\sum_r w_r},

with :math:`w_r = 1` (equal shards) or :math:`w_r = |B_r|` (``shard_size``), which is exact for any
shard sizes because ℓ is a mean over the batch (plus the log prior over N, which the weighted mean
keeps once). Anything that differentiates a log posterior by autograd runs data-parallel on it:
the engine's mid-step integrators (BAOAB, OBABO), and variational inference,
``vi.diag.build(reduced_log_posterior(log_posterior), optimizer)`` — VI's noise comes from the
state's key and step, the same on every rank, so the ranks take the identical step. Both
collectives have ``torch.func.vmap`` rules (they reduce the whole mapped tensor at once), so VI
with ``n_samples > 1`` and vmapped chains work too.

Example:
    >>> import torch
    >>> from bayesflow.distributed import reduced_log_posterior
    >>> f = reduced_log_posterior(lambda p, batch: (-0.5 * (p**2).sum(), None))
    >>> p = torch.ones(2, requires_grad=True)
    >>> torch.autograd.grad(f(p, None)[0], p)[0]     # one process: the log posterior itself
    tensor([-1., -1.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bayesflow.distributed.reduce import all_reduce_mean, check_weight
from bayesflow.tree import flatten, unflatten

__all__ = ["reduced_log_posterior"]


def shard_weight(shard_size: Callable[[Any], float] | None, batch) -> float | None:
    """The weight of this rank's shard, ``shard_size(batch)`` (checked), or None for equal shards."""
    if shard_size is None:
        return None
    size = shard_size(batch)
    try:
        weight = check_weight(size)
    except (TypeError, ValueError) as error:
        raise ValueError(f"shard_size(batch) must return this rank's number of data (a number >= 0), got "
                         f"{size!r}") from error
    return weight


class _AverageGradients(torch.autograd.Function):
    """Identity on the parameter leaves whose backward averages their gradients across ranks."""

    @staticmethod
    def forward(group, weight, *leaves):
        return tuple(leaf.view_as(leaf) for leaf in leaves)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group, ctx.weight = inputs[0], inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        # (unused outputs arrive as zeros: autograd materialises them)
        return (None, None, *all_reduce_mean(grads, ctx.group, weight=ctx.weight,
                                             what="gradient all-reduce (backward)"))

    @staticmethod
    def vmap(info, in_dims, group, weight, *leaves):  # the mapped tensors whole: one collective
        return _AverageGradients.apply(group, weight, *leaves), in_dims[2:]


class _AverageValue(torch.autograd.Function):
    """The rank mean of the value; its gradient passes through (each rank's backward is local)."""

    @staticmethod
    def forward(group, weight, value):
        return all_reduce_mean([value.detach().clone()], group, weight=weight, what="log posterior all-reduce")[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return None, None, grad

    @staticmethod
    def vmap(info, in_dims, group, weight, value):
        return _AverageValue.apply(group, weight, value), in_dims[2]


def reduced_log_posterior(log_posterior, group=None, *, shard_size: Callable[[Any], float] | None = None):
    r"""``log_posterior`` whose value and gradient are the (weighted) means over ranks of the shards'.

    Forward averages the value (:math:`\sum_r w_r ℓ_{B_r} / \sum_r w_r`); backward averages the
    parameter gradients in one flat all-reduce, so ``torch.autograd.grad`` of the returned value on
    every rank is the full-batch gradient. Every rank must evaluate it the same number of times in
    the same order (the collectives pair up by order).

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum (a mean over
            the batch).
        group: the process group (None: the default one).
        shard_size: ``shard_size(batch) -> |B_r|``, the number of data in this rank's shard, for shards
            of different sizes (the weights :math:`w_r`); None: equal shards, :math:`w_r = 1`.

    Returns:
        A log posterior with the same signature (aux stays the rank's own).

    Raises:
        CollectiveFailed: (when called) a collective failed: another rank raised, exited or timed out.
        ValueError: (when called) ``shard_size`` returned something other than a number >= 0.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import reduced_log_posterior
        >>> f = reduced_log_posterior(lambda p, batch: (-0.5 * ((p - batch) ** 2).sum(-1).mean(), None),
        ...                           shard_size=len)
        >>> p = torch.zeros(2, requires_grad=True)
        >>> value, _ = f(p, torch.ones(3, 2))
        >>> float(value.detach()), torch.autograd.grad(value, p)[0]
        (-1.0, tensor([1., 1.]))
    """
    if not callable(log_posterior):
        raise TypeError(f"log_posterior must be a function (params, batch) -> (value, aux), got {log_posterior!r}")
    if shard_size is not None and not callable(shard_size):
        raise TypeError(f"shard_size must be a function batch -> number of data, or None; got {shard_size!r}")

    def reduced(params, batch):
        weight = shard_weight(shard_size, batch)
        leaves, spec = flatten(params)
        value, aux = log_posterior(unflatten(spec, list(_AverageGradients.apply(group, weight, *leaves))), batch)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = _AverageValue.apply(group, weight, value)
        return value, aux

    return reduced
