r"""Draws from a Laplace state: N(μ, diag(P)⁻¹) or N(μ, P⁻¹) for parameters of any tree and shapes.

At a temperature T the draws come from the tempered Laplace posterior: a Gaussian
:math:`q = N(μ, P^{-1})` raised to the power 1/T and renormalised is :math:`q^{1/T} \propto
\exp(-\tfrac{1}{2T}(θ-μ)^\top P (θ-μ)) = N(μ, T P^{-1})`, so the noise is scaled by :math:`\sqrt T`
(T = 1: the Laplace approximation itself; T = 0: its mode μ, with no noise drawn).

A dense draw solves :math:`L^\top x = ξ` with :math:`P = L L^\top` (one Cholesky factor, one
triangular solve; no inverse), on the parameters' device, from an optional ``torch.Generator``;
``sample_shape`` goes in front of every leaf.

Example:
    >>> import torch
    >>> from bayesflow.laplace import diag_fisher
    >>> state = diag_fisher.init({"w": torch.zeros(2, 2)}, init_prec_diag=4.0)
    >>> diag_fisher.sample(state, (5,), generator=torch.Generator().manual_seed(0))["w"].shape
    torch.Size([5, 2, 2])
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import optree
import torch

from bayesflow.laplace._common import (
    ONE_DRAW,
    DenseLaplaceState,
    DiagLaplaceState,
    param_leaves,
    param_paths,
    ravel,
)
from bayesflow.types import TensorTree
from bayesflow.utils.gaussian import sample_size

__all__ = ["dense_sample", "diag_sample"]


def _temperature(temperature: Any) -> float:
    """``temperature`` as a float T ≥ 0 (a number or a one-element floating-point tensor)."""
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1 and temperature.is_floating_point():
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, Real):
        raise TypeError(f"temperature must be a number T >= 0, got {temperature!r:.80}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0 (the draws have covariance T·P⁻¹), "
                         f"got {temperature!r}")
    return float(temperature)


def _the_mean(mean: torch.Tensor, n: int, leaves: list[torch.Tensor], spec: optree.PyTreeSpec,
              sample_shape: torch.Size) -> TensorTree:
    """T = 0: every draw is μ (new tensors, not views of the state)."""
    return _to_tree(mean.expand(n, mean.numel()).clone(), leaves, spec, sample_shape)


def _standard_normal(n: int, d: int, dtype: torch.dtype, device: torch.device,
                     generator: torch.Generator | None) -> torch.Tensor:
    """``(n, d)`` standard normals from ``generator`` (drawn on its device) or torch's global one."""
    if generator is None:
        return torch.randn(n, d, dtype=dtype, device=device)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return torch.randn(n, d, dtype=dtype, device=generator.device, generator=generator).to(device)


def _to_tree(flat: torch.Tensor, leaves: list[torch.Tensor], spec: optree.PyTreeSpec,
             sample_shape: torch.Size) -> TensorTree:
    """``(n, d)`` draws to a tree of ``sample_shape + leaf.shape`` tensors on the leaves' devices."""
    pieces = torch.split(flat, [leaf.numel() for leaf in leaves], dim=1)
    return spec.unflatten([piece.reshape(sample_shape + leaf.shape).to(dtype=leaf.dtype, device=leaf.device)
                           for piece, leaf in zip(pieces, leaves)])


def diag_sample(state: DiagLaplaceState, sample_shape: torch.Size = ONE_DRAW,
                generator: torch.Generator | None = None, temperature: float = 1.0) -> TensorTree:
    r"""Draws :math:`\theta = \mu + \sqrt{T}\,\mathrm{diag}(p)^{-1/2} z`, :math:`z \sim N(0, I)`, from a
    diagonal state: :math:`N(\mu, T\,\mathrm{diag}(p)^{-1})`, the Laplace approximation tempered by T.

    Args:
        state: a :class:`DiagLaplaceState` (``params`` :math:`\mu`, ``prec_diag`` :math:`p > 0`).
        sample_shape: the shape of the batch of draws (``torch.Size``, tuple or int); ``()`` for one draw.
        generator: the ``torch.Generator`` to draw from (any device: the numbers are drawn on its device
            and moved to the parameters'); torch's global generator when None.
        temperature: T ≥ 0, finite: the covariance is T·diag(p)⁻¹ (1: the Laplace approximation; 0: every
            draw is μ and no noise is drawn).

    Returns:
        A tree shaped like ``params`` whose leaves have shape ``sample_shape + leaf.shape``, on the
        leaves' devices and in their dtypes.

    Raises:
        TypeError: ``temperature`` is not a number.
        ValueError: a precision is zero, negative or not finite (the distribution has no density), or
            ``temperature`` is negative or not finite.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_fisher
        >>> state = diag_fisher.init({"a": torch.zeros(2), "b": torch.ones(2, 2)}, init_prec_diag=1e4)
        >>> draws = diag_fisher.sample(state, (1000,), generator=torch.Generator().manual_seed(0))
        >>> draws["b"].shape, round(float(draws["b"].mean()), 2), round(float(draws["a"].std()), 2)
        (torch.Size([1000, 2, 2]), 1.0, 0.01)
        >>> hot = diag_fisher.sample(state, (1000,), generator=torch.Generator().manual_seed(0), temperature=4.0)
        >>> round(float(hot["a"].std()), 2)                    # √T times the spread
        0.02
    """
    sample_shape = sample_size(sample_shape)
    temperature = _temperature(temperature)
    leaves, spec = param_leaves("sample", state.params)
    try:
        prec_leaves = spec.flatten_up_to(state.prec_diag)
    except (TypeError, ValueError) as error:
        raise ValueError(f"state.prec_diag must have the structure of state.params: {error}") from None
    mean, prec = ravel(leaves), ravel(prec_leaves).to(device=leaves[0].device)
    if not bool(torch.isfinite(prec).all()) or not bool((prec > 0).all()):
        bad = [path for path, p in zip(param_paths(state.params), prec_leaves)
               if not bool(torch.isfinite(p).all() and (p > 0).all())]
        raise ValueError(f"diagonal precisions must be finite and positive to sample; prec_diag{bad[0]} is "
                         f"not (give init_prec_diag > 0, a prior precision, or update with data first)")
    n = math.prod(sample_shape)
    if temperature == 0.0:
        return _the_mean(mean, n, leaves, spec, sample_shape)
    scale = prec.rsqrt()
    if temperature != 1.0:
        scale.mul_(math.sqrt(temperature))
    z = _standard_normal(n, mean.numel(), mean.dtype, mean.device, generator)
    return _to_tree(torch.addcmul(mean, z, scale), leaves, spec, sample_shape)


