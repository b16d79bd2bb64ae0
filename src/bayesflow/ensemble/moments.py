r"""Running moments of θ over a chain, and the SWAG Gaussian built from them (Maddox et al. 2019).

Turns any chain — a sampler, or T = 0 SGD as in SWAG — into a Gaussian posterior approximation without
storing the samples. After :math:`n` updates with :math:`θ_1..θ_n`:

.. math::
    \bar θ_n = \bar θ_{n-1} + \frac{θ_n - \bar θ_{n-1}}{n}, \qquad
    σ^2_n = \frac{n-1}{n}σ^2_{n-1} + \frac{(θ_n - \bar θ_{n-1})(θ_n - \bar θ_n)}{n}

(Welford's update of the mean and of the population variance, elementwise: stable where
:math:`\overline{θ^2} - \bar θ^2` cancels), and with ``max_rank = K > 0`` a ring buffer of the last ``K``
deviations :math:`D_{:,j} = θ_j - \bar θ_j`. :func:`sample` draws from SWAG's

.. math::
    N\Big(\bar θ,\ \tfrac12 \mathrm{diag}(σ^2) + \tfrac{1}{2(k-1)} D D^\top\Big), \qquad
    θ = \bar θ + \sqrt{σ^2/2}\odot z_1 + \frac{D z_2}{\sqrt{2(k-1)}}, \quad z_1 \sim N(0, I_d),\ z_2 \sim N(0, I_k)

with ``k`` the number of deviations stored (``max_rank = 0``: SWAG-diagonal, :math:`N(\bar θ, \mathrm{diag}(σ^2))`).
Every update is a handful of ``torch._foreach_*`` calls over the leaves; leaves may carry a leading chain
dimension (moments are elementwise, so each chain gets its own).

Example:
    >>> import torch
    >>> from bayesflow.ensemble.moments import running_moments, sample
    >>> from bayesflow.sgmcmc import sgld
    >>> transform = sgld.build(lambda params, batch: (-0.5 * (params["w"] ** 2).sum(), None), lr=1e-2)
    >>> params, batch = {"w": torch.zeros(3)}, None
    >>> chain = transform.init(params, seed=0)
    >>> moments = running_moments(max_rank=20)
    >>> state = moments.init(params)
    >>> for _ in range(1000):
    ...     chain, _ = transform.update(chain, batch)
    ...     state, _ = moments.update(state, chain.params, inplace=True)
    >>> draws = sample(state, torch.Generator().manual_seed(0), num_samples=30)
    >>> draws["w"].shape
    torch.Size([30, 3])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from bayesflow.tree import flatten, unflatten
from bayesflow.types import TensorTree, Transform

__all__ = ["MomentsState", "running_moments", "sample"]


class MomentsState(NamedTuple):
    """State of :func:`running_moments` (a NamedTuple: an optree node, ``torch.save``-able).

    Attributes:
        count: the number of updates n (int64, on the CPU so that updates read it without a device sync).
        mean: :math:`\\bar θ_n`, like params.
        variance: the elementwise population variance :math:`σ^2_n` (divides by n), like params.
        deviations: like params with a leading ``max_rank`` axis: the ring buffer of
            :math:`θ_j - \\bar θ_j` (slot ``j mod max_rank``); None when ``max_rank = 0``.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import running_moments
        >>> moments = running_moments()
        >>> state, _ = moments.update(moments.init(torch.zeros(2)), torch.tensor([1.0, 3.0]))
        >>> state.count, state.mean, state.deviations
        (tensor(1), tensor([1., 3.]), None)
    """

    count: torch.Tensor
    mean: TensorTree
    variance: TensorTree
    deviations: TensorTree | None


if hasattr(torch.serialization, "add_safe_globals"):  # torch.save(state) loads with weights_only=True
    torch.serialization.add_safe_globals([MomentsState])


def running_moments(max_rank: int = 0, dtype: torch.dtype | None = None) -> Transform:
    r"""Running mean, diagonal variance and (optionally) low-rank deviations of θ, as ``(init, update)``.

    ``update`` applies Welford's recurrences

    .. math::
        δ = θ - \bar θ, \quad \bar θ \mathrel{+}= δ / n, \quad
        σ^2 \leftarrow (1 - \tfrac1n) σ^2 + \tfrac1n\, δ \odot (θ - \bar θ), \quad
        D_{:, n \bmod K} \leftarrow θ - \bar θ,

    so ``state.mean`` and ``state.variance`` equal the mean and the (ddof = 0) variance of every θ
    passed so far, and ``state.deviations`` holds SWAG's deviation matrix of the last ``K`` of them.

    Args:
        max_rank: K, the number of deviation columns kept (0: diagonal only). SWAG uses 20.
        dtype: accumulate in this dtype (e.g. ``torch.float64`` for long float32 chains); None keeps
            each leaf's dtype.

    Returns:
        A :class:`~bayesflow.types.Transform`: ``init(params) -> MomentsState`` (count 0: ``init`` only
        sets shapes) and ``update(state, params, inplace=False) -> (state, None)``. ``inplace=True``
        writes into the state's tensors (no allocation); otherwise the input state is left unchanged.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import running_moments
        >>> moments = running_moments(max_rank=2)
        >>> state = moments.init(torch.zeros(3))
        >>> for theta in torch.randn(10, 3):
        ...     state, _ = moments.update(state, theta)
        >>> state.count, state.deviations.shape
        (tensor(10), torch.Size([2, 3]))
    """
    if not isinstance(max_rank, int) or max_rank < 0:
        raise ValueError(f"max_rank must be a non-negative int, got {max_rank!r}")

    def cast(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p.detach() if dtype is None else p.detach().to(dtype) for p in leaves]

    def init(params: TensorTree) -> MomentsState:
        leaves, spec = flatten(params)
        leaves = cast(leaves)
        deviations = None
        if max_rank:
            deviations = unflatten(spec, [p.new_zeros((max_rank, *p.shape)) for p in leaves])
        return MomentsState(
            count=torch.zeros((), dtype=torch.int64),
            mean=unflatten(spec, [torch.zeros_like(p) for p in leaves]),
            variance=unflatten(spec, [torch.zeros_like(p) for p in leaves]),
            deviations=deviations,
        )

    def update(state: MomentsState, params: TensorTree, inplace: bool = False) -> tuple[MomentsState, None]:
        mean, spec = flatten(state.mean)
        variance, _ = flatten(state.variance)
        theta, theta_spec = flatten(params)
        if theta_spec != spec:
            raise ValueError(f"params have structure {theta_spec}; the moments were initialised with {spec}")
        theta = cast(theta)
        n = int(state.count) + 1
        delta = torch._foreach_sub(theta, mean)
        if inplace:
            torch._foreach_add_(mean, delta, alpha=1.0 / n)
            torch._foreach_mul_(variance, 1.0 - 1.0 / n)
        else:
            mean = torch._foreach_add(mean, delta, alpha=1.0 / n)
            variance = torch._foreach_mul(variance, 1.0 - 1.0 / n)
        residual = torch._foreach_sub(theta, mean)
        torch._foreach_addcmul_(variance, delta, residual, value=1.0 / n)
        deviations = state.deviations
        if max_rank:
            slot = (n - 1) % max_rank
            buffers, _ = flatten(state.deviations)
            if not inplace:
                buffers = [b.clone() for b in buffers]
            torch._foreach_copy_([b[slot] for b in buffers], residual)
            deviations = unflatten(spec, buffers)
        if inplace:
            state.count.add_(1)
            return state, None
        new = MomentsState(torch.full((), n, dtype=torch.int64), unflatten(spec, mean), unflatten(spec, variance),
                           deviations)
        return new, None

    return Transform(init=init, update=update, config={"max_rank": max_rank, "dtype": dtype})


def sample(
    state: MomentsState,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
    *,
    chain_dim: bool = False,
) -> TensorTree:
    r"""Draw from the Gaussian of :func:`running_moments` (SWAG, Maddox et al. 2019, Algorithm 1).

    .. math::
        θ = \bar θ + \sqrt{σ^2/2}\odot z_1 + \frac{D z_2}{\sqrt{2(k-1)}}, \qquad
        \mathrm{Cov}(θ) = \tfrac12\mathrm{diag}(σ^2) + \tfrac{1}{2(k-1)} D D^\top,

    with ``k = min(count, max_rank)`` stored deviation columns; without deviations (``max_rank = 0``)
    :math:`θ = \bar θ + σ \odot z_1`. One :math:`z_2` is shared by all leaves of a draw (D spans the whole
    parameter vector); with ``chain_dim=True`` the first axis of every leaf is a chain axis and each chain
    gets its own :math:`z_2` (independent posteriors).

    Args:
        state: a :class:`MomentsState` with at least one update (two deviations when ``max_rank > 0``).
        generator: the random stream (on the state's device); None uses torch's global one.
        num_samples: the number of draws.
        chain_dim: leaves carry a leading chain dimension.

    Returns:
        A tree like ``state.mean`` whose leaves have a leading ``num_samples`` axis.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble.moments import running_moments, sample
        >>> moments = running_moments(max_rank=0)
        >>> state = moments.init({"w": torch.zeros(2, 3)})
        >>> for k in range(3):
        ...     state, _ = moments.update(state, {"w": torch.full((2, 3), float(k))})
        >>> draws = sample(state, torch.Generator().manual_seed(0), num_samples=100)
        >>> draws["w"].shape  # (100, *w.shape)
        torch.Size([100, 2, 3])
    """
    count = int(state.count)
    if count < 1:
        raise ValueError("the moments state has no updates yet: call update before sample")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples!r}")
    mean, spec = flatten(state.mean)
    variance, _ = flatten(state.variance)
    ref = mean[0]
    sizes = [p.numel() for p in mean]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in mean) else ref.dtype
    z1 = torch.randn(num_samples, sum(sizes), generator=generator, dtype=dtype, device=ref.device)
    z1 = [z.reshape(num_samples, *p.shape).to(p.dtype) for z, p in zip(z1.split(sizes, dim=1), mean)]
    low_rank = state.deviations is not None
    scale = math.sqrt(0.5) if low_rank else 1.0
    stds = torch._foreach_mul(torch._foreach_sqrt(torch._foreach_clamp_min(variance, 0.0)), scale)
    draws = torch._foreach_addcmul([p.unsqueeze(0) for p in mean], [s.unsqueeze(0) for s in stds], z1)
    if low_rank:
        buffers, _ = flatten(state.deviations)
        rank = min(count, buffers[0].shape[0])
        if rank < 2:
            raise ValueError(f"SWAG's low-rank term needs at least 2 stored deviations, the state has {rank}")
        if chain_dim and ref.ndim == 0:
            raise ValueError("chain_dim=True needs leaves with a leading chain dimension")
        chains = ref.shape[0] if chain_dim else None
        shape = (num_samples, rank) if chains is None else (num_samples, rank, chains)
        z2 = torch.randn(shape, generator=generator, dtype=dtype, device=ref.device) / math.sqrt(2 * (rank - 1))
        for x, b in zip(draws, buffers):
            cols = b[:rank].reshape(rank, -1) if chains is None else b[:rank].reshape(rank, chains, -1)
            if chains is None:
                x.add_((z2.to(b.dtype) @ cols).reshape(x.shape))
            else:
                x.add_(torch.einsum("srk,rkp->skp", z2.to(b.dtype), cols).reshape(x.shape))
    return unflatten(spec, draws)
