r"""Collectives on tensor lists: one flat all-reduce per dtype, a parameter digest, the world of a group.

The data-parallel gradient of a per-datum log posterior ℓ (a mean over the batch) is the mean of
the ranks' shard gradients when the shards are of equal size:

.. math::
    \nabla ℓ_{B} = \frac1{|B|}\sum_{i\in B} \nabla ℓ_i = \frac1R \sum_{r=1}^{R} \nabla ℓ_{B_r},
    \qquad |B_1| = \dots = |B_R| = |B|/R,

so every rank sums its shard gradient into one flat buffer (one ``all_reduce`` per dtype, not one
per leaf) and divides by R. Without an initialised process group the world is one process and every
function here is the identity.

Example:
    >>> import torch
    >>> from bayesflow.distributed import all_reduce_mean, world
    >>> world()                                   # no process group: one process, rank 0
    (0, 1)
    >>> all_reduce_mean([torch.ones(2), torch.zeros(())])
    [tensor([1., 1.]), tensor(0.)]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

__all__ = ["CollectiveFailed", "all_reduce_mean", "all_reduce_sum", "digest", "world"]


class CollectiveFailed(RuntimeError):
    """A collective of a data- or chain-parallel step failed: another rank most likely raised,
    was killed or timed out (the original error is chained as ``__cause__``)."""


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group for None); ``(0, 1)`` when
    ``torch.distributed`` is unavailable or not initialised (a single process).

    Example:
        >>> from bayesflow.distributed import world
        >>> rank, size = world()
    """
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("a process group was given but torch.distributed is not initialised; "
                             "call torch.distributed.init_process_group first (torchrun sets the environment)")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_mean(tensors: Sequence[torch.Tensor], group=None, *,
                    what: str | Callable[[], str] = "all-reduce", weight: float | None = None) -> list[torch.Tensor]:
    r"""The mean over ranks of each tensor, :math:`\frac1R\sum_r x_r` — or with ``weight`` :math:`w_r`
    the weighted mean :math:`\sum_r w_r x_r / \sum_r w_r` — by one flat ``all_reduce`` (SUM, then a
    scale: gloo has no AVG) per (dtype, device) of the tensors.

    With :math:`w_r = |B_r|`, the number of data in rank r's shard, the weighted mean of the shards'
    per-datum means is the per-datum mean of the whole batch even when the shards differ in size; the
    weight travels as one more element of each buffer (no extra collective).

    Args:
        tensors: floating-point tensors of any shapes; every rank gives the same shapes in the same order.
        group: the process group (None: the default one).
        what: names the collective in the error raised when it fails (or a function making that name,
            called only then: a name that reads the step costs nothing on the way).
        weight: this rank's weight :math:`w_r \ge 0` (a number; the ranks' sum must be positive), or
            None for the plain mean.

    Returns:
        New tensors (views of the reduced buffers) with the shapes given; the inputs themselves
        when the world is one process.

    Raises:
        CollectiveFailed: the all-reduce failed (a peer rank raised, exited or timed out).
        ValueError: a negative or non-finite ``weight``.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import all_reduce_mean
        >>> all_reduce_mean([torch.tensor([2.0, 4.0])])[0]   # one process: the mean of one rank
        tensor([2., 4.])
        >>> all_reduce_mean([torch.tensor([2.0, 4.0])], weight=3)[0]
        tensor([2., 4.])
    """
    weight = check_weight(weight)
    return _all_reduce(list(tensors), group, what, weight, mean=True)


