r"""Variational inference with a diagonal Normal :math:`q(θ) = N(μ, \mathrm{diag}(σ^2))`, σ = exp(s).

Minimises :math:`\mathrm{NELBO}(μ, s) = \mathbb E_q[-\log p(θ) + T\log q(θ)]` (= T·KL(q ‖ p_T) + const,
:math:`p_T \propto \exp(\log p/T)`) with a torchopt-style optimizer, using S reparameterised draws
:math:`θ = μ + σ ⊙ ε`, :math:`ε \sim N(0, I)`. With :math:`g = \nabla_θ \log p(θ)` (one autograd
backward at θ) the gradient estimates of one draw are, in closed form:

* ``stl=True``, sticking the landing (Roeder, Wu & Duvenaud 2017): the score term
  :math:`\nabla_\phi \log q_\phi(θ)|_{θ\ \mathrm{fixed}}` (zero mean) is dropped — :math:`\log q` is
  evaluated with μ and σ detached, so only its path through θ counts:

  .. math:: g_μ = -g - T\,ε/σ, \qquad g_s = g_μ ⊙ σε = -g ⊙ σε - T ε^2.

  Both vanish for every ε when q equals :math:`p_T` (then :math:`g = T\nabla\log q = -Tε/σ`): the
  estimator has zero variance at the optimum of a Gaussian target.
* ``stl=False``, the full reparameterisation gradient (:math:`\log q(θ) = -\sum s - \tfrac12|ε|^2 -
  \tfrac N2\log 2π` along the path, whose entropy gives the −T):

  .. math:: g_μ = -g, \qquad g_s = -g ⊙ σε - T.

Both are unbiased; S > 1 averages them. The reported NELBO is :math:`\frac1S\sum_s[-\log p(θ_s) +
T\log q(θ_s)]`. The noise of step t comes from the state's key and t (``state.rng``,
:mod:`bayesflow.engine.noise`), never from torch's global generator.

Example:
    >>> import torch, torchopt
    >>> from bayesflow import vi
    >>> def log_posterior(params, batch):          # N(1, 0.5²) in each coordinate
    ...     return -0.5 * (((params["w"] - 1.0) / 0.5) ** 2).sum(), None
    >>> transform = vi.diag.build(log_posterior, torchopt.adam(lr=0.1))
    >>> state = transform.init({"w": torch.zeros(2)}, seed=0)
    >>> for _ in range(300):
    ...     state, aux = transform.update(state, None)
    >>> state.params["w"].round(decimals=3), state.log_sd_diag["w"].exp().round(decimals=3)
    (tensor([1., 1.]), tensor([0.5000, 0.5000]))
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import torch

from bayesflow.engine.validation import check_bool, check_finite_params
from bayesflow.records import record
from bayesflow.tree import flatten, unflatten
from bayesflow.types import LogProbFn, Schedule, TensorTree, Transform
from bayesflow.utils import diag_normal_log_prob, is_scalar
from bayesflow.utils.gaussian import sample_size
from bayesflow.vi.nelbo import (
    check_draws,
    check_n_samples,
    check_optimizer,
    check_stl,
    check_temperature,
    current_temperature,
    finish,
    initial_key,
    log_posterior_and_gradient,
    nelbo_value,
    noise_generator,
    optimizer_init,
    optimizer_step,
    standard_normal,
    value_and_aux,
)

__all__ = ["VIDiagState", "build", "init", "nelbo", "sample", "update"]


@record
class VIDiagState(NamedTuple):
    """State of diagonal-Normal VI (posteriors' fields, plus the noise key).

    Attributes:
        params: μ, the mean of q (the tree given to ``init``).
        log_sd_diag: s = log σ, a tree like params.
        opt_state: the optimizer's state over ``[params, log_sd_diag]``.
        nelbo: the NELBO estimate of the last step (NaN before the first).
        step: number of updates taken (int64, on the CPU).
        rng: the noise key (int64, on the CPU): step t draws ε from (rng, t) alone.

    Example:
        >>> import torch, torchopt
        >>> from bayesflow import vi
        >>> state = vi.diag.init({"w": torch.zeros(3)}, torchopt.sgd(lr=0.1), init_log_sds=-1.0, seed=0)
        >>> state.log_sd_diag["w"], int(state.step), bool(state.nelbo.isnan())
        (tensor([-1., -1., -1.]), 0, True)
    """

    params: TensorTree
    log_sd_diag: TensorTree
    opt_state: Any
    nelbo: torch.Tensor
    step: torch.Tensor
    rng: torch.Tensor


def build(
    log_posterior: LogProbFn,
    optimizer: Any,
    temperature: float | Schedule = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    init_log_sds: TensorTree | float = 0.0,
) -> Transform:
    r"""Diagonal-Normal VI as a transform: find μ, σ minimising :math:`\mathrm{KL}(N(μ, \mathrm{diag}\,σ^2) \| p_T)`.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)`` with a scalar value (unnormalised).
        optimizer: a torchopt-style gradient transformation minimising the NELBO (``torchopt.adam(lr=...)``,
            ``bayesflow.optim.adam.transformation(lr=...)``).
        temperature: T ≥ 0 (a number or a schedule of the step): the target is :math:`p^{1/T}`.
        n_samples: S, Monte-Carlo draws per step.
        stl: the sticking-the-landing gradient (see the module docstring) instead of the full one.
        init_log_sds: initial s = log σ, a number or a tree like params.

    Returns:
        A :class:`~bayesflow.types.Transform`: ``init(params, seed=None)``, ``update(state, batch, inplace=False)``.

    Example:
        >>> import torch, torchopt
        >>> from bayesflow import vi
        >>> transform = vi.diag.build(lambda p, batch: (-0.5 * (p**2).sum(), None), torchopt.adam(lr=1e-2))
        >>> state = transform.init(torch.zeros(3), seed=0)
        >>> state, aux = transform.update(state, None)
        >>> int(state.step), state.nelbo.shape
        (1, torch.Size([]))
    """
    if not callable(log_posterior):
        raise TypeError(f"log_posterior must be a function (params, batch) -> (value, aux), got {log_posterior!r}")
    optimizer = check_optimizer(optimizer)
    temperature = check_temperature(temperature)
    n_samples, stl = check_n_samples(n_samples), check_stl(stl)
    return Transform(partial(init, optimizer=optimizer, init_log_sds=init_log_sds),
                     partial(update, log_posterior=log_posterior, optimizer=optimizer, temperature=temperature,
                             n_samples=n_samples, stl=stl))


def init(params: TensorTree, optimizer: Any, init_log_sds: TensorTree | float = 0.0, seed=None) -> VIDiagState:
    """The initial state: mean ``params``, log standard deviations ``init_log_sds``, ``optimizer.init``
    called on ``[params, log_sd_diag]``.

    Args:
        params: μ₀, a tensor or a tree of floating-point tensors (kept, not copied: in-place updates write
            into it).
        optimizer: the gradient transformation (its hyperparameters set when it was made).
        init_log_sds: s₀, a number (every entry) or a tree of the structure and shapes of ``params``.
        seed: the noise key's seed (an int or a ``torch.Generator``; None draws it from torch's generator).

    Raises:
        ValueError: ``init_log_sds`` does not match ``params``, holds non-finite values, or gives a σ that
            underflows to 0 or overflows in the parameters' dtype.
        ValueError: ``params`` holds NaN or ±inf (the message names the leaf).

    Example:
        >>> import torch, torchopt
        >>> from bayesflow import vi
        >>> state = vi.diag.init({"a": torch.zeros(2), "b": torch.zeros(())}, torchopt.adam(lr=1e-2),
        ...                      init_log_sds={"a": torch.tensor([0.0, -1.0]), "b": torch.tensor(-2.0)}, seed=0)
        >>> state.log_sd_diag["a"]
        tensor([ 0., -1.])
    """
    optimizer = check_optimizer(optimizer)
    leaves, spec = flatten(params)
    if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in leaves):
        raise ValueError(f"params must be a floating-point tensor or a tree of them, got {spec}")
    check_finite_params(leaves, spec)
    if is_scalar(init_log_sds) and not (isinstance(init_log_sds, torch.Tensor) and spec.num_leaves == 1
                                        and init_log_sds.shape == leaves[0].shape):
        value = float(init_log_sds)
        if not math.isfinite(value):
            raise ValueError(f"init_log_sds must be finite, got {init_log_sds!r}")
        log_sds = unflatten(spec, [torch.full_like(leaf, value) for leaf in leaves])
    else:
        given, given_spec = flatten(init_log_sds)
        if given_spec != spec or any(not isinstance(s, torch.Tensor) or s.shape != leaf.shape
                                     for s, leaf in zip(given, leaves)):
            shapes = [tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__ for s in given]
            raise ValueError(f"init_log_sds must be a number or a tree with the structure and leaf shapes of "
                             f"params ({spec}, shapes {[tuple(leaf.shape) for leaf in leaves]}); got "
                             f"{given_spec} with shapes {shapes}")
        if not all(bool(torch.isfinite(s).all()) for s in given):
            raise ValueError("init_log_sds must be finite (log standard deviations)")
        log_sds = init_log_sds
    for leaf, log_sd in zip(leaves, flatten(log_sds)[0]):
        # a σ that underflows (to 0 or a subnormal) or overflows gives 0 · inf = NaN in the first step
        sd, finfo = log_sd.to(leaf.dtype).exp(), torch.finfo(leaf.dtype)
        if not bool(((sd >= finfo.tiny) & torch.isfinite(sd)).all()):
            raise ValueError(f"init_log_sds must give σ = exp(s) normal and finite in {leaf.dtype}: s lies in "
                             f"[{float(log_sd.min()):.4g}, {float(log_sd.max()):.4g}], outside "
                             f"({math.log(finfo.tiny):.4g}, {math.log(finfo.max):.4g})")
    opt_state = optimizer_init(optimizer, [params, log_sds])
    first = leaves[0]
    return VIDiagState(params, log_sds, opt_state, torch.full((), math.nan, dtype=first.dtype, device=first.device),
                       torch.zeros((), dtype=torch.int64), initial_key(seed))


def update(
    state: VIDiagState,
    batch: Any,
    log_posterior: LogProbFn,
    optimizer: Any,
    temperature: float | Schedule = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    inplace: bool = False,
) -> tuple[VIDiagState, Any]:
    r"""One optimizer step on the NELBO estimate (gradient estimators in the module docstring).

    For one draw the gradients take one autograd backward of ``log_posterior`` at θ = μ + σ ⊙ ε and a
    few ``torch._foreach`` passes; S > 1 draws are vmapped. Memory beyond the state: θ and σ are freed
    before the optimizer runs, and for one draw :math:`g_s` is written over the noise (this thread's
    reusable buffer), so the optimizer is handed g_μ as the only new parameter-sized tensor. The
    gradient trees are valid during ``optimizer.update`` only (as torchopt's in-place updates assume):
    an optimizer must not keep references to them.

    Args:
        state: the current :class:`VIDiagState`.
        batch: passed to ``log_posterior``.
        log_posterior, optimizer, temperature, n_samples, stl: as in :func:`build`.
        inplace: write the new values into the state's tensors (and return the same state).

    Returns:
        ``(state, aux)``, aux the log posterior's auxiliary output at the draw (one per draw for S > 1).

    Example:
        >>> import torch, torchopt
        >>> from bayesflow import vi
        >>> log_posterior = lambda p, batch: (-0.5 * (p**2).sum(), None)
        >>> optimizer = torchopt.sgd(lr=1e-2)
        >>> state = vi.diag.init(torch.zeros(3), optimizer, seed=0)
        >>> again, _ = vi.diag.update(state, None, log_posterior, optimizer)
        >>> state, _ = vi.diag.update(state, None, log_posterior, optimizer, inplace=True)
        >>> torch.equal(state.params, again.params)            # a state alone determines its step
        True
    """
    check_bool(inplace, "inplace")
    temperature = current_temperature(check_temperature(temperature), state.step)
    n_samples, stl = check_n_samples(n_samples), check_stl(stl)
    with torch.no_grad():
        mean, spec = flatten(state.params)
        log_sd, sd_spec = flatten(state.log_sd_diag)
        if sd_spec != spec:
            raise ValueError(f"state.log_sd_diag has the structure {sd_spec}, state.params {spec}")
        generator = noise_generator(state.rng, state.step, mean[0].device)
        sd = torch._foreach_exp(log_sd)
        sample_shape = () if n_samples == 1 else (n_samples,)
        flat_eps, eps = standard_normal(mean, sample_shape, generator, reuse=True)
        theta = torch._foreach_addcmul(mean, eps, sd)                     # θ = μ + σ ⊙ ε
        grads, log_p, aux = log_posterior_and_gradient(log_posterior, spec, theta, batch, n_samples)
        check_draws(log_p, grads, spec, state.step)
        del theta  # dead after the backward: its memory is free again before the optimizer allocates
        value = nelbo_value(log_p, temperature, torch.stack([s.sum() for s in log_sd]).sum(), flat_eps, n_samples)
        if stl:
            torch._foreach_addcdiv_(grads, eps, sd, value=temperature)    # g + T ε/σ
        torch._foreach_neg_(grads)                                        # per-draw g_μ
        # g_s = g_μ ⊙ σ ⊙ ε (per draw) written over the noise, this thread's scratch, which nothing reads
        # after this: σ is freed before the optimizer allocates, and of the two parameter-sized
        # gradients the optimizer gets only g_μ is new memory
        torch._foreach_mul_(eps, sd)
        del sd
        torch._foreach_mul_(eps, grads)
        grad_log_sd = eps
        if n_samples > 1:
            grads = [g.mean(0) for g in grads]
            grad_log_sd = [g.mean(0) for g in grad_log_sd]
        if not stl:
            torch._foreach_sub_(grad_log_sd, temperature)
        (new_mean, new_log_sd), opt_state = optimizer_step(
            optimizer, [unflatten(spec, grads), unflatten(spec, grad_log_sd)], state.opt_state,
            [state.params, state.log_sd_diag], inplace)
        state = finish(state, inplace, value, params=new_mean, log_sd_diag=new_log_sd, opt_state=opt_state)
    return state, aux


def nelbo(
    mean: TensorTree,
    sd_diag: TensorTree,
    batch: Any,
    log_posterior: LogProbFn,
    temperature: float = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Any]:
    r"""The Monte-Carlo NELBO :math:`\frac1S\sum_s[-\log p(θ_s) + T \log q(θ_s)]`, θ_s = μ + σ ⊙ ε_s.

    Differentiable in ``mean`` and ``sd_diag`` by autograd; with ``stl`` the :math:`\log q` term sees
    μ and σ detached (its gradient is then the sticking-the-landing one, as in :func:`update`).

    Args:
        mean: μ, a tree. sd_diag: σ (not its log), a tree like ``mean`` or a number.
        batch, log_posterior: as in :func:`build`. temperature: T ≥ 0. n_samples: S.
        stl: detach μ and σ in :math:`\log q`.
        generator: where ε comes from (None: torch's global generator).

    Returns:
        ``(nelbo, aux)``: a scalar tensor and the log posterior's aux (one per draw for S > 1).

    Example:
        >>> import torch
        >>> from bayesflow import vi
        >>> from bayesflow.utils import diag_normal_log_prob
        >>> target = lambda p, batch: (diag_normal_log_prob(p, 1.0, 2.0), None)
        >>> value, _ = vi.diag.nelbo(torch.ones(4), torch.full((4,), 2.0), None, target, n_samples=10)
        >>> value.abs() < 1e-5                               # q = p: log p - log q = 0 on every draw
        tensor(True)
    """
    temperature = check_temperature(temperature)
    n_samples, stl = check_n_samples(n_samples), check_stl(stl)
    means, spec = flatten(mean)
    sds = [sd_diag] * len(means) if is_scalar(sd_diag) else flatten(sd_diag)[0]
    sample_shape = () if n_samples == 1 else (n_samples,)
    _, eps = standard_normal(means, sample_shape, generator)
    theta = unflatten(spec, [m + s * e for m, s, e in zip(means, sds, eps)])
    q_mean, q_sd = mean, sd_diag
    if stl:
        q_mean = unflatten(spec, [m.detach() for m in means])
        q_sd = unflatten(spec, [s.detach() if isinstance(s, torch.Tensor) else s for s in sds])
    log_p, aux = value_and_aux(log_posterior, theta, batch, n_samples)
    if n_samples == 1:
        log_q = diag_normal_log_prob(theta, q_mean, q_sd)
    else:
        log_q = torch.func.vmap(lambda p: diag_normal_log_prob(p, q_mean, q_sd))(theta)
    return (temperature * log_q - log_p).mean(), aux


def sample(state: VIDiagState, sample_shape: torch.Size = torch.Size([]),  # noqa: B008
           generator: torch.Generator | None = None) -> TensorTree:
    r"""Draws θ = μ + σ ⊙ ε from q: a tree like params whose leaves have shape ``sample_shape + leaf.shape``.

    Args:
        state: a :class:`VIDiagState`.
        sample_shape: the shape of the batch of draws.
        generator: where ε comes from (None: torch's global generator, as posteriors).

    Example:
        >>> import torch, torchopt
        >>> from bayesflow import vi
        >>> state = vi.diag.init({"w": torch.zeros(2, 3), "b": torch.zeros(())}, torchopt.sgd(lr=0.1), seed=0)
        >>> draws = vi.diag.sample(state, (5, 4))
        >>> draws["w"].shape, draws["b"].shape
        (torch.Size([5, 4, 2, 3]), torch.Size([5, 4]))
    """
    sample_shape = sample_size(sample_shape)
    with torch.no_grad():
        means, spec = flatten(state.params)
        _, eps = standard_normal(means, tuple(sample_shape), generator)
        sd = torch._foreach_exp(flatten(state.log_sd_diag)[0])
        draws = torch._foreach_add(torch._foreach_mul(eps, sd), means)
    return unflatten(spec, draws)
