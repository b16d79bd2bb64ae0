"""What operators see during one step: the extended state, preconditioner values and the step."""

from __future__ import annotations

import torch

from bayesflow.engine.accumulator import Accumulator, Leaves

COMPONENTS = ("params", "momenta", "xi")
"""The components of the extended state z, in the order of flat vectors over several of them."""


class Context:
    """The extended state during a step.

    Attributes:
        z: component name -> :class:`Accumulator` of its current leaves.
        step: the step count (a Python int: schedules read it without a device sync).
        preconditioned: id of a preconditioner -> its current diagonal values (one tensor per leaf).
        numel: number of scalar parameters d (the thermostat's dimension).
        buffers: the transform's reusable scratch buffers (see :meth:`scratch`), or None.
        scratch_values: ids of preconditioners whose ``preconditioned`` values lie in memory the
            engine owns (scratch or a released gradient), not in their state: an operator may
            transform those in place for a moment if it restores them (``Preconditioned.sqrt_accumulate``).
        pending: id of a preconditioner -> ``(preconditioner, updated statistics)`` whose values
            are computed on first read (:meth:`values`).
        donor: a released gradient (leaves shaped like params that nothing reads any more this
            step) that the next values computed may be written into, or None.
        draws: noise drawn once per step for several rows (:class:`~bayesflow.engine.block.JointDiffusion`),
            or None.
    """

    __slots__ = ("buffers", "donor", "draws", "numel", "pending", "preconditioned", "scratch_values", "step", "z")

    def __init__(self, z: dict[str, Accumulator], step: int, preconditioned: dict, numel: int,
                 buffers: dict | None = None):
        self.z = z
        self.step = step
        self.preconditioned = preconditioned
        self.numel = numel
        self.buffers = buffers
        self.scratch_values = set()
        self.pending = {}
        self.donor = None
        self.draws = None  # per-step noise shared by several rows (a joint diffusion), made on first use

    def values(self, preconditioner) -> Leaves:
        """The preconditioner's diagonal P for this step, computed on first read.

        Computing P late lets it take the memory of the step's gradient once that is released
        (the gradient kick is done): Adam-type steps then need no parameter-sized buffer for P.
        """
        key = id(preconditioner)
        values = self.preconditioned.get(key)
        if values is None:
            preconditioner, statistics = self.pending.pop(key)
            out, self.donor = self.donor, None
            if out is None:
                out = self.scratch(("preconditioner", key), self.z["params"].leaves)
            values = self.preconditioned[key] = preconditioner.values(statistics, self.step, out)
            if values is out:
                self.scratch_values.add(key)
        return values

    def leaves(self, component: str) -> Leaves:
        return self.z[component].leaves

    def scratch(self, key, like: Leaves) -> Leaves:
        """Step-local temporaries shaped like ``like``, kept by the transform between steps.

        A fresh large allocation pays the operating system's page faults on every step (several
        times the cost of the arithmetic at 1e6+ parameters); a reused buffer does not. The
        contents are only valid until the next use of the same key.
        """
        if self.buffers is None:
            return [torch.empty_like(leaf) for leaf in like]
        entry = self.buffers.get(key)
        if entry is None or [(t.shape, t.dtype) for t in entry] != [(t.shape, t.dtype) for t in like]:
            entry = self.buffers[key] = [torch.empty_like(leaf) for leaf in like]
        return entry


def flat(leaves: Leaves) -> torch.Tensor:
    """One flat vector from a list of leaves (a view when there is a single contiguous leaf)."""
    if len(leaves) == 1:
        return leaves[0].reshape(-1)
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


def split_like(vector: torch.Tensor, like: Leaves) -> Leaves:
    """Cut a flat vector into views shaped like ``like``."""
    sizes = [leaf.numel() for leaf in like]
    return [part.view(leaf.shape) for part, leaf in zip(vector.split(sizes), like)]
