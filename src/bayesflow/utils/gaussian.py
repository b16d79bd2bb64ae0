r"""The diagonal Gaussian on parameter trees: log density and (reparameterised) samples.

posteriors' (normal-computing/posteriors) ``diag_normal_log_prob`` and ``diag_normal_sample``, with the
same names, signatures and return conventions: :math:`\theta \sim \mathcal N(\mu, \mathrm{diag}(\sigma^2))`
with :math:`\mu` and :math:`\sigma` trees like :math:`\theta`, or scalars broadcast to every leaf (without
building full-size tensors).

Example:
    >>> import torch
    >>> from bayesflow.utils import diag_normal_log_prob, diag_normal_sample
    >>> mean = {"a": torch.zeros(2), "b": torch.ones(3)}
    >>> draws = diag_normal_sample(mean, 0.5, sample_shape=(4,))
    >>> draws["a"].shape, draws["b"].shape
    (torch.Size([4, 2]), torch.Size([4, 3]))
    >>> diag_normal_log_prob(mean, mean, 1.0)  # the density at the mode: -5/2 log 2π
    tensor(-4.5947)
"""

from __future__ import annotations

import math
from functools import reduce
from numbers import Real

import torch

from bayesflow.tree import flatten, unflatten
from bayesflow.types import TensorTree
from bayesflow.utils.functional import is_scalar

__all__ = ["diag_normal_log_prob", "diag_normal_sample", "sample_size"]


def sample_size(sample_shape) -> torch.Size:
    """``sample_shape`` (a ``torch.Size``, a tuple of ints or an int) as a ``torch.Size`` of sizes ≥ 0.

    Raises:
        TypeError: not a shape. ValueError: a negative size.

    Example:
        >>> from bayesflow.utils.gaussian import sample_size
        >>> sample_size(3), sample_size((2, 4))
        (torch.Size([3]), torch.Size([2, 4]))
    """
    if isinstance(sample_shape, int) and not isinstance(sample_shape, bool):
        sample_shape = (sample_shape,)
    try:
        sample_shape = torch.Size(sample_shape)
    except TypeError:
        raise TypeError(f"sample_shape must be a torch.Size or a tuple of ints, got {sample_shape!r}") from None
    if any(n < 0 for n in sample_shape):
        raise ValueError(f"sample_shape must have non-negative sizes, got {tuple(sample_shape)}")
    return sample_shape


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_ONE_DRAW = torch.Size([])  # the default sample_shape: one draw, no extra dimension


def _leaves_like(value: float | TensorTree, spec, name: str, caller: str) -> list:
    """``value``'s leaves matching ``spec``: a scalar (number or one-element tensor) repeated, else its leaves."""
    if is_scalar(value):
        scalar = value.reshape(()) if isinstance(value, torch.Tensor) else float(value)
        return [scalar] * spec.num_leaves
    leaves, value_spec = flatten(value)
    if value_spec != spec:
        raise ValueError(f"{caller} expects {name} to be a scalar or a tree with the structure {spec}, "
                         f"got {value_spec}")
    for leaf in leaves:  # a string leaf would otherwise fail in the arithmetic, without a name
        if not isinstance(leaf, torch.Tensor | Real) or isinstance(leaf, bool):
            raise TypeError(f"{caller} expects {name} to be a number or a tree of tensors, got a leaf "
                            f"{leaf!r} ({type(leaf).__name__})")
    return leaves


def _check_scale(sd_diag: float | TensorTree) -> None:
    """A Python-number ``sd_diag`` must be > 0: ``math.log`` of it would fail with a bare "math domain error".

    NaN passes (the result is NaN, as in posteriors). Tensor scales are not read: a check would be a host
    sync and would break ``torch.vmap`` / ``torch.compile``; their log density is posteriors' (NaN for σ ≤ 0).
    """
    if isinstance(sd_diag, Real) and not isinstance(sd_diag, bool) and sd_diag <= 0:
        raise ValueError(f"diag_normal_log_prob expects sd_diag > 0 (a standard deviation), got {sd_diag!r}")


