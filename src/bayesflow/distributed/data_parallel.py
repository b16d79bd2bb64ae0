r"""``data_parallel``: any engine transform, its gradient averaged over the ranks of a process group.

Every rank holds the same parameters and a shard :math:`B_r` of the batch. With ℓ the per-datum log
posterior (a mean over the batch, posteriors' convention) and equal shards, the mean of the shard
gradients is the full-batch gradient,

.. math::
    \nabla ℓ_B(θ) = \frac1R \sum_{r=1}^{R} \nabla ℓ_{B_r}(θ),

so a step that averages the gradients across ranks (one flat ``all_reduce``) and then advances is
the single-process step on the concatenated batch :math:`B = B_1 ∪ \dots ∪ B_R`. The noise of step t
is a function of the state's key and t alone (:mod:`bayesflow.engine.noise`): ranks started from the
same state draw the same noise, apply the identical update, and stay identical without a broadcast
(Izmailov et al. 2021 ran HMC on 512 TPUs this way). Unequal shards give the mean of shard means.

Two paths, chosen from the integrator:

* integrators that read ∇ℓ once, at the start of the step (SGLD, SGHMC, SGNHT, SGD, Adam, …):
  ``update`` computes the local gradient by autograd, all-reduces gradient and value in one buffer,
  and calls the engine's ``step`` with them;
* integrators that need a gradient mid-step or at its end (BAOAB, OBABO, BAOA): the engine is rebuilt
  on a log posterior whose value is averaged in forward and whose gradient is averaged in backward (a
  custom autograd function: one flat all-reduce per gradient evaluation, plus one scalar all-reduce
  of the value), so each of the step's gradient evaluations is the full-batch one, and every rank
  sees the same value (a refused step is refused on every rank). (With ``chains`` these need ``vectorize="batched"``: a
  collective cannot run inside ``torch.func.vmap``.)

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

import torch

from bayesflow.distributed.reduce import all_gather, all_reduce_mean, digest, world
from bayesflow.engine.gradients import autograd_gradient, vmapped_gradient
from bayesflow.engine.sde import build
from bayesflow.tree import flatten, unflatten
from bayesflow.types import Transform

__all__ = ["RankDivergence", "check_replicas", "data_parallel", "reduced_log_posterior"]


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


class _AverageGradients(torch.autograd.Function):
    """Identity on the parameter leaves whose backward averages their gradients across ranks."""

    @staticmethod
    def forward(ctx, group, *leaves):
        ctx.group = group
        return tuple(leaf.view_as(leaf) for leaf in leaves)

    @staticmethod
    def backward(ctx, *grads):
        # (unused outputs arrive as zeros: autograd materialises them, ctx.set_materialize_grads)
        return (None, *all_reduce_mean(grads, ctx.group, what="gradient all-reduce (backward)"))


class _AverageValue(torch.autograd.Function):
    """The rank mean of the value; its gradient passes through (each rank's backward is local)."""

    @staticmethod
    def forward(ctx, group, value):
        return all_reduce_mean([value.detach().clone()], group, what="log posterior all-reduce")[0]

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def reduced_log_posterior(log_posterior, group=None):
    r"""``log_posterior`` whose value and gradient are the means over ranks of the shards'.

    Forward averages the value (:math:`\frac1R\sum_r ℓ_{B_r}`); backward averages the parameter
    gradients in one flat all-reduce, so ``torch.autograd.grad`` of the returned value on every rank
    is the full-batch gradient. Every rank must evaluate it the same number of times in the same order.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        group: the process group (None: the default one).

    Returns:
        A log posterior with the same signature (aux stays the rank's own).

    Example:
        >>> import torch
        >>> from bayesflow.distributed import reduced_log_posterior
        >>> f = reduced_log_posterior(lambda p, batch: (-0.5 * (p**2).sum(), None))
        >>> p = torch.ones(2, requires_grad=True)
        >>> torch.autograd.grad(f(p, None)[0], p)[0]
        tensor([-1., -1.])
    """
    def reduced(params, batch):
        leaves, spec = flatten(params)
        value, aux = log_posterior(unflatten(spec, list(_AverageGradients.apply(group, *leaves))), batch)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = _AverageValue.apply(group, value)
        return value, aux

    return reduced


def data_parallel(transform: Transform, group=None, *, vectorize: str = "vmap",
                  check_every: int | None = None) -> Transform:
    r"""The data-parallel version of an engine transform: each rank passes its shard of the batch.

    ``update(state, batch_r)`` takes the step of the full batch :math:`∪_r B_r`: the rank's gradient
    :math:`\nabla ℓ_{B_r}` is averaged across ranks (one flat all-reduce with the value,
    :math:`\frac1R\sum_r`), then the engine steps with it — or, for integrators that evaluate ∇ℓ
    mid-step (BAOAB, OBABO), the engine runs on :func:`reduced_log_posterior`. ``step(state, grads)``
    averages the caller's gradients first. Start every rank from the same state (same params, same
    seed): the noise then agrees on every rank and so do the parameters.

    Args:
        transform: a transform built by the engine (``bayesflow.engine.build``, a preset of
            ``bayesflow.sgmcmc`` / ``bayesflow.optim``, or ``bayesflow.ensemble.lift``).
        group: the process group of the data-parallel ranks (None: the default group; without an
            initialised ``torch.distributed``, one process and the transform unchanged in effect).
        vectorize: with a K-chain transform, how its log posterior takes chains (as in ``build``).
        check_every: every this many steps, check that the parameters are bit-identical on every
            rank (:func:`check_replicas`, one all-gather of a 16-byte digest and one host sync);
            None: never.

    Returns:
        A :class:`~bayesflow.types.Transform` with the same ``init``, a reducing ``update`` and
        ``step``, and the original ``config``/``log_posterior``/``chains``.

    Raises:
        TypeError: ``transform`` is not an engine transform.
        ValueError: a bad ``check_every`` or ``vectorize``, or a mid-step integrator with vmapped chains.
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
    world(group)  # a group without torch.distributed: refused here, not at the first step
    integrator = transform.config.integrator
    single_gradient = integrator.evaluates_at_start() and not integrator.caches_gradient
    log_posterior, chains = transform.log_posterior, transform.chains

    def check(state):
        if check_every is not None:
            step = _step_of(state)
            if step % check_every == 0:
                check_replicas(state.params, group, step=step)

    def step(state, grads, inplace: bool = False, log_posterior=None):
        leaves, spec = flatten(grads)
        what = lambda: f"gradient all-reduce of step {_step_of(state)}"  # noqa: E731 (read only on failure)
        if log_posterior is not None:  # the value travels in the gradients' buffer: one all-reduce
            *leaves, log_posterior = all_reduce_mean([*leaves, torch.as_tensor(log_posterior)], group, what=what)
        else:
            leaves = all_reduce_mean(leaves, group, what=what)
        state = transform.step(state, unflatten(spec, leaves), inplace=inplace, log_posterior=log_posterior)
        check(state)
        return state

    if single_gradient:
        def update(state, batch, inplace: bool = False):
            leaves, spec = flatten(state.params)
            aux_box = [None]
            vmapped = chains is not None and vectorize == "vmap"
            gradient_fn = (vmapped_gradient if vmapped else autograd_gradient)(log_posterior, spec, batch, chains,
                                                                               aux_box)
            grads, value, _ = gradient_fn(leaves)
            return step(state, unflatten(spec, list(grads)), inplace, value), aux_box[0]

        return transform._replace(update=update, step=step)

    if chains is not None and vectorize == "vmap":
        raise ValueError(f"{integrator!r} evaluates ∇ℓ mid-step, where the gradient is averaged inside autograd, "
                         "which torch.func.vmap cannot map over; with chains, give a log posterior that takes "
                         "batched params and vectorize='batched'")
    engine = build(reduced_log_posterior(log_posterior, group), transform.config, chains=chains,
                   vectorize=vectorize)

    def update_mid_step(state, batch, inplace: bool = False):
        state, aux = engine.update(state, batch, inplace=inplace)
        check(state)
        return state, aux

    return transform._replace(init=engine.init, update=update_mid_step, step=step)
