r"""K copies of a feed-forward ``nn.Module`` evaluated as one batched forward, without vmap.

``torch.func.vmap`` maps any single-chain model over K stacked parameter sets, but pays functorch's
batching rules for every op (``addmm`` becomes a matmul plus scalar multiplications and an add, the
cross-entropy a gather-based decomposition): on a small MLP about 1.5× a hand-written ensemble.
For the common ``nn.Sequential`` of linear layers and elementwise activations,
:func:`batched_forward` writes that hand-written ensemble for you: each ``nn.Linear`` becomes one
``torch.baddbmm`` over the chains (bias fused), activations apply to the batched activations as
they are. Small CNNs work too: a convolution of K chains is one grouped convolution (the chains'
channels side by side, K times the groups), pooling runs on chains × batch as one batch, and
``nn.LayerNorm`` normalises as usual and applies each chain's own affine map. The gain over vmap
is on linear stacks (K = 16 MLP: ≈ 1.1× a hand-written ensemble, vmap ≈ 1.6×); where convolutions or
layer norms dominate, their batched forms cost what vmap's batching rules do (K = 16, one thread:
an MLP with layer norms runs within 10 % of vmap and 2× faster than a loop over K modules; a small
CNN runs within 10 % of both, the convolutions' arithmetic dominating).

.. math::
    h^{(k)}_{l+1} = σ\big(h^{(k)}_l W^{(k)\top}_l + b^{(k)}_l\big), \qquad k = 1, \dots, K

Use it in a log posterior for ``vectorize="batched"`` (see :func:`bayesflow.ensemble.lift`).

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from bayesflow.ensemble import batched_forward, deep_ensemble, replicate
    >>> from bayesflow.optim import sgd
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    >>> forward = batched_forward(model)
    >>> params = replicate(dict(model.named_parameters()), 16, perturbation=0.1, seed=0)
    >>> def log_posterior(params, batch):           # one value per chain
    ...     x, y = batch
    ...     logits = forward(params, x)              # (16, B, 10)
    ...     nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(16), reduction="none")
    ...     return -nll.view(16, -1).mean(1), None
    >>> ensemble = deep_ensemble(sgd.build(log_posterior, lr=1e-2), 16, vectorize="batched")
    >>> g = torch.Generator().manual_seed(0)
    >>> batch = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    >>> state, aux = ensemble.update(ensemble.init(params), batch)
    >>> state.params["0.weight"].shape
    torch.Size([16, 100, 64])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["batched_forward"]

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Softplus, nn.Identity,
               nn.Mish, nn.Hardtanh, nn.Softsign)
"""Modules that act on each entry alone, so they apply to batched activations unchanged."""

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Convolutions with zero padding: one grouped convolution runs all chains."""

POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
           nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
