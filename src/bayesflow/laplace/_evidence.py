"""The terms of the Laplace evidence for :mod:`bayesflow.laplace.marglik`: the likelihood curvature of a
diagonal, dense or KFAC state, its log determinant with a prior precision, and the checks of that
prior's shape (scalar, per leaf, per Linear layer). Private: the public functions are marglik's.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch

from bayesflow.laplace._common import DenseLaplaceState, DiagLaplaceState, param_leaves, param_paths
from bayesflow.laplace.kfac_posterior import KFACLaplaceState, _layer_params

LaplaceState = DiagLaplaceState | DenseLaplaceState | KFACLaplaceState


class _Evidence:
    r"""The :math:`\lambda`-free parts of one state's evidence, computed once: the squared MAP per
    coordinate, each coordinate's group (leaf, or KFAC layer), and the curvature — a diagonal (diag), the
    eigenvalues :math:`N \gamma_o \alpha_i` (KFAC) or :math:`H` with its eigenvalues (dense)."""

    def __init__(self, state: Any, init_prec: Any):
        if isinstance(state, KFACLaplaceState):
            self._init_kfac(state, init_prec)
        elif isinstance(state, (DiagLaplaceState, DenseLaplaceState)):
            leaves, self.spec = param_leaves("state.params", state.params)
            self.names = [f"params{path}" for path in param_paths(state.params)] or ["params"]
            self.shapes = [leaf.shape for leaf in leaves]
            self.kind = "diag" if isinstance(state, DiagLaplaceState) else "dense"
            curvature = self._diag_curvature(state, init_prec) if self.kind == "diag" else \
                self._dense_curvature(state, init_prec)
            self.theta = torch.cat([leaf.reshape(-1).to(curvature.dtype) for leaf in leaves])
            self.leaf_group = torch.cat([torch.full((leaf.numel(),), i, device=self.theta.device)
                                         for i, leaf in enumerate(leaves)])
        else:
            raise TypeError("state must be a DiagLaplaceState, DenseLaplaceState or KFACLaplaceState, got "
                            f"{type(state).__name__}")
        self.dtype, self.device = self.theta.dtype, self.theta.device

    def _diag_curvature(self, state: DiagLaplaceState, init_prec: Any) -> torch.Tensor:
        try:
            prec = torch.cat([leaf.reshape(-1) for leaf in self.spec.flatten_up_to(state.prec_diag)])
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"state.prec_diag must be a tree of tensors like state.params: {error}") from None
        self.curv = prec - _expand_tree("init_prec", init_prec, self, prec.dtype, prec.device, positive=False)
        _check_curvature(self.curv, prec, "H = state.prec_diag − init_prec has the entry")
        self.curv = self.curv.clamp(min=0)
        return prec

    def _dense_curvature(self, state: DenseLaplaceState, init_prec: Any) -> torch.Tensor:
        prec, d = state.prec, sum(math.prod(shape) for shape in self.shapes)
        if not isinstance(prec, torch.Tensor) or prec.shape != (d, d):
            raise ValueError(f"state.prec must be a ({d}, {d}) tensor (params has {d} entries), got "
                             f"{tuple(getattr(prec, 'shape', ()))}")
        if isinstance(init_prec, torch.Tensor) and init_prec.numel() > 1:
            if init_prec.shape != prec.shape:
                raise ValueError(f"init_prec must be a number or a {tuple(prec.shape)} tensor like state.prec, got "
                                 f"shape {tuple(init_prec.shape)}")
            hess = prec - init_prec.to(prec)
        else:
            hess = prec - _number("init_prec", init_prec, positive=False) * torch.eye(
                len(prec), dtype=prec.dtype, device=prec.device)
        if not bool(torch.isfinite(hess).all()):
            raise ValueError("state.prec must be finite")
        tolerance = _tolerance(prec)
        asymmetry = float((hess - hess.mT).abs().max())
        if asymmetry > tolerance:
            raise ValueError(f"H = state.prec − init_prec must be symmetric, but |H - Hᵀ| reaches {asymmetry:.3g}")
        self.hess = 0.5 * (hess + hess.mT)
        self.curv = torch.linalg.eigvalsh(self.hess)   # for scalar λ: log det(H + λI) = Σ log(eig + λ)
        _check_curvature(self.curv, prec, "H = state.prec − init_prec has the eigenvalue")
        self.curv = self.curv.clamp(min=0)
        return prec

    def _init_kfac(self, state: KFACLaplaceState, init_prec: Any) -> None:
        if _number("init_prec", init_prec, positive=False) != 0:
            raise ValueError("a KFAC state keeps its prior apart (state.prior_prec, ignored here): init_prec does "
                             f"not apply to it, got {init_prec!r}")
        self.kind, self.names, self.spec = "kfac", list(state.A), None
        theta, curv, group = [], [], []
        for i, name in enumerate(self.names):
            weight, bias = _layer_params(state, name)
            theta += [weight.reshape(-1)] + ([] if bias is None else [bias.reshape(-1)])
            alpha, gamma = torch.linalg.eigvalsh(state.A[name]), torch.linalg.eigvalsh(state.G[name])
            for factor, values in (("A", alpha), ("G", gamma)):
                _check_curvature(values, getattr(state, factor)[name],
                                 f"the factor {factor}[{name!r}] has the eigenvalue")
            products = state.num_data.to(alpha.dtype) * torch.outer(gamma.clamp(min=0), alpha.clamp(min=0))
            curv.append(products.reshape(-1))
            group.append(torch.full((products.numel(),), i, device=products.device))
        self.curv = torch.cat(curv)
        self.theta = torch.cat(theta).to(self.curv)
        self.leaf_group = torch.cat(group)

    # ------------------------------------------------------------------------------------------------

    def prior_vector(self, prior_prec: Any) -> tuple[torch.Tensor, bool]:
        """``prior_prec`` checked and expanded to one precision per coordinate, and whether it is one scalar."""
        if _is_number(prior_prec):
            value = _as_tensor("prior_prec", prior_prec, self.dtype, self.device)
            return value.reshape(()).expand(len(self.theta)), True
        if self.kind == "kfac":
            return _expand_layers("prior_prec", prior_prec, self)[self.leaf_group], False
        return _expand_tree("prior_prec", prior_prec, self, self.dtype, self.device, positive=True), False

    def value(self, prior: torch.Tensor, scalar: bool) -> torch.Tensor:
        r""":math:`\tfrac12 \log\det\Lambda - \tfrac12 \theta^\top\Lambda\theta - \tfrac12 \log\det(H + \Lambda)`."""
        if self.kind == "dense" and not scalar:
            factor = torch.linalg.cholesky(self.hess + torch.diag(prior))
            log_det = 2 * factor.diagonal().log().sum()
        else:   # prior is constant wherever the curvature's basis mixes coordinates (a KFAC layer; dense)
            log_det = torch.log(self.curv + prior).sum()
        return 0.5 * (prior.log().sum() - (prior * self.theta**2).sum() - log_det)

    def effective_parameters(self, prior: torch.Tensor, scalar: bool, group: torch.Tensor, count: int,
                             ) -> torch.Tensor:
        r""":math:`\gamma_g = P_g - \lambda_g \operatorname{tr}[(H + \Lambda)^{-1}]_{gg}
        = \operatorname{tr}[(H + \Lambda)^{-1} H]_{gg}` for each of the ``count`` groups (the second form:
        no cancellation when :math:`\lambda \gg H`)."""
        if self.kind == "dense" and not scalar:
            factor = torch.linalg.cholesky(self.hess + torch.diag(prior))
            diagonal = torch.cholesky_solve(self.hess, factor).diagonal()
        else:
            diagonal = self.curv / (self.curv + prior)
        return torch.zeros(count, dtype=self.dtype, device=self.device).index_add_(0, group, diagonal)


def _is_number(value: Any) -> bool:
    return (isinstance(value, Real) and not isinstance(value, bool)) or (
        isinstance(value, torch.Tensor) and value.numel() == 1)


def _number(name: str, value: Any, positive: bool) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} precision, "
                         f"got {value!r}")
    return value


def _as_tensor(name: str, value: Any, dtype: torch.dtype, device: torch.device, positive: bool = True,
               ) -> torch.Tensor:
    """``value`` as a tensor (gradients kept), checked finite and positive (or non-negative)."""
    if isinstance(value, bool) or not isinstance(value, (Real, torch.Tensor)):
        raise TypeError(f"{name} must hold numbers or tensors, got {type(value).__name__}")
    # a Python number straight to the state's dtype: through float32 it would lose digits
    tensor = value.to(dtype=dtype, device=device) if isinstance(value, torch.Tensor) else torch.tensor(
        float(value), dtype=dtype, device=device)
    bad = ~torch.isfinite(tensor) | ((tensor <= 0) if positive else (tensor < 0))
    if bool(bad.any()):
        raise ValueError(f"{name} must hold finite {'positive' if positive else 'non-negative'} precisions, "
                         f"got {tensor.detach().cpu().tolist()}")
    return tensor


def _expand_tree(name: str, value: Any, evidence: _Evidence, dtype: torch.dtype, device: torch.device,
                 positive: bool) -> torch.Tensor:
    """A number, or a tree like ``params`` whose leaves broadcast to the parameters', to one value per entry."""
    if _is_number(value):
        return _as_tensor(name, value, dtype, device, positive).reshape(()).expand(
            sum(math.prod(shape) for shape in evidence.shapes))
    try:
        given = evidence.spec.flatten_up_to(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a number or a tree with the structure of params ({evidence.spec}): "
                         f"{error}") from None
    pieces = []
    for path, shape, leaf in zip(evidence.names, evidence.shapes, given):
        tensor = _as_tensor(f"{name} at {path}", leaf, dtype, device, positive)
        try:
            pieces.append(torch.broadcast_to(tensor, shape).reshape(-1))
        except RuntimeError:
            raise ValueError(f"{name} at {path} has shape {tuple(tensor.shape)}, which does not broadcast to the "
                             f"parameter's shape {tuple(shape)}") from None
    return torch.cat(pieces)