def all_reduce_sum(tensors: Sequence[torch.Tensor], group=None, *,
                   what: str | Callable[[], str] = "all-reduce") -> list[torch.Tensor]:
    r"""The sum over ranks of each tensor, :math:`\sum_r x_r`, by one flat ``all_reduce`` per
    (dtype, device): what sums of per-datum statistics (curvatures, counts) need.

    Args:
        tensors: tensors of any shapes and dtypes; every rank gives the same shapes in the same order.
        group: the process group (None: the default one).
        what: names the collective in the error raised when it fails.

    Returns:
        New tensors (views of the reduced buffers); the inputs themselves in a world of one process.

    Raises:
        CollectiveFailed: the all-reduce failed (a peer rank raised, exited or timed out).

    Example:
        >>> import torch
        >>> from bayesflow.distributed import all_reduce_sum
        >>> all_reduce_sum([torch.tensor([1.0, 2.0]), torch.tensor(3)])
        [tensor([1., 2.]), tensor(3)]
    """
    return _all_reduce(list(tensors), group, what, None, mean=False)


def check_weight(weight):
    """``weight`` as a float ≥ 0 (or None), else a ValueError naming it."""
    if weight is None:
        return None
    if isinstance(weight, bool) or not isinstance(weight, (numbers.Real, torch.Tensor)):
        raise TypeError(f"weight must be a number (this rank's number of data), got {weight!r}")
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"weight must be a finite number >= 0 (this rank's number of data), got {weight!r}")
    return value


def _all_reduce(tensors: list, group, what, weight: float | None, mean: bool) -> list[torch.Tensor]:
    rank, size = world(group)
    if size == 1:
        return tensors
    out: list = [None] * len(tensors)
    buckets: dict = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    for indices in buckets.values():
        parts = [tensors[i] for i in indices]
        pieces = [p.reshape(-1) for p in parts]
        if weight is not None:  # (w x_r, w): the weight's sum arrives in the same buffer
            pieces.append(pieces[0].new_ones(1))
        flat = torch.cat(pieces)
        if weight is not None:
            flat.mul_(weight)
        try:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        except Exception as error:  # gloo/NCCL raise RuntimeError subclasses; keep the cause
            raise _failed(rank, what() if callable(what) else what, error) from error
        if weight is not None:
            total, flat = flat[-1], flat[:-1]
            flat.div_(total)
        elif mean:
            flat.mul_(1.0 / size)
        for i, view, p in zip(indices, flat.split([p.numel() for p in parts]), parts):
            out[i] = view.view(p.shape)
    return out


def _failed(rank: int, name: str, error: Exception) -> CollectiveFailed:
    return CollectiveFailed(f"rank {rank}: the {name} failed; another rank has most likely raised, exited or "
                            f"timed out ({type(error).__name__}: {error})")


def all_gather(tensor: torch.Tensor, group=None, *, what: str = "all-gather") -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on every rank), on the backend's device (NCCL: this rank's GPU);
    a failed collective raises :class:`CollectiveFailed` naming ``what``."""
    rank, _ = world(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else (
        torch.device("cpu"))
    local = tensor.to(device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(parts, local, group=group)
    except Exception as error:  # gloo/NCCL raise RuntimeError subclasses; keep the cause
        raise _failed(rank, what, error) from error
    return parts


def digest(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""A checksum of the bits of ``tensors``: two int64 sums over their elements read as integers,
    :math:`(\sum_i b_i, \sum_i (i \bmod 65521 + 1)\, b_i) \bmod 2^{64}` per tensor, summed.

    Integer sums are exact and independent of the reduction order (thread counts, devices), so equal
    tensors give equal digests bit for bit, and one changed bit changes the first sum.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import digest
        >>> a = torch.tensor([1.0, 2.0])
        >>> torch.equal(digest([a]), digest([a.clone()])), torch.equal(digest([a]), digest([a + 1e-7]))
        (True, False)
    """
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    total = torch.zeros(2, dtype=torch.int64)
    for t in tensors:
        t = t.detach().contiguous().reshape(-1)
        if t.dtype.is_complex:
            t = torch.view_as_real(t).reshape(-1)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        bits = t.view(as_int[t.element_size()]).to(torch.int64)
        weights = torch.arange(bits.numel(), dtype=torch.int64, device=bits.device).remainder_(65521).add_(1)
        total += torch.stack([bits.sum(), (bits * weights).sum()]).cpu()
    return total
