r"""Laplace on a subset of the parameters (last-layer Laplace), the rest held fixed at their values.

Split the parameters as :math:`\theta = (\theta_S, \theta_F)`: the selected leaves :math:`S` and the fixed
ones :math:`F`. A subset Laplace approximation is the Laplace approximation of the conditional posterior
:math:`p(\theta_S \mid \theta_F = \hat\theta_F, \mathcal D)`,

.. math::
    \theta_S \sim N(\mu_S, P_{SS}^{-1}), \qquad \theta_F = \hat\theta_F,

with :math:`P_{SS}` any of the curvatures of :mod:`bayesflow.laplace` taken with respect to
:math:`\theta_S` alone: exactly the :math:`S \times S` block of the full curvature (empirical Fisher,
GGN, Hessian or their diagonals), computed without the rest of it. For a dense curvature the state
holds a :math:`k \times k` matrix, :math:`k = |S|` (the last layer of a large network: a few thousand
numbers squared, not millions). Daxberger et al. (2021), *Laplace Redux*, show the last layer often
suffices; Kristiadi et al. (2020) why it fixes overconfidence of ReLU networks.

The *sub-tree* of a selection has the structure of the parameters with an empty tensor (no entries) in
place of every fixed leaf, posteriors' convention (:mod:`bayesflow.tree_utils`): it ravels to
:math:`\theta_S`, and ``torch.func`` differentiates it, so every Laplace method's ``init``, ``update``
and ``sample`` work on it unchanged and its states are the method's own (``params``,
``prec``/``prec_diag``, ``step``: posteriors' fields) over :math:`\theta_S` alone. Leaves are named by
their dotted paths (``"head.weight"``, ``"layers.0.bias"``; :func:`names`) and selected by exact names,
module prefixes (``"head"`` selects ``"head.weight"`` and ``"head.bias"``), globs (``"head.*"``,
:mod:`fnmatch`) or a predicate ``select(name, leaf) -> bool``.

- :func:`build` ``(method_build, params, select, *args, **kwargs)``: any method's transform on the subset
  (its ``log_posterior`` or ``forward`` restricted; the other arguments passed through);
- :func:`sample` ``(state, params, ...)``: draws as *full* trees, the fixed leaves broadcast (views);
  the method's own ``sample(state)`` gives the sub-tree alone (empty leaves at the fixed ones);
- :func:`restrict`, :func:`take`, :func:`complete`, :func:`names`, :func:`last_layer`: the pieces.

Example:
    >>> import torch
    >>> from bayesflow.laplace import dense_ggn, subset
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> params = {name: p.detach() for name, p in model.named_parameters()}
    >>> forward = lambda p, batch: (torch.func.functional_call(model, p, (batch[0],)), torch.tensor([]))
    >>> loglik = lambda z, batch: -0.5 * ((batch[1] - z) ** 2).sum()
    >>> transform = subset.build(dense_ggn.build, params, subset.last_layer(model), forward=forward,
    ...                          outer_log_likelihood=loglik, init_prec=1.0)
    >>> state = transform.init(params)
    >>> state, _ = transform.update(state, (torch.randn(16, 3), torch.randn(16, 1)))
    >>> state.prec.shape   # the 8 weights and 1 bias of the last layer, not all 41 parameters
    torch.Size([9, 9])
    >>> draws = subset.sample(state, params, (5,))
    >>> draws["0.weight"].shape, bool((draws["0.weight"] == params["0.weight"]).all())
    (torch.Size([5, 8, 3]), True)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch

from bayesflow.laplace._common import ONE_DRAW, DenseLaplaceState, DiagLaplaceState, check_callable
from bayesflow.laplace.low_rank import LowRankLaplaceState
from bayesflow.laplace.low_rank import sample as low_rank_sample
from bayesflow.laplace.sampling import dense_sample, diag_sample
from bayesflow.laplace.selection import (
    Select,
    _keep,
    _mask,
    complete,
    last_layer,
    names,
    take,
)
from bayesflow.tree import flatten
from bayesflow.types import TensorTree, Transform

__all__ = ["build", "complete", "last_layer", "names", "restrict", "sample", "take"]

_RESTRICTED = ("log_posterior", "forward")  # the build arguments that are functions of the parameters


def _fixed_mask(params: TensorTree, select: Select) -> list[bool]:
    """``_mask``, with the fixed leaves checked: they enter every evaluation as constants, so a NaN or
    ±inf among them would give a NaN curvature (or a finite wrong one) for the whole subset."""
    mask = _mask(params, select)
    leaves, _ = flatten(params)
    for name, leaf, chosen in zip(names(params), leaves, mask):
        if chosen:
            continue
        if isinstance(leaf, torch.Tensor):
            finite = not leaf.is_floating_point() or bool(torch.isfinite(leaf).all())
        else:
            finite = not isinstance(leaf, Real) or math.isfinite(leaf)
        if not finite:
            raise ValueError(f"the fixed leaf {name!r} of params holds NaN or infinite values; the fixed "
                             "parameters are constants of every evaluation and must be finite")
    return mask


def restrict(fn: Callable, params: TensorTree, select: Select) -> Callable:
    r"""``fn`` as a function of the selected leaves: ``restricted(sub, *args) = fn(complete(sub, params), *args)``.

    For a log posterior, its gradient, Fisher, GGN and Hessian with respect to the sub-tree are the
    :math:`S` rows and columns of the full ones (the fixed leaves enter as constants).

    Args:
        fn: a function of the full parameter tree first (``log_posterior(params, batch)``,
            ``forward(params, batch)``, ...).
        params: the full tree; its leaves outside the selection are the fixed values.
        select: as in :func:`take`.

    Returns:
        The restricted function, taking a sub-tree (:func:`take`) in place of ``params``.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import subset
        >>> params = {"scale": torch.tensor(2.0), "w": torch.tensor([1.0, 1.0])}
        >>> f = subset.restrict(lambda p, x: ((p["scale"] * p["w"] * x) ** 2).sum(), params, "w")
        >>> torch.func.grad(f)(subset.take(params, "w"), torch.ones(2))   # scale² · 2w
        {'scale': tensor([]), 'w': tensor([8., 8.])}
    """
    check_callable("fn", fn)
    _fixed_mask(params, select)  # the errors now, not at the first call

    def restricted(sub: TensorTree, *args: Any, **kwargs: Any) -> Any:
        return fn(complete(sub, params), *args, **kwargs)

    return restricted


def build(method_build: Callable[..., Transform], params: TensorTree, select: Select, *args: Any,
          **kwargs: Any) -> Transform:
    r"""A Laplace method's transform on the selected leaves, the rest fixed at ``params``' values.

    ``method_build`` is called with ``args``/``kwargs`` after its ``log_posterior`` or ``forward``
    argument is replaced by :func:`restrict` of it (``outer_log_likelihood``, precisions and options pass
    through). The transform's ``init`` takes the full tree (or the sub-tree) and keeps the selected
    leaves; ``update`` is the method's own. The state is the method's state over the sub-tree:
    ``params`` the sub-tree, ``prec`` :math:`k \times k` or ``prec_diag`` a sub-tree, ``step``.

    Args:
        method_build: a method's ``build``: ``diag_fisher.build``, ``dense_fisher.build``,
            ``diag_ggn.build``, ``dense_ggn.build``, ``dense_hessian.build``, ``low_rank.build``.
        params: the full parameter tree; the fixed leaves are held at these values.
        select: as in :func:`take` (e.g. ``"head.*"``, ``["fc.weight", "fc.bias"]``, :func:`last_layer`).
        *args, **kwargs: ``method_build``'s arguments. An initial precision is over the subset: a number,
            a ``(k, k)`` tensor, or a sub-tree for a diagonal.

    Returns:
        A :class:`~bayesflow.types.Transform` ``(init, update)``.

    Raises:
        TypeError: ``method_build`` is not callable, does not take these arguments, or takes neither a
            ``log_posterior`` nor a ``forward`` (e.g. ``kfac.build``, which takes a module); ``select``
            as in :func:`take`.
        ValueError: as in :func:`take`; a fixed leaf holding NaN or ±inf.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_fisher, subset
        >>> params = {"a": torch.zeros(2), "b": torch.zeros(1)}
        >>> log_posterior = lambda p, x: (-0.5 * ((x - p["a"].sum() - p["b"]) ** 2).sum(), torch.tensor([]))
        >>> transform = subset.build(diag_fisher.build, params, "b", log_posterior, init_prec_diag=1.0)
        >>> state, _ = transform.update(transform.init(params), torch.tensor([1.0, 2.0]))
        >>> state.prec_diag   # 1 + Σ_i x_i²
        {'a': tensor([]), 'b': tensor([6.])}
    """
    check_callable("method_build", method_build)
    mask = _fixed_mask(params, select)
    try:
        bound = inspect.signature(method_build).bind_partial(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"{getattr(method_build, '__module__', '')}.build does not take these arguments: "
                        f"{error}") from None
    restricted = [name for name in _RESTRICTED if name in bound.arguments]
    if not restricted:
        parameters = list(inspect.signature(method_build).parameters)
        raise TypeError(f"subset.build restricts a log_posterior or forward argument of method_build, but none was "
                        f"given (method_build takes {parameters}); pass it, e.g. forward=..., or use a method "
                        "whose curvature comes from one")
    for name in restricted:
        check_callable(name, bound.arguments[name])
        bound.arguments[name] = restrict(bound.arguments[name], params, select)
    inner = method_build(*bound.args, **bound.kwargs)
    _, spec = flatten(params)

    def init(full: TensorTree, *init_args: Any, **init_kwargs: Any) -> Any:
        try:
            given = spec.flatten_up_to(full)
        except (TypeError, ValueError) as error:
            raise ValueError(f"init takes a tree with the structure of build's params ({spec}): {error}") from None
        for name, item, chosen in zip(names(params), given, mask):
            if chosen and not (isinstance(item, torch.Tensor) and item.is_floating_point()):
                raise TypeError(f"init: the selected leaf {name!r} must be a floating-point tensor, got {item!r}")
        return inner.init(_keep(given, spec, mask), *init_args, **init_kwargs)

    return inner._replace(init=init)


def sample(state: Any, params: TensorTree, sample_shape: torch.Size = ONE_DRAW,
           generator: torch.Generator | None = None, sampler: Callable | None = None) -> TensorTree:
    """Draws of a subset state as full trees: the selected leaves drawn, the fixed ones ``params``' values.

    Args:
        state: a state of a :func:`build` transform (its ``params`` a sub-tree of ``params``).
        params: the full tree the fixed leaves come from (the one given to :func:`build`).
        sample_shape: the shape of the batch of draws; every leaf gets it in front.
        generator: the ``torch.Generator`` to draw from; torch's global one when None.
        sampler: the method's ``sample(state, sample_shape, generator)``; found from the state's type
            (diagonal, dense or low-rank) when None.

    Returns:
        A tree shaped like ``params``, leaves ``sample_shape + leaf.shape``; the fixed leaves are
        broadcast views of ``params``' (detached) leaves: read them, do not write into them.

    Raises:
        TypeError: no sampler is known for the state's type. ValueError: as :func:`complete`.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_hessian, subset
        >>> params = {"fixed": torch.ones(2), "free": torch.zeros(2)}
        >>> transform = subset.build(dense_hessian.build, params, "free",
        ...                          lambda p, b: (-(p["free"] ** 2).sum(), torch.tensor([])))
        >>> state, _ = transform.update(transform.init(params), None)
        >>> draws = subset.sample(state, params, (4,), generator=torch.Generator().manual_seed(0))
        >>> draws["fixed"], draws["free"].shape
        (tensor([[1., 1.],
                [1., 1.],
                [1., 1.],
                [1., 1.]]), torch.Size([4, 2]))
    """
    if sampler is None:
        samplers = {DiagLaplaceState: diag_sample, DenseLaplaceState: dense_sample,
                    LowRankLaplaceState: low_rank_sample}
        sampler = next((fn for kind, fn in samplers.items() if isinstance(state, kind)), None)
        if sampler is None:
            raise TypeError(f"no sampler is known for a {type(state).__name__}; pass sampler=<method>.sample")
    draws = sampler(state, sample_shape, generator=generator)
    leaves, spec = flatten(params)
    return complete(draws, spec.unflatten([leaf.detach() for leaf in leaves]), sample_shape)
