r"""The Laplace marginal likelihood (evidence) of a Gaussian prior's precision, and its maximisation.

With a Gaussian prior :math:`N(0, \Lambda^{-1})` on the :math:`P` parameters, a MAP :math:`\theta^*` and
:math:`H` the curvature (GGN, Fisher or Hessian) of the negative log *likelihood* at :math:`\theta^*`,
Laplace's approximation of the evidence is (MacKay, 1992; Immer et al., 2021)

.. math::
    \log p(D \mid \Lambda) &\approx \log p(D \mid \theta^*) + \log N(\theta^*; 0, \Lambda^{-1})
        + \tfrac P2 \log 2\pi - \tfrac12 \log\det(H + \Lambda) \\
    &= \log p(D \mid \theta^*) - \tfrac12\, \theta^{*\top} \Lambda\, \theta^*
        + \tfrac12 \log\det\Lambda - \tfrac12 \log\det(H + \Lambda),

with :math:`\Lambda = \lambda I` (one scalar) or :math:`\lambda_g I` on each group :math:`g` of parameters
(a leaf of the parameter tree; a Linear layer's weight and bias together for KFAC). As in laplace-torch,
:math:`\theta^*` and :math:`H` are held fixed while :math:`\lambda` moves ("post hoc"); for a Gaussian
likelihood this is exact when :math:`\theta^*` is the MAP of that :math:`\lambda`. Setting the derivative
in :math:`\lambda_g` to zero gives MacKay's fixed point

.. math::
    \lambda_g = \frac{\gamma_g}{\lVert\theta^*_g\rVert^2}, \qquad
    \gamma_g = P_g - \lambda_g \operatorname{tr}\big[(H + \Lambda)^{-1}\big]_{gg},

:math:`\gamma_g` the effective number of parameters of group :math:`g`. To tune :math:`\lambda` *with* the
MAP refitted (MacKay's evidence framework), alternate: fit :math:`\theta^*(\lambda)`, accumulate a new state,
re-tune :math:`\lambda`. For a Gaussian likelihood (:math:`H` independent of :math:`\theta`) this converges
to the maximiser of the exact evidence. Otherwise it neglects how :math:`\log\det(H(\theta^*(\lambda)) +
\Lambda)` moves with :math:`\theta^*(\lambda)`: on 2-D logistic regression with 40 data
(``tests/test_laplace_marglik.py``) its :math:`\log\lambda` is 0.2 from the exact evidence's maximiser,
while the maximiser of the Laplace evidence with the MAP refitted at each :math:`\lambda` (a 1-D search
over :func:`log_marginal_likelihood`) is within 0.015 of it.

**What in the state is likelihood curvature.** :math:`H` must be the curvature of the summed negative log
likelihood over the whole data set, prior excluded:

* a diagonal or dense state (:class:`~bayesflow.laplace._common.DiagLaplaceState`,
  :class:`~bayesflow.laplace._common.DenseLaplaceState`) holds :math:`P_0 + H`, :math:`P_0` its
  ``init_prec`` / ``init_prec_diag``. Pass that :math:`P_0` as ``init_prec`` (a number :math:`c` for
  :math:`cI`, a ``(d, d)`` tensor, or for a diagonal state a tree) and it is subtracted; the default 0 is
  for a state built with ``init_prec=0``. A Hessian or Fisher taken of a log *posterior* includes the prior's
  curvature too: accumulate those of the log likelihood alone (or add the prior precision to ``init_prec``).
* a KFAC state (:class:`~bayesflow.laplace.kfac_posterior.KFACLaplaceState`) keeps its prior apart
  (``state.prior_prec``), so :math:`H = N\,(A \otimes G)` per Linear layer and ``state.prior_prec`` is
  ignored; :math:`\log\det(H + \lambda I) = \sum_{o,i} \log(N \gamma_o \alpha_i + \lambda)` from the factors'
  eigenvalues. The evidence covers the Linear layers' parameters; other parameters are point estimates.

Example:
    >>> import torch
    >>> from bayesflow.laplace import dense_ggn, marglik
    >>> x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 2.0, 2.5], dtype=torch.float64)
    >>> theta = torch.linalg.solve(x.T @ x + torch.eye(2, dtype=torch.float64), x.T @ y)   # MAP at λ = 1
    >>> transform = dense_ggn.build(lambda p, b: (b[0] @ p, torch.tensor([])),
    ...                             lambda z, b: -0.5 * ((b[1] - z) ** 2).sum())   # init_prec 0: H alone
    >>> state, _ = transform.update(transform.init(theta), (x, y))
    >>> log_lik = -0.5 * ((y - x @ theta) ** 2).sum() - 1.5 * torch.log(torch.tensor(2 * torch.pi))
    >>> round(float(marglik.log_marginal_likelihood(state, log_lik, 1.0)), 4)   # = log N(y; 0, I + x xᵀ)
    -4.8525
    >>> round(float(marglik.optimize_prior_precision(state)), 4)   # MacKay's fixed point at this MAP
    1.0671
"""

