r"""Aleatoric and epistemic variance of a Gaussian regression model from posterior samples.

Each sample :math:`θ_k` predicts :math:`y|x,θ_k \sim N(μ_k(x), σ^2_k(x))` (elementwise per output).
The posterior predictive is the mixture :math:`\frac1K\sum_k N(μ_k, σ^2_k)`, whose mean and variance
are, exactly (the law of total variance),

.. math::
    \bar μ = \frac1K\sum_k μ_k, \qquad
    \underbrace{\mathrm{Var}[y|x]}_{\text{total}}
    = \underbrace{\frac1K\sum_k σ^2_k}_{\text{aleatoric } E_θ[\mathrm{Var}[y|x,θ]]}
    + \underbrace{\frac1K\sum_k (μ_k - \bar μ)^2}_{\text{epistemic } \mathrm{Var}_θ[E[y|x,θ]]}.

The epistemic term divides by K (it is the mixture's own variance, not an unbiased estimate of a
population's). The means' spread is accumulated with Chan et al.'s pairwise update of the sum of
squared deviations, chunk by chunk (stable where :math:`\overline{μ^2} - \bar μ^2` would cancel),
so samples can stream in one at a time.

Example:
    >>> import torch
    >>> from bayesflow.predictive import regression_uncertainty
    >>> means, variances = torch.tensor([[[1.0]], [[3.0]]]), torch.tensor([[[0.5]], [[1.5]]])  # (K=2, B=1, D=1)
    >>> u = regression_uncertainty(means, variances)
    >>> u.mean, u.aleatoric, u.epistemic, u.total
    (tensor([[2.]]), tensor([[1.]]), tensor([[1.]]), tensor([[2.]]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from numbers import Real
from typing import NamedTuple

import torch

from bayesflow.predictive._samples import check_finite
from bayesflow.records import record

__all__ = ["RegressionUncertainty", "regression_uncertainty"]

GaussianSamples = torch.Tensor | Callable[[int], tuple] | Iterable[tuple]


@record
class RegressionUncertainty(NamedTuple):
    r"""The predictive mean and the split of the predictive variance, per datum and output.

    Attributes:
        mean: ``(...)`` :math:`\bar μ`.
        total: ``(...)`` aleatoric + epistemic, the variance of the predictive mixture.
        aleatoric: ``(...)`` :math:`\frac1K\sum_k σ^2_k`.
        epistemic: ``(...)`` :math:`\frac1K\sum_k (μ_k - \bar μ)^2`.
        num_samples: K.

    Example:
        >>> import torch
        >>> from bayesflow.predictive import regression_uncertainty
        >>> u = regression_uncertainty(torch.ones(5, 3, 2), 0.1)   # 5 identical samples: no epistemic part
        >>> u.epistemic.abs().max().item(), round(u.total[0, 0].item(), 6), u.num_samples
        (0.0, 0.1, 5)
    """

    mean: torch.Tensor
    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor
    num_samples: int


def regression_uncertainty(means: GaussianSamples, variances: torch.Tensor | float | None = None, *,
                           num_samples: int | None = None, chunk_size: int | None = None) -> RegressionUncertainty:
    r"""Predictive mean and total = aleatoric + epistemic variance from K Gaussian predictions.

    Args:
        means: the samples' predictive means, as one of
            * a tensor ``(K, ...)`` (with ``variances`` a tensor broadcastable to it, a number for a
              shared noise variance, or None for noise-free function samples);
            * a function ``k -> (mean_k, variance_k)`` with ``num_samples=K`` (``variances`` None);
            * an iterable of ``(mean_k, variance_k)`` pairs (``variances`` None).
        variances: the samples' predictive variances :math:`σ^2_k` (see ``means``; finite and non-negative).
        num_samples: K, required for a function; a check for the others.
        chunk_size: for tensors, samples per chunk (None: all at once).

    Returns:
        A :class:`RegressionUncertainty` with fields shaped like one sample's mean, in its dtype
        (detached: no autograd graph is kept across samples).

    Raises:
        TypeError: ``means`` is none of the three, or yields something other than tensor pairs.
        ValueError: K = 0, shapes that disagree, NaN or infinite means, NaN, infinite or negative
            variances (named by sample and index), a missing or wrong ``num_samples``, or ``variances``
            given together with a function or iterable. The check is one ``.all()`` per chunk.

    Example (heteroscedastic samples streamed from a function of the sample index):
        >>> import torch
        >>> from bayesflow.predictive import regression_uncertainty
        >>> g = torch.Generator().manual_seed(0)
        >>> mu, var = torch.randn(10, 4, 2, generator=g, dtype=torch.float64), torch.rand(10, 4, 2, generator=g)
        >>> streamed = regression_uncertainty(lambda k: (mu[k], var[k]), num_samples=10)
        >>> whole = regression_uncertainty(mu, var.double())
        >>> torch.allclose(streamed.epistemic, mu.var(0, unbiased=False)), torch.allclose(streamed.total, whole.total)
        (True, True)
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be a positive int (K >= 1), got {num_samples!r}")
    count, mean, squares, variance_sum = 0, None, None, None
    for mu, var in _pairs(means, variances, num_samples, chunk_size):
        mu, var, k = mu.detach(), var.detach(), mu.shape[0]
        if not bool(torch.isfinite(mu).all() & ((var >= 0) & (var < math.inf)).all()):  # False for NaN too
            check_finite(mu, "means", first_sample=count)
            check_finite(var, "variances", first_sample=count)
            raise ValueError(f"variances must be non-negative, got a minimum of {var.min().item()!r} "
                             f"among samples {count}..{count + k - 1}")
        chunk_mean = mu.mean(0)
        chunk_squares = (mu - chunk_mean).square().sum(0)
        chunk_variance = var.sum(0)
        if mean is None:
            mean, squares, variance_sum = chunk_mean, chunk_squares, chunk_variance
        else:  # Chan, Golub & LeVeque (1979): merge two groups' sums of squared deviations
            delta = chunk_mean - mean
            mean = mean + delta * (k / (count + k))
            squares = squares + chunk_squares + delta.square() * (count * k / (count + k))
            variance_sum = variance_sum + chunk_variance
        count += k
    aleatoric, epistemic = variance_sum / count, squares / count
    return RegressionUncertainty(mean, aleatoric + epistemic, aleatoric, epistemic, count)