def dense_sample(state: DenseLaplaceState, sample_shape: torch.Size = ONE_DRAW,
                 generator: torch.Generator | None = None, temperature: float = 1.0) -> TensorTree:
    r"""Draws :math:`\theta = \mu + \sqrt{T}\,L^{-\top} z`, :math:`z \sim N(0, I)`, :math:`P = L L^\top`, from
    a dense state: :math:`N(\mu, T P^{-1})`, the Laplace approximation tempered by T.

    The Cholesky factor :math:`L` of the precision is taken once, and the draws solve one triangular
    system (:math:`\mathrm{Cov}\,\theta = L^{-\top} L^{-1} = P^{-1}`): no inverse is formed. Works for
    parameters of any tree structure and leaf shapes, on the precision's device.

    Args:
        state: a :class:`DenseLaplaceState` (``params`` :math:`\mu`, ``prec`` :math:`P`, positive definite).
        sample_shape: the shape of the batch of draws (``torch.Size``, tuple or int); ``()`` for one draw.
        generator: the ``torch.Generator`` to draw from (any device: the numbers are drawn on its device
            and moved to the precision's); torch's global generator when None.
        temperature: T ≥ 0, finite: the covariance is T·P⁻¹ (1: the Laplace approximation; 0: every draw
            is μ and no noise is drawn).

    Returns:
        A tree shaped like ``params`` whose leaves have shape ``sample_shape + leaf.shape``, on the
        leaves' devices and in their dtypes.

    Raises:
        TypeError: ``temperature`` is not a number.
        ValueError: ``prec`` is not ``(d, d)`` or not positive definite, or ``temperature`` is negative or
            not finite.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_ggn
        >>> cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]])
        >>> state = dense_ggn.init(torch.zeros(2), init_prec=torch.linalg.inv(cov))
        >>> draws = dense_ggn.sample(state, 20000, generator=torch.Generator().manual_seed(0))
        >>> torch.cov(draws.T).round(decimals=1)
        tensor([[1.0000, 0.8000],
                [0.8000, 1.0000]])
        >>> hot = dense_ggn.sample(state, 20000, generator=torch.Generator().manual_seed(0), temperature=2.0)
        >>> torch.cov(hot.T).round(decimals=1)                  # T·P⁻¹
        tensor([[2.0000, 1.6000],
                [1.6000, 2.0000]])
    """
    sample_shape = sample_size(sample_shape)
    temperature = _temperature(temperature)
    leaves, spec = param_leaves("sample", state.params)
    mean = ravel(leaves)
    d = mean.numel()
    prec = state.prec
    if not isinstance(prec, torch.Tensor) or prec.shape != (d, d):
        shape = tuple(prec.shape) if isinstance(prec, torch.Tensor) else type(prec).__name__
        raise ValueError(f"state.prec must be a ({d}, {d}) tensor (params has {d} entries), got {shape}")
    mean = mean.to(device=prec.device, dtype=torch.promote_types(mean.dtype, prec.dtype))
    factor, info = torch.linalg.cholesky_ex(prec.to(mean.dtype))
    if int(info) != 0:
        raise ValueError("state.prec must be positive definite to sample (its Cholesky factorisation fails at "
                         f"column {int(info)}); give init_prec > 0 (a prior precision) or add epsilon")
    n = math.prod(sample_shape)
    if temperature == 0.0:
        return _the_mean(mean, n, leaves, spec, sample_shape)
    z = _standard_normal(n, d, mean.dtype, mean.device, generator)
    if temperature != 1.0:
        z.mul_(math.sqrt(temperature))  # √T z: the solve is linear, so the draws are √T L^{-T} z
    draws = mean + torch.linalg.solve_triangular(factor, z, upper=False, left=False)  # z L^{-1}: rows of L^{-T} z
    return _to_tree(draws, leaves, spec, sample_shape)
