r"""Diagonal Laplace approximations of an ``nn.Module``'s Linear and Conv2d layers, computed per layer (no
per-sample Jacobians).

The same states and precisions as :mod:`bayesflow.laplace.diag_fisher` (on the per-sample log
likelihood) and :mod:`bayesflow.laplace.diag_ggn`, for ``torch.nn.Linear`` and ``torch.nn.Conv2d``
(``groups=1``) weights and biases: with :math:`s_n = W a_n + b`, :math:`g_n = \partial \log p(y_n \mid
x_n, \theta) / \partial s_n` and the GGN's :math:`q_n` (:mod:`bayesflow.utils.layer_curvature`), a batch adds

.. math::
    \text{empirical Fisher:}\quad & \Delta p_W = (g^{\odot 2})^\top a^{\odot 2}
        = \textstyle\sum_n (\nabla_W \log p_n)^{\odot 2}, \\
    \text{GGN:}\quad & \Delta p_W = q^\top a^{\odot 2} = \mathrm{diag}\big(\textstyle\sum_n J_n^\top H_n J_n\big)_W,

and :math:`\sum_n g_n^{\odot 2}` / :math:`\sum_n q_n` to the bias. A Conv2d weight is shared over the
output positions :math:`l`, so its per-sample gradient :math:`\sum_l g_{n,l} a_{n,l}^\top` (patches
:math:`a_{n,l}`) is formed from the captured signals by an ``einsum`` and squared
(:mod:`bayesflow.utils.conv_curvature`): still exact, no per-sample autograd. The cost is one forward and one
backward pass (a backward batched over the output's size for the GGN), as a training step, instead of
one backward pass per datum. Build through :func:`bayesflow.laplace.diag_fisher.build_for_module` and
:func:`bayesflow.laplace.diag_ggn.build_for_module`.

``params`` (``init``) must be a dict of Linear/Conv2d weights and biases by ``model.named_parameters()``
key; parameters of other layers (``LayerNorm``, ``Conv1d``, grouped ``Conv2d``, ...) are not covered: leave
them out (they are held at the module's values) or use the torch.func routes, which take any log posterior.

Example:
    >>> import torch
    >>> from bayesflow.laplace import diag_ggn
    >>> model = torch.nn.Linear(2, 1)
    >>> loglik = lambda z, batch: -0.5 * ((z - batch[1]) ** 2).sum()   # H = 1: p += Σ_n [x_n, 1]²
    >>> transform = diag_ggn.build_for_module(model, loglik, init_prec_diag=1.0)
    >>> state = transform.init(dict(model.named_parameters()))
    >>> state, output = transform.update(state, (torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.zeros(2, 1)))
    >>> state.prec_diag
    {'weight': tensor([[11.,  5.]]), 'bias': tensor([3.])}
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from bayesflow.engine.validation import check_bool
from bayesflow.laplace._common import DiagLaplaceState, add_diag, check_callable, check_scalar_precision, init_diag
from bayesflow.types import TensorTree, Transform
from bayesflow.utils.layer_capture import covered_layers, curvature_layers
from bayesflow.utils.layer_curvature import CURVATURES, layer_diagonal

__all__ = ["build", "build_fisher_for_module", "build_ggn_for_module", "init", "update"]

OuterLogLikelihood = Callable[[torch.Tensor, Any], torch.Tensor]


def build(model: torch.nn.Module, outer_log_likelihood: OuterLogLikelihood, curvature: str = "empirical",
          init_prec_diag: TensorTree | float = 0.0, input_fn: Callable[[Any], Any] | None = None) -> Transform:
    r"""The per-layer diagonal Laplace transform: ``init(params)`` and ``update(state, batch, inplace)``.

    Args:
        model: a ``torch.nn.Module`` with ``torch.nn.Linear`` / ``torch.nn.Conv2d`` layers.
        outer_log_likelihood: ``outer_log_likelihood(output, batch)``, the log likelihood of the model's
            output summed over the batch (a scalar).
        curvature: ``"empirical"`` (the per-sample empirical Fisher) or ``"ggn"``.
        init_prec_diag: :math:`p_0`, a non-negative number or a tree shaped like (broadcasting to) params of
            non-negative numbers and tensors (checked here: a TypeError for another type, a ValueError for
            NaN, infinite or negative values; the shapes are checked at ``init``).
        input_fn: ``input_fn(batch)``, the model's input; ``batch[0]`` when None.

    Returns:
        A :class:`~bayesflow.types.Transform` of :func:`init` and :func:`update` with these arguments.

    Raises:
        TypeError / ValueError: not a Module, no Linear/Conv2d layer, an unknown curvature, a negative precision.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import module_diag
        >>> module_diag.build(torch.nn.Linear(2, 1), lambda z, b: z.sum(), curvature="hessian")
        Traceback (most recent call last):
            ...
        ValueError: curvature must be one of ('empirical', 'ggn'), got 'hessian'
    """
    curvature_layers(model)
    check_callable("outer_log_likelihood", outer_log_likelihood)
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    check_scalar_precision("init_prec_diag", init_prec_diag)
    if input_fn is not None:
        check_callable("input_fn", input_fn)
    return Transform(partial(init, model=model, init_prec_diag=init_prec_diag),
                     partial(update, model=model, outer_log_likelihood=outer_log_likelihood, curvature=curvature,
                             input_fn=input_fn))


def build_fisher_for_module(model: torch.nn.Module, outer_log_likelihood: OuterLogLikelihood,
                            init_prec_diag: TensorTree | float = 0.0,
                            input_fn: Callable[[Any], Any] | None = None) -> Transform:
    r"""The diagonal empirical-Fisher Laplace transform of a module's Linear/Conv2d layers, computed per layer.

    ``update`` adds :math:`\sum_n (\nabla_\theta \log p(y_n \mid x_n, \theta))^2` at ``params``, the
    precision of :func:`bayesflow.laplace.diag_fisher.build` on the per-sample log likelihood
    (:mod:`bayesflow.laplace.module_diag`), at the cost of about one training step; it returns
    ``(state, output)``, output the model's (detached) output on the batch.

    Args:
        model: a ``torch.nn.Module`` with ``torch.nn.Linear`` / ``torch.nn.Conv2d`` (``groups=1``) layers,
            each called once per forward, on ``(batch, features)`` / ``(batch, channels, height, width)`` inputs.
        outer_log_likelihood: ``outer_log_likelihood(output, batch)``, the log likelihood summed over
            the batch (a scalar), rows independent.
        init_prec_diag: :math:`p_0`, a non-negative number or a tree shaped like (broadcasting to) params of
            non-negative numbers and tensors (checked here: a TypeError for another type, a ValueError for
            NaN, infinite or negative values; the shapes are checked at ``init``).
        input_fn: ``input_fn(batch)``, the model's input; ``batch[0]`` when None.

    Returns:
        A :class:`~bayesflow.types.Transform`; ``init(params)`` takes a dict of Linear/Conv2d weights and
        biases (``dict(model.named_parameters())`` when every parameter is in such a layer) and gives a
        :class:`~bayesflow.laplace._common.DiagLaplaceState`.

    Raises:
        TypeError / ValueError: at build, not a Module or no Linear/Conv2d layer; at init, a parameter
            outside a covered layer; at update, a non-scalar log likelihood, a batch row mismatch, a layer called twice.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_fisher
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> loglik = lambda z, batch: -0.5 * ((z - batch[1]) ** 2).sum()
        >>> transform = diag_fisher.build_for_module(model, loglik)
        >>> state = transform.init({"weight": torch.ones(1, 1)})
        >>> state, _ = transform.update(state, (torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1)))
        >>> state.prec_diag   # Σ_n (x_n (y_n - w x_n))² = 1 + 16
        {'weight': tensor([[17.]])}
    """
    return build(model, outer_log_likelihood, "empirical", init_prec_diag, input_fn)


def build_ggn_for_module(model: torch.nn.Module, outer_log_likelihood: OuterLogLikelihood,
                         init_prec_diag: TensorTree | float = 0.0,
                         input_fn: Callable[[Any], Any] | None = None) -> Transform:
    r"""The diagonal GGN Laplace transform of a module's Linear/Conv2d layers, computed exactly per layer.

    ``update`` adds :math:`\mathrm{diag}(\sum_n J_n^\top H_n J_n)` at ``params`` (:math:`J_n` the
    Jacobian of datum :math:`n`'s output, :math:`H_n` the Hessian of :math:`-\log p(y_n \mid z_n)` in it,
    used as is), the precision of :func:`bayesflow.laplace.diag_ggn.build` with ``forward`` the module,
    without forming a Jacobian (:mod:`bayesflow.laplace.module_diag`); it returns ``(state, output)``.

    Args:
        model, outer_log_likelihood, init_prec_diag, input_fn: as in
            :func:`bayesflow.laplace.diag_fisher.build_for_module`.

    Returns:
        A :class:`~bayesflow.types.Transform` (``init(params)``, ``update(state, batch, inplace=False)``).

    Raises:
        TypeError / ValueError: as :func:`bayesflow.laplace.diag_fisher.build_for_module`.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_ggn
        >>> model = torch.nn.Linear(3, 2)
        >>> loglik = lambda logits, b: -torch.nn.functional.cross_entropy(logits, b[1], reduction="sum")
        >>> transform = diag_ggn.build_for_module(model, loglik)
        >>> state = transform.init(dict(model.named_parameters()))
        >>> state, _ = transform.update(state, (torch.ones(4, 3), torch.zeros(4, dtype=torch.long)), inplace=True)
        >>> state.prec_diag["weight"].shape, int(state.step)
        (torch.Size([2, 3]), 1)
    """
    return build(model, outer_log_likelihood, "ggn", init_prec_diag, input_fn)


def init(params: dict[str, torch.Tensor], model: torch.nn.Module,
         init_prec_diag: TensorTree | float = 0.0) -> DiagLaplaceState:
    """The initial state: ``params`` (kept, not copied), ``prec_diag`` :math:`p_0` and ``step`` 0.

    Args:
        params: a dict of the model's Linear/Conv2d weights and biases by ``named_parameters`` key.
        model: the module.
        init_prec_diag: as in :func:`bayesflow.laplace.diag_fisher.init`.

    Raises:
        TypeError / ValueError: a key that is no Linear/Conv2d weight or bias of the model, a wrong shape, a
            grouped Conv2d, a bad precision, a parameter holding NaN or ±inf.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import module_diag
        >>> module_diag.init({"weight": torch.zeros(1, 2)}, torch.nn.Linear(2, 1), 2.0).prec_diag
        {'weight': tensor([[2., 2.]])}
    """
    covered_layers(model, params)
    return init_diag(params, init_prec_diag)


def update(state: DiagLaplaceState, batch: Any, model: torch.nn.Module, outer_log_likelihood: OuterLogLikelihood,
           curvature: str = "empirical", input_fn: Callable[[Any], Any] | None = None,
           inplace: bool = False) -> tuple[DiagLaplaceState, torch.Tensor]:
    r"""Adds the batch's empirical Fisher or GGN diagonal at ``state.params`` (module docstring).

    Args:
        state: the current state (its ``params`` are where the curvature is taken; they do not move).
        batch: the batch; every tensor in it must have the model input's number of rows.
        model, outer_log_likelihood, curvature, input_fn: as in :func:`build`.
        inplace: add into the state's own ``prec_diag`` and ``step`` tensors (and return the same state).

    Returns:
        ``(state, output)``, output the model's output on the batch (detached).

    Raises:
        TypeError / ValueError: as :func:`bayesflow.utils.layer_curvature.layer_diagonal`.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import module_diag
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> loglik = lambda z, b: -0.5 * ((z - b[1]) ** 2).sum()
        >>> state = module_diag.init({"weight": torch.zeros(1, 1)}, model)
        >>> state, _ = module_diag.update(state, (torch.ones(3, 1), torch.ones(3, 1)), model, loglik)
        >>> state.prec_diag   # empirical: Σ_n (x_n (y_n - w x_n))² = 3
        {'weight': tensor([[3.]])}
    """
    check_bool(inplace, "inplace")
    if not isinstance(state, DiagLaplaceState):
        raise TypeError(f"state must be a DiagLaplaceState (from init), got {type(state).__name__}")
    result = layer_diagonal(model, state.params, batch, outer_log_likelihood, curvature, input_fn)
    return add_diag(state, result.diagonal, inplace), result.output
