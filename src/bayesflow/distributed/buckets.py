r"""Gradient buckets all-reduced while backward still runs: DDP's overlap, for ``data_parallel(...).update``.

The parameter leaves are split, in reverse order (roughly the order backward produces their
gradients), into buckets of about ``bucket_bytes`` (the first one smaller, 1 MiB, as in
``DistributedDataParallel``). Each bucket passes through an identity autograd function; its
backward — as soon as every gradient of the bucket exists — copies them into one flat buffer and
launches an asynchronous ``all_reduce`` of it, while autograd goes on with the layers below. Buckets
are launched strictly in order (bucket b only after b − 1, as DDP's reducer does), so every rank
issues the same collectives in the same order even if its backward reaches them in another; a
bucket whose gradients never arrive (leaves the log posterior did not use) is launched with zeros
at the end. The log posterior's value rides in the last bucket. Without shard weights backward
starts from the seed 1/R instead of 1, so the gradients arrive divided and the sums are the means
(no pass over the gradients after the collective); with weights each bucket carries :math:`w_r` as
one extra element and is divided by the sum of the weights:

.. math::
    \bar g = \frac{\sum_r w_r g_r}{\sum_r w_r} \quad (w_r = 1: \text{the plain mean}).

After backward the caller waits for the buckets and reads the reduced gradients: the time of the
collectives that overlapped with backward is hidden, the rest (the last bucket) is not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bayesflow.distributed.reduce import _failed, all_reduce_mean, world
from bayesflow.tree import flatten, unflatten

FIRST_BUCKET_BYTES = 1 << 20
"""The first bucket's size (``torch.distributed``'s ``_DEFAULT_FIRST_BUCKET_BYTES``): small, so the
first collective starts early in backward."""


class _Ready(torch.autograd.Function):
    """Identity on a bucket's leaves; backward hands the bucket's gradients to the reducer."""

    @staticmethod
    def forward(reducer, index, *leaves):
        return tuple(leaf.view_as(leaf) for leaf in leaves)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reducer, ctx.index = inputs[0], inputs[1]

    @staticmethod
    def backward(ctx, *grads):
        ctx.reducer.ready(ctx.index, grads)
        return (None, None, *grads)  # the local gradients: the reduced ones are read from the buffers

    @staticmethod
    def vmap(info, in_dims, reducer, index, *leaves):  # mapped chains: the bucket holds every chain
        return _Ready.apply(reducer, index, *leaves), in_dims[2:]


class _Capture(torch.autograd.Function):
    """Identity on the value that keeps it (unmapped, all chains) for the last bucket; its backward
    scales the seed by 1/R, so that every gradient arrives already divided (no pass after the sum)."""

    @staticmethod
    def forward(reducer, value):
        reducer.value = value.detach()
        return value.view_as(value)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reducer = inputs[0]

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.reducer.scale
        return None, grad if scale is None else grad * scale

    @staticmethod
    def vmap(info, in_dims, reducer, value):
        return _Capture.apply(reducer, value), in_dims[1]


class OverlappedReduce:
    """The buckets of one data-parallel transform: ``wrap`` the log posterior once, then per step
    ``begin(leaves, weight)``, run backward through the wrapped log posterior, and ``finish()``.

    Args:
        group: the process group (None: the default one).
        bucket_bytes: the size of the buckets after the first.
    """

    def __init__(self, group=None, bucket_bytes: int = 25 << 20):
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive number of bytes, got {bucket_bytes!r}")
        self.group, self.bucket_bytes = group, bucket_bytes
        self._signature, self.buckets, self._buffers = None, [], {}
        self.leaves, self.weight, self.value, self.scale = [], None, None, None
        self.flats, self.works, self.launched, self.rides = [], [], 0, False
        self._what = "gradient all-reduce"

    # ----- the plan -------------------------------------------------------------------------------
    def _plan(self, leaves: list) -> None:
        signature = [(leaf.shape, leaf.dtype, leaf.device) for leaf in leaves]
        if signature == self._signature:
            return
        buckets, current, size, cap = [], [], 0, min(FIRST_BUCKET_BYTES, self.bucket_bytes)
        for i in reversed(range(len(leaves))):
            leaf = leaves[i]
            if current and (leaf.dtype, leaf.device) != (leaves[current[0]].dtype, leaves[current[0]].device):
                buckets.append(current)
                current, size, cap = [], 0, self.bucket_bytes
            current.append(i)
            size += leaf.numel() * leaf.element_size()
            if size >= cap:
                buckets.append(current)
                current, size, cap = [], 0, self.bucket_bytes
        if current:
            buckets.append(current)
        self._signature, self.buckets, self._buffers = signature, buckets, {}

    def wrap(self, log_posterior):
        """``log_posterior`` with every bucket of leaves and the value passing through the reducer."""
        def wrapped(params, batch):
            leaves, spec = flatten(params)
            leaves = list(leaves)
            for b, indices in enumerate(self.buckets):
                outs = _Ready.apply(self, b, *[leaves[i] for i in indices])
                for i, out in zip(indices, outs):
                    leaves[i] = out
            value, aux = log_posterior(unflatten(spec, leaves), batch)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = _Capture.apply(self, value)
            return value, aux

        return wrapped

    # ----- one step -------------------------------------------------------------------------------
    def begin(self, leaves: list, weight: float | None) -> None:
        """Start a step on the parameter leaves (their shapes fix the buckets) with this rank's weight."""
        self._plan(leaves)
        self.leaves, self.weight, self.value = leaves, weight, None
        self.scale = 1.0 / world(self.group)[1] if weight is None else None  # (weights: divided by Σw after)
        self.flats, self.works, self.launched, self.rides = [None] * len(self.buckets), [], 0, False
        self._what = "gradient all-reduce"

    def _pack(self, b: int, grads) -> torch.Tensor:
        pieces = [g.reshape(-1) for g in grads]
        if b == len(self.buckets) - 1:
            self.rides = self._value_rides(pieces[0])
            if self.rides:
                value = self.value.reshape(-1)
                pieces.append(value if self.scale is None else value * self.scale)
        if self.weight is not None:
            pieces.append(pieces[0].new_ones(1))
        flat = torch.cat(pieces, out=self._buffer(b, pieces))
        if self.weight is not None:
            flat.mul_(self.weight)
        return flat

    def _buffer(self, b: int, pieces: list) -> torch.Tensor:
        """Bucket b's flat buffer, kept across steps as DDP keeps its buckets (a fresh 2.7 MB buffer
        per step costs more in page faults than the copy into it). The reduced gradients handed to
        the engine are views of it, valid until the next step (the engine's single-gradient steps
        keep no reference to the gradient)."""
        numel, first = sum(p.numel() for p in pieces), pieces[0]
        buffer = self._buffers.get(b)
        if buffer is None or buffer.numel() != numel or buffer.dtype != first.dtype or buffer.device != first.device:
            buffer = self._buffers[b] = torch.empty(numel, dtype=first.dtype, device=first.device)
        return buffer

    def _value_rides(self, like: torch.Tensor) -> bool:
        value = self.value
        return value is not None and value.dtype == like.dtype and value.device == like.device

    def ready(self, b: int, grads) -> None:
        """Backward produced bucket ``b``'s gradients: pack them and launch every bucket now in order."""
        self.flats[b] = self._pack(b, grads)
        self._launch()

    def _launch(self) -> None:
        rank, _ = world(self.group)
        while self.launched < len(self.flats) and self.flats[self.launched] is not None:
            try:
                work = dist.all_reduce(self.flats[self.launched], op=dist.ReduceOp.SUM, group=self.group,
                                       async_op=True)
            except Exception as error:  # gloo/NCCL raise RuntimeError subclasses; keep the cause
                raise _failed(rank, _name(self._what), error) from error
            self.works.append(work)
            self.launched += 1

    def finish(self, what) -> tuple[list, torch.Tensor | None]:
        """Wait for every bucket; the reduced gradients (in leaf order) and the reduced value. ``what``
        (a string, or a function making it, called only on failure) names the collective in errors."""
        self._what = what
        for b, indices in enumerate(self.buckets):  # buckets backward never reached: zeros
            if self.flats[b] is None:
                self.flats[b] = self._pack(b, [torch.zeros_like(self.leaves[i]) for i in indices])
        self._launch()
        rank, _ = world(self.group)
        failure = None
        for work in self.works:  # every launched bucket is waited for, even after one failed: a process
            try:                 # leaving with collectives in flight is aborted by gloo's threads
                work.wait()
            except Exception as error:
                failure = failure or error
        if failure is not None:
            self.flats, self.works, self.leaves = [], [], []
            raise _failed(rank, _name(what), failure) from failure
        grads: list = [None] * len(self.leaves)
        value = self.value
        for b, (indices, flat) in enumerate(zip(self.buckets, self.flats)):
            if self.weight is not None:
                total, flat = flat[-1], flat[:-1]
                flat.div_(total)
            # (without weights the sums are means already: the seed of backward was 1/R)
            sizes = [self.leaves[i].numel() for i in indices]
            if b == len(self.buckets) - 1 and self.rides:
                sizes.append(value.numel())
                *views, reduced = flat.split(sizes)
                value = reduced.view(value.shape)
            else:
                views = flat.split(sizes)
            for i, view in zip(indices, views):
                grads[i] = view.view(self.leaves[i].shape)
        if value is not None and not self.rides:  # another dtype than the last bucket's: alone
            value = all_reduce_mean([value.clone()], self.group, what=what, weight=self.weight)[0]
        self.flats, self.works, self.leaves = [], [], []
        return grads, value


def _name(what) -> str:
    return what() if callable(what) else what
