"""bayesflow: Bayesian learning in PyTorch where one SDE engine drives every sampler and optimizer."""

from bayesflow import engine
from bayesflow.engine import SDEConfig, SDEState, build
from bayesflow.tree import load_state_dict, state_dict
from bayesflow.types import Transform

__version__ = "0.1.0"

__all__ = ["SDEConfig", "SDEState", "Transform", "build", "engine", "load_state_dict", "state_dict"]
