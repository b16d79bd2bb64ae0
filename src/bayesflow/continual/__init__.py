r"""Continual learning: the posterior of the tasks so far as the prior of the next one.

:func:`gaussian_prior` turns a Laplace, EKF or VI state into a log-prior callable (diagonal, dense or
KFAC precision); see :mod:`bayesflow.continual.from_state` for the maths and the exactness of chains.

Example:
    >>> import torch
    >>> from bayesflow import continual, laplace
    >>> prior = continual.gaussian_prior(laplace.diag_fisher.init({"w": torch.ones(2)}, init_prec_diag=1.0))
    >>> prior({"w": torch.ones(2)}) == prior.log_normalizer
    tensor(True)
"""

from bayesflow.continual.from_state import gaussian_prior
from bayesflow.continual.gaussian_prior import DenseGaussianPrior, DiagGaussianPrior, KFACGaussianPrior

__all__ = ["DenseGaussianPrior", "DiagGaussianPrior", "KFACGaussianPrior", "gaussian_prior"]