def _pairs(means, variances, num_samples: int | None, chunk_size: int | None) -> Iterator[tuple]:
    """``(means (k, ...), variances (k, ...))`` chunks, checked; variances broadcast to the means."""
    if isinstance(means, torch.Tensor):
        if not means.is_floating_point() or means.ndim < 1 or means.shape[0] == 0:
            raise ValueError(f"means must be a floating tensor (K, ...) with K >= 1, got a {means.dtype} tensor "
                             f"of shape {tuple(means.shape)}")
        if num_samples is not None and means.shape[0] != num_samples:
            raise ValueError(f"means has {means.shape[0]} samples on its leading axis, num_samples says {num_samples}")
        if variances is None:
            variances = means.new_zeros(())
        elif isinstance(variances, Real) and not isinstance(variances, bool):
            if not 0 <= float(variances) < math.inf:  # False for NaN
                raise ValueError(f"variances must be a finite non-negative number (a shared noise variance), "
                                 f"got {variances!r}")
            variances = means.new_tensor(float(variances))
        elif not isinstance(variances, torch.Tensor):
            raise TypeError(f"variances must be a tensor, a number or None, got {type(variances).__name__}")
        try:
            variances = torch.broadcast_to(variances.to(means.dtype), means.shape)
        except RuntimeError:
            raise ValueError(f"variances of shape {tuple(variances.shape)} do not broadcast to the means' shape "
                             f"{tuple(means.shape)}") from None
        size = chunk_size or means.shape[0]
        yield from zip(means.split(size), variances.split(size))
        return
    if variances is not None:
        raise ValueError("variances goes with a tensor of means; a function or iterable yields (mean, variance) pairs")
    if callable(means):
        if num_samples is None:
            raise ValueError("means is a function of the sample index: pass num_samples=K as well")
        source = (means(k) for k in range(num_samples))
    elif isinstance(means, Iterable) and not isinstance(means, (str, bytes, dict)):
        source = iter(means)
    else:
        raise TypeError(f"means must be a (K, ...) tensor, a function k -> (mean, variance) or an iterable of "
                        f"(mean, variance) pairs, got {type(means).__name__}")
    shape, count = None, 0
    for count, pair in enumerate(source, start=1):
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
            raise TypeError(f"sample {count - 1} must be a (mean, variance) pair of tensors, got {type(pair).__name__}")
        mu, var = pair
        if not mu.is_floating_point():
            raise ValueError(f"sample {count - 1}'s mean must be a floating tensor, got {mu.dtype}")
        if shape is None:
            shape = mu.shape
        if mu.shape != shape or var.shape != shape:
            raise ValueError(f"sample {count - 1} has mean shape {tuple(mu.shape)} and variance shape "
                             f"{tuple(var.shape)}; sample 0's mean has {tuple(shape)}")
        yield mu.unsqueeze(0), var.to(mu.dtype).unsqueeze(0)
    if count == 0:
        raise ValueError("means yielded no samples: K must be at least 1")
    if num_samples is not None and count != num_samples:
        raise ValueError(f"means yielded {count} samples, num_samples says {num_samples}")
