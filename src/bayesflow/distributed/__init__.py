"""Beyond one process: data-parallel steps and chain-parallel ensembles on ``torch.distributed``.

Launch with ``torchrun --nproc_per_node=R script.py`` (gloo on CPUs, NCCL on GPUs) and call
``torch.distributed.init_process_group`` in the script; without a process group every helper here
acts on a world of one process.

* data parallel: :func:`data_parallel` (engine transforms), :func:`reduced_log_posterior` (VI, or
  anything differentiating a log posterior), :func:`data_parallel_laplace`, :func:`data_parallel_ekf`;
* chain parallel: :func:`chain_block`, :func:`lift_block`, :func:`gather_chains`,
  :func:`chain_diagnostics`, :func:`gather_moments`, :func:`reduce_predictive`;
* both at once: :func:`process_mesh`; sharded parameters: :func:`shard_normal`, :func:`flat_shard`.
"""

from bayesflow.distributed.chain_parallel import chain_block, chain_diagnostics, gather_chains, lift_block
from bayesflow.distributed.curvature import data_parallel_laplace
from bayesflow.distributed.data_parallel import RankDivergence, check_replicas, data_parallel
from bayesflow.distributed.ekf import data_parallel_ekf
from bayesflow.distributed.gathered import gather_moments, reduce_predictive
from bayesflow.distributed.mesh import ProcessMesh, process_mesh
from bayesflow.distributed.reduce import CollectiveFailed, all_reduce_mean, all_reduce_sum, digest, world
from bayesflow.distributed.reduced import reduced_log_posterior
from bayesflow.distributed.sharded_noise import flat_shard, shard_normal

__all__ = [
    "CollectiveFailed",
    "ProcessMesh",
    "RankDivergence",
    "all_reduce_mean",
    "all_reduce_sum",
    "chain_block",
    "chain_diagnostics",
    "check_replicas",
    "data_parallel",
    "data_parallel_ekf",
    "data_parallel_laplace",
    "digest",
    "flat_shard",
    "gather_chains",
    "gather_moments",
    "lift_block",
    "process_mesh",
    "reduce_predictive",
    "reduced_log_posterior",
    "shard_normal",
    "world",
]
