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
    """

    __slots__ = ("numel", "preconditioned", "step", "z")

    def __init__(self, z: dict[str, Accumulator], step: int, preconditioned: dict, numel: int):
        self.z = z
        self.step = step
        self.preconditioned = preconditioned
        self.numel = numel

    def leaves(self, component: str) -> Leaves:
        return self.z[component].leaves


def flat(leaves: Leaves) -> torch.Tensor:
    """One flat vector from a list of leaves (a view when there is a single contiguous leaf)."""
    if len(leaves) == 1:
        return leaves[0].reshape(-1)
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


def split_like(vector: torch.Tensor, like: Leaves) -> Leaves:
    """Cut a flat vector into views shaped like ``like``."""
    sizes = [leaf.numel() for leaf in like]
    return [part.view(leaf.shape) for part, leaf in zip(vector.split(sizes), like)]