def _expand_layers(name: str, value: Any, evidence: _Evidence) -> torch.Tensor:
    """A dict of one number per KFAC Linear layer to a ``(layers,)`` tensor in the state's layer order."""
    if not isinstance(value, dict) or set(value) != set(evidence.names):
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"{name} must be a number or a dict with one number per Linear layer, keys "
                         f"{evidence.names} (a KFAC layer's weight and bias share it), got {got}")
    values = []
    for layer in evidence.names:
        if not _is_number(value[layer]):
            raise ValueError(f"{name}[{layer!r}] must be one number (a KFAC layer has one prior precision)")
        values.append(_as_tensor(f"{name}[{layer!r}]", value[layer], evidence.dtype, evidence.device).reshape(()))
    return torch.stack(values)


def _tolerance(reference: torch.Tensor) -> float:
    scale = max(float(reference.detach().abs().max()), 1e-300) if reference.numel() else 1.0
    return 100 * max(reference.shape[0] if reference.ndim == 2 else 1, 1) * torch.finfo(reference.dtype).eps * scale


def _check_curvature(values: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    """ValueError unless ``values`` (a diagonal or eigenvalues) are finite and ≥ 0 to round-off."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{what} NaN or inf: the likelihood curvature must be finite")
    smallest = float(values.min())
    if smallest < -_tolerance(reference):
        raise ValueError(f"{what} {smallest:.6g} < 0: the evidence needs a positive semi-definite likelihood "
                         "curvature H (use a GGN or Fisher state, and pass as init_prec the prior precision the "
                         "state was built with)")
