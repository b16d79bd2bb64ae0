r"""Control-variate gradients around a mode (SGLD-CV, Baker et al. 2019): a gradient source for every preset.

For a per-datum log posterior ℓ (a mini-batch mean of log likelihoods plus log prior / N), with
ℓ(θ) the full-data value and ℓ_B(θ) its mini-batch estimate, a mode θ̂ gives the estimate

.. math::
    \widehat{\nabla ℓ}(θ, B) = \nabla ℓ(\hat θ) + \nabla ℓ_B(θ) - \nabla ℓ_B(\hat θ),

unbiased whenever ℓ_B is (:math:`E_B \nabla ℓ_B = \nabla ℓ`), with variance
:math:`\operatorname{Var}_B[\nabla ℓ_B(θ) - \nabla ℓ_B(\hat θ)] = O(|θ - \hat θ|^2)`: zero at the mode, and
small across a posterior of width :math:`O(N^{-1/2})` around it, where plain mini-batch gradients keep
a variance of O(1). :func:`control_variate` turns ``log_posterior`` into a log posterior whose value
and gradient on batch B are those of

.. math::
    ℓ_{cv}(θ, B) = ℓ_B(θ) - \big[ℓ_B(\hat θ) - ℓ(\hat θ)\big]
                   - \big\langle \nabla ℓ_B(\hat θ) - \nabla ℓ(\hat θ),\ θ - \hat θ \big\rangle

(the bracket and the inner product's left factor computed at θ̂ and held constant), so any preset —
``sgld``, ``sghmc``, ``baoab``, ``sgnht``, an optimizer — runs on control-variate gradients unchanged:
``sgld.build(control_variate(log_posterior, mode, full_batch), lr=..., temperature=1/N)``. Its value
is an unbiased estimate of ℓ(θ) too.

**Cost, counted honestly:** one full-data gradient at θ̂ when built, then **two batch gradients per
evaluation** (at θ and at θ̂). With ``key`` (batches identified by a hashable key, e.g. their index in a
fixed partition) the mode's terms are cached per batch: one batch gradient per evaluation once every
batch was seen, at the memory of one parameter-sized tree per cached batch. :func:`find_mode` finds θ̂
with the engine at T = 0 (``steps`` gradient evaluations).

Chains: under ``lift(..., vectorize="vmap")`` the mode's gradient is taken with ``torch.func``; with a
batched log posterior (``vectorize="batched"``, params with leading chain dimensions) a mode without
them is broadcast, and each chain's own batch gives its own ∇ℓ_B(θ̂) (the log posterior should return
one value per chain).

Example (a Gaussian mean; the control-variate gradient at the mode is the full gradient, 0, on every batch):
    >>> import torch
    >>> from bayesflow.sgmcmc import sgld
    >>> from bayesflow.sgmcmc.control_variate import control_variate, find_mode
    >>> data = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    >>> def log_posterior(params, batch):   # per datum: mean log likelihood + log prior / N
    ...     return -0.5 * ((batch - params) ** 2).sum(-1).mean() - 0.5 * (params**2).sum() / 100, None
    >>> mode = find_mode(log_posterior, torch.zeros(2), [data], steps=500, lr=0.05)
    >>> cv = control_variate(log_posterior, mode, data)
    >>> params = mode.clone().requires_grad_(True)
    >>> grad, = torch.autograd.grad(cv(params, data[:10])[0], params)
    >>> bool(grad.abs().max() < 1e-3)
    True
    >>> transform = sgld.build(cv, lr=0.1, temperature=1 / 100)
    >>> state, aux = transform.update(transform.init(mode, seed=0), data[:10])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import optree
import torch

from bayesflow.tree import NONE_IS_LEAF, flatten, unflatten
from bayesflow.types import LogPosterior, TensorTree

__all__ = ["ControlVariate", "control_variate", "find_mode"]


def _paths(tree) -> list[str]:
    paths = optree.tree_paths(tree, none_is_leaf=NONE_IS_LEAF, namespace="bayesflow")
    return ["/".join(map(str, path)) or "<root>" for path in paths]


def _transformed() -> bool:
    """Whether a torch.func transform (vmap, grad) is running: autograd.grad is not allowed there."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class ControlVariate:
    """``log_posterior_cv(params, batch) -> (value, aux)``: ℓ_cv of the module docstring (built by
    :func:`control_variate`).

    Attributes:
        mode: θ̂ (a detached copy, the structure of params).
        full_value: ℓ(θ̂) on the full batch; full_gradient: ∇ℓ(θ̂) (a tree like the mode).
        mode_gradients: batch gradients evaluated at θ̂ so far (cache misses); each call also costs
            the gradient at θ that the engine takes.
        cache: ``key(batch) -> (∇ℓ_B(θ̂) - ∇ℓ(θ̂) leaves, ℓ_B(θ̂) - ℓ(θ̂))`` when ``key`` is given.
    """

    def __init__(self, log_posterior: LogPosterior, mode: TensorTree, full_batch, key: Callable | None = None):
        if not callable(log_posterior):
            raise TypeError(f"log_posterior must be callable (params, batch) -> (value, aux), got {log_posterior!r}")
        if key is not None and not callable(key):
            raise TypeError(f"key must be None or a callable batch -> hashable, got {key!r}")
        leaves, spec = flatten(mode)
        names = _paths(mode)
        if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in leaves):
            raise TypeError(f"mode must be a floating-point tensor or a tree of them, got {spec}")
        for name, leaf in zip(names, leaves):
            if not bool(torch.isfinite(leaf).all()):
                raise ValueError(f"mode leaf {name!r} has non-finite values: a mode must be finite (did the "
                                 "optimizer diverge?)")
        self.log_posterior, self.key, self.cache = log_posterior, key, {}
        self._leaves, self._spec, self._names = [leaf.detach().clone() for leaf in leaves], spec, names
        self.mode = unflatten(spec, self._leaves)
        self.mode_gradients = 0
        grads, value = self._gradient(self._leaves, full_batch)
        bad = [name for name, g in zip(names, grads) if not bool(torch.isfinite(g).all())]
        if bad or not bool(torch.isfinite(value).all()):
            raise ValueError(f"the full-data log posterior or its gradient at the mode is not finite (leaves {bad}): "
                             "θ̂ must lie where the log posterior is defined")
        self._full_grads, self.full_value = grads, value
        self.full_gradient = unflatten(spec, grads)

    def _gradient(self, leaves, batch):
        """(∇ℓ_B leaves, ℓ_B) at ``leaves`` (detached; by torch.func inside a transform)."""
        def value_of(*xs):
            value = self.log_posterior(unflatten(self._spec, list(xs)), batch)[0]
            return value.sum(), value

        if _transformed():
            grads, value = torch.func.grad(value_of, argnums=tuple(range(len(leaves))), has_aux=True)(*leaves)
            return list(grads), value.detach()
        with torch.enable_grad():
            xs = [leaf.detach().requires_grad_(True) for leaf in leaves]
            total, value = value_of(*xs)
            grads = torch.autograd.grad(total, xs, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)], value.detach()

    def _lead(self, leaves) -> tuple:
        """The leading (chain) dimensions params have beyond the mode's shapes, the same for every leaf."""
        leads = set()
        for name, p, m in zip(self._names, leaves, self._leaves):
            if not isinstance(p, torch.Tensor) or p.dtype != m.dtype:
                raise TypeError(f"params leaf {name!r} must be a {m.dtype} tensor like the mode's, got "
                                f"{getattr(p, 'dtype', type(p).__name__)}")
            if p.ndim < m.ndim or p.shape[p.ndim - m.ndim:] != m.shape:
                raise ValueError(f"params leaf {name!r} has shape {tuple(p.shape)} but the mode's is {tuple(m.shape)} "
                                 "(params may only add leading chain dimensions)")
            leads.add(tuple(p.shape[:p.ndim - m.ndim]))
        if len(leads) > 1:
            raise ValueError(f"params leaves add different leading dimensions {sorted(leads)} to the mode's shapes")
        return leads.pop()

    def _mode_terms(self, batch, lead):
        """(∇ℓ_B(θ̂) - ∇ℓ(θ̂) leaves, ℓ_B(θ̂) - ℓ(θ̂)) for this batch (and chain dimensions ``lead``)."""
        cache_key = None
        if self.key is not None:
            cache_key = (self.key(batch), lead)
            if isinstance(cache_key[0], torch.Tensor) or not isinstance(cache_key[0], Hashable):
                raise TypeError(f"key(batch) must return a hashable value such as an int (a tensor hashes by "
                                f"identity), got {type(cache_key[0]).__name__}")
            hit = self.cache.get(cache_key)
            if hit is not None:
                return hit
        leaves = [m.expand(*lead, *m.shape).clone() for m in self._leaves] if lead else self._leaves
        grads, value = self._gradient(leaves, batch)
        self.mode_gradients += 1
        full = self.full_value
        if lead and value.ndim == 0 and full.ndim == 0:  # a batched value summed over the chains
            full = full * math.prod(lead)
        terms = ([g - f for g, f in zip(grads, self._full_grads)], value - full)
        if cache_key is not None:
            self.cache[cache_key] = terms
        return terms

    def __call__(self, params, batch):
        leaves, spec = flatten(params)
        if spec != self._spec:
            raise ValueError(f"params have the structure {spec} but the mode has {self._spec}")
        lead = self._lead(leaves)
        value, aux = self.log_posterior(params, batch)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"log_posterior must return (tensor value, aux), got a {type(value).__name__} value")
        if value.ndim and tuple(value.shape) != lead:
            raise ValueError(f"log_posterior returned a value of shape {tuple(value.shape)}: expected one value "
                             f"(shape ()) or one per chain (shape {lead})")
        offsets, shift = self._mode_terms(batch, lead)
        correction = 0.0
        for p, m, c in zip(leaves, self._leaves, offsets):
            product = c * (p - m)
            correction = correction + (product.sum() if value.ndim == 0 else product.reshape(*lead, -1).sum(-1))
        return value - shift - correction, aux


