r"""``data_parallel``: any engine transform, its gradient averaged over the ranks of a process group.

Every rank holds the same parameters and a shard :math:`B_r` of the batch. With ℓ the per-datum log
posterior (a mean over the batch, posteriors' convention), the datum-weighted mean of the shard
gradients is the full-batch gradient,

.. math::
    \nabla ℓ_B(θ) = \frac{\sum_r |B_r|\, \nabla ℓ_{B_r}(θ)}{\sum_r |B_r|}
    \;=\; \frac1R \sum_{r=1}^{R} \nabla ℓ_{B_r}(θ) \quad \text{for equal shards,}

so a step that averages the gradients across ranks and then advances is the single-process step on
the concatenated batch :math:`B = B_1 ∪ \dots ∪ B_R` (give ``shard_size`` when the shards differ in
size: without it the reduction is the plain mean of the shard means). The noise of step t is a
function of the state's key and t alone (:mod:`bayesflow.engine.noise`): ranks started from the same
state draw the same noise, apply the identical update, and stay identical without a broadcast
(Izmailov et al. 2021 ran HMC on 512 TPUs this way).

Two paths, chosen from the integrator:

* integrators that read ∇ℓ once, at the start of the step (SGLD, SGHMC, SGNHT, SGD, Adam, …):
  ``update`` runs backward through the log posterior with the gradients bucketed as DDP buckets
  them (:mod:`bayesflow.distributed.buckets`): each bucket's all-reduce starts, asynchronously, as
  soon as backward has produced it, overlapping the rest of backward; the value rides in the last
  bucket; then the engine's ``step`` takes the reduced gradient;
* integrators that need a gradient mid-step or at its end (BAOAB, OBABO, BAOA): the engine is rebuilt
  on :func:`~bayesflow.distributed.reduced_log_posterior`, whose value is averaged in forward and
  whose gradient is averaged in backward (one flat all-reduce per gradient evaluation, plus one
  scalar all-reduce of the value; the engine uses each gradient as soon as autograd returns it, so
  these cannot overlap), so each of the step's gradient evaluations is the full-batch one, and every
  rank sees the same value (a refused step is refused on every rank).

Example (a world of one process — no process group — is the plain transform):
    >>> import torch
    >>> from bayesflow.distributed import data_parallel
    >>> from bayesflow.sgmcmc import sgld
    >>> def log_posterior(params, batch):
    ...     return -0.5 * ((batch - params) ** 2).sum(-1).mean(), None
    >>> transform = data_parallel(sgld.build(log_posterior, lr=1e-2, temperature=0.0), check_every=10)
    >>> state = transform.init(torch.zeros(2), seed=0)
    >>> state, aux = transform.update(state, torch.ones(8, 2))   # under torchrun: this rank's shard
    >>> state.params
    tensor([0.0100, 0.0100])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bayesflow.distributed.buckets import OverlappedReduce
from bayesflow.distributed.reduce import all_gather, all_reduce_mean, check_weight, digest, world
from bayesflow.distributed.reduced import reduced_log_posterior, shard_weight
from bayesflow.engine.gradients import autograd_gradient, vmapped_gradient
from bayesflow.engine.sde import build
from bayesflow.tree import flatten, unflatten
from bayesflow.types import Transform

__all__ = ["RankDivergence", "check_replicas", "data_parallel"]


class RankDivergence(RuntimeError):
    """The parameters of the ranks of a data-parallel run are no longer identical."""


def _step_of(state) -> int:
    step = state.step
    return int(step.reshape(-1)[0]) if isinstance(step, torch.Tensor) else int(step)


def check_replicas(params, group=None, *, step: int | None = None) -> None:
    """Raise unless ``params`` are bit-identical on every rank (an all-gather of a :func:`digest`).

    Args:
        params: a tensor or tree of tensors, the replicated parameters.
        group: the process group (None: the default one).
        step: the step named in the error.

    Raises:
        RankDivergence: naming the step and the ranks whose parameters differ from rank 0's.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import check_replicas
        >>> check_replicas({"w": torch.ones(3)}, step=0)   # one process: trivially identical
    """
    _, size = world(group)
    if size == 1:
        return
    gathered = all_gather(digest(flatten(params)[0]), group, what=f"parameter check of step {step}")
    differ = [r for r in range(size) if not torch.equal(gathered[r], gathered[0])]
    if differ:
        raise RankDivergence(f"parameters diverged across ranks at step {step}: ranks {differ} differ from rank 0 "
                             "(were the states initialised identically, with the same seed, and is every rank "
                             "stepping the same transform?)")


def data_parallel(transform: Transform, group=None, *, vectorize: str = "vmap",
                  check_every: int | None = None, shard_size: Callable[[Any], float] | None = None,
                  bucket_mb: float = 25.0) -> Transform:
    r"""The data-parallel version of an engine transform: each rank passes its shard of the batch.

    ``update(state, batch_r)`` takes the step of the full batch :math:`∪_r B_r`: the rank's gradient
    :math:`\nabla ℓ_{B_r}` is averaged across ranks (:math:`\frac1R\sum_r`, or weighted by the shard
    sizes, :math:`\sum_r |B_r| \nabla ℓ_{B_r} / \sum_r |B_r|`, with ``shard_size``) in buckets reduced
    while backward runs, then the engine steps with it — or, for integrators that evaluate ∇ℓ
    mid-step (BAOAB, OBABO), the engine runs on :func:`reduced_log_posterior`.
    ``step(state, grads, weight=None)`` averages the caller's gradients first (``weight``: the number
    of data behind this rank's gradient, for unequal shards). Start every rank from the same state
    (same params, same seed): the noise then agrees on every rank and so do the parameters.

    Args:
        transform: a transform built by the engine (``bayesflow.engine.build``, a preset of
            ``bayesflow.sgmcmc`` / ``bayesflow.optim``, ``bayesflow.ensemble.lift`` or
            :func:`~bayesflow.distributed.lift_block`).
        group: the process group of the data-parallel ranks (None: the default group; without an
            initialised ``torch.distributed``, one process and the transform unchanged in effect).
        vectorize: with a K-chain transform, how its log posterior takes chains (as in ``build``).
        check_every: every this many steps, check that the parameters are bit-identical on every
            rank (:func:`check_replicas`, one all-gather of a 16-byte digest and one host sync);
            None: never.
        shard_size: ``shard_size(batch) -> |B_r|``, the number of data in this rank's shard (e.g.
            ``lambda batch: len(batch[0])``): the reduction is then weighted by it and exact for
            shards of any sizes; None: equal shards assumed.
        bucket_mb: the size of the gradient buckets after the first (1 MiB), in MiB (DDP's
            ``bucket_cap_mb``).

    Returns:
        A :class:`~bayesflow.types.Transform` with the same ``init``, a reducing ``update`` and
        ``step``, and the original ``config``/``log_posterior``/``chains``.

    Raises:
        TypeError: ``transform`` is not an engine transform, or ``shard_size`` is not callable.
        ValueError: a bad ``check_every``, ``vectorize`` or ``bucket_mb``.
        CollectiveFailed: (from ``update``) an all-reduce failed: another rank raised, exited or timed out.
        RankDivergence: (from ``update``, with ``check_every``) the ranks' parameters differ, naming the step.

    Example:
        >>> import torch
        >>> from bayesflow.distributed import data_parallel
        >>> from bayesflow.sgmcmc import baoab
        >>> transform = data_parallel(baoab.build(lambda p, batch: (-0.5 * (p**2).sum(), None), lr=0.1))
        >>> state, aux = transform.update(transform.init(torch.zeros(3), seed=0), None)
        >>> state.params.shape
        torch.Size([3])
    """
    if not isinstance(transform, Transform) or transform.config is None or transform.log_posterior is None or (
            transform.step is None):
        raise TypeError(f"data_parallel needs a transform built by bayesflow's engine (it carries config, "
                        f"log_posterior and step), got {type(transform).__name__}")
    if vectorize not in ("vmap", "batched"):
        raise ValueError(f"unknown vectorize {vectorize!r}; expected 'vmap' or 'batched'")
    if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                                    or check_every < 1):
        raise ValueError(f"check_every must be a positive number of steps or None, got {check_every!r}")
    if shard_size is not None and not callable(shard_size):
        raise TypeError(f"shard_size must be a function batch -> number of data, or None; got {shard_size!r}")
    if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) or not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be a positive number of MiB, got {bucket_mb!r}")
    world(group)  # a group without torch.distributed: refused here, not at the first step
    integrator = transform.config.integrator
    single_gradient = integrator.evaluates_at_start() and not integrator.caches_gradient
    log_posterior, chains = transform.log_posterior, transform.chains

    def check(state):
        if check_every is not None:
            step = _step_of(state)
            if step % check_every == 0:
                check_replicas(state.params, group, step=step)

    def step(state, grads, inplace: bool = False, log_posterior=None, weight=None):
        leaves, spec = flatten(grads)
        weight = check_weight(weight)
        what = lambda: f"gradient all-reduce of step {_step_of(state)}"  # noqa: E731 (read only on failure)
        if log_posterior is not None:  # the value travels in the gradients' buffer: one all-reduce
            *leaves, log_posterior = all_reduce_mean([*leaves, torch.as_tensor(log_posterior)], group, what=what,
                                                     weight=weight)
        else:
            leaves = all_reduce_mean(leaves, group, what=what, weight=weight)
        state = transform.step(state, unflatten(spec, leaves), inplace=inplace, log_posterior=log_posterior)
        check(state)
        return state

    if single_gradient:
        reducer = OverlappedReduce(group, int(bucket_mb * (1 << 20)))
        reducing = reducer.wrap(log_posterior)
        vmapped = chains is not None and vectorize == "vmap"

        def update(state, batch, inplace: bool = False):
            weight = shard_weight(shard_size, batch)
            if world(group)[1] == 1:
                state, aux = transform.update(state, batch, inplace=inplace)
                check(state)
                return state, aux
            leaves, spec = flatten(state.params)
            aux_box = [None]
            reducer.begin(leaves, weight)
            gradient_fn = (vmapped_gradient if vmapped else autograd_gradient)(reducing, spec, batch, chains,
                                                                               aux_box)
            gradient_fn(leaves)  # the local gradients; the reduced ones are in the reducer's buckets
            grads, value = reducer.finish(lambda: f"gradient all-reduce of step {_step_of(state)}")
            state = transform.step(state, unflatten(spec, grads), inplace=inplace, log_posterior=value)
            check(state)
            return state, aux_box[0]

        return transform._replace(update=update, step=step)

    engine = build(reduced_log_posterior(log_posterior, group, shard_size=shard_size), transform.config,
                   chains=chains, vectorize=vectorize)

    def update_mid_step(state, batch, inplace: bool = False):
        state, aux = engine.update(state, batch, inplace=inplace)
        check(state)
        return state, aux

    # (the transform's own init: the same config makes the same state, and a wrapper's init — the seeds
    # and rows of lift_block — is kept)
    return transform._replace(update=update_mid_step, step=step)
