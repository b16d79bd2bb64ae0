r"""The low-rank Laplace posterior :math:`N(\mu, (U \mathrm{diag}(s) U^\top + \lambda I)^{-1})`: its state record and
what is computed from it without a d × d matrix — precision and covariance products (Woodbury), the log
determinant and exact draws. Fitting it (streaming square roots, matrix-free sketches) is
:mod:`bayesflow.laplace.low_rank`.

Example:
    >>> import torch
    >>> from bayesflow.laplace.low_rank_posterior import LowRankLaplaceState, log_det
    >>> u = torch.eye(3)[:, :1]                      # one direction e₁ with curvature 3, prior λ = 1
    >>> state = LowRankLaplaceState(torch.zeros(3), u, torch.tensor([3.0]), torch.tensor(1.0))
    >>> log_det(state)                               # log(3 + 1) + 2 log 1
    tensor(1.3863)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from bayesflow.laplace._common import ONE_DRAW, param_leaves, ravel
from bayesflow.laplace.sampling import _standard_normal, _to_tree
from bayesflow.records import record
from bayesflow.types import TensorTree
from bayesflow.utils.gaussian import sample_size

__all__ = ["LowRankLaplaceState", "cov_vp", "log_det", "prec_vp", "sample"]


class _LowRankFields(NamedTuple):
    params: TensorTree
    eigvecs: torch.Tensor
    eigvals: torch.Tensor
    prior_prec: torch.Tensor
    step: torch.Tensor | None = None


@record
class LowRankLaplaceState(_LowRankFields):
    r""":math:`N(\mu, (U \mathrm{diag}(s) U^\top + \lambda I)^{-1})` over the ravelled parameters.

    Attributes:
        params: :math:`\mu`, the parameters themselves (not copied), any tree of any leaf shapes.
        eigvecs: :math:`U`, ``(d, k)`` with orthonormal columns, in the order of the ravelled leaves.
        eigvals: :math:`s`, ``(k,)``, non-negative and descending: the curvature's kept eigenvalues.
        prior_prec: :math:`\lambda > 0`, a 0-d tensor.
        step: the number of curvature updates (an int64 tensor; a fresh ``tensor(0)`` when left out).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> state = low_rank.init({"w": torch.zeros(2, 3)}, rank=2, prior_prec=0.5)
        >>> state.eigvecs.shape, state.eigvals, state.prior_prec, state.step
        (torch.Size([6, 2]), tensor([0., 0.]), tensor(0.5000), tensor(0))
    """

    __slots__ = ()

    def __new__(cls, params: TensorTree, eigvecs: torch.Tensor, eigvals: torch.Tensor, prior_prec: torch.Tensor,
                step: torch.Tensor | None = None):
        step = torch.zeros((), dtype=torch.int64) if step is None else step
        return super().__new__(cls, params, eigvecs, eigvals, prior_prec, step)


def _flat_vector(state: LowRankLaplaceState, v: Any, name: str) -> torch.Tensor:
    d = state.eigvecs.shape[0]
    if not isinstance(v, torch.Tensor) or v.ndim < 1 or v.shape[-1] != d:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} takes flat (..., {d}) vectors in the ravelled order of params, got {shape}")
    return v.to(dtype=state.eigvecs.dtype, device=state.eigvecs.device)


def prec_vp(state: LowRankLaplaceState, v: torch.Tensor) -> torch.Tensor:
    r""":math:`P v = U (s \odot U^\top v) + \lambda v` for flat ``(..., d)`` vectors.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> state = low_rank.add_factor(low_rank.init(torch.zeros(2), 1, prior_prec=1.0), torch.tensor([1.0, 0.0]))
        >>> low_rank.prec_vp(state, torch.tensor([1.0, 1.0]))   # diag(2, 1) v
        tensor([2., 1.])
    """
    v = _flat_vector(state, v, "prec_vp")
    return ((v @ state.eigvecs) * state.eigvals) @ state.eigvecs.mT + state.prior_prec * v


def cov_vp(state: LowRankLaplaceState, v: torch.Tensor) -> torch.Tensor:
    r""":math:`P^{-1} v = \lambda^{-1}\big(v - U (\tfrac{s}{s + \lambda} \odot U^\top v)\big)` (Woodbury), flat vectors.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> state = low_rank.add_factor(low_rank.init(torch.zeros(2), 1, prior_prec=1.0), torch.tensor([1.0, 0.0]))
        >>> low_rank.cov_vp(state, torch.tensor([1.0, 1.0]))   # diag(1/2, 1) v
        tensor([0.5000, 1.0000])
    """
    v = _flat_vector(state, v, "cov_vp")
    lam, s = state.prior_prec, state.eigvals
    return (v - ((v @ state.eigvecs) * (s / (s + lam))) @ state.eigvecs.mT) / lam


def log_det(state: LowRankLaplaceState, prior_prec: torch.Tensor | float | None = None) -> torch.Tensor:
    r""":math:`\log\det P = \sum_{i \le k} \log(s_i + \lambda) + (d - k) \log \lambda` (of the precision).

    Args:
        state: a :class:`LowRankLaplaceState`.
        prior_prec: a :math:`\lambda` in place of ``state.prior_prec`` (a number or a tensor, through which
            the value is differentiable: the marginal likelihood's :math:`\log\det(H + \lambda I)` as
            :math:`\lambda` is tuned); the state's own when None.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> state = low_rank.add_factor(low_rank.init(torch.zeros(4), rank=1, prior_prec=2.0), torch.ones(4))
        >>> torch.isclose(low_rank.log_det(state), torch.log(torch.tensor(6.0)) + 3 * torch.log(torch.tensor(2.0)))
        tensor(True)
        >>> lam = torch.tensor(1.0, requires_grad=True)
        >>> torch.autograd.grad(low_rank.log_det(state, lam), lam)   # 1 / (4 + 1) + 3 / 1
        (tensor(3.2000),)
    """
    d, rank = state.eigvecs.shape
    lam = state.prior_prec if prior_prec is None else torch.as_tensor(prior_prec, dtype=state.eigvals.dtype,
                                                                      device=state.eigvals.device)
    return torch.log(state.eigvals + lam).sum() + (d - rank) * torch.log(lam)


def sample(state: LowRankLaplaceState, sample_shape: torch.Size = ONE_DRAW,
           generator: torch.Generator | None = None) -> TensorTree:
    r"""Draws :math:`\theta = \mu + P^{-1/2} z`, :math:`z \sim N(0, I_d)`: exactly :math:`N(\mu, P^{-1})`.

    :math:`P^{-1/2} z = \lambda^{-1/2} z + U\big(((s + \lambda)^{-1/2} - \lambda^{-1/2}) \odot U^\top z\big)`
    (the symmetric root, :math:`U` orthonormal): :math:`O(dk)` per draw, no d×d matrix.

    Args:
        state: a :class:`LowRankLaplaceState`.
        sample_shape: the shape of the batch of draws (``torch.Size``, tuple or int); ``()`` for one draw.
        generator: the ``torch.Generator`` to draw from (any device); torch's global one when None.

    Returns:
        A tree shaped like ``params``, leaves ``sample_shape + leaf.shape``, in the leaves' dtypes and devices.

    Raises:
        ValueError: ``eigvals`` negative or not finite, or ``prior_prec`` not positive.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> state = low_rank.add_factor(low_rank.init(torch.zeros(2), 1, prior_prec=1.0), torch.tensor([3.0, 0.0]))
        >>> draws = low_rank.sample(state, 20000, generator=torch.Generator().manual_seed(0))
        >>> draws.var(0).round(decimals=1)   # 1 / (9 + 1) and 1 / 1
        tensor([0.1000, 1.0000])
    """
    sample_shape = sample_size(sample_shape)
    leaves, spec = param_leaves("sample", state.params)
    eigvecs, eigvals, lam = state.eigvecs, state.eigvals, state.prior_prec
    if not bool(torch.isfinite(eigvals).all()) or bool((eigvals < 0).any()) or not float(lam) > 0:
        raise ValueError("to sample, eigvals must be finite and non-negative and prior_prec positive; got "
                         f"eigvals {eigvals} and prior_prec {float(lam)}")
    mean = ravel(leaves).to(device=eigvecs.device, dtype=eigvecs.dtype)
    if mean.numel() != eigvecs.shape[0]:
        raise ValueError(f"state.eigvecs has {eigvecs.shape[0]} rows, but params has {mean.numel()} entries")
    z = _standard_normal(math.prod(sample_shape), mean.numel(), mean.dtype, mean.device, generator)
    iso = lam.rsqrt()
    draws = mean + iso * z + ((z @ eigvecs) * ((eigvals + lam).rsqrt() - iso)) @ eigvecs.mT
    return _to_tree(draws, leaves, spec, sample_shape)
