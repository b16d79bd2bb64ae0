r"""posteriors-compatible utilities (``posteriors.utils``): the full API, one concept per module.

The names, signatures, semantics and return conventions are those of ``posteriors.utils``
(normal-computing/posteriors 0.1.3), so code written for posteriors runs after renaming the import; the
implementations are bayesflow's.

- :mod:`~bayesflow.utils.functional`: :class:`CatchAuxError`, :func:`model_to_function`,
  :func:`per_samplify`, :func:`is_scalar` (and torch.func's aux error fragments
  ``NO_AUX_ERROR_MSG``, ``NON_TENSOR_AUX_ERROR_MSG``);
- :mod:`~bayesflow.utils.curvature`: matrix-free :func:`hvp`, :func:`fvp`, :func:`ggnvp` and the dense
  :func:`empirical_fisher`; :mod:`~bayesflow.utils.gauss_newton`: the dense :func:`ggn` and :func:`diag_ggn`;
- :mod:`~bayesflow.utils.linalg`: conjugate gradients :func:`cg`, :func:`L_from_flat`, :func:`L_to_flat`;
- :mod:`~bayesflow.utils.gaussian`: :func:`diag_normal_log_prob`, :func:`diag_normal_sample`;
- :mod:`~bayesflow.utils.linearized`: :func:`linearized_forward_diag` and (beyond posteriors)
  :func:`linearized_forward_dense`;
- :mod:`~bayesflow.utils.moments`: :func:`cumulative_mean_and_cov`;
- :mod:`~bayesflow.utils.layer_curvature`: exact per-layer diagonal Fisher/GGN of ``nn.Linear`` and
  ``nn.Conv2d`` (groups=1) layers, shared with KFAC; :mod:`~bayesflow.utils.layer_capture`: finding and
  hooking those layers; :mod:`~bayesflow.utils.conv_curvature`: Conv2d patches, exact per-sample-square
  diagonals and KFC ("expand") moments (modules of their own, outside posteriors' names).

Example:
    >>> import torch
    >>> from bayesflow.utils import cg, hvp
    >>> f = lambda x: (x**4).sum() / 12 + 0.5 * (x**2).sum()  # H = diag(x² + 1)
    >>> x = torch.tensor([1.0, 2.0])
    >>> solution, info = cg(lambda v: hvp(f, (x,), (v,))[1], torch.tensor([2.0, 5.0]))  # H⁻¹ b
    >>> solution.round(decimals=4), info["niter"]
    (tensor([1., 1.]), 2)
"""

from __future__ import annotations

from bayesflow.utils.curvature import empirical_fisher, fvp, ggnvp, hvp
from bayesflow.utils.functional import (
    NO_AUX_ERROR_MSG,
    NON_TENSOR_AUX_ERROR_MSG,
    CatchAuxError,
    is_scalar,
    model_to_function,
    per_samplify,
)
from bayesflow.utils.gauss_newton import diag_ggn, ggn
from bayesflow.utils.gaussian import diag_normal_log_prob, diag_normal_sample
from bayesflow.utils.linalg import L_from_flat, L_to_flat, cg
from bayesflow.utils.linearized import linearized_forward_dense, linearized_forward_diag
from bayesflow.utils.moments import cumulative_mean_and_cov

__all__ = [
    "NON_TENSOR_AUX_ERROR_MSG",
    "NO_AUX_ERROR_MSG",
    "CatchAuxError",
    "L_from_flat",
    "L_to_flat",
    "cg",
    "cumulative_mean_and_cov",
    "diag_ggn",
    "diag_normal_log_prob",
    "diag_normal_sample",
    "empirical_fisher",
    "fvp",
    "ggn",
    "ggnvp",
    "hvp",
    "is_scalar",
    "linearized_forward_dense",
    "linearized_forward_diag",
    "model_to_function",
    "per_samplify",
]
