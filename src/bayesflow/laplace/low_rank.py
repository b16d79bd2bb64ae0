r"""Low-rank plus isotropic Laplace: :math:`N(\mu, (U \mathrm{diag}(s) U^\top + \lambda I)^{-1})`, no d×d matrix.

The precision keeps the top-:math:`k` eigenpairs of a curvature :math:`G` (the GGN summed over batches,
or any PSD operator) plus an isotropic prior precision :math:`\lambda > 0`:

.. math::
    P = U \mathrm{diag}(s) U^\top + \lambda I, \qquad U \in \mathbb R^{d \times k},\ U^\top U = I_k,\ s \ge 0.

Its eigenvalues are :math:`s_i + \lambda` on the columns of :math:`U` and :math:`\lambda` on their
complement, so (Woodbury) :math:`P^{-1} = \lambda^{-1}(I - U \mathrm{diag}(\tfrac{s}{s + \lambda})
U^\top)`, :math:`P^{-1/2} = U \mathrm{diag}((s+\lambda)^{-1/2}) U^\top + \lambda^{-1/2}(I - U U^\top)`
and :math:`\log\det P = \sum_i \log(s_i + \lambda) + (d - k)\log\lambda`: :func:`sample`,
:func:`cov_vp`, :func:`prec_vp` and :func:`log_det` cost :math:`O(dk)` memory and time per vector.

**Streaming square-root factors** (:func:`build`, :func:`update`, :func:`add_factor`). A batch's GGN is
:math:`J^\top H_\ell J = V^\top V` with :math:`V = \Lambda^{1/2} Q^\top J` from :math:`H_\ell = Q \Lambda
Q^\top` (the loss Hessian at the batch's outputs; its negative eigenvalues are clipped to 0, so the PSD
part is kept for a non-convex loss). With :math:`F = U \mathrm{diag}(\sqrt s)`, the sum is :math:`F F^\top +
V^\top V = A A^\top`, :math:`A = [F, V^\top]` (``d × (k + m)``); a thin QR :math:`A = QR` and the SVD of
the small :math:`R` give the eigenpairs of :math:`AA^\top`, of which the top :math:`k` are kept. Cost per
batch :math:`O(d (k + m)^2)`, memory :math:`O(d (k + m))`, :math:`m` = outputs in the batch.

- *Exact* when the rank of the total curvature is at most :math:`k` (every partial sum then has rank
  :math:`\le k`, since their ranges nest: nothing is ever discarded).
- One update from the initial state gives the *best* rank-:math:`k` approximation of that batch's
  curvature (Eckart–Young).
- Over several truncated updates the result :math:`B` is greedy: :math:`0 \preceq G - B` and
  :math:`\|G - B\|_2 \le \sum_t \sigma_{k+1}(G_{1..t}) \le T\,\sigma_{k+1}(G)` for :math:`T` batches (each
  step discards at most :math:`\sigma_{k+1}` of the running sum, which is below the partial sum's); take a
  larger rank or fewer, larger batches to tighten it.

**Matrix-free** (:func:`from_matvec`): randomized subspace iteration (Halko, Martinsson & Tropp, 2011)
on any symmetric product :math:`v \mapsto Gv` (e.g. :func:`bayesflow.utils.ggnvp` or
:func:`bayesflow.utils.hvp` summed over the data), exact (and then the Eckart–Young truncation) whenever
the rank of :math:`G` is at most :math:`k + p` (oversampling :math:`p`): the sketch then spans the range.

Example:
    >>> import torch
    >>> from bayesflow.laplace import low_rank
    >>> forward = lambda p, x: (x @ p, torch.tensor([]))     # a linear model, 5 parameters
    >>> loglik = lambda z, x: -0.5 * (z**2).sum()              # unit Gaussian: G = xᵀx, rank 2 here
    >>> transform = low_rank.build(forward, loglik, rank=2, prior_prec=1.0)
    >>> x = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0, 0.0]])
    >>> state, _ = transform.update(transform.init(torch.zeros(5)), x)
    >>> state.eigvals, float(low_rank.log_det(state))   # log(4 + 1) + log(1 + 1) + 3 log 1
    (tensor([4., 1.]), 2.302585...)
    >>> low_rank.sample(state, (3,)).shape
    torch.Size([3, 5])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from numbers import Integral, Real
from typing import Any

import torch

from bayesflow.engine.validation import check_bool, check_finite_params
from bayesflow.laplace._common import (
    check_callable,
    flat_layout,
    likelihood_terms,
    param_leaves,
)
from bayesflow.laplace.low_rank_posterior import LowRankLaplaceState, cov_vp, log_det, prec_vp, sample
from bayesflow.laplace.sampling import _standard_normal
from bayesflow.types import ForwardFn, OuterLogProbFn, TensorTree, Transform
from bayesflow.utils import CatchAuxError
from bayesflow.utils.gauss_newton import _jacobian_and_hessian

__all__ = ["LowRankLaplaceState", "add_factor", "build", "cov_vp", "from_matvec", "ggn_factor", "init",
           "log_det", "prec_vp", "sample", "update"]


def _check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, Integral) or rank < 1:
        raise ValueError(f"rank must be a positive int (the number of eigenpairs kept), got {rank!r}")
    return int(rank)


def _check_prior_prec(prior_prec: Any) -> float:
    if isinstance(prior_prec, torch.Tensor) and prior_prec.numel() == 1:
        prior_prec = float(prior_prec)
    if isinstance(prior_prec, bool) or not isinstance(prior_prec, Real) or not (
            math.isfinite(prior_prec) and prior_prec > 0):
        raise ValueError(f"prior_prec must be a finite positive number (λ of P = U diag(s) Uᵀ + λ I; the "
                         f"complement of U has no other precision), got {prior_prec!r}")
    return float(prior_prec)


def build(forward: ForwardFn, outer_log_likelihood: OuterLogProbFn, rank: int, prior_prec: float = 1.0,
          ) -> Transform:
    r"""The streaming low-rank GGN Laplace transform: ``init(params)`` and ``update(state, batch, inplace)``.

    Args:
        forward: ``forward(params, batch) -> (output, aux)``, the model's output (a tensor, not reduced
            over the batch).
        outer_log_likelihood: ``outer_log_likelihood(output, batch) -> value``, a scalar log likelihood.
        rank: :math:`k`, the number of eigenpairs kept (at most the number of parameters).
        prior_prec: :math:`\lambda > 0`.

    Returns:
        A :class:`~bayesflow.types.Transform` of :func:`init` and :func:`update` with these arguments.

    Raises:
        TypeError: a function is not callable. ValueError: a bad ``rank`` or ``prior_prec``.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> transform = low_rank.build(lambda p, x: (x * p, torch.tensor([])), lambda z, x: -0.5 * (z**2).sum(),
        ...                            rank=1, prior_prec=2.0)
        >>> state, _ = transform.update(transform.init(torch.zeros(2)), torch.tensor([3.0, 4.0]))
        >>> state.eigvals   # G = diag(9, 16): the top eigenvalue
        tensor([16.])
    """
    check_callable("forward", forward)
    check_callable("outer_log_likelihood", outer_log_likelihood)
    rank, prior_prec = _check_rank(rank), _check_prior_prec(prior_prec)
    return Transform(partial(init, rank=rank, prior_prec=prior_prec),
                     partial(update, forward=forward, outer_log_likelihood=outer_log_likelihood))


def init(params: TensorTree, rank: int, prior_prec: float = 1.0) -> LowRankLaplaceState:
    r"""The initial state :math:`N(\mu, \lambda^{-1} I)`: ``eigvecs`` the first :math:`k` unit vectors, ``eigvals`` 0.

    Args:
        params: :math:`\mu`, a tree of floating-point tensors (``d`` entries in all).
        rank: :math:`k \le d`.
        prior_prec: :math:`\lambda > 0`.

    Raises:
        ValueError: ``rank`` is not in ``1..d``, ``prior_prec`` is not positive, or ``params`` holds NaN or
            ±inf. TypeError: a leaf of ``params`` is not a floating-point tensor.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> low_rank.init(torch.zeros(3), rank=4)
        Traceback (most recent call last):
            ...
        ValueError: rank must be at most the number of parameters (3), got 4
    """
    leaves, spec = param_leaves("init", params)
    check_finite_params(leaves, spec)
    dtype, device = flat_layout(leaves)
    d, rank = sum(leaf.numel() for leaf in leaves), _check_rank(rank)
    if rank > d:
        raise ValueError(f"rank must be at most the number of parameters ({d}), got {rank}")
    return LowRankLaplaceState(params, torch.eye(d, rank, dtype=dtype, device=device),
                               torch.zeros(rank, dtype=dtype, device=device),
                               torch.tensor(_check_prior_prec(prior_prec), dtype=dtype, device=device))


def ggn_factor(params: TensorTree, batch: Any, forward: ForwardFn, outer_log_likelihood: OuterLogProbFn,
               ) -> tuple[torch.Tensor, Any]:
    r"""A square-root factor :math:`V` (``(m, d)``) of the batch's GGN: :math:`V^\top V = J^\top H_\ell J`.

    :math:`V = \max(\Lambda, 0)^{1/2} Q^\top J`, with :math:`J` the Jacobian of the batch's output
    (``(dz, d)``) and :math:`H_\ell = Q \Lambda Q^\top` the loss Hessian at the output: :math:`m = dz` rows
    (those of zero eigenvalues, e.g. one per sample for a softmax, are zero; dropping them would need a
    host sync for a data-dependent shape).

    Returns:
        ``(V, aux)``, aux ``forward``'s aux output.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> factor, _ = low_rank.ggn_factor(torch.zeros(2), torch.tensor([[1.0, 2.0]]),
        ...                                 lambda p, x: (x @ p, torch.tensor([])), lambda z, x: -2.0 * (z**2).sum())
        >>> factor   # H = 4: V = 2 x
        tensor([[2., 4.]])
    """
    model, loss = likelihood_terms(forward, outer_log_likelihood, batch)
    with torch.no_grad(), CatchAuxError():
        jac, hess, aux, _ = _jacobian_and_hessian(model, loss, params, True, False, False, "low_rank.update")
        values, vectors = torch.linalg.eigh((hess + hess.mT) / 2)
        factor = (vectors * values.clamp(min=0).sqrt()).mT @ jac
    return factor, aux[0]


def update(state: LowRankLaplaceState, batch: Any, forward: ForwardFn, outer_log_likelihood: OuterLogProbFn,
           inplace: bool = False) -> tuple[LowRankLaplaceState, Any]:
    r"""Adds the batch's GGN (at ``params``) to the low-rank precision and keeps the top :math:`k` eigenpairs.

    :func:`ggn_factor` then :func:`add_factor`.

    Args:
        state: the current state (``params`` is where the GGN is taken; it does not move).
        batch: the batch passed to ``forward`` and ``outer_log_likelihood``.
        forward, outer_log_likelihood: as in :func:`build`.
        inplace: write into the state's own ``eigvecs``, ``eigvals`` and ``step``.

    Returns:
        ``(state, aux)``, aux ``forward``'s aux output.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> state = low_rank.init(torch.zeros(3), rank=2)
        >>> forward, loglik = lambda p, x: (x @ p, torch.tensor([])), lambda z, x: -0.5 * (z**2).sum()
        >>> for x in (torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0]])):
        ...     state, _ = low_rank.update(state, x, forward, loglik, inplace=True)
        >>> state.eigvals, state.eigvecs.abs().T, state.step
        (tensor([4., 1.]), tensor([[0., 0., 1.],
                [1., 0., 0.]]), tensor(2))
    """
    check_bool(inplace, "inplace")
    factor, aux = ggn_factor(state.params, batch, forward, outer_log_likelihood)
    return add_factor(state, factor, inplace), aux


def add_factor(state: LowRankLaplaceState, factor: torch.Tensor, inplace: bool = False) -> LowRankLaplaceState:
    r"""The state with :math:`V^\top V` added to its curvature, truncated to its rank.

    The top :math:`k` eigenpairs of :math:`U \mathrm{diag}(s) U^\top + V^\top V` from the thin QR of
    :math:`[U \mathrm{diag}(\sqrt s), V^\top]` and the SVD of its ``R``. Any square root works: a GGN
    factor (:func:`ggn_factor`), per-sample scores (rows :math:`g_i^\top`: the empirical Fisher), ...

    Args:
        state: the current state.
        factor: :math:`V`, ``(m, d)`` (a ``(d,)`` vector is one row).
        inplace: write into the state's own ``eigvecs``, ``eigvals`` and ``step``.

    Raises:
        ValueError: ``factor`` does not have ``d`` columns.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> state = low_rank.add_factor(low_rank.init(torch.zeros(2), rank=1), torch.tensor([[3.0, 4.0]]))
        >>> state.eigvals, state.eigvecs.abs().T   # ‖v‖² along v / ‖v‖
        (tensor([25.]), tensor([[0.6000, 0.8000]]))
    """
    eigvecs, eigvals = state.eigvecs, state.eigvals
    d, rank = eigvecs.shape
    if not isinstance(factor, torch.Tensor) or factor.ndim not in (1, 2) or factor.shape[-1] != d:
        shape = tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__
        raise ValueError(f"factor must be an (m, {d}) tensor (rows over the {d} ravelled parameters), got {shape}")
    factor = factor.reshape(-1, d).to(dtype=eigvecs.dtype, device=eigvecs.device)
    stacked = torch.cat([eigvecs * eigvals.clamp(min=0).sqrt(), factor.mT], dim=1)  # A with AAᵀ the new curvature
    q, r = torch.linalg.qr(stacked)
    left, singular, _ = torch.linalg.svd(r, full_matrices=False)
    new_vecs, new_vals = q @ left[:, :rank], singular[:rank].square()
    if inplace:
        eigvecs.copy_(new_vecs)
        eigvals.copy_(new_vals)
        state.step.add_(1)
        return state
    return LowRankLaplaceState(state.params, new_vecs, new_vals, state.prior_prec, state.step + 1)


def from_matvec(params: TensorTree, matvec: Callable[[torch.Tensor], torch.Tensor], rank: int,
                prior_prec: float = 1.0, oversample: int = 10, power_iters: int = 1,
                generator: torch.Generator | None = None) -> LowRankLaplaceState:
    r"""A state from a matrix-free symmetric product :math:`v \mapsto Gv` (randomized subspace iteration).

    With :math:`\Omega` a ``(d, k + p)`` Gaussian sketch, :math:`Q = \mathrm{orth}(G^{q+1}\Omega)`
    (re-orthonormalised at every power step), the eigenpairs :math:`(w, W)` of :math:`Q^\top G Q` give
    :math:`U = QW` and :math:`s = \max(w, 0)` (the top :math:`k`; a negative curvature, e.g. a Hessian off
    the MAP, is clipped). :math:`(q + 2)(k + p)` products. Exact, almost surely, when
    :math:`\mathrm{rank}(G) \le k + p` (then the top :math:`k` are G's own: Eckart–Young); otherwise the
    error decays like :math:`(\sigma_{k+p+1}/\sigma_k)^{2q+1}` (Halko et al., 2011, §10).

    Args:
        params: :math:`\mu` (any tree; ``d`` entries).
        matvec: ``matvec(v) -> G v`` on flat ``(d,)`` vectors in the ravelled order.
        rank, prior_prec: as in :func:`init`.
        oversample: :math:`p \ge 0`, extra sketch columns (capped at ``d - rank``).
        power_iters: :math:`q \ge 0`.
        generator: the ``torch.Generator`` of the sketch; torch's global one when None.

    Returns:
        A :class:`LowRankLaplaceState` with ``step`` 1.

    Raises:
        ValueError: ``matvec`` returns another shape; bad ``rank``, ``prior_prec``, ``oversample``,
            ``power_iters``.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import low_rank
        >>> from bayesflow.utils import hvp
        >>> neg_log_post = lambda p: 0.5 * (torch.tensor([3.0, 2.0, 1.0]) * p**2).sum()   # H = diag(3, 2, 1)
        >>> state = low_rank.from_matvec(torch.zeros(3), lambda v: hvp(neg_log_post, (torch.zeros(3),), (v,))[1],
        ...                              rank=2, generator=torch.Generator().manual_seed(0))
        >>> state.eigvals.round(decimals=4)
        tensor([3., 2.])
    """
    state = init(params, rank, prior_prec)
    check_callable("matvec", matvec)
    for name, value in (("oversample", oversample), ("power_iters", power_iters)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    d, rank = state.eigvecs.shape
    dtype, device = state.eigvecs.dtype, state.eigvecs.device

    def apply(block: torch.Tensor) -> torch.Tensor:
        columns = []
        for column in block.mT:
            out = matvec(column)
            if not isinstance(out, torch.Tensor) or out.shape != (d,):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"matvec must map a ({d},) vector to a ({d},) vector, got {shape}")
            columns.append(out.to(dtype=dtype, device=device))
        return torch.stack(columns, dim=1)

    with torch.no_grad():
        sketch = _standard_normal(min(d, rank + int(oversample)), d, dtype, device, generator).mT
        basis = torch.linalg.qr(apply(sketch)).Q
        for _ in range(int(power_iters)):
            basis = torch.linalg.qr(apply(basis)).Q
        projected = basis.mT @ apply(basis)
        values, vectors = torch.linalg.eigh((projected + projected.mT) / 2)
        values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    return LowRankLaplaceState(params, basis @ vectors, values.clamp(min=0), state.prior_prec,
                               torch.ones((), dtype=torch.int64))