"""Parameter-free modules acting on each sample's channels alone: run on chains × batch as one batch."""

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def batched_forward(module: nn.Module) -> Callable:
    """``forward(params, x, per_chain=False)`` running K stacked copies of ``module`` at once.

    Args:
        module: an ``nn.Sequential`` (nested ones too) of ``nn.Linear``, convolutions
            (:data:`CONVOLUTIONS`, ``padding_mode="zeros"``), pooling (:data:`POOLING`),
            ``nn.LayerNorm``, elementwise activations (:data:`ELEMENTWISE`), ``nn.Dropout``
            (applied as the module's mode says) and ``nn.Flatten()``; or one such layer.

    Returns:
        ``forward(params, x, per_chain=False)``: ``params`` maps the module's parameter names
        (``named_parameters``) to tensors with a leading chain dimension K; ``x`` is
        ``(B, features...)`` shared by all chains, or with ``per_chain=True`` ``(K, B, features...)``,
        one batch per chain. The result is ``(K, B, ..., out)``.

    Raises:
        TypeError: at construction, naming the first layer that has no batched form (map the
            single-chain model with ``vectorize="vmap"`` then).

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import batched_forward, replicate
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> params = replicate(dict(model.named_parameters()), 5, perturbation=0.1, seed=0)  # K = 5 chains
        >>> batched_forward(model)(params, torch.randn(16, 4)).shape
        torch.Size([5, 16, 2])
    """
    layers = list(_layers(module, ""))
    first = next((prefix for layer, prefix in layers if isinstance(layer, (nn.Linear, *CONVOLUTIONS))), None)
    if first is None:
        raise TypeError("batched_forward needs at least one nn.Linear or convolution")

    def forward(params: dict, x: torch.Tensor, per_chain: bool = False) -> torch.Tensor:
        chains = params[first + "weight"].shape[0]
        if per_chain and x.shape[0] != chains:
            raise ValueError(f"per_chain=True needs x of shape (K={chains}, B, ...), got {tuple(x.shape)}")
        h = x if per_chain else x.expand(chains, *x.shape)
        for layer, prefix in layers:
            if isinstance(layer, nn.Linear):
                weight, bias = params[prefix + "weight"], params.get(prefix + "bias")
                lead = h.shape[1:-1]
                flat = h if h.ndim == 3 else h.reshape(chains, -1, h.shape[-1])
                # (W hᵀ)ᵀ rather than h Wᵀ: the weight's gradient then comes out contiguous in
                # nn.Linear's (out, in) layout (a transposed gradient would slow every update), and
                # the transposed activations feed the next layer's bmm without a copy
                transposed = flat.transpose(1, 2)
                if bias is None:
                    flat = torch.bmm(weight, transposed).transpose(1, 2)
                else:
                    flat = torch.baddbmm(bias.unsqueeze(2), weight, transposed).transpose(1, 2)
                h = flat if h.ndim == 3 else flat.reshape(chains, *lead, weight.shape[1])
            elif isinstance(layer, CONVOLUTIONS):
                h = _convolution(layer, params[prefix + "weight"], params.get(prefix + "bias"), h)
            elif isinstance(layer, POOLING):
                h = layer(h.flatten(0, 1)).unflatten(0, h.shape[:2])
            elif isinstance(layer, nn.LayerNorm):
                h = _layer_norm(layer, params.get(prefix + "weight"), params.get(prefix + "bias"), h)
            elif isinstance(layer, nn.Flatten):
                h = h.flatten(2)
            else:
                h = layer(h)
        return h

    return forward


def _convolution(layer, weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """K chains' convolutions as one grouped convolution: chain k's channels and filters are the
    k-th block of K·C input and K·O output channels, so its groups are the k-th block of K·groups."""
    chains, batch = h.shape[:2]
    merged = h.transpose(0, 1).reshape(batch, chains * h.shape[2], *h.shape[3:])
    out = _CONV[weight.ndim - 3](merged, weight.flatten(0, 1), None if bias is None else bias.flatten(),
                                 layer.stride, layer.padding, layer.dilation, layer.groups * chains)
    return out.view(batch, chains, weight.shape[1], *out.shape[2:]).transpose(0, 1)


def _layer_norm(layer, weight: torch.Tensor | None, bias: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """Normalise over the trailing ``normalized_shape`` (as nn.LayerNorm), then each chain's affine map."""
    shape = tuple(layer.normalized_shape)
    h = F.layer_norm(h, shape, None, None, layer.eps)
    lead = (1,) * (h.ndim - 1 - len(shape))  # the batch and sequence dimensions between chain and features
    if weight is not None and bias is not None:
        return torch.addcmul(bias.view(bias.shape[0], *lead, *shape), h, weight.view(weight.shape[0], *lead, *shape))
    if weight is not None:
        h = h * weight.view(weight.shape[0], *lead, *shape)
    if bias is not None:
        h = h + bias.view(bias.shape[0], *lead, *shape)
    return h


def _layers(module: nn.Module, prefix: str):
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _layers(child, f"{prefix}{name}.")
        return
    if isinstance(module, nn.Flatten):
        if module.start_dim != 1 or module.end_dim != -1:
            raise TypeError(f"{prefix.rstrip('.') or 'module'}: only Flatten(start_dim=1) has a batched form here")
        yield module, prefix
        return
    name = prefix.rstrip(".") or "module"
    if isinstance(module, CONVOLUTIONS) and module.padding_mode != "zeros":
        raise TypeError(f"{name}: only zero-padded convolutions have a batched form here "
                        f"(padding_mode={module.padding_mode!r})")
    if isinstance(module, POOLING) and getattr(module, "return_indices", False):
        raise TypeError(f"{name}: pooling that returns indices has no batched form here")
    if isinstance(module, (nn.Linear, nn.Dropout, nn.LayerNorm, *CONVOLUTIONS, *POOLING, *ELEMENTWISE)):
        yield module, prefix  # dropout masks entries independently
        return
    raise TypeError(f"{name} ({type(module).__name__}) has no batched form in "
                    "batched_forward; map the single-chain model with vectorize='vmap' instead")
