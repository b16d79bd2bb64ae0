"""What :mod:`bayesflow.laplace.predictive` computes from a state: the linearised output covariance
:math:`J \\Sigma J^\top` (diagonal, dense and KFAC states), Monte-Carlo draws of outputs and of parameters in
chunks, and the argument checks. Private: the public functions are predictive's.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch.func import vmap

from bayesflow.laplace._common import DenseLaplaceState, DiagLaplaceState, param_leaves, param_paths, ravel
from bayesflow.laplace.kfac_posterior import KFACLaplaceState, _key, _layer_params, layer_eigen
from bayesflow.laplace.kfac_posterior import sample as kfac_sample
from bayesflow.laplace.sampling import _standard_normal, _to_tree, diag_sample
from bayesflow.tree import flatten
from bayesflow.types import ForwardFn, TensorTree
from bayesflow.utils.linearized import jacobian_tree, ravel_jacobian

LaplaceState = DiagLaplaceState | DenseLaplaceState | KFACLaplaceState
_STATES = (DiagLaplaceState, DenseLaplaceState, KFACLaplaceState)
_GLM_DRAW_ELEMENTS = 1 << 22  # output draws (n · B · out numbers) held at once by the GLM Monte Carlo


def _glm_covariance(state: LaplaceState, forward: ForwardFn, batch: Any, mean: torch.Tensor) -> torch.Tensor:
    """:math:`C_b = J_b \\Sigma J_b^\\top`, ``(B, out, out)``, for each kind of state (checked before the Jacobian)."""
    if isinstance(state, KFACLaplaceState):
        layers = {name: layer_eigen(state, name, "for a predictive") for name in state.A}
        return _kfac_covariance(state, layers, jacobian_tree(forward, state.params, batch, mean), mean)
    if isinstance(state, DiagLaplaceState):
        variances = 1 / _positive_diagonal(state)
        jac = ravel_jacobian(jacobian_tree(forward, state.params, batch, mean), mean.shape)
        cov = (jac * variances.to(jac)) @ jac.mT
    else:
        factor = _dense_factor(state)
        jac = ravel_jacobian(jacobian_tree(forward, state.params, batch, mean), mean.shape).to(factor.dtype)
        size, out, d = jac.shape
        # L⁻¹ Jᵀ as one (d, B·out) solve: 20x faster than a batch of B solves broadcasting L
        v = torch.linalg.solve_triangular(factor, jac.reshape(size * out, d).mT, upper=False)
        v = v.reshape(d, size, out).permute(1, 0, 2)  # (B, d, out)
        cov = v.mT @ v
    return cov.to(mean.dtype)


def _kfac_covariance(state: KFACLaplaceState, layers: dict[str, tuple[torch.Tensor, ...]],
                     jac: dict[str, torch.Tensor], mean: torch.Tensor) -> torch.Tensor:
    size, out = mean.shape
    cov = mean.new_zeros(size, out, out)
    for name, (prec, u_a, u_g) in layers.items():
        _, bias = _layer_params(state, name)
        j = jac[_key(name, "weight")].flatten(3)  # (B, out, o, i): a conv weight's (C_in, kh, kw) flattened
        if bias is not None:
            j = torch.cat([j, jac[_key(name, "bias")].unsqueeze(-1)], dim=-1)  # J̃ over [W, b]
        rotated = u_g.mT @ j.to(prec.dtype) @ u_a * prec.rsqrt()  # U_Gᵀ J̃ U_A (N γ αᵀ + λ)^{-1/2}
        rotated = rotated.reshape(size, out, -1)
        cov += (rotated @ rotated.mT).to(cov.dtype)
    return cov


def _glm_monte_carlo(mean: torch.Tensor, cov: torch.Tensor, n_samples: int,
                     generator: torch.Generator | None) -> torch.Tensor:
    """:math:`\\frac1S \\sum_s \\mathrm{link}(m + R z_s)`, :math:`R R^\\top = C`, in chunks of draws."""
    eigenvalues, vectors = torch.linalg.eigh(cov)
    root = vectors * eigenvalues.clamp(min=0).sqrt().unsqueeze(-2)  # (B, out, out), R Rᵀ = C
    size, out = mean.shape
    step = max(1, _GLM_DRAW_ELEMENTS // max(size * out, 1))
    total = torch.zeros_like(mean)
    for start in range(0, n_samples, step):
        count = min(step, n_samples - start)
        z = _standard_normal(count, size * out, mean.dtype, mean.device, generator).reshape(count, size, out)
        total += _probabilities(mean + torch.einsum("bij,sbj->sbi", root, z)).sum(0)
    return total / n_samples


# ----------------------------------------------------------------------------------------------------
# Parameter draws


def _output_chunks(state: LaplaceState, forward: ForwardFn, batch: Any, n_samples: int,
                   generator: torch.Generator | None, chunk_size: int):
    """``forward``'s ``(count, B, out)`` outputs for successive chunks of draws from the state."""
    draw = _drawer(state)
    for start in range(0, n_samples, chunk_size):
        params = draw(min(chunk_size, n_samples - start), generator)
        yield _forward_each(forward, params, batch)


