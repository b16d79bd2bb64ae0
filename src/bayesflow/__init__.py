"""bayesflow: Bayesian learning in PyTorch where one SDE engine drives every sampler and optimizer.

``import bayesflow`` makes every method family available, as ``import posteriors`` does:
``bayesflow.sgmcmc`` (samplers), ``bayesflow.optim`` (optimizers at T = 0, and posteriors'
``optim.build`` around torch.optim), ``bayesflow.torchopt``, ``bayesflow.vi``, ``bayesflow.laplace``,
``bayesflow.ekf``, ``bayesflow.ensemble``, ``bayesflow.engine``, and beyond posteriors
``bayesflow.predictive`` (TU = AU + EU, OOD scores), ``bayesflow.metrics`` and ``bayesflow.continual``
(posteriors as priors), ``bayesflow.integrations`` (``as_optimizer``: any transform as a
``torch.optim.Optimizer``; Lightning, Hugging Face, pyro); posteriors' utilities and tree helpers are
top-level names too.
"""

from bayesflow import (
    continual,
    distributed,
    ekf,
    engine,
    ensemble,
    integrations,
    laplace,
    metrics,
    optim,
    predictive,
    sgmcmc,
    torchopt,
    tree_utils,
    types,
    utils,
    vi,
)
from bayesflow.engine import SDEConfig, SDEState, build
from bayesflow.integrations import EngineOptimizer, as_optimizer
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
from bayesflow.utils import (
    CatchAuxError,
    L_from_flat,
    L_to_flat,
    cg,
    cumulative_mean_and_cov,
    diag_ggn,
    diag_normal_log_prob,
    diag_normal_sample,
    empirical_fisher,
    fvp,
    ggn,
    ggnvp,
    hvp,
    is_scalar,
    linearized_forward_diag,
    model_to_function,
    per_samplify,
)

__version__ = "0.1.0"

__all__ = [
    "CatchAuxError",
    "EngineOptimizer",
    "L_from_flat",
    "L_to_flat",
    "LogProbFn",
    "SDEConfig",
    "SDEState",
    "TensorTree",
    "Transform",
    "as_optimizer",
    "build",
    "cg",
    "continual",
    "cumulative_mean_and_cov",
    "diag_ggn",
    "diag_normal_log_prob",
    "diag_normal_sample",
    "distributed",
    "ekf",
    "empirical_fisher",
    "engine",
    "ensemble",
    "extract_requires_grad",
    "extract_requires_grad_and_func",
    "flexi_tree_map",
    "fvp",
    "ggn",
    "ggnvp",
    "hvp",
    "inplacify",
    "insert_requires_grad",
    "insert_requires_grad_",
    "integrations",
    "is_scalar",
    "laplace",
    "linearized_forward_diag",
    "load_state_dict",
    "metrics",
    "model_to_function",
    "optim",
    "per_samplify",
    "predictive",
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
    "vi",
]