from __future__ import annotations

import math
import warnings
from numbers import Real
from typing import Any

import torch

from bayesflow.laplace._common import DenseLaplaceState, DiagLaplaceState
from bayesflow.laplace._evidence import (
    _as_tensor,
    _Evidence,
    _expand_layers,
    _is_number,
)
from bayesflow.laplace.kfac_posterior import KFACLaplaceState
from bayesflow.types import TensorTree

__all__ = ["METHODS", "log_marginal_likelihood", "optimize_prior_precision"]

METHODS = ("mackay", "adam")
"""The choices of ``method`` in :func:`optimize_prior_precision`."""

LaplaceState = DiagLaplaceState | DenseLaplaceState | KFACLaplaceState


def log_marginal_likelihood(state: LaplaceState, log_likelihood: torch.Tensor | float,
                            prior_prec: TensorTree | float, init_prec: TensorTree | float = 0.0) -> torch.Tensor:
    r"""Laplace's log evidence :math:`\log p(D \mid \Lambda)` of a Gaussian prior :math:`N(0, \Lambda^{-1})`.

    .. math::
        \log p(D \mid \theta^*) - \tfrac12\,\theta^{*\top}\Lambda\,\theta^*
        + \tfrac12 \log\det\Lambda - \tfrac12 \log\det(H + \Lambda)

    (the module docstring says what :math:`H` is). Differentiable in ``prior_prec`` and ``log_likelihood``
    (e.g. to tune :math:`\lambda` with any optimiser), and in the state's tensors.

    Args:
        state: a diagonal, dense or KFAC Laplace state at the MAP :math:`\theta^*`.
        log_likelihood: :math:`\log p(D \mid \theta^*)`, summed over the whole data set (a scalar; it only
            shifts the value, not the maximiser).
        prior_prec: :math:`\Lambda`: a positive number :math:`\lambda` (:math:`\lambda I`); for a diagonal or
            dense state a tree like ``params`` whose leaves are positive numbers or tensors broadcastable to
            the leaf (one :math:`\lambda` per leaf, or per entry); for a KFAC state a dict of one positive
            number per Linear layer name (the keys of ``state.A``).
        init_prec: the precision in the state that is not likelihood curvature, subtracted (diagonal and dense
            states: their ``init_prec``; a number, a ``(d, d)`` tensor or a tree for a diagonal state). Must
            be 0 for KFAC.

    Returns:
        The log evidence, a 0-d tensor in the state's dtype.

    Raises:
        TypeError: an unknown state, or prior or init precisions that are not numbers or tensors.
        ValueError: a non-positive or non-finite :math:`\lambda`, a tree of another structure or shapes, an
            :math:`H` that is not positive semi-definite (to round-off), a non-scalar log likelihood.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import DiagLaplaceState, marglik
        >>> state = DiagLaplaceState(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))   # H = diag(3, 4)
        >>> marglik.log_marginal_likelihood(state, 0.0, torch.tensor([1.0, 2.0]))   # λ per entry
        tensor(-5.7425)
        >>> marglik.log_marginal_likelihood(state, 0.0, -1.0)
        Traceback (most recent call last):
            ...
        ValueError: prior_prec must hold finite positive precisions, got -1.0
    """
    evidence = _Evidence(state, init_prec)
    prior, scalar = evidence.prior_vector(prior_prec)
    log_likelihood = torch.as_tensor(log_likelihood, dtype=evidence.dtype, device=evidence.device)
    if log_likelihood.numel() != 1:
        raise ValueError(f"log_likelihood must be one number (summed over the data), got shape "
                         f"{tuple(log_likelihood.shape)}")
    return log_likelihood.reshape(()) + evidence.value(prior, scalar)


