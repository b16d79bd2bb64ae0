r"""K copies of a feed-forward ``nn.Module`` evaluated as one batched forward, without vmap.

``torch.func.vmap`` maps any single-chain model over K stacked parameter sets, but pays functorch's
batching rules for every op (``addmm`` becomes a matmul plus scalar multiplications and an add, the
cross-entropy a gather-based decomposition): on a small MLP about 1.5× a hand-written ensemble.
For the common ``nn.Sequential`` of linear layers and elementwise activations,
:func:`batched_forward` writes that hand-written ensemble for you: each ``nn.Linear`` becomes one
``torch.baddbmm`` over the chains (bias fused), activations apply to the batched activations as
they are.

.. math::
    h^{(k)}_{l+1} = σ\big(h^{(k)}_l W^{(k)\top}_l + b^{(k)}_l\big), \qquad k = 1, \dots, K

Use it in a log posterior for ``vectorize="batched"`` (see :func:`bayesflow.ensemble.lift`).

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    >>> forward = batched_forward(model)
    >>> params = replicate(dict(model.named_parameters()), 16, perturbation=0.1, seed=0)
    >>> def log_posterior(params, batch):           # one value per chain
    ...     x, y = batch
    ...     logits = forward(params, x)              # (16, B, 10)
    ...     nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(16), reduction="none")
    ...     return -nll.view(16, -1).mean(1), None
    >>> ensemble = deep_ensemble(sgd.build(log_posterior, lr=1e-2), 16, vectorize="batched")
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["batched_forward"]

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Softplus, nn.Identity,
               nn.Mish, nn.Hardtanh, nn.Softsign)
"""Modules that act on each entry alone, so they apply to batched activations unchanged."""


def batched_forward(module: nn.Module) -> Callable:
    """``forward(params, x, per_chain=False)`` running K stacked copies of ``module`` at once.

    Args:
        module: an ``nn.Sequential`` (nested ones too) of ``nn.Linear``, elementwise activations
            (:data:`ELEMENTWISE`), ``nn.Dropout`` (applied as the module's mode says) and
            ``nn.Flatten()``; or a single ``nn.Linear``.

    Returns:
        ``forward(params, x, per_chain=False)``: ``params`` maps the module's parameter names
        (``named_parameters``) to tensors with a leading chain dimension K; ``x`` is
        ``(B, features...)`` shared by all chains, or with ``per_chain=True`` ``(K, B, features...)``,
        one batch per chain. The result is ``(K, B, ..., out)``.

    Raises:
        TypeError: at construction, naming the first layer that has no batched form (map the
            single-chain model with ``vectorize="vmap"`` then).
    """
    layers = list(_layers(module, ""))
    first = next((prefix for layer, prefix in layers if isinstance(layer, nn.Linear)), None)
    if first is None:
        raise TypeError("batched_forward needs at least one nn.Linear")

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
            elif isinstance(layer, nn.Flatten):
                h = h.flatten(2)
            else:
                h = layer(h)
        return h

    return forward


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
    if isinstance(module, (nn.Linear, nn.Dropout, *ELEMENTWISE)):  # dropout masks entries independently
        yield module, prefix
        return
    raise TypeError(f"{prefix.rstrip('.') or 'module'} ({type(module).__name__}) has no batched form in "
                    "batched_forward; map the single-chain model with vectorize='vmap' instead")
