r"""Extended Kalman filters: online Gaussian posteriors updated one batch at a time (posteriors' ``ekf``).

Each update is the online Laplace step of :math:`\log q(\theta) + ε\,\bar\ell(\theta)` about the current mean:
the precision gains ε times a curvature of the batch's mean log likelihood, the mean moves by
ε · covariance · gradient (Ollivier 2019: the extended Kalman filter is online natural gradient).

============== =================================== ==========================================
module          covariance                          curvature
============== =================================== ==========================================
diag_fisher     diagonal, ``sd_diag`` (a tree)      diagonal of the empirical Fisher
dense_fisher    dense ``cov`` (d × d)               empirical Fisher, or ``curvature="hessian"``
============== =================================== ==========================================

Example:
    >>> import torch
    >>> from bayesflow import ekf
    >>> ll = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))
    >>> transform = ekf.dense_fisher.build(ll, lr=1.0)
    >>> state, _ = transform.update(transform.init(torch.zeros(1)), torch.tensor([[2.0]]))
    >>> state.params, state.cov   # g = 2, F = g² = 4: precision 1 + 4, mean 0 + 0.2 · 2
    (tensor([0.4000]), tensor([[0.2000]]))
"""

from bayesflow.ekf import dense_fisher, diag_fisher, module_diag

__all__ = ["dense_fisher", "diag_fisher", "module_diag"]