def optimize_prior_precision(state: LaplaceState, init: TensorTree | float = 1.0, per_layer: bool = False,
                             method: str = "mackay", init_prec: TensorTree | float = 0.0, max_steps: int = 1000,
                             tol: float | None = None, lr: float = 0.1) -> torch.Tensor | TensorTree:
    r"""The prior precision that maximises :func:`log_marginal_likelihood` at the state's MAP and curvature.

    One :math:`\lambda` (``per_layer=False``) or one :math:`\lambda_g` per leaf of ``params`` (per Linear
    layer for KFAC), found by

    * ``"mackay"``: the fixed-point iteration :math:`\lambda_g \leftarrow \gamma_g / \lVert\theta^*_g\rVert^2`,
      :math:`\gamma_g = P_g - \lambda_g \operatorname{tr}[(H + \Lambda)^{-1}]_{gg}` (module docstring), or
    * ``"adam"``: gradient ascent on :math:`\log\lambda_g` with ``torch.optim.Adam(lr=lr)`` and autograd.

    Both stop when every :math:`|\partial \log p(D \mid \Lambda) / \partial \log \lambda_g|
    = \tfrac12 |\gamma_g - \lambda_g \lVert\theta^*_g\rVert^2|` is at most ``tol`` (nats), or after ``max_steps``
    steps (with a ``RuntimeWarning``). For one :math:`\lambda` the maximiser is unique: the derivative in
    :math:`\log\lambda`, :math:`\tfrac12 \sum_i h_i/(h_i + \lambda) - \tfrac12 \lambda \lVert\theta^*\rVert^2`
    (:math:`h_i` the eigenvalues of :math:`H`), decreases. The log likelihood does not depend on
    :math:`\lambda` and is not needed. Cost per iteration: :math:`O(P)` for a diagonal or KFAC state and a
    scalar dense one (one eigendecomposition up front), a Cholesky factorisation for a dense state per leaf.
    MacKay's iteration typically converges in 10–100 steps from any start; Adam's progress depends on
    ``lr`` and on how far ``init`` is (its second moments remember the large early gradients).

    Args:
        state: a diagonal, dense or KFAC Laplace state at the MAP (see the module docstring for :math:`H`).
        init: the starting :math:`\lambda > 0`: a number, or with ``per_layer`` a tree like ``params`` of one
            number per leaf (a dict by layer name for KFAC).
        per_layer: one precision per leaf (per Linear layer for KFAC) instead of one in all.
        method: ``"mackay"`` or ``"adam"``.
        init_prec: the non-likelihood precision in the state, subtracted (as in :func:`log_marginal_likelihood`).
        max_steps: the most iterations or Adam steps.
        tol: the stopping threshold on the gradient in :math:`\log\lambda_g`, in nats; None for
            :math:`\max(10^{-8}, 100\epsilon)\, P` (:math:`\epsilon` the state dtype's machine epsilon:
            :math:`10^{-8} P` in float64, :math:`1.2 \cdot 10^{-5} P` in float32, above the round-off of
            :math:`\gamma_g`), which puts :math:`\log\lambda_g` within about :math:`2\,\mathrm{tol}/\gamma_g`.
        lr: Adam's learning rate on :math:`\log\lambda` (``"adam"`` only).

    Returns:
        The tuned precision, detached: a 0-d tensor, or with ``per_layer`` a tree like ``params`` of 0-d
        tensors (a dict by layer name for KFAC), ready to pass as ``prior_prec``.

    Raises:
        TypeError / ValueError: as :func:`log_marginal_likelihood`; an unknown method; a non-positive
            ``max_steps``, ``tol`` or ``lr``; a group whose MAP is zero (the evidence grows without bound in
            its :math:`\lambda`) or whose curvature is zero (the evidence grows as its :math:`\lambda \to 0`).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import DiagLaplaceState, marglik
        >>> f64 = {"dtype": torch.float64}
        >>> params = {"a": torch.tensor([1.0, -1.0], **f64), "b": torch.tensor([0.5], **f64)}
        >>> state = DiagLaplaceState(params, {"a": torch.tensor([3.0, 3.0], **f64), "b": torch.tensor([1.0], **f64)})
        >>> tuned = marglik.optimize_prior_precision(state, per_layer=True)
        >>> {name: round(float(value), 4) for name, value in tuned.items()}   # roots of λ² + 3λ - 3, λ² + λ - 4
        {'a': 0.7913, 'b': 1.5616}
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    for name, value in (("tol", 1.0 if tol is None else tol), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, Real) or not value > 0 or not math.isfinite(value):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not isinstance(per_layer, bool):
        raise TypeError(f"per_layer must be True or False, got {per_layer!r}")
    with torch.no_grad():
        evidence = _Evidence(state, init_prec)
        evidence.theta = evidence.theta.detach()
        count = len(evidence.names) if per_layer else 1
        group = evidence.leaf_group if per_layer else torch.zeros_like(evidence.leaf_group)
        square = torch.zeros(count, dtype=evidence.dtype, device=evidence.device).index_add_(
            0, group, evidence.theta**2)
        _check_groups(evidence, group, square, per_layer)
        log_prior = _initial(init, evidence, per_layer, count).log()
    if tol is None:
        tol = max(1e-8, 100 * torch.finfo(evidence.dtype).eps) * len(evidence.theta)
    if method == "mackay":
        log_prior, converged = _mackay(evidence, group, count, square, log_prior, max_steps, tol)
    else:
        log_prior, converged = _adam(evidence, group, count, square, log_prior, max_steps, tol, lr)
    if not converged:
        warnings.warn(f"optimize_prior_precision ({method}) did not reach tol={tol} in {max_steps} steps",
                      RuntimeWarning, stacklevel=2)
    tuned = log_prior.detach().exp()
    if not per_layer:
        return tuned.reshape(())
    if evidence.kind == "kfac":
        return dict(zip(evidence.names, tuned.unbind()))
    return evidence.spec.unflatten(list(tuned.unbind()))


def _check_groups(evidence: _Evidence, group: torch.Tensor, square: torch.Tensor, per_layer: bool) -> None:
    curvature = evidence.hess.diagonal() if evidence.kind == "dense" else evidence.curv
    info = torch.zeros_like(square).index_add_(0, group, curvature)
    for bad, message in ((square == 0, "the MAP of {} is zero: the evidence grows without bound as its prior "
                                       "precision grows (no finite maximiser)"),
                         (info == 0, "the likelihood curvature of {} is zero (the data say nothing about it): the "
                                     "evidence grows as its prior precision goes to 0 (no positive maximiser)")):
        if bool(bad.any()):   # one host sync per check, not per group
            first = int(bad.nonzero()[0, 0])
            raise ValueError(message.format(evidence.names[first] if per_layer else "the parameters"))


def _initial(init: Any, evidence: _Evidence, per_layer: bool, count: int) -> torch.Tensor:
    if _is_number(init):
        return _as_tensor("init", init, evidence.dtype, evidence.device).reshape(()).expand(count).clone()
    if not per_layer:
        raise ValueError(f"init must be one positive number unless per_layer=True, got {type(init).__name__}")
    if evidence.kind == "kfac":
        return _expand_layers("init", init, evidence)
    try:
        leaves = evidence.spec.flatten_up_to(init)
    except (TypeError, ValueError) as error:
        raise ValueError(f"init must be a number or a tree with the structure of params ({evidence.spec}): "
                         f"{error}") from None
    for path, leaf in zip(evidence.names, leaves):
        if not _is_number(leaf):
            raise ValueError(f"init at {path} must be one number (per_layer tunes one precision per leaf)")
    return torch.stack([_as_tensor(f"init at {path}", leaf, evidence.dtype, evidence.device).reshape(())
                        for path, leaf in zip(evidence.names, leaves)])


def _slope(evidence, group, count, square, log_prior):
    r""":math:`\partial \log p / \partial \log\lambda_g = \tfrac12 (\gamma_g - \lambda_g \lVert\theta^*_g\rVert^2)`
    and :math:`\gamma_g`."""
    prior = log_prior.exp()
    gamma = evidence.effective_parameters(prior[group], count == 1, group, count)
    return 0.5 * (gamma - prior * square), gamma


def _mackay(evidence, group, count, square, log_prior, max_steps, tol):
    with torch.no_grad():
        for _ in range(max_steps):
            slope, gamma = _slope(evidence, group, count, square, log_prior)
            if float(slope.abs().max()) <= tol:
                return log_prior, True
            log_prior = gamma.log() - square.log()   # λ_g ← γ_g / |θ_g|²
        return log_prior, float(_slope(evidence, group, count, square, log_prior)[0].abs().max()) <= tol


def _adam(evidence, group, count, square, log_prior, max_steps, tol, lr):
    log_prior = log_prior.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([log_prior], lr=lr)
    for _ in range(max_steps):
        optimizer.zero_grad()
        with torch.enable_grad():
            (-evidence.value(log_prior.exp()[group], count == 1)).backward()
        if float(log_prior.grad.abs().max()) <= tol:
            return log_prior, True
        optimizer.step()
    with torch.no_grad():
        return log_prior, float(_slope(evidence, group, count, square, log_prior)[0].abs().max()) <= tol
