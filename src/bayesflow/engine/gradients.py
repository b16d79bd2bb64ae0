"""Where a step's gradient ∇ℓ comes from: autograd on a batch, vmap over chains, or the caller.

Each builder returns ``gradient_fn(leaves) -> (grads, value, owned)`` for one step: the ascent
gradient of the per-datum log posterior at the parameter leaves given, its value, and whether the
engine owns the gradient tensors (its own autograd output may be scaled or reused in place; a
caller's never is). ``aux_box[0]`` receives the log posterior's ``aux``.
"""

from __future__ import annotations

import torch

from bayesflow.engine.system import GradientNotAvailable
from bayesflow.engine.validation import mismatched_leaves
from bayesflow.tree import tree_map, unflatten


def autograd_gradient(log_posterior, spec, batch, chains: int | None, aux_box: list):
    """Plain autograd on fresh leaves sharing the parameters' memory (no ``torch.func`` per-call cost).

    With ``chains`` (``vectorize="batched"``) the log posterior takes all chains at once and returns
    one value per chain; the chains are independent, so the gradient of the sum is each chain's own.
    """
    def gradient_fn(leaves):
        detached = [leaf.detach().requires_grad_(True) for leaf in leaves]
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(True)  # the engine steps under no_grad; torch.enable_grad() costs µs
        try:
            value, aux = log_posterior(unflatten(spec, detached), batch)
            if chains is not None and value.shape != (chains,):
                raise ValueError(f"vectorize='batched' needs log_posterior to return {chains} values, "
                                 f"got shape {tuple(value.shape)}")
            total = value.sum() if chains is not None else value
            grads = torch.autograd.grad(total, detached, allow_unused=True)
        finally:
            torch._C._set_grad_enabled(enabled)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
        aux_box[0] = aux
        return grads, value.detach(), True

    return gradient_fn


def vmapped_gradient(log_posterior, spec, batch, chains: int, aux_box: list):
    """A single-chain log posterior mapped over the chain dimension with ``torch.func.vmap``.

    Only the forward pass is vmapped; one ordinary autograd backward runs through it: the chains are
    independent, so the gradient of the summed values is every chain's own gradient, and this avoids
    the per-call cost of functorch's grad transform (vmap of grad_and_value).
    """
    no_aux = []

    def single(leaves, batch):
        value, aux = log_posterior(unflatten(spec, list(leaves)), batch)
        if aux is None:  # vmap returns tensors only: stand in for a missing aux
            no_aux.append(True)
            aux = value.new_zeros(())
        return value, aux

    batched = torch.func.vmap(single, in_dims=(0, None))

    def gradient_fn(leaves):
        detached = [leaf.detach().requires_grad_(True) for leaf in leaves]
        with torch.enable_grad():
            value, aux = batched(tuple(detached), batch)
            if value.shape != (chains,):
                raise ValueError(f"log_posterior must return one number per chain, got shape "
                                 f"{tuple(value.shape[1:])} per chain")
            grads = torch.autograd.grad(value.sum(), detached, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
        aux_box[0] = None if no_aux else tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)
        return grads, value.detach(), True

    return gradient_fn


def caller_gradient(grad_leaves: list, log_posterior, signature: list, spec, integrator):
    """The gradient a caller computed (DDP, Lightning, custom autograd), usable once per step."""
    given = [grad_leaves]

    def gradient_fn(leaves):
        if not given:
            raise GradientNotAvailable(f"{integrator!r} needs a gradient at a second point in the step; "
                                       "use update(state, batch) instead of step(state, grads)")
        if [(g.shape, g.dtype) for g in given[0]] != signature:
            raise ValueError(mismatched_leaves(given[0], leaves, spec))
        value = None if log_posterior is None else torch.as_tensor(log_posterior).detach()
        return given.pop(), value, False

    return gradient_fn
