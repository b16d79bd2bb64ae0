"""Counter-based noise: every draw is a function of the chain's key, the step and the draw's purpose.

A state carries one 64-bit **key** per chain (``state.rng``, an int64 tensor: shape ``()`` for one
chain, ``(K,)`` for K chains) and its step count. The noise of step t of a chain with key k is drawn
from a generator seeded with a value derived from ``(k, t, purpose)`` — nothing else — so

* a state alone determines its future: a refused or failed step, a checkpoint, a copy of a state, a
  state taken out of a stack of chains all continue on the same numbers;
* the initial momenta (purpose ``INIT``), every step (``STEP``), and the starting-point perturbation
  of :func:`~bayesflow.ensemble.replicate` (``PERTURBATION``) draw from independent streams, even
  when they are given the same user seed;
* the state stays small (8 bytes per chain instead of a 5 KB generator state), so states stack,
  concatenate and index like tensors.

Keys are mixed with SplitMix64 (Steele, Lea & Flood 2014). On the CPU torch's Mersenne Twister
takes a 32-bit seed: there the seed of step t is a keyed *bijection* of t (a 4-round Feistel
network on 32 bits), so one chain never repeats a step's numbers within 2³² steps. (Two chains with
different keys may meet on one step's seed with probability ≈ (K·steps)²/2³³ over a whole run;
each such pair shares one step's noise vector, which does not bias the dynamics.) CUDA generators
(Philox) take the full 64-bit value.

Example:
    >>> import torch
    >>> from bayesflow.engine.noise import NoiseStream
    >>> stream = NoiseStream(torch.device("cpu"))
    >>> key = stream.initial_state(0)
    >>> stream.begin(key, step=5)
    >>> a = stream.normal([torch.empty(3)], "params")[0].clone()
    >>> stream.begin(key, step=5)                       # the same key and step: the same numbers
    >>> torch.equal(a, stream.normal([torch.empty(3)], "params")[0])
    True
"""

from __future__ import annotations

import numbers

import torch

from bayesflow.engine.accumulator import Leaves

__all__ = ["INIT", "PERTURBATION", "SEEDS", "STEP", "NoiseStream", "derive", "drawn_seed", "mix", "seed_key",
           "views_of"]

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1

STEP, INIT, PERTURBATION = 0x5354, 0x494E, 0x5045
"""Purposes of a draw: the dynamics of a step, the initial momenta, a starting-point perturbation."""


