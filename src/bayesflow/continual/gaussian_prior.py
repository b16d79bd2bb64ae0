r"""Gaussian priors made from a posterior: the log-prior functions of sequential Bayesian updating.

A Gaussian prior :math:`N(\mu, (sP)^{-1})` has the log density

.. math::
    \log p(\theta) = -\tfrac{s}{2} (\theta - \mu)^\top P (\theta - \mu)
    + \tfrac12 \log\det(sP) - \tfrac{d}{2}\log 2\pi,

with :math:`s > 0` a *strength* (EWC's :math:`\lambda`; :math:`s = 1` is exact Bayesian updating) and
:math:`P` stored in one of three forms:

* :class:`DiagGaussianPrior`: :math:`P = \mathrm{diag}(p)`, ``prec_diag`` a tree shaped like ``mean``;
* :class:`DenseGaussianPrior`: ``prec`` one ``(d, d)`` matrix over the ravelled parameters (the order of
  :func:`bayesflow.tree.ravel`, the order of the dense Laplace, EKF and VI states);
* :class:`KFACGaussianPrior`: per Linear layer :math:`P = N (G \otimes A) + \lambda I` over the row-major
  :math:`\tilde W = [W, b]`, so :math:`\Delta^\top P \Delta = N\,\mathrm{tr}(\Delta^\top G \Delta A) +
  \lambda \lVert\Delta\rVert^2`; parameters outside the Linear layers are not penalised.

Priors are callables, ``prior(params) -> tensor`` (a scalar), so they drop into a log posterior as
they are; the constant :math:`\frac12\log\det(sP) - \frac d2 \log 2\pi` is computed once, when the
prior is made. Made by :func:`bayesflow.continual.gaussian_prior` from a Laplace, EKF or VI state.

Example:
    >>> import torch
    >>> from bayesflow.continual import DiagGaussianPrior
    >>> prior = DiagGaussianPrior.of(torch.zeros(2), torch.full((2,), 4.0))
    >>> prior(torch.tensor([0.5, 0.0]))   # −½·4·0.25 + ½ log 16 − log 2π
    tensor(-0.9516)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import optree
import torch

from bayesflow.records import record
from bayesflow.tree import NONE_IS_LEAF, flatten, tree_map
from bayesflow.types import TensorTree

__all__ = ["DenseGaussianPrior", "DiagGaussianPrior", "KFACGaussianPrior"]


def _leaves(name: str, tree: TensorTree, like: list[torch.Tensor] | None = None,
            mean: TensorTree = None) -> list[torch.Tensor]:
    leaves, _ = flatten(tree)
    if like is not None:
        if len(leaves) != len(like):
            raise ValueError(f"{name} has {len(leaves)} tensors, but the prior's mean has {len(like)}")
        if mean is not None:   # by path, not by spec: a dict and an OrderedDict of the same names agree
            got, want = _paths(tree), _paths(mean)
            if got != want:
                extra, missing = [p for p in got if p not in want], [p for p in want if p not in got]
                raise ValueError(f"{name} does not have the prior's parameters: {extra} are not in the prior's "
                                 f"mean, {missing} are missing (the prior penalises each parameter against its "
                                 "own mean, so the names must agree)")
        for i, (leaf, ref) in enumerate(zip(leaves, like)):
            if not isinstance(leaf, torch.Tensor) or leaf.shape != ref.shape:
                shape = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise ValueError(f"{name}'s tensor {i} has shape {shape}, but the prior's mean has "
                                 f"{tuple(ref.shape)} there")
    return leaves


def _paths(tree: TensorTree) -> list[str]:
    paths, _, _ = optree.tree_flatten_with_path(tree, none_is_leaf=NONE_IS_LEAF, namespace="bayesflow")
    return [".".join(map(str, path)) for path in paths]


class _DiagFields(NamedTuple):
    mean: TensorTree
    prec_diag: TensorTree
    log_normalizer: torch.Tensor


@record
class DiagGaussianPrior(_DiagFields):
    r"""The prior :math:`N(\mu, \mathrm{diag}(p)^{-1})`, with :math:`p` already multiplied by the strength.

    Attributes:
        mean: :math:`\mu`, a tree of tensors.
        prec_diag: :math:`p > 0`, a tree shaped like ``mean``.
        log_normalizer: :math:`\frac12 \sum \log p - \frac d2 \log 2\pi`.

    Example:
        >>> import torch
        >>> from bayesflow.continual import DiagGaussianPrior
        >>> prior = DiagGaussianPrior.of({"w": torch.ones(3)}, {"w": torch.ones(3)})
        >>> prior({"w": torch.zeros(3)})   # −½·3 − (3/2) log 2π
        tensor(-4.2568)
    """

    __slots__ = ()

    @classmethod
    def of(cls, mean: TensorTree, prec_diag: TensorTree) -> DiagGaussianPrior:
        """The prior with this mean and precision diagonal (checked: same structure, positive, finite)."""
        mean, prec_diag = _snapshot(mean), _snapshot(prec_diag)
        means = _leaves("mean", mean)
        precs = _leaves("prec_diag", prec_diag, means, mean)
        for i, p in enumerate(precs):
            if not bool(torch.isfinite(p).all()) or bool((p <= 0).any()):
                raise ValueError(f"prec_diag's tensor {i} must be finite and positive (a Gaussian prior needs a "
                                 f"positive precision); its smallest value is {float(p.min()):.3g}")
        d = sum(m.numel() for m in means)
        log_norm = 0.5 * sum(p.log().sum() for p in precs) - 0.5 * d * math.log(2 * math.pi)
        return cls(mean, prec_diag, torch.as_tensor(log_norm).detach())

    def __call__(self, params: TensorTree) -> torch.Tensor:
        means, _ = flatten(self.mean)
        deltas = [x - m for x, m in zip(_leaves("params", params, means, self.mean), means)]
        quad = sum((p * d.square()).sum() for p, d in zip(flatten(self.prec_diag)[0], deltas))
        return self.log_normalizer - 0.5 * quad


class _DenseFields(NamedTuple):
    mean: TensorTree
    prec: torch.Tensor
    log_normalizer: torch.Tensor


@record
class DenseGaussianPrior(_DenseFields):
    r"""The prior :math:`N(\mu, P^{-1})` with a dense ``(d, d)`` precision over the ravelled parameters.

    Attributes:
        mean: :math:`\mu`, a tree of tensors.
        prec: :math:`P`, symmetric positive definite (strength included).
        log_normalizer: :math:`\frac12 \log\det P - \frac d2 \log 2\pi`.

    Example:
        >>> import torch
        >>> from bayesflow.continual import DenseGaussianPrior
        >>> prior = DenseGaussianPrior.of(torch.zeros(2), torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> prior(torch.tensor([1.0, -1.0]))   # −½·2 + ½ log 3 − log 2π
        tensor(-2.2886)
    """

    __slots__ = ()

    @classmethod
    def of(cls, mean: TensorTree, prec: torch.Tensor) -> DenseGaussianPrior:
        """The prior with this mean and dense precision (checked: shape, symmetric, positive definite)."""
        mean = _snapshot(mean)
        means = _leaves("mean", mean)
        d = sum(m.numel() for m in means)
        if not isinstance(prec, torch.Tensor) or prec.shape != (d, d):
            shape = tuple(prec.shape) if isinstance(prec, torch.Tensor) else type(prec).__name__
            raise ValueError(f"prec must be a ({d}, {d}) matrix over the {d} ravelled parameters, got {shape}")
        if not bool(torch.isfinite(prec).all()):
            raise ValueError("prec has NaN or infinite entries")
        if not torch.allclose(prec, prec.mT, rtol=1e-5, atol=1e-8 * float(prec.abs().max())):
            raise ValueError("prec must be symmetric")
        chol, info = torch.linalg.cholesky_ex(prec)
        if int(info) != 0:
            raise ValueError("prec must be positive definite (its Cholesky factorisation failed): a Gaussian prior "
                             "needs every direction constrained; add a positive prior precision")
        log_norm = chol.diagonal().log().sum() - 0.5 * d * math.log(2 * math.pi)
        return cls(mean, _snapshot(prec), log_norm.detach())

    def __call__(self, params: TensorTree) -> torch.Tensor:
        means, _ = flatten(self.mean)
        # not bayesflow.tree.ravel, which detaches: the prior must be differentiable in params
        delta = torch.cat([(x - m).reshape(-1) for x, m in zip(_leaves("params", params, means, self.mean), means)])
        delta = delta.to(self.prec.dtype)
        return self.log_normalizer - 0.5 * delta @ (self.prec @ delta)


class _KFACFields(NamedTuple):
    mean: dict[str, torch.Tensor]
    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    scale: torch.Tensor
    prior_prec: torch.Tensor
    log_normalizer: torch.Tensor


@record
class KFACGaussianPrior(_KFACFields):
    r"""Per Linear layer :math:`P = c\,(G \otimes A) + \lambda I` around ``mean`` (strength in :math:`c, \lambda`).

    Attributes:
        mean: the parameters by name; the layers' ``weight`` / ``bias`` are penalised, others are not.
        A, G: the Kronecker factors by layer name (``(in [+1], in [+1])`` and ``(out, out)``).
        scale: :math:`c` (``strength · num_data``).
        prior_prec: :math:`\lambda` (``strength · prior_prec``).
        log_normalizer: :math:`\frac12 \sum_{\text{layers}} \sum_{ij} \log(c\, g_i a_j + \lambda)
            - \frac d2 \log 2\pi` (:math:`g, a` the factors' eigenvalues, :math:`d` the penalised count).

    Example:
        >>> import torch
        >>> from bayesflow.continual import KFACGaussianPrior
        >>> mean = {"weight": torch.zeros(1, 1), "bias": torch.zeros(1)}
        >>> prior = KFACGaussianPrior.of(mean, {"": torch.eye(2)}, {"": torch.eye(1)}, scale=1.0, prior_prec=1.0)
        >>> prior({"weight": torch.ones(1, 1), "bias": torch.zeros(1)})   # −½·2 + ½·2 log 2 − log 2π
        tensor(-2.1447)
    """

    __slots__ = ()

    @classmethod
    def of(cls, mean: dict, A: dict, G: dict, scale: float, prior_prec: float) -> KFACGaussianPrior:
        """The prior from Kronecker factors (checked: layers, shapes, a positive definite result)."""
        scale = torch.as_tensor(scale, dtype=torch.float64)
        prior_prec = torch.as_tensor(prior_prec, dtype=torch.float64)
        mean, A, G = _snapshot(mean), _snapshot(A), _snapshot(G)
        if set(A) != set(G):
            raise ValueError(f"A and G must have the same layers, got {sorted(A)} and {sorted(G)}")
        log_det, count = torch.zeros((), dtype=torch.float64), 0
        for name in A:
            weight = mean.get(_key(name, "weight"))
            if weight is None:
                raise ValueError(f"mean has no {_key(name, 'weight')!r} for the layer {name!r}")
            rows, cols = weight.shape[0], A[name].shape[0]
            if G[name].shape != (rows, rows) or cols not in (weight.shape[1], weight.shape[1] + 1):
                raise ValueError(f"the factors of layer {name!r} ({tuple(A[name].shape)}, {tuple(G[name].shape)}) "
                                 f"do not fit its weight {tuple(weight.shape)}")
            eig_a = torch.linalg.eigvalsh(A[name].double()).clamp(min=0)
            eig_g = torch.linalg.eigvalsh(G[name].double()).clamp(min=0)
            eig = scale * torch.outer(eig_g, eig_a) + prior_prec
            if bool((eig <= 0).any()):
                raise ValueError(f"the precision of layer {name!r} is singular: give a positive prior_prec")
            log_det, count = log_det + eig.log().sum(), count + eig.numel()
        log_norm = 0.5 * log_det - 0.5 * count * math.log(2 * math.pi)
        dtype = next(iter(A.values())).dtype
        return cls(mean, A, G, scale.to(dtype), prior_prec.to(dtype), log_norm.to(dtype))

    def __call__(self, params: dict) -> torch.Tensor:
        quad = torch.zeros((), dtype=self.scale.dtype)
        for name, A in self.A.items():
            delta = _delta(params, self.mean, name, A.shape[0])
            quad = quad + self.scale * ((self.G[name] @ delta @ A) * delta).sum()
            quad = quad + self.prior_prec * delta.square().sum()
        return self.log_normalizer - 0.5 * quad


def _snapshot(tree: Any) -> Any:
    """Detached copies of a tree's tensors: the prior must not follow a state trained in place afterwards."""
    return tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def _key(layer: str, leaf: str) -> str:
    return f"{layer}.{leaf}" if layer else leaf


def _delta(params: dict, mean: dict, name: str, width: int) -> torch.Tensor:
    """:math:`\\tilde W - \\tilde\\mu` of one layer, ``(out, in [+ 1])``."""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict by parameter name, got {type(params).__name__}")
    keys = [_key(name, "weight")] + ([_key(name, "bias")] if width == mean[_key(name, "weight")].shape[1] + 1 else [])
    pieces = []
    for key in keys:
        if key not in params:
            raise ValueError(f"params has no {key!r} (a parameter the prior penalises)")
        if params[key].shape != mean[key].shape:
            raise ValueError(f"params[{key!r}] has shape {tuple(params[key].shape)}, the prior's mean "
                             f"{tuple(mean[key].shape)}")
        piece = params[key] - mean[key]
        pieces.append(piece if piece.ndim == 2 else piece.unsqueeze(1))
    return torch.cat(pieces, dim=1)
