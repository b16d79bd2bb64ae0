r"""A process mesh: C chain blocks × D data shards, one process group for each row and column.

The :math:`C D` ranks of the default group are laid out as

.. math::
    \text{rank} = c\,D + d, \qquad c ∈ [0, C) \text{ (chain block)}, \quad d ∈ [0, D) \text{ (data shard)},

so the D ranks of one chain block are consecutive (on one node, where the frequent gradient
all-reduces are cheapest). Rank (c, d) holds chain block c (:func:`~bayesflow.distributed.lift_block`
with ``group=mesh.chains``: the ranks with the same d) and data shard d of every batch
(:func:`~bayesflow.distributed.data_parallel` with ``group=mesh.data``: the ranks with the same c):

.. code-block:: python

    mesh = process_mesh(chain_blocks=2, data_shards=2)           # 4 processes
    ensemble = data_parallel(lift_block(single, K, group=mesh.chains), group=mesh.data)
    state = ensemble.init(start, seed=0)                          # the rows and seeds of block c
    state, _ = ensemble.update(state, shard(batch, mesh.data_rank, 2))
    everything = gather_chains(state.params, K, group=mesh.chains)

Example (one process: a 1 × 1 mesh, no groups):
    >>> from bayesflow.distributed import process_mesh
    >>> mesh = process_mesh(1, 1)
    >>> mesh.chain_rank, mesh.data_rank, mesh.chains is None
    (0, 0, True)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.distributed as dist

from bayesflow.distributed.reduce import world

__all__ = ["ProcessMesh", "process_mesh"]


class ProcessMesh(NamedTuple):
    """This rank's place in a C × D mesh and its two process groups.

    Attributes:
        chains: the group of the C ranks with this rank's data shard (pass to ``lift_block``,
            ``gather_chains``, ``chain_diagnostics``, ``gather_moments``); None in one process.
        data: the group of the D ranks with this rank's chain block (pass to ``data_parallel``);
            None in one process.
        chain_rank: c, this rank's chain block. data_rank: d, this rank's data shard.
        chain_blocks: C. data_shards: D.

    Example:
        >>> from bayesflow.distributed import process_mesh
        >>> process_mesh(1, 1).data_shards
        1
    """

    chains: Any
    data: Any
    chain_rank: int
    data_rank: int
    chain_blocks: int
    data_shards: int


def process_mesh(chain_blocks: int, data_shards: int) -> ProcessMesh:
    """Split the default group into chain-parallel and data-parallel groups (every rank must call it,
    at the same point: ``torch.distributed.new_group`` is collective).

    Args:
        chain_blocks: C, the number of chain blocks.
        data_shards: D, the number of data shards; C · D must be the world size.

    Returns:
        A :class:`ProcessMesh`.

    Raises:
        ValueError: C or D is not a positive integer, or C · D is not the world size.

    Example:
        >>> from bayesflow.distributed import process_mesh
        >>> process_mesh(chain_blocks=1, data_shards=1).chain_blocks
        1
    """
    for name, value in (("chain_blocks", chain_blocks), ("data_shards", data_shards)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    rank, size = world()
    if chain_blocks * data_shards != size:
        raise ValueError(f"a mesh of {chain_blocks} chain blocks x {data_shards} data shards needs "
                         f"{chain_blocks * data_shards} processes; the world has {size}")
    if size == 1:
        return ProcessMesh(None, None, 0, 0, 1, 1)
    chain_rank, data_rank = divmod(rank, data_shards)
    chains = data = None
    for d in range(data_shards):  # every rank creates every group, in the same order
        group = dist.new_group([c * data_shards + d for c in range(chain_blocks)])
        if d == data_rank:
            chains = group
    for c in range(chain_blocks):
        group = dist.new_group([c * data_shards + d for d in range(data_shards)])
        if c == chain_rank:
            data = group
    return ProcessMesh(chains, data, chain_rank, data_rank, chain_blocks, data_shards)
