"""Optimizers: the temperature-zero configurations of the SDE engine.

Each module (:mod:`sgd`, :mod:`rmsprop`, :mod:`adam`, :mod:`adamw`) offers ``config(...)`` (the
engine configuration, as data), ``build(log_posterior, ...)`` (the engine transform) and
``transformation(...)`` (a torchopt-style gradient transformation). At ``temperature=0`` each equals
its ``torch.optim`` namesake step for step; a positive temperature turns it into the matching sampler.

Example:
    >>> import torch
    >>> from bayesflow.optim import adam
    >>> def log_posterior(params, batch):  # a standard Gaussian; no data
    ...     return -0.5 * (params ** 2).sum(), None
    >>> params, batch = torch.ones(3), None
    >>> transform = adam.build(log_posterior, lr=1e-3)
    >>> state = transform.init(params)
    >>> state, aux = transform.update(state, batch)
    >>> state.params  # Adam's first step moves every coordinate by lr
    tensor([0.9990, 0.9990, 0.9990])
"""

from bayesflow.optim import adam, adamw, rmsprop, sgd, transform
from bayesflow.optim.torch_optim import OptimState, build, init, update
from bayesflow.optim.transform import GradientTransformation, as_gradient_transformation

__all__ = [
    "GradientTransformation",
    "OptimState",
    "adam",
    "adamw",
    "as_gradient_transformation",
    "build",
    "init",
    "rmsprop",
    "sgd",
    "transform",
    "update",
]
