r"""Variational inference with a full-covariance Normal :math:`q(θ) = N(μ, LL^\top)`, L lower triangular.

The parameters are the mean μ (the params tree; d entries in all, in ``tree_ravel`` order) and the
d(d+1)/2 entries of L's lower triangle, row by row (``L_factor``, :func:`bayesflow.utils.L_to_flat`).
The NELBO :math:`\mathbb E_q[-\log p(θ) + T\log q(θ)]` is estimated with draws θ = μ + Lε,
ε ~ N(0, I). With :math:`g = \nabla_θ\log p(θ)` (one autograd backward) the gradient estimates of one
draw are, in closed form:

* ``stl=True``, sticking the landing (Roeder, Wu & Duvenaud 2017): :math:`\log q` is evaluated with
  **both** μ and L detached (posteriors 0.1.3 detaches L only: its ``mean_flat.detach()`` result is
  discarded, so its STL gradient keeps the mean's score term), leaving the path term
  :math:`\nabla_θ\log q = -Σ^{-1}(θ-μ) = -L^{-\top}ε`:

  .. math:: v = -g - T L^{-\top}ε, \qquad g_μ = v, \qquad g_L = \mathrm{tril}(v ε^\top).

  Zero for every ε when q equals :math:`p_T` (then :math:`g = -T L^{-\top}ε`).
* ``stl=False``, the full reparameterisation gradient (:math:`\log q(θ) = -\sum_i\log|L_{ii}| -
  \tfrac12|ε|^2 - \tfrac d2\log 2π` along the path):

  .. math:: g_μ = -g, \qquad g_L = \mathrm{tril}(-g ε^\top) - T\,\mathrm{diag}(1/L_{ii}).

S > 1 draws average them (the log posterior is vmapped). The noise of step t comes from the state's
key and t (``state.rng``), never from torch's global generator. Memory and time are O(d²) per step.

Example:
    >>> import torch, torchopt
    >>> from bayesflow import vi
    >>> cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]])
    >>> target = torch.distributions.MultivariateNormal(torch.tensor([1.0, -1.0]), cov)
    >>> transform = vi.dense.build(lambda p, batch: (target.log_prob(p), None), torchopt.adam(lr=0.05))
    >>> state = transform.init(torch.zeros(2), seed=0)
    >>> for _ in range(500):
    ...     state, _ = transform.update(state, None)
    >>> from bayesflow.utils import L_from_flat
    >>> L = L_from_flat(state.L_factor)
    >>> state.params.round(decimals=3), (L @ L.T).round(decimals=3)
    (tensor([ 1., -1.]), tensor([[1.0000, 0.8000],
            [0.8000, 1.0000]]))
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
from bayesflow.utils import L_from_flat, L_to_flat, is_scalar
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

__all__ = ["VIDenseState", "build", "init", "nelbo", "sample", "update"]


@record
class VIDenseState(NamedTuple):
    """State of dense-Normal VI (posteriors' fields, plus the noise key).

    Attributes:
        params: μ, the mean of q (the tree given to ``init``).
        L_factor: the d(d+1)/2 lower-triangular entries of L, row by row (Σ = LLᵀ).
        opt_state: the optimizer's state over ``[params, L_factor]``.
        nelbo: the NELBO estimate of the last step (NaN before the first).
        step: number of updates taken (int64, on the CPU).
        rng: the noise key (int64, on the CPU): step t draws ε from (rng, t) alone.

    Example:
        >>> import torch, torchopt
        >>> from bayesflow import vi
        >>> state = vi.dense.init(torch.zeros(3), torchopt.sgd(lr=0.1), init_L=0.5, seed=0)
        >>> state.L_factor
        tensor([0.5000, 0.0000, 0.5000, 0.0000, 0.0000, 0.5000])
    """

    params: TensorTree
    L_factor: torch.Tensor
    opt_state: Any
    nelbo: torch.Tensor
    step: torch.Tensor
    rng: torch.Tensor


def _ravel(leaves: list, sample_shape: tuple = ()) -> torch.Tensor:
    """The leaves as one vector (``(*sample_shape, d)`` when they carry a leading sample shape)."""
    return torch.cat([leaf.reshape((*sample_shape, -1)) for leaf in leaves], dim=-1)


def _unravel(flat: torch.Tensor, like: list, sample_shape: tuple = ()) -> list:
    """Inverse of :func:`_ravel`: pieces of ``flat`` shaped ``sample_shape + leaf.shape``, in ``like``'s dtypes."""
    parts = flat.split([leaf.numel() for leaf in like], dim=-1)
    return [part.reshape((*sample_shape, *leaf.shape)).to(leaf.dtype) for part, leaf in zip(parts, like)]


def build(
    log_posterior: LogProbFn,
    optimizer: Any,
    temperature: float | Schedule = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    init_L: torch.Tensor | float = 1.0,
) -> Transform:
    r"""Dense-Normal VI as a transform: find μ, L minimising :math:`\mathrm{KL}(N(μ, LL^\top) \| p_T)`.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)`` with a scalar value (unnormalised).
        optimizer: a torchopt-style gradient transformation minimising the NELBO (``torchopt.adam(lr=...)``,
            ``bayesflow.optim.adam.transformation(lr=...)``).
        temperature: T ≥ 0 (a number or a schedule of the step): the target is :math:`p^{1/T}`.
        n_samples: S, Monte-Carlo draws per step.
        stl: the sticking-the-landing gradient (see the module docstring) instead of the full one.
        init_L: the initial L: a number c > 0 (L = c·I) or a (d, d) lower-triangular matrix with a
            positive diagonal (``torch.linalg.cholesky(Σ₀)``).

    Returns:
        A :class:`~bayesflow.types.Transform`: ``init(params, seed=None)``, ``update(state, batch, inplace=False)``.

    Example:
        >>> import torch, torchopt
        >>> from bayesflow import vi
        >>> transform = vi.dense.build(lambda p, batch: (-0.5 * (p**2).sum(), None), torchopt.adam(lr=1e-2))
        >>> state, aux = transform.update(transform.init(torch.zeros(3), seed=0), None)
        >>> state.L_factor.shape
        torch.Size([6])
    """
    if not callable(log_posterior):
        raise TypeError(f"log_posterior must be a function (params, batch) -> (value, aux), got {log_posterior!r}")
    optimizer = check_optimizer(optimizer)
    temperature = check_temperature(temperature)
    n_samples, stl = check_n_samples(n_samples), check_stl(stl)
    return Transform(partial(init, optimizer=optimizer, init_L=init_L),
                     partial(update, log_posterior=log_posterior, optimizer=optimizer, temperature=temperature,
                             n_samples=n_samples, stl=stl))


def _initial_L(init_L, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``init_L`` checked: a positive number (times I) or a (d, d) lower-triangular matrix with a positive
    diagonal, so that Σ = LLᵀ is positive definite."""
    if is_scalar(init_L) and not (isinstance(init_L, torch.Tensor) and init_L.ndim == 2):
        value = float(init_L)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"init_L as a number c gives L = c·I and must be finite and > 0, got {init_L!r}")
        return torch.eye(d, dtype=dtype, device=device) * value
    if not isinstance(init_L, torch.Tensor) or not init_L.is_floating_point():
        raise TypeError(f"init_L must be a number or a floating-point (d, d) tensor, got {type(init_L).__name__}")
    if init_L.shape != (d, d):
        raise ValueError(f"init_L must be a ({d}, {d}) lower-triangular matrix for the d = {d} entries of params, "
                         f"got shape {tuple(init_L.shape)}")
    L = init_L.detach()
    if not bool(torch.isfinite(L).all()):
        raise ValueError("init_L holds non-finite values")
    if bool(torch.triu(L, diagonal=1).ne(0).any()):
        raise ValueError("init_L must be lower triangular (the Cholesky factor L of Σ₀ = L Lᵀ), but it has non-zero "
                         "entries above the diagonal; for a covariance matrix pass torch.linalg.cholesky(cov)")
    if not bool((torch.diagonal(L) > 0).all()):
        raise ValueError("init_L must have a positive diagonal (so that Σ₀ = L Lᵀ is positive definite), got "
                         f"diagonal {torch.diagonal(L).tolist()}")
    return L.to(dtype=dtype, device=device)


def init(params: TensorTree, optimizer: Any, init_L: torch.Tensor | float = 1.0, seed=None) -> VIDenseState:
    """The initial state: mean ``params``, L = ``init_L``, ``optimizer.init`` called on ``[params, L_factor]``.

    Args:
        params: μ₀, a tensor or a tree of floating-point tensors (kept, not copied).
        optimizer: the gradient transformation.
        init_L: a number c > 0 (L = c·I) or a (d, d) lower-triangular matrix with a positive diagonal.
        seed: the noise key's seed (an int or a ``torch.Generator``; None draws it from torch's generator).

    Raises:
        ValueError: ``init_L`` has the wrong shape, is not lower triangular, or its diagonal is not positive.
        ValueError: ``params`` holds NaN or ±inf (the message names the leaf).

    Example:
        >>> import torch, torchopt
        >>> from bayesflow import vi
        >>> L0 = torch.linalg.cholesky(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> state = vi.dense.init({"a": torch.zeros(()), "b": torch.zeros(1)}, torchopt.sgd(lr=0.1), L0, seed=0)
        >>> from bayesflow.utils import L_from_flat
        >>> torch.allclose(L_from_flat(state.L_factor), L0)
        True
    """
    optimizer = check_optimizer(optimizer)
    leaves, spec = flatten(params)
    if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in leaves):
        raise ValueError(f"params must be a floating-point tensor or a tree of them, got {spec}")
    check_finite_params(leaves, spec)
    dtypes = sorted({str(leaf.dtype) for leaf in leaves})
    if len(dtypes) > 1:  # μ is one flat vector and L one matrix over all leaves: one dtype
        raise ValueError(f"params have several dtypes {dtypes}; dense VI's covariance spans every leaf, so cast "
                         "them to one")
    first = leaves[0]
    d = sum(leaf.numel() for leaf in leaves)
    L_factor = L_to_flat(_initial_L(init_L, d, first.dtype, first.device))
    opt_state = optimizer_init(optimizer, [params, L_factor])
    return VIDenseState(params, L_factor, opt_state, torch.full((), math.nan, dtype=first.dtype, device=first.device),
                        torch.zeros((), dtype=torch.int64), initial_key(seed))


def update(
    state: VIDenseState,
    batch: Any,
    log_posterior: LogProbFn,
    optimizer: Any,
    temperature: float | Schedule = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    inplace: bool = False,
) -> tuple[VIDenseState, Any]:
    r"""One optimizer step on the NELBO estimate (gradient estimators in the module docstring).

    Args:
        state: the current :class:`VIDenseState`.
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
        >>> state = vi.dense.init(torch.zeros(2), optimizer, seed=0)
        >>> state, aux = vi.dense.update(state, None, log_posterior, optimizer, n_samples=4)
        >>> int(state.step)
        1
    """
    check_bool(inplace, "inplace")
    temperature = current_temperature(check_temperature(temperature), state.step)
    n_samples, stl = check_n_samples(n_samples), check_stl(stl)
    with torch.no_grad():
        mean, spec = flatten(state.params)
        mu = _ravel(mean)
        d = mu.numel()
        L = L_from_flat(state.L_factor)
        if L.shape[0] != d:
            raise ValueError(f"state.L_factor describes a {L.shape[0]}-dimensional L, params have {d} entries")
        sample_shape = () if n_samples == 1 else (n_samples,)
        flat_eps, (eps,) = standard_normal([mu], sample_shape, noise_generator(state.rng, state.step, mu.device),
                                         reuse=True)
        theta = torch.addmv(mu, L, eps) if n_samples == 1 else torch.addmm(mu, eps, L.T)   # μ + Lε
        grads, log_p, aux = log_posterior_and_gradient(
            log_posterior, spec, _unravel(theta, mean, sample_shape), batch, n_samples)
        check_draws(log_p, grads, spec, state.step)
        v = _ravel(grads, sample_shape).to(mu.dtype).neg_()                               # -g
        if stl:                                                                            # - T L^{-T} ε
            solved = torch.linalg.solve_triangular(L.T, eps.reshape(-1, d).T, upper=True)
            v.sub_(solved.T.reshape(v.shape), alpha=temperature)
        if n_samples == 1:
            grad_mu, grad_L = v, torch.outer(v, eps)
        else:
            grad_mu, grad_L = v.mean(0), (v.T @ eps).div_(n_samples)
        grad_L = L_to_flat(grad_L)
        diagonal = torch.diagonal(L)
        if not stl:
            index = torch.arange(d, device=mu.device)
            grad_L[index * (index + 3) // 2] -= temperature / diagonal
        value = nelbo_value(log_p, temperature, diagonal.abs().log().sum(), flat_eps, n_samples)
        (new_mean, new_L), opt_state = optimizer_step(
            optimizer, [unflatten(spec, _unravel(grad_mu, mean)), grad_L], state.opt_state,
            [state.params, state.L_factor], inplace)
        state = finish(state, inplace, value, params=new_mean, L_factor=new_L, opt_state=opt_state)
    return state, aux


def nelbo(
    mean: TensorTree,
    L_factor: torch.Tensor,
    batch: Any,
    log_posterior: LogProbFn,
    temperature: float = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, Any]:
    r"""The Monte-Carlo NELBO :math:`\frac1S\sum_s[-\log p(θ_s) + T \log q(θ_s)]`, θ_s = μ + Lε_s.

    Differentiable in ``mean`` and ``L_factor`` by autograd; with ``stl`` the :math:`\log q` term sees μ
    and L detached (its gradient is then the sticking-the-landing one, as in :func:`update`).

    Args:
        mean: μ, a tree. L_factor: the flat lower triangle of L (:func:`bayesflow.utils.L_to_flat`).
        batch, log_posterior: as in :func:`build`. temperature: T ≥ 0. n_samples: S.
        stl: detach μ and L in :math:`\log q`.
        generator: where ε comes from (None: torch's global generator).

    Returns:
        ``(nelbo, aux)``: a scalar tensor and the log posterior's aux (one per draw for S > 1).

    Example:
        >>> import torch
        >>> from bayesflow import vi
        >>> L = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
        >>> target = torch.distributions.MultivariateNormal(torch.zeros(2), scale_tril=L)
        >>> from bayesflow.utils import L_to_flat
        >>> value, _ = vi.dense.nelbo(torch.zeros(2), L_to_flat(L), None,
        ...                           lambda p, batch: (target.log_prob(p), None), n_samples=10)
        >>> value.abs() < 1e-5                               # q = p: log p - log q = 0 on every draw
        tensor(True)
    """
    temperature = check_temperature(temperature)
    n_samples, stl = check_n_samples(n_samples), check_stl(stl)
    means, spec = flatten(mean)
    mu = _ravel(means)
    L = L_from_flat(L_factor)
    sample_shape = () if n_samples == 1 else (n_samples,)
    _, (eps,) = standard_normal([mu], sample_shape, generator)
    theta_flat = mu + eps @ L.T
    q_mu, q_L = (mu.detach(), L.detach()) if stl else (mu, L)
    # the same Σ with a positive diagonal (columns times the signs of L's diagonal), as scale_tril requires
    q = torch.distributions.MultivariateNormal(q_mu, scale_tril=q_L * torch.sign(torch.diagonal(q_L)),
                                               validate_args=False)
    log_q = q.log_prob(theta_flat)
    theta = unflatten(spec, _unravel(theta_flat, means, sample_shape))
    log_p, aux = value_and_aux(log_posterior, theta, batch, n_samples)
    return (temperature * log_q - log_p).mean(), aux


def sample(state: VIDenseState, sample_shape: torch.Size = torch.Size([]),  # noqa: B008
           generator: torch.Generator | None = None) -> TensorTree:
    r"""Draws θ = μ + Lε from q: a tree like params whose leaves have shape ``sample_shape + leaf.shape``.

    Args:
        state: a :class:`VIDenseState`.
        sample_shape: the shape of the batch of draws.
        generator: where ε comes from (None: torch's global generator, as posteriors).

    Example:
        >>> import torch, torchopt
        >>> from bayesflow import vi
        >>> state = vi.dense.init({"w": torch.zeros(2, 3), "b": torch.zeros(())}, torchopt.sgd(lr=0.1), seed=0)
        >>> draws = vi.dense.sample(state, (5,))
        >>> draws["w"].shape, draws["b"].shape
        (torch.Size([5, 2, 3]), torch.Size([5]))
    """
    sample_shape = tuple(sample_size(sample_shape))
    with torch.no_grad():
        means, spec = flatten(state.params)
        mu = _ravel(means)
        _, (eps,) = standard_normal([mu], sample_shape, generator)
        theta = mu + eps @ L_from_flat(state.L_factor).T
    return unflatten(spec, _unravel(theta, means, sample_shape))
