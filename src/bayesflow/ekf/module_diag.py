r"""The diagonal extended Kalman filter of an ``nn.Module``'s Linear and Conv2d layers, its Fisher computed
per layer.

The filter of :mod:`bayesflow.ekf.diag_fisher` (same state, predict and update steps),

.. math::
    \tilde\sigma^2 = \sigma^2 + \tau^2, \qquad
    \sigma'^{-2} = \tilde\sigma^{-2} + ε\, \tfrac1n \textstyle\sum_i g_i^{\odot 2}, \qquad
    \mu' = \mu + ε\, \sigma'^2 \odot \tfrac1n \textstyle\sum_i g_i,

with :math:`g_i = \nabla_\theta \log p(y_i \mid x_i, \theta)|_\mu` for the weights and biases of the
model's ``torch.nn.Linear`` and ``torch.nn.Conv2d`` (``groups=1``) layers. The per-sample squares come
from one forward and one backward pass (:mod:`bayesflow.utils.layer_curvature`: :math:`\sum_i (g_i
a_i^\top)^{\odot 2} = (g^{\odot 2})^\top a^{\odot 2}` for a Linear weight, :math:`\sum_i (\sum_l
g_{i,l} a_{i,l}^\top)^{\odot 2}` over the patches of a Conv2d weight) instead of a per-sample
Jacobian. Build through :func:`bayesflow.ekf.diag_fisher.build_for_module`.

Example:
    >>> import torch
    >>> from bayesflow.ekf import diag_fisher
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> loglik = lambda z, batch: -0.5 * ((z - batch[1]) ** 2).sum()   # y ~ N(w x, 1)
    >>> transform = diag_fisher.build_for_module(model, loglik, lr=1.0)
    >>> state = transform.init({"weight": torch.zeros(1, 1)})
    >>> state, output = transform.update(state, (torch.ones(1, 1), torch.ones(1, 1)))
    >>> state.params["weight"], state.sd_diag["weight"] ** 2   # prior N(0, 1), one datum, residual 1
    (tensor([[0.5000]]), tensor([[0.5000]]))
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from bayesflow.ekf._common import check_lr, check_state, current_lr, write_counters
from bayesflow.ekf.diag_fisher import EKFDiagState, _check_transition_sd
from bayesflow.ekf.diag_fisher import init as init_diag
from bayesflow.engine.validation import check_bool
from bayesflow.tree import flatten
from bayesflow.tree_utils import tree_insert_
from bayesflow.types import Schedule, TensorTree, Transform
from bayesflow.utils.layer_capture import covered_layers, curvature_layers
from bayesflow.utils.layer_curvature import layer_diagonal

__all__ = ["build_for_module", "init", "update"]

OuterLogLikelihood = Callable[[torch.Tensor, Any], torch.Tensor]


def build_for_module(model: torch.nn.Module, outer_log_likelihood: OuterLogLikelihood, lr: float | Schedule,
                     transition_sd: float = 0.0, init_sds: TensorTree | float = 1.0,
                     input_fn: Callable[[Any], Any] | None = None) -> Transform:
    r"""The diagonal EKF transform of a module's Linear/Conv2d layers (the update of
    :mod:`bayesflow.ekf.diag_fisher`).

    ``update(state, batch, inplace=False)`` returns ``(state, output)``, output the model's (detached)
    output on the batch; ``state.log_likelihood`` is the batch's mean per-sample log likelihood at the
    previous mean, as in :func:`bayesflow.ekf.diag_fisher.update`.

    Args:
        model: a ``torch.nn.Module`` with ``torch.nn.Linear`` / ``torch.nn.Conv2d`` (``groups=1``) layers,
            each called once per forward, on ``(batch, features)`` / ``(batch, channels, height, width)`` inputs.
        outer_log_likelihood: ``outer_log_likelihood(output, batch)``, the log likelihood summed over
            the batch (a scalar), rows independent.
        lr: the inverse temperature ε of each update (a number ≥ 0 or a schedule ``step -> ε``).
        transition_sd: τ ≥ 0, the transition noise's standard deviation.
        init_sds: the initial σ, a number > 0 or a tree like the parameters.
        input_fn: ``input_fn(batch)``, the model's input; ``batch[0]`` when None.

    Returns:
        A :class:`~bayesflow.types.Transform`; ``init(params)`` takes a dict of Linear/Conv2d weights and
        biases by ``named_parameters`` key and gives an :class:`~bayesflow.ekf.diag_fisher.EKFDiagState`.

    Raises:
        TypeError / ValueError: at build, not a Module, no Linear/Conv2d layer, a bad ``lr`` or
            ``transition_sd``; at init, a parameter outside a covered layer or of a grouped Conv2d; at
            update, a non-scalar log likelihood, a batch row mismatch, a layer called twice.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import diag_fisher
        >>> diag_fisher.build_for_module(torch.nn.Linear(2, 1), lambda z, b: z.sum(), lr=-1.0)
        Traceback (most recent call last):
            ...
        ValueError: lr must be a finite number ≥ 0 (the inverse temperature of each update), got -1.0
    """
    curvature_layers(model)
    if not callable(outer_log_likelihood):
        raise TypeError(f"outer_log_likelihood must be a function, got {type(outer_log_likelihood).__name__}")
    check_lr(lr)
    _check_transition_sd(transition_sd)
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"input_fn must be a function, got {type(input_fn).__name__}")
    return Transform(partial(init, model=model, init_sds=init_sds),
                     partial(update, model=model, outer_log_likelihood=outer_log_likelihood, lr=lr,
                             transition_sd=transition_sd, input_fn=input_fn))


def init(params: dict[str, torch.Tensor], model: torch.nn.Module, init_sds: TensorTree | float = 1.0,
         ) -> EKFDiagState:
    """The initial state :math:`\\mathcal N(\\text{params}, \\operatorname{diag}(\\text{init\\_sds}^2))`.

    Args:
        params: a dict of the model's Linear/Conv2d weights and biases by ``named_parameters`` key (kept as
            given, so that ``inplace`` updates change these tensors).
        model: the module.
        init_sds: as in :func:`bayesflow.ekf.diag_fisher.init`.

    Raises:
        TypeError / ValueError: a key that is no Linear/Conv2d weight or bias of the model, a wrong shape,
            a grouped Conv2d, bad sds, a parameter holding NaN or ±inf.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import module_diag
        >>> module_diag.init({"bias": torch.zeros(1)}, torch.nn.Linear(2, 1), init_sds=0.5).sd_diag
        {'bias': tensor([0.5000])}
    """
    covered_layers(model, params)
    return init_diag(params, init_sds)


def update(state: EKFDiagState, batch: Any, model: torch.nn.Module, outer_log_likelihood: OuterLogLikelihood,
           lr: float | Schedule, transition_sd: float = 0.0, input_fn: Callable[[Any], Any] | None = None,
           inplace: bool = False) -> tuple[EKFDiagState, torch.Tensor]:
    r"""One diagonal EKF update (module docstring) with the per-layer Fisher diagonal and gradient.

    Args:
        state: the current :class:`~bayesflow.ekf.diag_fisher.EKFDiagState`.
        batch: the batch; every tensor in it must have the model input's number of rows.
        model, outer_log_likelihood, lr, transition_sd, input_fn: as in :func:`build_for_module`.
        inplace: write the new mean, σ, log likelihood and step into the tensors of ``state`` (and return it).

    Returns:
        ``(new_state, output)``, output the model's output on the batch at the previous mean (detached).

    Raises:
        TypeError / ValueError: as :func:`bayesflow.utils.layer_curvature.layer_diagonal`.

    Example:
        >>> import torch
        >>> from bayesflow.ekf import module_diag
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> loglik = lambda z, b: -0.5 * ((z - b[1]) ** 2).sum()
        >>> state = module_diag.init({"weight": torch.zeros(1, 1)}, model)
        >>> state, _ = module_diag.update(state, (torch.ones(1, 1), torch.ones(1, 1)), model, loglik, lr=1.0,
        ...                               transition_sd=1.0)
        >>> state.params, state.sd_diag   # σ̃² = 2, precision 1/2 + 1
        ({'weight': tensor([[0.6667]])}, {'weight': tensor([[0.8165]])})
    """
    check_bool(inplace, "inplace")
    check_state(state, EKFDiagState, "diag_fisher")
    _check_transition_sd(transition_sd)
    lr = current_lr(lr, state.step)
    result = layer_diagonal(model, state.params, batch, outer_log_likelihood, "empirical", input_fn,
                            with_gradient=True)
    n = result.output.shape[0]
    mu, spec = flatten(state.params)
    sd = spec.flatten_up_to(state.sd_diag)
    fisher = spec.flatten_up_to(result.diagonal)
    grad = spec.flatten_up_to(result.gradient)
    with torch.no_grad():
        # 1/σ'² = 1/(σ² + τ²) + ε F/n and μ' = μ + ε σ'² ⊙ g/n, leaf by leaf (foreach, no ravel copy)
        predict_var = torch._foreach_add(torch._foreach_mul(sd, sd), transition_sd ** 2)
        prec = torch._foreach_reciprocal(predict_var)
        torch._foreach_add_(prec, torch._foreach_mul(fisher, lr / n))
        new_var = torch._foreach_reciprocal(prec)
        step = torch._foreach_mul(torch._foreach_mul(new_var, grad), lr / n)
        new_mean = torch._foreach_add(mu, step)
        new_sd = torch._foreach_sqrt(new_var)
    log_likelihood = result.log_likelihood / n
    if inplace:
        tree_insert_(state.params, spec.unflatten(new_mean))
        tree_insert_(state.sd_diag, spec.unflatten(new_sd))
        return write_counters(state, log_likelihood), result.output
    new_state = EKFDiagState(spec.unflatten(new_mean), spec.unflatten(new_sd), log_likelihood, state.step + 1)
    return new_state, result.output
