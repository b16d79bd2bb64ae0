"""bayesflow: Bayesian learning in PyTorch where one SDE engine drives every sampler and optimizer.

``import bayesflow`` makes every method family available, as ``import posteriors`` does:
``bayesflow.sgmcmc`` (samplers), ``bayesflow.optim`` (optimizers at T = 0, and posteriors'
``optim.build`` around torch.optim), ``bayesflow.torchopt``, ``bayesflow.ensemble``, ``bayesflow.engine``.
"""

from bayesflow import engine, ensemble, optim, sgmcmc, torchopt, tree_utils, types, utils
from bayesflow.engine import SDEConfig, SDEState, build
from bayesflow.tree import load_state_dict, state_dict
from bayesflow.tree_utils import (
    extract_requires_grad,
    extract_requires_grad_and_func,
    flexi_tree_map,
    inplacify,
    insert_requires_grad,
    insert_requires_grad_,
    tree_extract,
    tree_insert,
    tree_insert_,
    tree_map_inplacify_,
    tree_size,
)
from bayesflow.types import LogProbFn, TensorTree, Transform
from bayesflow.utils import cumulative_mean_and_cov

__version__ = "0.1.0"

__all__ = [
    "LogProbFn",
    "SDEConfig",
    "SDEState",
    "TensorTree",
    "Transform",
    "build",
    "cumulative_mean_and_cov",
    "engine",
    "ensemble",
    "extract_requires_grad",
    "extract_requires_grad_and_func",
    "flexi_tree_map",
    "inplacify",
    "insert_requires_grad",
    "insert_requires_grad_",
    "load_state_dict",
    "optim",
    "sgmcmc",
    "state_dict",
    "torchopt",
    "tree_extract",
    "tree_insert",
    "tree_insert_",
    "tree_map_inplacify_",
    "tree_size",
    "tree_utils",
    "types",
    "utils",
]
