r"""The posterior of a KFAC Laplace state: its record, the dense precision and matrix-normal draws.

Per Linear or Conv2d layer, with column-stacking vec of ``[W, b]`` (a Conv2d weight flattened as
``weight.reshape(C_out, -1)``, ``(C_out, C_in·kh·kw)``), the precision is
:math:`P = N (A \otimes G) + \lambda I` (:mod:`bayesflow.laplace.kfac` accumulates A and G). Draws use
the eigendecompositions :math:`A = U_A \mathrm{diag}(α) U_A^\top`, :math:`G = U_G \mathrm{diag}(γ)
U_G^\top`: :math:`μ + U_G (Z ⊙ (N γ α^\top + λ)^{-1/2}) U_A^\top` — no d×d matrix is formed (a
Conv2d draw is reshaped back to the 4-D weight).

Example:
    >>> import torch
    >>> from bayesflow.laplace import kfac
    >>> model = torch.nn.Linear(2, 3)
    >>> state = kfac.init(dict(model.named_parameters()), model, prior_prec=1.0)
    >>> kfac.sample(state, (4,), generator=torch.Generator().manual_seed(0))["weight"].shape
    torch.Size([4, 3, 2])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from bayesflow.laplace._common import ONE_DRAW
from bayesflow.laplace.sampling import _standard_normal
from bayesflow.records import record
from bayesflow.tree import flatten
from bayesflow.utils.gaussian import sample_size

__all__ = ["KFACLaplaceState", "precision_dense", "sample"]


class _KFACFields(NamedTuple):
    params: dict[str, torch.Tensor]
    A: dict[str, torch.Tensor]
    G: dict[str, torch.Tensor]
    prior_prec: torch.Tensor
    num_data: torch.Tensor
    step: torch.Tensor
    rng: torch.Tensor | None = None


@record
class KFACLaplaceState(_KFACFields):
    r"""A KFAC Laplace state: per Linear/Conv2d layer :math:`P = N (A \otimes G) + \lambda I` around ``params``.

    Attributes:
        params: :math:`\mu`, a dict of the model's parameters by name (``model.named_parameters()``).
        A: by layer name (``model.named_modules()``), :math:`A = E[\tilde a \tilde a^\top]`,
            ``(in + 1, in + 1)`` with a bias (the last row/column is the bias' ones), ``(in, in)`` without;
            ``in`` is ``C_in·kh·kw`` for a Conv2d layer (:math:`A` then averages over output positions).
        G: by layer name, :math:`G = E[g g^\top]`, ``(out, out)`` (``C_out``; a Conv2d's summed over positions).
        prior_prec: :math:`\lambda`, a 0-d tensor.
        num_data: :math:`N`, the number of data accumulated (an int64 0-d tensor).
        step: the number of batches accumulated (an int64 0-d tensor).
        rng: the noise key of ``fisher_type="mc"`` (int64, on the CPU): batch ``step``'s draws are a
            function of the key and the step alone (:mod:`bayesflow.engine.noise`).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import kfac
        >>> model = torch.nn.Linear(2, 3)
        >>> state = kfac.init(dict(model.named_parameters()), model, prior_prec=2.0)
        >>> state.A[""].shape, state.G[""].shape, state.prior_prec, state.num_data
        (torch.Size([3, 3]), torch.Size([3, 3]), tensor(2.), tensor(0))
    """

    __slots__ = ()


def _key(layer: str, leaf: str) -> str:
    return f"{layer}.{leaf}" if layer else leaf


def layer_eigen(state: KFACLaplaceState, name: str, purpose: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N γ αᵀ + λ, U_A, U_G)`` of a layer: its precision's eigenvalues in the eigenbases of the factors,
    checked positive (``purpose`` ends the error: what the precision is needed for)."""
    alpha, u_a = torch.linalg.eigh(state.A[name])
    gamma, u_g = torch.linalg.eigh(state.G[name])
    n = state.num_data.to(alpha.dtype)
    prec = n * gamma.clamp(min=0).unsqueeze(1) * alpha.clamp(min=0).unsqueeze(0) + state.prior_prec
    if not bool((prec > 0).all()) or not bool(torch.isfinite(prec).all()):
        weight = state.params[_key(name, "weight")]
        raise ValueError(f"the precision of the {_kind(weight)} layer {name!r} is not positive definite (no "
                         f"data and prior_prec 0, or a zero factor); give prior_prec > 0 {purpose}")
    return prec, u_a, u_g


def _kind(weight: torch.Tensor) -> str:
    return "Conv2d" if weight.ndim == 4 else "Linear"


def _layer_params(state: KFACLaplaceState, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = state.params[_key(name, "weight")]
    has_bias = state.A[name].shape[0] == weight[0].numel() + 1   # in (Linear) or C_in·kh·kw (Conv2d), + 1
    return weight, state.params[_key(name, "bias")] if has_bias else None


def _linear_keys(state: KFACLaplaceState) -> set[str]:
    keys = {_key(name, "weight") for name in state.A}
    keys |= {_key(name, "bias") for name in state.A if _layer_params(state, name)[1] is not None}
    return keys


def precision_dense(state: KFACLaplaceState) -> torch.Tensor:
    r"""The ``(d, d)`` precision :math:`P` of the covered layers' parameters, Kronecker products materialised.

    ``d`` counts the Linear/Conv2d layers' weights and biases, ravelled in bayesflow's tree order of the
    dict ``{name: state.params[name]}`` restricted to them (sorted names, each tensor row-major: when every
    parameter belongs to a covered layer this is the layout of :mod:`bayesflow.laplace.dense_ggn` on
    ``state.params``). Blocks of
    different layers are zero. For tests and small models only (memory :math:`O(d^2)`).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import kfac
        >>> model = torch.nn.Linear(1, 2)
        >>> state = kfac.init(dict(model.named_parameters()), model, prior_prec=3.0)
        >>> kfac.precision_dense(state)   # no data yet: the prior; order bias (2), weight (2, 1)
        tensor([[3., 0., 0., 0.],
                [0., 3., 0., 0.],
                [0., 0., 3., 0.],
                [0., 0., 0., 3.]])
    """
    keys = _linear_keys(state)
    leaves, spec = flatten({key: state.params[key] for key in keys})
    position = spec.unflatten(list(range(len(leaves))))   # key -> its leaf's place in the ravelled order
    offsets, start = {}, 0
    for key, index in sorted(position.items(), key=lambda item: item[1]):
        offsets[key] = start
        start += leaves[index].numel()
    d = start
    dtype = next(iter(state.A.values())).dtype
    device = next(iter(state.A.values())).device
    prec = torch.eye(d, dtype=dtype, device=device) * state.prior_prec.to(dtype)
    for name in state.A:
        weight, bias = _layer_params(state, name)
        out, inp = weight.shape[0], weight[0].numel()   # a Conv2d weight's row-major order is (C_out, C_in·kh·kw)
        width = state.A[name].shape[0]
        # row-major index o * width + i of W̃ = [W, b] -> position in the ravelled parameters
        rows = torch.arange(out, device=device).unsqueeze(1)
        cols = torch.arange(width, device=device).unsqueeze(0)
        index = offsets[_key(name, "weight")] + rows * inp + cols
        if bias is not None:
            index[:, inp] = offsets[_key(name, "bias")] + torch.arange(out, device=device)
        index = index.reshape(-1)
        block = state.num_data.to(dtype) * torch.kron(state.G[name], state.A[name])   # row-major: G ⊗ A
        prec[index.unsqueeze(1), index.unsqueeze(0)] += block
    return prec


def sample(state: KFACLaplaceState, sample_shape: torch.Size = ONE_DRAW,
           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    r"""Draws per layer :math:`\tilde W = \tilde\mu + U_G\,(Z \odot S)\,U_A^\top` (matrix normal).

    With :math:`A = U_A\,\mathrm{diag}(\alpha)\,U_A^\top`, :math:`G = U_G\,\mathrm{diag}(\gamma)\,U_G^\top`,
    :math:`P = (U_A \otimes U_G)\,\mathrm{diag}(N \alpha \otimes \gamma + \lambda)\,(U_A \otimes U_G)^\top`,
    so :math:`S_{oi} = (N \gamma_o \alpha_i + \lambda)^{-1/2}` and :math:`Z` standard normal give
    covariance :math:`P^{-1}`: two small eigendecompositions per layer, no ``(d, d)`` matrix. A Conv2d
    layer's ``(C_out, C_in·kh·kw)`` draw is reshaped to its 4-D weight. Other parameters stay at ``params``
    (expanded to ``sample_shape``).

    Args:
        state: a :class:`KFACLaplaceState`.
        sample_shape: the shape of the batch of draws (``torch.Size``, tuple or int); ``()`` for one draw.
        generator: the ``torch.Generator`` to draw from; torch's global one when None.

    Returns:
        A dict like ``params`` whose tensors have shape ``sample_shape + param.shape``.

    Raises:
        ValueError: a layer's precision is not positive definite (give ``prior_prec > 0``).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import kfac
        >>> model = torch.nn.Linear(2, 1)
        >>> state = kfac.init(dict(model.named_parameters()), model, prior_prec=1e4)
        >>> draws = kfac.sample(state, (2000,), generator=torch.Generator().manual_seed(0))
        >>> draws["weight"].shape, round(float(draws["bias"].std()), 2)
        (torch.Size([2000, 1, 2]), 0.01)
    """
    sample_shape = sample_size(sample_shape)
    count = math.prod(sample_shape)
    draws = {}
    for name in state.A:
        weight, bias = _layer_params(state, name)
        prec, u_a, u_g = layer_eigen(state, name, "to sample")
        z = _standard_normal(count, prec.numel(), prec.dtype, prec.device, generator).reshape(count, *prec.shape)
        delta = u_g @ (z * prec.rsqrt()) @ u_a.mT   # (count, out, width)
        mean = weight.detach().reshape(weight.shape[0], -1)   # (out, in) or (C_out, C_in·kh·kw)
        inp = mean.shape[1]
        if bias is not None:
            mean = torch.cat([mean, bias.detach().unsqueeze(1)], 1)
        full = (mean.to(delta.dtype) + delta).reshape(*sample_shape, *mean.shape)
        draws[_key(name, "weight")] = full[..., :inp].reshape(*sample_shape, *weight.shape).to(weight.dtype)
        if bias is not None:
            draws[_key(name, "bias")] = full[..., inp].to(bias.dtype)
    for key, value in state.params.items():
        if key not in draws:
            draws[key] = value.detach().expand(*sample_shape, *value.shape)
    return {key: draws[key] for key in state.params}
