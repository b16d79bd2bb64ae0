r"""A gradient source that also returns per-sample gradients: ``torch.func.vmap(torch.func.grad(...))``.

The user's log posterior is per datum, :math:`ℓ_B(θ) = \frac1b \sum_{i \in B} ℓ_i(θ)` with
:math:`ℓ_i = \log p(y_i \mid θ) + \log p(θ)/N`, so ``log_posterior(params, batch_of_one_datum)`` is
:math:`ℓ_i` itself. :func:`per_sample_log_posterior` wraps a log posterior so that one call

* evaluates every :math:`\nabla ℓ_i` and :math:`ℓ_i` of the batch (``vmap`` over the data, and over
  the chains with K chains),
* returns the value :math:`\bar ℓ = \frac1b\sum_i ℓ_i` as a surrogate
  :math:`\bar ℓ + \langle θ - \operatorname{sg}(θ), \bar g\rangle` whose autograd gradient is the
  mean :math:`\bar g = \frac1b \sum_i \nabla ℓ_i = \nabla ℓ_B` (so the engine's backward costs one
  elementwise product, not a second pass through the model),
* hands the centred per-sample gradients :math:`G_c = [g_i - \bar g]_i` (a ``([K,] b, d)`` matrix)
  to ``sink`` for the noise estimate of :mod:`bayesflow.engine.noise_correction`.

The aux it returns is the user's aux of every datum, stacked along the batch (``[K,] b, ...``).
The batch must be a tensor or a tree of tensors sharing the leading batch size b ≥ 2 (``[K, b]``
with ``chain_batches=True``: one mini-batch per chain).

Example:
    >>> import torch
    >>> from bayesflow.engine.per_sample import per_sample_log_posterior
    >>> def log_posterior(theta, batch):          # per datum: mean over the batch
    ...     return -0.5 * ((batch - theta) ** 2).sum(-1).mean(), None
    >>> seen = []
    >>> wrapped = per_sample_log_posterior(log_posterior, seen.append)
    >>> theta = torch.zeros(2, requires_grad=True)
    >>> value, aux = wrapped(theta, torch.tensor([[1.0, 0.0], [3.0, 2.0]]))
    >>> torch.autograd.grad(value, theta)[0], seen[0]      # the mean gradient; the centred g_i
    (tensor([2., 1.]), tensor([[-1., -1.],
            [ 1.,  1.]]))
"""

from __future__ import annotations

import math

import torch

from bayesflow.tree import batch_leaves, flatten, tree_map, unflatten

__all__ = ["per_sample_log_posterior"]


def _batch_leaves(batch, chains: int | None, chain_batches: bool) -> tuple[list, object, int]:
    """The batch's tensors, its spec and the batch size b, checked."""
    leaves, spec, head = batch_leaves(batch, 2 if chain_batches else 1,
                                      "a (chains, batch) batch" if chain_batches else "the batch")
    if chain_batches and head[0] != chains:
        raise ValueError(f"chain_batches=True needs one mini-batch per chain: leading size {chains}, got {head[0]}")
    b = head[-1]
    if b < 2:
        raise ValueError(f"estimating the gradient noise needs at least 2 data per batch, got {b}")
    return leaves, spec, b