def control_variate(log_posterior: LogPosterior, mode: TensorTree, full_batch, *,
                    key: Callable[[object], Hashable] | None = None) -> ControlVariate:
    r"""The control-variate log posterior ℓ_cv around ``mode`` (see the module docstring).

    .. math::
        \nabla ℓ_{cv}(θ, B) = \nabla ℓ(\hat θ) + \nabla ℓ_B(θ) - \nabla ℓ_B(\hat θ)

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        mode: θ̂, a tree like params (e.g. from :func:`find_mode`); finite.
        full_batch: the batch on which ``log_posterior`` is the full-data ℓ (one gradient, now).
        key: optional ``key(batch) -> hashable`` identifying batches (their index in a fixed partition):
            the mode's gradient on each batch is then computed once and cached (memory: one params-sized
            tree per batch). Without it every call costs two batch gradients.

    Returns:
        A :class:`ControlVariate`, callable as ``(params, batch) -> (value, aux)``: pass it to any preset's
        ``build`` in place of ``log_posterior``.

    Raises:
        TypeError: ``log_posterior`` or ``key`` not callable, a mode that is not a floating-point tree.
        ValueError: a non-finite mode, or a non-finite log posterior or gradient at the mode; at call
            time, params whose structure or shapes differ from the mode's.

    Example (linear regression: with batches keyed by their index, the mode's terms are computed once):
        >>> import torch
        >>> from bayesflow.sgmcmc.control_variate import control_variate
        >>> g = torch.Generator().manual_seed(0)
        >>> X, y = torch.randn(60, 3, generator=g), torch.randn(60, generator=g)
        >>> def log_posterior(w, batch):
        ...     index = slice(None) if batch is None else slice(20 * batch, 20 * batch + 20)
        ...     return -0.5 * ((y[index] - X[index] @ w) ** 2).mean() - 0.5 * (w**2).sum() / 60, None
        >>> cv = control_variate(log_posterior, torch.zeros(3), None, key=lambda batch: batch)
        >>> w = torch.ones(3, requires_grad=True)
        >>> grads = [torch.autograd.grad(cv(w, b)[0], w)[0] for b in (0, 1, 2, 0)]
        >>> full, = torch.autograd.grad(log_posterior(w, None)[0], w)
        >>> torch.allclose(sum(grads[:3]) / 3, full), cv.mode_gradients   # unbiased; batch 0 was cached
        (True, 3)
    """
    return ControlVariate(log_posterior, mode, full_batch, key)