def diag_normal_log_prob(x: TensorTree, mean: float | TensorTree = 0.0, sd_diag: float | TensorTree = 1.0,
                         normalize: bool = True) -> torch.Tensor:
    r"""Log density of :math:`\mathcal N(\mu, \mathrm{diag}(\sigma^2))` at the tree :math:`x`, summed over all entries.

    .. math::
        \log p(x) = \sum_j \Big[-\frac{(x_j - \mu_j)^2}{2\sigma_j^2} - \log \sigma_j - \tfrac12 \log 2\pi\Big]

    over every entry :math:`j` of every leaf; with ``normalize=False`` only the quadratic term
    :math:`-\frac12 ((x_j - \mu_j)/\sigma_j)^2` is summed. Differentiable in :math:`x`, :math:`\mu` and
    :math:`\sigma`, and usable under ``torch.vmap`` / ``torch.func``.

    Args:
        x: the point, a tensor or a tree of tensors.
        mean: :math:`\mu`, a tree like ``x`` (leaves broadcastable to ``x``'s) or a scalar.
        sd_diag: :math:`\sigma > 0`, the square root of the covariance's diagonal: a tree like ``x`` or a scalar.
        normalize: include the normalising terms :math:`-\log\sigma_j - \frac12\log 2\pi`.

    Returns:
        The scalar log density, a 0-dimensional tensor.

    Raises:
        TypeError: a leaf of ``mean`` or ``sd_diag`` is neither a tensor nor a number (a string).
        ValueError: ``mean`` or ``sd_diag`` is neither a scalar nor a tree of ``x``'s structure, ``x``
            has no leaves, or ``sd_diag`` is a Python number ≤ 0 (a NaN number gives NaN; tensor
            ``sd_diag`` is not read — no host sync, usable under ``vmap`` — and gives posteriors'
            value, NaN where :math:`\sigma \le 0`).

    Example:
        >>> import torch
        >>> from bayesflow.utils import diag_normal_log_prob
        >>> x = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}
        >>> diag_normal_log_prob(x, mean=1.0, sd_diag=1.0, normalize=False)  # -(0 + 1 + 1)/2
        tensor(-1.)
        >>> sd = {"a": torch.tensor([0.5, 2.0]), "b": torch.tensor(1.0)}
        >>> diag_normal_log_prob(x, 0.0, sd)  # agrees with torch.distributions.Normal, summed
        tensor(-5.2568)
    """
    x_leaves, spec = flatten(x)
    if not x_leaves:
        raise ValueError(f"diag_normal_log_prob expects x to hold at least one tensor, got {x!r}")
    _check_scale(sd_diag)
    means = _leaves_like(mean, spec, "mean", "diag_normal_log_prob")
    sds = _leaves_like(sd_diag, spec, "sd_diag", "diag_normal_log_prob")
    terms = []
    for value, mu, sd in zip(x_leaves, means, sds):
        quadratic = -0.5 * ((value - mu) / sd) ** 2
        if normalize:
            log_sd = torch.log(sd) if isinstance(sd, torch.Tensor) else math.log(sd)
            quadratic = quadratic - log_sd - _HALF_LOG_2PI
        terms.append(quadratic.sum())
    return reduce(torch.add, terms)


def diag_normal_sample(mean: TensorTree, sd_diag: float | TensorTree,
                       sample_shape: torch.Size = _ONE_DRAW) -> TensorTree:
    r"""Draws :math:`\theta = \mu + \sigma \odot \varepsilon`, :math:`\varepsilon \sim \mathcal N(0, I)`, leaf by leaf.

    Reparameterised (differentiable in :math:`\mu` and :math:`\sigma`); each leaf gets ``sample_shape``
    prepended, ``torch.randn(sample_shape + leaf.shape)`` in the leaf's dtype and device from the global
    generator, leaves in optree order: with ``torch.manual_seed`` fixed the draws equal
    ``torch.distributions.Normal(mean, sd).sample(sample_shape)`` leaf by leaf.

    Args:
        mean: :math:`\mu`, a tensor or a tree of tensors.
        sd_diag: :math:`\sigma`, a tree like ``mean`` or a scalar.
        sample_shape: the shape of the batch of draws (a ``torch.Size``, a tuple of ints or an int).

    Returns:
        A tree like ``mean`` whose leaves have shape ``sample_shape + leaf.shape``.

    Raises:
        TypeError: ``sample_shape`` is not a shape, or a leaf of ``sd_diag`` is neither a tensor nor a
            number. ValueError: a negative size in ``sample_shape``, or ``sd_diag`` neither a scalar nor
            a tree of ``mean``'s structure.

    Example:
        >>> import torch
        >>> from bayesflow.utils import diag_normal_sample
        >>> _ = torch.manual_seed(0)
        >>> draws = diag_normal_sample({"w": torch.tensor([0.0, 10.0])}, 2.0, sample_shape=(100_000,))
        >>> draws["w"].shape  # mean ≈ (0, 10) and sd ≈ 2 within 5 Monte Carlo standard errors (2/√n):
        torch.Size([100000, 2])
        >>> bool(((draws["w"].mean(0) - torch.tensor([0.0, 10.0])).abs() < 5 * 2.0 / 100_000**0.5).all())
        True
        >>> bool(((draws["w"].std(0) - 2.0).abs() < 5 * 2.0 / (2 * 100_000) ** 0.5).all())
        True
    """
    sample_shape = sample_size(sample_shape)
    mean_leaves, spec = flatten(mean)
    sds = _leaves_like(sd_diag, spec, "sd_diag", "diag_normal_sample")
    draws = []
    for mu, sd in zip(mean_leaves, sds):
        mu = torch.as_tensor(mu)
        dtype = mu.dtype if mu.is_floating_point() or mu.is_complex() else torch.get_default_dtype()
        draws.append(mu + torch.randn(sample_shape + mu.shape, dtype=dtype, device=mu.device) * sd)
    return unflatten(spec, draws)