def per_sample_log_posterior(log_posterior, sink, chains: int | None = None, chain_batches: bool = False):
    """Wrap ``log_posterior`` so that each call also sends the centred per-sample gradients to ``sink``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value the MEAN over the batch
            (per datum); it must be ``torch.func`` transformable (no ``.item()``, no in-place updates
            of captured tensors).
        sink: called with the ``([K,] b, d)`` tensor of centred gradients :math:`g_i - \\bar g`
            (flattened over the params leaves in their flatten order) once per evaluation.
        chains: K when params carry a leading chain dimension (the engine's ``vectorize="batched"``):
            the wrapped function then takes all chains and returns K values.
        chain_batches: with chains, the batch leads with (K, b): chain k uses mini-batch k.

    Returns:
        ``wrapped(params, batch) -> (value, aux)``, value a differentiable surrogate equal to the mean
        of the per-datum values whose gradient is the mean per-datum gradient.

    The first call checks that the value is the mean of the per-datum values (a log posterior that
    sums over the batch would make every gradient b times too large) and raises a ValueError if not.
    """
    if chain_batches and chains is None:
        raise ValueError("chain_batches=True needs chains=K")
    checked = [False]

    def wrapped(params, batch):
        leaves, spec = flatten(params)
        data, batch_spec, b = _batch_leaves(batch, chains, chain_batches)

        def single(param_leaves, datum):
            one = unflatten(batch_spec, [t.unsqueeze(0) for t in datum])
            value, aux = log_posterior(unflatten(spec, list(param_leaves)), one)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ValueError("log_posterior's value must be a scalar tensor (per datum), got "
                                 f"{type(value).__name__} {getattr(value, 'shape', '')}")
            aux_leaves, aux_spec = flatten(aux)
            tensors = [i for i, leaf in enumerate(aux_leaves) if isinstance(leaf, torch.Tensor)]
            held[:] = [aux_spec, aux_leaves, tensors]  # the structure and the non-tensor leaves (static)
            return value.reshape(()), (value.reshape(()), tuple(aux_leaves[i] for i in tensors))

        per_datum = torch.func.vmap(torch.func.grad(single, has_aux=True), in_dims=(None, 0))
        if chains is not None:
            per_datum = torch.func.vmap(per_datum, in_dims=(0, 0 if chain_batches else None))
        detached = tuple(leaf.detach() for leaf in leaves)
        held = []
        grads, (values, aux_tensors) = per_datum(detached, data)
        aux_spec, aux_leaves, tensors = held
        aux_leaves = list(aux_leaves)
        for i, tensor in zip(tensors, aux_tensors):
            aux_leaves[i] = tensor
        aux = unflatten(aux_spec, aux_leaves)
        lead = 1 if chains is None else 2
        mean = [g.mean(lead - 1) for g in grads]
        value = values.mean(-1)
        if not checked[0]:
            _check_mean(log_posterior, params, batch, value, chains, chain_batches, b)
            checked[0] = True
        flat = torch.cat([g.reshape(*g.shape[:lead], -1) for g in grads], -1)
        sink(flat - flat.mean(lead - 1, keepdim=True))
        surrogate = value
        for leaf, m in zip(leaves, mean):
            if leaf.requires_grad:
                product = (leaf - leaf.detach()) * m
                surrogate = surrogate + (product.reshape(product.shape[0], -1).sum(-1) if chains is not None
                                         else product.sum())
        return surrogate, aux

    return wrapped


def _check_mean(log_posterior, params, batch, value, chains, chain_batches, b) -> None:
    """Raise if the batch value is not the mean of the per-datum values (chain 0 is checked)."""
    with torch.no_grad():
        params0 = tree_map(lambda t: t.detach()[0] if chains is not None else t.detach(), params)
        batch0 = tree_map(lambda t: t[0], batch) if chain_batches else batch
        whole = log_posterior(params0, batch0)
        whole = whole[0] if isinstance(whole, (tuple, list)) else whole
        if not isinstance(whole, torch.Tensor):
            raise TypeError(f"log_posterior must return (value, aux) with a tensor value, got {type(whole).__name__}")
        expected = float(value[0] if chains is not None else value)
        got = float(whole.reshape(-1)[0])
    if not math.isclose(got, expected, rel_tol=1e-3, abs_tol=1e-5):
        raise ValueError(f"log_posterior(params, batch) = {got:.6g} but the mean of its per-datum values is "
                         f"{expected:.6g} (their sum would be {b * expected:.6g}): per-sample gradient noise "
                         "needs the per-datum convention, the MEAN log likelihood over the batch + log prior / N")
