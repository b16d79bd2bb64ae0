r"""Noise for sharded parameters (FSDP / ZeRO): each rank draws only its slice, keyed by global index.

With the parameters flattened to one vector of d entries and split over ranks (rank r owns
:math:`[s_r, e_r)`, as FSDP's flat parameters or ZeRO's partitions), a sampler's step
:math:`θ ← θ + h∇ℓ + \sqrt{2hT}\,ξ` is elementwise: rank r can update its slice alone — once it has
its slice of the reduced gradient (a reduce-scatter) — *if* it can draw :math:`ξ_{[s_r, e_r)}`, the
same numbers a one-process run draws for those entries, without drawing the other d − (e_r − s_r).

The engine's noise (:mod:`bayesflow.engine.noise`) cannot be sliced that way: it is one
``torch.randn`` of all d entries per step from a generator seeded by (key, step), and what
``randn`` puts at entry i depends on d, not on i alone. On the CPU (a Mersenne Twister, with no
skip-ahead in torch) the vectorised sampler transforms its uniforms in groups whose layout depends
on the length — from one seed, even the first 32 entries of ``randn(40)`` and ``randn(100)``
differ; on CUDA (Philox) each thread draws entries strided by the launch configuration, which
depends on d. A rank could draw all d entries and keep its slice, which costs the full draw's time
and memory on every rank: what sharding is meant to avoid.

:func:`shard_normal` is: the flat vector is cut into fixed blocks of ``block_size`` entries
(global index i lies in block ⌊i / block_size⌋), and block b of step t is one ``torch.randn`` from a
generator seeded with ``derive(key, t · n_blocks + b, purpose)`` — the engine's seed derivation, on
the CPU a keyed bijection of the 32-bit counter, so no two (step, block) pairs share a seed while
:math:`t · n_\text{blocks} < 2^{32}`; 64-bit seeds on CUDA. A slice draws only the blocks it
overlaps (at most two partial blocks beyond what it keeps), and the concatenation of every rank's slice is, bit for
bit, the one-process draw of all d entries with the same function. A ZeRO-sharded engine would draw
its step noise with this function instead of :class:`~bayesflow.engine.noise.NoiseStream`'s one
``randn`` (a change to the engine's noise stream, not made here: it would change every existing
seed's numbers); :func:`flat_shard` is FSDP's split of the d entries.

Example:
    >>> import torch
    >>> from bayesflow.distributed import shard_normal
    >>> full = shard_normal(key=7, step=3, start=0, stop=1000, numel=1000, block_size=64)
    >>> parts = [shard_normal(7, 3, a, b, 1000, block_size=64) for a, b in [(0, 333), (333, 700), (700, 1000)]]
    >>> torch.equal(torch.cat(parts), full)
    True
"""

from __future__ import annotations

import numbers

import torch

from bayesflow.distributed.reduce import world
from bayesflow.engine.noise import STEP, derive

__all__ = ["BLOCK_SIZE", "flat_shard", "shard_normal"]

BLOCK_SIZE = 1 << 16
"""Entries per noise block (65 536): a block's seeding costs a few µs, small beside its draw."""


def _index(name: str, value) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def shard_normal(key, step, start: int, stop: int, numel: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", purpose: int = STEP, block_size: int = BLOCK_SIZE
                 ) -> torch.Tensor:
    r"""Standard normals of the entries :math:`[\text{start}, \text{stop})` of a flat vector of ``numel``
    entries, for draw (key, step, purpose): the same numbers whatever slice they are drawn in.

    Args:
        key: the chain's noise key (``state.rng``, an int64 scalar tensor, or an int).
        step: the step (an int or an int64 scalar tensor).
        start, stop: the slice of global indices, ``0 <= start <= stop <= numel``.
        numel: d, the number of entries of the whole flat vector (it fixes the number of blocks).
        dtype, device: of the draw (the device's generator: Mersenne Twister on the CPU, Philox on CUDA).
        purpose: the draw's purpose (:data:`bayesflow.engine.noise.STEP` for a step's noise).
        block_size: entries per block; every rank must use the same.

    Returns:
        A ``(stop - start,)`` tensor.

    Raises:
        TypeError: a non-integer key, step or bound.
        ValueError: bounds outside ``[0, numel]`` or out of order, a non-positive ``block_size``.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import shard_normal
        >>> a = shard_normal(1, 0, 10, 20, numel=100, block_size=16)
        >>> torch.equal(a, shard_normal(1, 0, 0, 100, numel=100, block_size=16)[10:20])
        True
    """
    key, step = _index("key", key), _index("step", step)
    start, stop, numel = _index("start", start), _index("stop", stop), _index("numel", numel)
    block_size = _index("block_size", block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be a positive number of entries, got {block_size}")
    if not 0 <= start <= stop <= numel:
        raise ValueError(f"the slice [{start}, {stop}) must lie in [0, {numel}] with start <= stop")
    device = torch.device(device)
    out = torch.empty(stop - start, dtype=dtype, device=device)
    if start == stop:
        return out
    blocks = -(-numel // block_size)
    generator = torch.Generator(device=device)
    full = device.type != "cpu"
    for b in range(start // block_size, -(-stop // block_size)):
        low, high = b * block_size, min((b + 1) * block_size, numel)
        generator.manual_seed(derive(key, step * blocks + b, purpose, full=full))
        lo, hi = max(low, start), min(high, stop)
        if (lo, hi) == (low, high):   # a whole block: drawn in place
            torch.randn(high - low, generator=generator, dtype=dtype, device=device, out=out[lo - start:hi - start])
        else:
            out[lo - start:hi - start] = torch.randn(high - low, generator=generator, dtype=dtype,
                                                     device=device)[lo - low:hi - low]
    return out


def flat_shard(numel: int, group=None) -> range:
    r"""This rank's slice of a flat vector of d entries, FSDP's split: chunks of :math:`\lceil d/R \rceil`,
    the last ones shorter (or empty).

    Args:
        numel: d.
        group: the process group (None: the default group, or one process).

    Returns:
        ``range(start, stop)`` of global indices.

    Example:
        >>> from bayesflow.distributed import flat_shard
        >>> flat_shard(10)          # one process: everything
        range(0, 10)
    """
    numel = _index("numel", numel)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    rank, size = world(group)
    chunk = -(-numel // size)
    return range(min(rank * chunk, numel), min((rank + 1) * chunk, numel))