def _drawer(state: LaplaceState) -> Callable[[int, torch.Generator | None], TensorTree]:
    """``draw(count, generator)``: ``count`` draws from the state (the dense factor taken once, here)."""
    if isinstance(state, DiagLaplaceState):
        _positive_diagonal(state)
        return lambda count, generator: diag_sample(state, (count,), generator)
    if isinstance(state, KFACLaplaceState):
        return lambda count, generator: kfac_sample(state, (count,), generator)
    leaves, spec = param_leaves("mc_predictive", state.params)
    factor = _dense_factor(state)
    mean = ravel(leaves).to(factor)

    def draw(count: int, generator: torch.Generator | None) -> TensorTree:  # as dense_sample, one factor
        z = _standard_normal(count, mean.numel(), mean.dtype, mean.device, generator)
        return _to_tree(mean + torch.linalg.solve_triangular(factor, z, upper=False, left=False), leaves, spec,
                        torch.Size([count]))

    return draw


def _forward_each(forward: ForwardFn, params: TensorTree, batch: Any) -> torch.Tensor:
    """``forward(params[s], batch)[0]`` for each draw ``s`` (leading axis): vmap, or a loop if that fails."""
    try:
        return vmap(lambda p: forward(p, batch)[0])(params)
    except RuntimeError:  # forward cannot be vmapped (.item(), data-dependent control flow, ...)
        count = flatten(params)[0][0].shape[0]
        return torch.stack([forward(_index(params, s), batch)[0] for s in range(count)])


def _index(tree: TensorTree, s: int) -> TensorTree:
    leaves, spec = flatten(tree)
    return spec.unflatten([leaf[s] for leaf in leaves])


# ----------------------------------------------------------------------------------------------------
# States' covariances, checked


def _positive_diagonal(state: DiagLaplaceState) -> torch.Tensor:
    leaves, spec = param_leaves("predictive", state.params)
    try:
        prec_leaves = spec.flatten_up_to(state.prec_diag)
    except (TypeError, ValueError) as error:
        raise ValueError(f"state.prec_diag must have the structure of state.params: {error}") from None
    for path, p in zip(param_paths(state.params), prec_leaves):
        if not bool(torch.isfinite(p).all() and (p > 0).all()):
            raise ValueError(f"diagonal precisions must be finite and positive for a predictive; prec_diag{path} "
                             "is not (give init_prec_diag > 0, a prior precision, or update with data first)")
    return ravel(prec_leaves).to(leaves[0].device)


def _dense_factor(state: DenseLaplaceState) -> torch.Tensor:
    """The lower Cholesky factor :math:`L` of :math:`P = L L^\\top` (in the promoted parameter dtype)."""
    leaves, _ = param_leaves("predictive", state.params)
    d = sum(leaf.numel() for leaf in leaves)
    prec = state.prec
    if not isinstance(prec, torch.Tensor) or prec.shape != (d, d):
        shape = tuple(prec.shape) if isinstance(prec, torch.Tensor) else type(prec).__name__
        raise ValueError(f"state.prec must be a ({d}, {d}) tensor (params has {d} entries), got {shape}")
    dtype = torch.promote_types(ravel(leaves).dtype, prec.dtype)
    factor, info = torch.linalg.cholesky_ex(prec.to(dtype))
    if int(info) != 0:
        raise ValueError("state.prec must be positive definite for a predictive (its Cholesky factorisation fails "
                         f"at column {int(info)}); give init_prec > 0 (a prior precision) or add epsilon")
    return factor


# ----------------------------------------------------------------------------------------------------
# Arguments and links


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last axis, or the sigmoid when it has one entry (binary logits)."""
    return torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)


def _check_state(state: Any) -> None:
    if not isinstance(state, _STATES):
        raise TypeError("expected a Laplace state (DiagLaplaceState, DenseLaplaceState or KFACLaplaceState), "
                        f"got {type(state).__name__}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _noise(noise_var: Any, likelihood: str, mean: torch.Tensor) -> torch.Tensor:
    r"""``noise_var`` as an ``(out,)`` tensor (checked), which only regression may set."""
    if isinstance(noise_var, bool) or not isinstance(noise_var, Real | torch.Tensor):
        raise TypeError(f"noise_var must be a number or an (out,) tensor, got {type(noise_var).__name__}")
    noise = torch.as_tensor(noise_var, dtype=mean.dtype, device=mean.device).detach()
    out = mean.shape[1]
    if noise.shape not in ((), (1,), (out,)):
        raise ValueError(f"noise_var must be a number or an ({out},) tensor, got shape {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise).all()) or bool((noise < 0).any()):
        raise ValueError(f"noise_var must be finite and non-negative, got {noise_var!r}")
    if likelihood == "classification" and bool((noise != 0).any()):
        raise ValueError("noise_var is the observation noise of regression; classification takes none, "
                         f"got {noise_var!r}")
    return noise.expand(out)
