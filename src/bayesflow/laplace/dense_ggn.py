r"""Dense generalised Gauss-Newton Laplace approximation (posteriors' ``laplace.dense_ggn``).

Around parameters :math:`\mu` (a MAP estimate) the posterior is approximated by :math:`N(\mu, P^{-1})`
with the GGN of the negative log likelihood summed over batches,

.. math::
    P = P_0 + \sum_b J_f(\mu; B_b)^\top\, H_\ell(z_b)\, J_f(\mu; B_b), \qquad
    z_b = f(\mu; B_b), \quad \ell(z) = -\log p(y_b \mid z),

where ``forward`` is :math:`f` (the model output, e.g. logits, not reduced over the batch) and
``outer_log_likelihood`` is :math:`\log p(y \mid z)`. :math:`H_\ell` is positive semi-definite for the
usual likelihoods (Gaussian, softmax), so :math:`P` is too, unlike the Hessian; for exponential families
in their natural parameter the GGN is the Fisher (Martens, 2020; Daxberger et al., 2021). Computed by
:func:`bayesflow.utils.ggn` (the whole Jacobian of the batch's output: memory :math:`O(dz\,d)`); a
``(d, d)`` matrix over the ravelled parameters, any tree of any leaf shapes.

Example:
    >>> import torch
    >>> from bayesflow.laplace import dense_ggn
    >>> def forward(params, batch):   # a linear model's outputs, one per row of x
    ...     return batch[0] @ params, torch.tensor([])
    >>> def outer_log_likelihood(z, batch):   # unit-variance Gaussian: H = I, so G = xᵀx
    ...     return -0.5 * ((batch[1] - z) ** 2).sum()
    >>> transform = dense_ggn.build(forward, outer_log_likelihood, init_prec=1.0)
    >>> x, y = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([1.0, 2.0])
    >>> state, aux = transform.update(transform.init(torch.zeros(2)), (x, y))
    >>> state.prec   # I + xᵀx
    tensor([[3., 1.],
            [1., 2.]])
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from bayesflow.engine.validation import check_bool
from bayesflow.laplace._common import (
    DenseLaplaceState,
    add_dense,
    check_callable,
    check_scalar_precision,
    init_dense,
    likelihood_terms,
)
from bayesflow.laplace.sampling import dense_sample as sample
from bayesflow.types import ForwardFn, OuterLogProbFn, TensorTree, Transform
from bayesflow.utils import CatchAuxError, ggn

__all__ = ["DenseLaplaceState", "build", "init", "sample", "update"]


def build(forward: ForwardFn, outer_log_likelihood: OuterLogProbFn, init_prec: torch.Tensor | float = 0.0,
          ) -> Transform:
    """The dense GGN Laplace transform: ``init(params)`` and ``update(state, batch, inplace)``.

    Args:
        forward: ``forward(params, batch) -> (output, aux)``, the model's output (a tensor, not reduced
            over the batch); aux ``torch.tensor([])`` when there is none.
        outer_log_likelihood: ``outer_log_likelihood(output, batch) -> value``, a scalar log likelihood
            of the output (no aux).
        init_prec: :math:`P_0`: a non-negative number :math:`c` (:math:`c I`) or a symmetric positive
            semi-definite ``(d, d)`` tensor (checked here: a TypeError for another type, a ValueError for
            NaN, infinite or negative values; the shape and definiteness are checked at ``init``).

    Returns:
        A :class:`~bayesflow.types.Transform` of :func:`init` and :func:`update` with these arguments.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_ggn
        >>> forward = lambda p, b: (b * p, torch.tensor([]))   # z_i = b_i θ
        >>> loglik = lambda z, b: torch.distributions.Poisson(z.exp()).log_prob(torch.ones_like(z)).sum()
        >>> transform = dense_ggn.build(forward, loglik)   # H_ℓ = diag(e^z)
        >>> state, _ = transform.update(transform.init(torch.zeros(1)), torch.tensor([1.0, 2.0]))
        >>> state.prec   # Σ_i b_i² e^0
        tensor([[5.]])
    """
    check_callable("forward", forward)
    check_callable("outer_log_likelihood", outer_log_likelihood)
    check_scalar_precision("init_prec", init_prec)
    return Transform(partial(init, init_prec=init_prec),
                     partial(update, forward=forward, outer_log_likelihood=outer_log_likelihood))


def init(params: TensorTree, init_prec: torch.Tensor | float = 0.0) -> DenseLaplaceState:
    r"""The initial state: ``params`` (kept, not copied), ``prec`` :math:`P_0` and ``step`` 0.

    Args:
        params: :math:`\mu`, a tree of floating-point tensors (``d`` entries in all).
        init_prec: a non-negative number :math:`c` (then :math:`P_0 = c I`, made on the parameters'
            device) or a symmetric positive semi-definite ``(d, d)`` tensor (copied into the state).

    Raises:
        ValueError: a negative number, a tensor of another shape, or one that is not symmetric PSD.
        ValueError: ``params`` holds NaN or ±inf (the message names the leaf).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_ggn
        >>> dense_ggn.init({"w": torch.zeros(2, 2)}, torch.eye(3))
        Traceback (most recent call last):
            ...
        ValueError: init_prec must be a number or a (4, 4) tensor (params has 4 entries), got shape (3, 3)
    """
    return init_dense(params, init_prec)


def update(state: DenseLaplaceState, batch: Any, forward: ForwardFn, outer_log_likelihood: OuterLogProbFn,
           inplace: bool = False) -> tuple[DenseLaplaceState, Any]:
    r"""Adds the batch's GGN :math:`J_f^\top H_\ell J_f` (at ``params``) to the precision.

    Args:
        state: the current state (its ``params`` are where the GGN is taken; they do not move).
        batch: the batch passed to ``forward`` and ``outer_log_likelihood``.
        forward, outer_log_likelihood: as in :func:`build`.
        inplace: add into the state's own ``prec`` and ``step`` tensors (and return the same state)
            instead of returning a new state.

    Returns:
        ``(state, aux)``, aux ``forward``'s aux output.

    Raises:
        TypeError / ValueError: ``forward`` returns no ``(output, aux)`` tuple or a non-tensor output, or
            ``outer_log_likelihood`` a non-scalar value.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import dense_ggn
        >>> forward = lambda p, b: (torch.stack([p.sum(), p[0] - p[1]]), torch.tensor([]))
        >>> loglik = lambda z, b: -0.5 * b * (z**2).sum()   # H_ℓ = b I
        >>> state = dense_ggn.init(torch.zeros(2))
        >>> state, _ = dense_ggn.update(state, 2.0, forward, loglik, inplace=True)
        >>> state.prec, state.step   # 2 JᵀJ, J = [[1, 1], [1, -1]]
        (tensor([[4., 0.],
                [0., 4.]]), tensor(1))
    """
    check_bool(inplace, "inplace")
    model, loss = likelihood_terms(forward, outer_log_likelihood, batch)
    with torch.no_grad(), CatchAuxError():
        curvature, aux = ggn(model, loss, forward_has_aux=True, loss_has_aux=False, normalize=False)(state.params)
    return add_dense(state, curvature.to(state.prec.dtype), inplace), aux
