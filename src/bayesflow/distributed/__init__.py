"""Beyond one process: data-parallel steps and chain-parallel ensembles on ``torch.distributed``.

Launch with ``torchrun --nproc_per_node=R script.py`` (gloo on CPUs, NCCL on GPUs) and call
``torch.distributed.init_process_group`` in the script; without a process group every helper here
acts on a world of one process.
"""

from bayesflow.distributed.chain_parallel import chain_block, chain_diagnostics, gather_chains, lift_block
from bayesflow.distributed.data_parallel import RankDivergence, check_replicas, data_parallel, reduced_log_posterior
from bayesflow.distributed.reduce import CollectiveFailed, all_reduce_mean, digest, world

__all__ = [
    "CollectiveFailed",
    "RankDivergence",
    "all_reduce_mean",
    "chain_block",
    "chain_diagnostics",
    "check_replicas",
    "data_parallel",
    "digest",
    "gather_chains",
    "lift_block",
    "reduced_log_posterior",
    "world",
]