def mix(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that mixes every bit into every bit."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


SEEDS = range(-(1 << 63), 1 << 64)
"""The seeds ``torch.manual_seed`` takes (a negative one is its two's complement)."""


def seed_key(seed: int) -> int:
    """The chain key (a signed int64, as stored in ``state.rng``) of a user seed.

    Seeds take ``torch.manual_seed``'s range, :math:`[-2^{63}, 2^{64})` (a negative seed is its two's
    complement, as there); outside it two seeds would silently share a key."""
    seed = int(seed)
    if seed not in SEEDS:
        raise ValueError(f"seed {seed} is outside [-2**63, 2**64), the range of torch.manual_seed (with chains, "
                         "chain k's seed is seed + k)")
    key = mix(seed & _MASK64)
    return key - (1 << 64) if key >= 1 << 63 else key


def _round_keys(stream: int) -> tuple[int, int, int, int]:
    return tuple(mix(stream ^ (round_ << 56)) & _MASK32 for round_ in range(4))


def _feistel32(value: int, round_keys: tuple[int, int, int, int]) -> int:
    """A keyed bijection of 32-bit integers: 4 Feistel rounds on 16-bit halves (any round function
    gives a bijection; a multiplicative hash of the half and the round key mixes it)."""
    left, right = value >> 16, value & 0xFFFF
    for k in round_keys:
        left, right = right, left ^ ((((right ^ k) * 0x9E3779B1) & _MASK32) >> 16)
    return (left << 16) | right


def _stream(key: int, purpose: int) -> int:
    return mix((key & _MASK64) ^ mix(purpose))


def derive(key: int, step: int, purpose: int, full: bool = False) -> int:
    """The generator seed of draw ``(key, step, purpose)``.

    ``full``: a 64-bit seed (CUDA's Philox); otherwise 32 bits, a bijection of ``step`` for a fixed
    key and purpose (CPU's Mersenne Twister reads only 32 bits of its seed).

    Example:
        >>> from bayesflow.engine.noise import STEP, derive
        >>> len({derive(7, step, STEP) for step in range(10_000)})   # distinct seeds for distinct steps
        10000
    """
    stream = _stream(key, purpose)
    if full:
        return mix(stream ^ (step & _MASK64))
    return _feistel32(step & _MASK32, _round_keys(stream))


class NoiseStream:
    """Standard normal and uniform draws shaped like leaves, seeded per step from a state's keys.

    Args:
        device: where the generators live (the parameters' device).
        chains: number of chains, each with its own key (None: a single chain).

    Example:
        >>> import torch
        >>> from bayesflow.engine.noise import INIT, NoiseStream
        >>> stream = NoiseStream(torch.device("cpu"), chains=2)
        >>> keys = stream.initial_state([3, 4])             # one key per chain
        >>> stream.begin(keys, step=0, purpose=INIT)
        >>> buffer, views = stream.normal([torch.empty(2, 5)], "momenta")
        >>> buffer.shape
        torch.Size([2, 5])
    """

    def __init__(self, device: torch.device, chains: int | None = None):
        self.device = torch.device(device)
        self.chains = chains
        self.generators = [torch.Generator(device=self.device) for _ in range(chains or 1)]
        self._full = self.device.type != "cpu"
        self._buffers: dict = {}
        self._streams: dict = {}

    def initial_state(self, seed: int | list[int] | torch.Generator | None) -> torch.Tensor:
        """The keys of a seed: an int64 tensor on the CPU, shape ``()`` or ``(chains,)``.

        With chains, ``seed`` may be a list of one seed per chain; an int gives chain k the seed
        ``seed + k``, so chain k of a batched run reproduces a single run seeded ``seed + k``. A
        ``torch.Generator`` gives the seed drawn from it: a seeded generator reproduces the run, and
        successive ``init`` calls with one generator get different streams. None draws the seed from
        torch's global generator.
        """
        if isinstance(seed, torch.Generator) or seed is None:
            seed = drawn_seed(seed)
        if _is_integer(seed):
            seeds = [int(seed) + chain for chain in range(len(self.generators))]
        else:
            if (isinstance(seed, (str, bytes)) or not hasattr(seed, "__iter__") or getattr(seed, "ndim", 1) == 0
                    or not all(map(_is_integer, seed))):
                raise TypeError(f"seed must be an int, a list of ints (one per chain), a torch.Generator or None; "
                                f"got {seed!r}")
            seeds = [int(s) for s in seed]
            if len(seeds) != len(self.generators):
                raise ValueError(f"got {len(seeds)} seeds for {len(self.generators)} chains")
        keys = torch.tensor([seed_key(s) for s in seeds], dtype=torch.int64)
        return keys[0].clone() if self.chains is None else keys

    def begin(self, keys: torch.Tensor, step: int, purpose: int = STEP) -> None:
        """Seed every chain's generator for draw ``(key, step, purpose)``; the draws that follow
        (any number, in a fixed order) belong to that step."""
        values = keys.tolist()
        if self.chains is None:
            values = [values]
        elif len(values) != self.chains:
            raise ValueError(f"the state holds {len(values)} chain keys, the transform has {self.chains} chains")
        cache_key = (tuple(values), purpose)
        streams = self._streams.get(cache_key)
        if streams is None:  # what depends on the keys alone, kept across the steps of a run
            if len(self._streams) > 16:
                self._streams.clear()
            streams = [_stream(key, purpose) for key in values]
            streams = self._streams[cache_key] = streams if self._full else [_round_keys(s) for s in streams]
        if self._full:
            for generator, stream in zip(self.generators, streams):
                generator.manual_seed(mix(stream ^ (step & _MASK64)))
        else:
            counter = step & _MASK32
            for generator, round_keys in zip(self.generators, streams):
                generator.manual_seed(_feistel32(counter, round_keys))

    def normal(self, like: Leaves, key: str) -> tuple[torch.Tensor, Leaves]:
        """A flat buffer of standard normals and its views shaped like ``like``.

        The buffer is reused between calls with the same ``key``: consume it before the next draw.
        With chains, leaves carry a leading chain dimension and each chain draws from its own stream.
        """
        buffer, views = self._buffer(like, key)
        if self.chains is None:
            fill_normal(buffer, self.generators[0])
        else:
            for chain, generator in enumerate(self.generators):
                fill_normal(buffer[chain], generator)
        return buffer, views

    def uniform(self, like: Leaves, key: str) -> tuple[torch.Tensor, Leaves]:
        """Like :meth:`normal`, with U[0, 1) draws (discrete-noise integrators)."""
        buffer, views = self._buffer(like, key)
        if self.chains is None:
            buffer.uniform_(generator=self.generators[0])
        else:
            for chain, generator in enumerate(self.generators):
                buffer[chain].uniform_(generator=generator)
        return buffer, views

    def _buffer(self, like: Leaves, key: str) -> tuple[torch.Tensor, Leaves]:
        entry = self._buffers.get(key)
        # A stream belongs to one parameter layout (engine.layout), where a key always names leaves of
        # the same shapes: the count and the first shape guard against misuse at no per-leaf cost.
        if entry is None or len(entry[1]) != len(like) or entry[1][0].shape != like[0].shape:
            entry = self._buffers[key] = self._allocate(like)
        return entry

    def _allocate(self, like: Leaves) -> tuple[torch.Tensor, Leaves]:
        dtype, device = like[0].dtype, like[0].device
        sizes = [leaf.numel() if self.chains is None else leaf[0].numel() for leaf in like]
        shape = (sum(sizes),) if self.chains is None else (self.chains, sum(sizes))
        buffer = torch.empty(shape, dtype=dtype, device=device)
        return buffer, views_of(buffer, like, self.chains)


NORMAL_CHUNK = 1 << 16
"""Entries per ``normal_`` call of :func:`fill_normal` on the CPU (a multiple of 16; 256 KB of float32)."""


def fill_normal(flat: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normals written into the contiguous 1-D ``flat``, the numbers ``torch.randn(n,
    generator=generator)`` gives.

    On the CPU, float32 and float64 buffers are filled in chunks of :data:`NORMAL_CHUNK` entries:
    torch's CPU ``normal_`` writes all n uniforms and then transforms them 16 at a time, two passes over
    memory that, for a buffer larger than the cache, go to DRAM twice — chunked, the second pass reads
    the cache (measured at 1e7 float32 on one thread: 44.5 ms in one call, 25.8 ms chunked). The kernel
    draws the same uniforms in the same order into each position and transforms the same blocks of 16
    (every chunk but the last is a multiple of 16, the last is at least 16 long), so the numbers are
    bitwise those of one call (tested). Elsewhere (CUDA's Philox offsets depend on each call's size;
    other dtypes): one call.

    Example:
        >>> import torch
        >>> from bayesflow.engine.noise import fill_normal
        >>> a = fill_normal(torch.empty(300_000), torch.Generator().manual_seed(0))
        >>> torch.equal(a, torch.randn(300_000, generator=torch.Generator().manual_seed(0)))
        True
    """
    n = flat.numel()
    flat = flat.view(-1)   # (a contiguous buffer of any shape: its entries in memory order)
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64) or n < 2 * NORMAL_CHUNK:
        flat.normal_(generator=generator)
        return flat
    last = (n // NORMAL_CHUNK - 1) * NORMAL_CHUNK   # the final chunk takes the remainder too: ≥ 16 long
    for start in range(0, last, NORMAL_CHUNK):
        flat[start:start + NORMAL_CHUNK].normal_(generator=generator)
    flat[last:].normal_(generator=generator)
    return flat


def views_of(buffer: torch.Tensor, like: Leaves, chains: int | None) -> Leaves:
    """Views of a flat noise buffer (``(n,)``, or ``(chains, n)``) shaped like the leaves ``like``."""
    if chains is None:
        sizes = [leaf.numel() for leaf in like]
        return [part.view(leaf.shape) for part, leaf in zip(buffer.split(sizes), like)]
    sizes = [leaf[0].numel() for leaf in like]
    return [part.view(leaf.shape) for part, leaf in zip(buffer.split(sizes, dim=1), like)]


def drawn_seed(generator: torch.Generator | None = None) -> int:
    """A seed drawn from ``generator`` (torch's global generator when None): what ``seed=None`` means."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator, device=device).item())


def _is_integer(value) -> bool:
    """An int (numpy's too) or a one-element integer tensor; not a bool."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_floating_point() and not value.is_complex() and (
            value.dtype != torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