def find_mode(log_posterior: LogPosterior, params: TensorTree, batches: Sequence | Callable[[int], object], *,
              steps: int = 1000, lr: float = 1e-2, optimizer=None, **options) -> TensorTree:
    r"""θ̂ ≈ argmax ℓ by the engine at T = 0: ``steps`` updates of an optimizer preset (Adam by default).

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        params: the starting point (a tree).
        batches: a sequence of batches used in turn (``[full_batch]`` for full-batch ascent), or a function
            ``step -> batch``. Mini-batches leave θ̂ within their noise of the mode: the control variate
            stays unbiased, its variance grows with |θ̂ - mode|²; end with full batches for the best θ̂.
        steps: number of updates (each one batch gradient).
        lr: the optimizer's learning rate.
        optimizer: a preset module with ``build(log_posterior, lr=..., **options)`` (default
            :mod:`bayesflow.optim.adam`).
        **options: passed to the optimizer's ``build``.

    Returns:
        The final params (detached), a tree like ``params``.

    Example:
        >>> import torch
        >>> from bayesflow.sgmcmc.control_variate import find_mode
        >>> mode = find_mode(lambda p, batch: (-0.5 * ((p - batch) ** 2).sum(), None), torch.zeros(2),
        ...                  [torch.tensor([1.0, -2.0])], steps=300, lr=0.1)
        >>> torch.allclose(mode, torch.tensor([1.0, -2.0]), atol=1e-3)
        True
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if callable(batches):
        batch_at = batches
    elif isinstance(batches, Sequence) and not isinstance(batches, (str, bytes)) and len(batches) > 0:
        def batch_at(step):
            return batches[step % len(batches)]
    else:
        raise TypeError("batches must be a non-empty sequence of batches (e.g. [full_batch]) or a function "
                        f"step -> batch, got {type(batches).__name__}")
    if optimizer is None:
        from bayesflow.optim import adam as optimizer
    transform = optimizer.build(log_posterior, lr=lr, **options)
    state = transform.init(optree.tree_map(lambda leaf: leaf.detach().clone(), params, none_is_leaf=NONE_IS_LEAF,
                                           namespace="bayesflow"))
    for step in range(steps):
        state, _ = transform.update(state, batch_at(step), inplace=True)
    leaves, spec = flatten(state.params)
    for name, leaf in zip(_paths(state.params), leaves):
        if not bool(torch.isfinite(leaf).all()):
            raise ValueError(f"find_mode diverged: leaf {name!r} is not finite after {steps} steps at lr={lr}")
    return unflatten(spec, [leaf.detach() for leaf in leaves])
