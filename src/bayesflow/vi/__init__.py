"""Variational inference: Gaussian approximations fitted by minimising the NELBO (posteriors' ``vi``).

``vi.diag``: a diagonal Normal N(μ, diag σ²); ``vi.dense``: a full-covariance Normal N(μ, LLᵀ). Both
take any torchopt-style optimizer, use the sticking-the-landing gradient by default (μ and the scale
detached in log q), and draw their noise from the state's key, so a state determines its future.

Example:
    >>> import torch, torchopt
    >>> from bayesflow import vi
    >>> transform = vi.diag.build(lambda p, batch: (-0.5 * (p**2).sum(), None), torchopt.adam(lr=1e-2))
    >>> state, aux = transform.update(transform.init(torch.zeros(3), seed=0), None)
    >>> sorted(state.to_dict())
    ['log_sd_diag', 'nelbo', 'opt_state', 'params', 'rng', 'step']
"""

from bayesflow.vi import dense, diag

__all__ = ["dense", "diag"]
