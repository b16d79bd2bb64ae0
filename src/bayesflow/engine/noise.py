"""Seeded Gaussian noise whose generator state lives in the (checkpointable) sampler state.

One :class:`NoiseStream` per parameter layout of a transform keeps a ``torch.Generator`` per chain and scratch buffers.
A step loads the state's generator state (skipped when it is the state this stream just produced,
the usual case of a chain advancing), draws one flat buffer per component and writes the new
generator state back into the returned state. Runs are exactly reproducible from the seed, and a
saved state resumes the identical trajectory. At T = 0 nothing here is called.
"""

from __future__ import annotations

import numbers

import torch

from bayesflow.engine.accumulator import Leaves


class NoiseStream:
    """Standard normal draws shaped like leaves, from the generator state stored in a state.

    Args:
        device: where the generators live (the parameters' device).
        chains: number of chains with independent generators (None: a single chain).
    """

    def __init__(self, device: torch.device, chains: int | None = None):
        self.device = device
        self.chains = chains
        self.generators = [torch.Generator(device=device) for _ in range(chains or 1)]
        self._buffers: dict = {}
        self._produced = None

    def initial_state(self, seed: int | list[int] | torch.Generator | None) -> torch.Tensor:
        """Generator state(s) for a seed (drawn from torch's global RNG when None).

        With chains, ``seed`` may be a list of one seed per chain; an int gives chain k the seed
        ``seed + k``, so chain k of a batched run reproduces a single run seeded ``seed + k``. A
        ``torch.Generator`` gives the seed drawn from it: a seeded generator reproduces the run, and
        successive ``init`` calls with one generator get different streams.
        """
        if isinstance(seed, torch.Generator):
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=seed, device=seed.device).item())
        elif seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
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
        states = []
        for generator, chain_seed in zip(self.generators, seeds):
            generator.manual_seed(chain_seed)
            states.append(generator.get_state())
        self._produced = None
        return states[0] if self.chains is None else torch.stack(states)

    def load(self, rng_state: torch.Tensor) -> None:
        if rng_state is self._produced:
            return
        if self.chains is None:
            self.generators[0].set_state(rng_state)
            return
        if rng_state.shape[0] != self.chains:
            raise ValueError(f"rng state holds {rng_state.shape[0]} chains, the transform has {self.chains}")
        for generator, state in zip(self.generators, rng_state):
            generator.set_state(state.clone())  # a row view crashes set_state: give it its own storage

    def save(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The generators' state after this step's draws (written into ``out`` when given: an
        in-place step keeps its state's tensor)."""
        if self.chains is None:
            produced = self.generators[0].get_state()
        else:
            produced = torch.stack([generator.get_state() for generator in self.generators])
        if out is not None:
            produced = out.copy_(produced)
        self._produced = produced
        return produced

    def normal(self, like: Leaves, key: str) -> tuple[torch.Tensor, Leaves]:
        """A flat buffer of standard normals and its views shaped like ``like``.

        The buffer is reused between calls with the same ``key``: consume it before the next draw.
        With chains, leaves carry a leading chain dimension and each chain draws from its own stream.
        """
        entry = self._buffers.get(key)
        # A stream belongs to one parameter layout (engine.layout), where a key always names leaves of
        # the same shapes: the count and the first shape guard against misuse at no per-leaf cost.
        if entry is None or len(entry[1]) != len(like) or entry[1][0].shape != like[0].shape:
            entry = self._allocate(like)
            self._buffers[key] = entry
        buffer, views = entry
        if self.chains is None:
            torch.randn(buffer.shape, generator=self.generators[0], out=buffer)
        else:
            for chain, generator in enumerate(self.generators):
                torch.randn(buffer.shape[1:], generator=generator, out=buffer[chain])
        return buffer, views

    def _allocate(self, like: Leaves) -> tuple[torch.Tensor, Leaves]:
        dtype, device = like[0].dtype, like[0].device
        if self.chains is None:
            sizes = [leaf.numel() for leaf in like]
            buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
            views = [part.view(leaf.shape) for part, leaf in zip(buffer.split(sizes), like)]
        else:
            sizes = [leaf[0].numel() for leaf in like]
            buffer = torch.empty(self.chains, sum(sizes), dtype=dtype, device=device)
            views = [part.view(leaf.shape) for part, leaf in zip(buffer.split(sizes, dim=1), like)]
        return buffer, views


def _is_integer(value) -> bool:
    """An int (numpy's too) or a one-element integer tensor; not a bool."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_floating_point() and not value.is_complex() and (
            value.dtype != torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
