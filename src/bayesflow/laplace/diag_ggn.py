r"""Diagonal generalised Gauss-Newton Laplace approximation (posteriors' ``laplace.diag_ggn``).

Around parameters :math:`\mu` (a MAP estimate) the posterior is approximated by
:math:`N(\mu, \mathrm{diag}(p)^{-1})` with the diagonal of the GGN summed over batches,

.. math::
    p = p_0 + \sum_b \mathrm{diag}\big(J_f(\mu; B_b)^\top H_\ell(z_b) J_f(\mu; B_b)\big), \qquad
    \ell(z) = -\log p(y_b \mid z),

``forward`` being :math:`f` (the model output, not reduced over the batch) and ``outer_log_likelihood``
:math:`\log p(y \mid z)` (see :mod:`bayesflow.laplace.dense_ggn`). Computed by
:func:`bayesflow.utils.diag_ggn`, which never forms the ``(d, d)`` matrix; the diagonal is a tree shaped
like the parameters. For an ``nn.Module`` model :func:`build_for_module` gives the same diagonal for
its ``torch.nn.Linear`` layers exactly, per layer, without forming a Jacobian
(:mod:`bayesflow.laplace.module_diag`).

Example:
    >>> import torch
    >>> from bayesflow.laplace import diag_ggn
    >>> def forward(params, batch):
    ...     return batch[0] @ params["w"] + params["b"], torch.tensor([])
    >>> def outer_log_likelihood(z, batch):   # unit-variance Gaussian: H = I
    ...     return -0.5 * ((batch[1] - z) ** 2).sum()
    >>> transform = diag_ggn.build(forward, outer_log_likelihood)
    >>> x, y = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([1.0, 2.0])
    >>> state, aux = transform.update(transform.init({"w": torch.zeros(2), "b": torch.zeros(())}), (x, y))
    >>> state.prec_diag   # Σ_i x_ij² and the number of rows
    {'w': tensor([2., 1.]), 'b': tensor(2.)}
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from bayesflow.engine.validation import check_bool
from bayesflow.laplace._common import (
    DiagLaplaceState,
    add_diag,
    check_callable,
    check_scalar_precision,
    init_diag,
    likelihood_terms,
)
from bayesflow.laplace.module_diag import build_ggn_for_module as build_for_module
from bayesflow.laplace.sampling import diag_sample as sample
from bayesflow.types import ForwardFn, OuterLogProbFn, TensorTree, Transform
from bayesflow.utils import CatchAuxError
from bayesflow.utils import diag_ggn as ggn_diagonal

__all__ = ["DiagLaplaceState", "build", "build_for_module", "init", "sample", "update"]


def build(forward: ForwardFn, outer_log_likelihood: OuterLogProbFn, init_prec_diag: TensorTree | float = 0.0,
          ) -> Transform:
    """The diagonal GGN Laplace transform: ``init(params)`` and ``update(state, batch, inplace)``.

    Args:
        forward: ``forward(params, batch) -> (output, aux)``, the model's output (a tensor, not reduced
            over the batch); aux ``torch.tensor([])`` when there is none.
        outer_log_likelihood: ``outer_log_likelihood(output, batch) -> value``, a scalar log likelihood
            of the output (no aux).
        init_prec_diag: :math:`p_0`, a non-negative number or a tree shaped like (broadcasting to) params of
            non-negative numbers and tensors (checked here: a TypeError for another type, a ValueError for
            NaN, infinite or negative values; the shapes are checked at ``init``).

    Returns:
        A :class:`~bayesflow.types.Transform` of :func:`init` and :func:`update` with these arguments.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_ggn
        >>> forward = lambda p, b: (b * p, torch.tensor([]))   # z_i = b_i θ
        >>> loglik = lambda z, b: -0.5 * (z**2).sum()
        >>> transform = diag_ggn.build(forward, loglik, init_prec_diag=1.0)
        >>> state, _ = transform.update(transform.init(torch.zeros(1)), torch.tensor([1.0, 2.0]))
        >>> state.prec_diag   # 1 + Σ_i b_i²
        tensor([6.])
    """
    check_callable("forward", forward)
    check_callable("outer_log_likelihood", outer_log_likelihood)
    check_scalar_precision("init_prec_diag", init_prec_diag)
    return Transform(partial(init, init_prec_diag=init_prec_diag),
                     partial(update, forward=forward, outer_log_likelihood=outer_log_likelihood))


def init(params: TensorTree, init_prec_diag: TensorTree | float = 0.0) -> DiagLaplaceState:
    """The initial state: ``params`` (kept, not copied), ``prec_diag`` :math:`p_0` and ``step`` 0.

    Args:
        params: :math:`\\mu`, a tree of floating-point tensors.
        init_prec_diag: a non-negative number, or a tree with params' structure whose leaves broadcast
            to the parameters' shapes (copied into the state, in each parameter's dtype and on its device).

    Raises:
        ValueError: a negative or non-finite precision, or a tree that does not match params.
        ValueError: ``params`` holds NaN or ±inf (the message names the leaf).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_ggn
        >>> diag_ggn.init({"w": torch.zeros(2, 3)}, {"w": torch.tensor([1.0, 2.0, 3.0])}).prec_diag  # broadcast
        {'w': tensor([[1., 2., 3.],
                [1., 2., 3.]])}
    """
    return init_diag(params, init_prec_diag)


def update(state: DiagLaplaceState, batch: Any, forward: ForwardFn, outer_log_likelihood: OuterLogProbFn,
           inplace: bool = False) -> tuple[DiagLaplaceState, Any]:
    r"""Adds the batch's GGN diagonal :math:`\mathrm{diag}(J_f^\top H_\ell J_f)` (at ``params``).

    Args:
        state: the current state (its ``params`` are where the GGN is taken; they do not move).
        batch: the batch passed to ``forward`` and ``outer_log_likelihood``.
        forward, outer_log_likelihood: as in :func:`build`.
        inplace: add into the state's own ``prec_diag`` and ``step`` tensors (and return the same state)
            instead of returning a new state.

    Returns:
        ``(state, aux)``, aux ``forward``'s aux output.

    Raises:
        TypeError / ValueError: ``forward`` returns no ``(output, aux)`` tuple or a non-tensor output, or
            ``outer_log_likelihood`` a non-scalar value.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import diag_ggn
        >>> forward = lambda p, b: (torch.stack([p.sum(), p[0] - p[1]]), torch.tensor([]))
        >>> loglik = lambda z, b: -0.5 * b * (z**2).sum()   # H_ℓ = b I
        >>> state = diag_ggn.init(torch.zeros(2))
        >>> state, _ = diag_ggn.update(state, 3.0, forward, loglik, inplace=True)
        >>> state.prec_diag, state.step
        (tensor([6., 6.]), tensor(1))
    """
    check_bool(inplace, "inplace")
    model, loss = likelihood_terms(forward, outer_log_likelihood, batch)
    with torch.no_grad(), CatchAuxError():
        diagonal, aux = ggn_diagonal(model, loss, forward_has_aux=True, loss_has_aux=False,
                                     normalize=False)(state.params)
    return add_diag(state, diagonal, inplace), aux
