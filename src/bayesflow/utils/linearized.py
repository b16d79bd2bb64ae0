r"""The linearised model's predictive Gaussian, for a diagonal Gaussian over the parameters.

posteriors' (normal-computing/posteriors) ``linearized_forward_diag``, with the same name, signature and
return convention. Linearising the model at :math:`\theta_m` (a MAP or variational mean),
:math:`f(x \mid \theta) \approx f(x \mid \theta_m) + J(x)(\theta - \theta_m)`, turns
:math:`\theta \sim \mathcal N(\theta_m, \Sigma)` into the Gaussian predictive
:math:`f(x) \sim \mathcal N(f(x \mid \theta_m), J(x) \Sigma J(x)^\top)` (Foong et al., 2019,
*'In-between' uncertainty in Bayesian neural networks*, arXiv:1906.11537). It uses the whole Jacobian
(``(batch, out, dθ)``), as posteriors does.

Example:
    >>> import torch
    >>> from bayesflow.utils import linearized_forward_diag
    >>> def forward(params, x):  # a linear model: J(x) = [x, 1]
    ...     out = x @ params["w"] + params["b"]
    ...     return out, out
    >>> params = {"w": torch.zeros(2, 1), "b": torch.zeros(1)}
    >>> sd = {"w": torch.ones(2, 1), "b": torch.ones(1)}
    >>> mean, chol, _ = linearized_forward_diag(forward, params, torch.tensor([[1.0, 0.0], [3.0, 4.0]]), sd)
    >>> chol  # √(‖x‖² + 1) for each input
    tensor([[[1.4142]],
    <BLANKLINE>
            [[5.0990]]])
"""

from __future__ import annotations

import torch
from torch.func import jacrev

from bayesflow.tree import flatten
from bayesflow.types import ForwardFn, TensorTree
from bayesflow.utils.functional import CatchAuxError

__all__ = ["linearized_forward_diag"]


def linearized_forward_diag(forward_func: ForwardFn, params: TensorTree, batch: TensorTree, sd_diag: TensorTree,
                            ) -> tuple[TensorTree, torch.Tensor, TensorTree]:
    r"""Mean and Cholesky factor of the linearised predictive for :math:`\Sigma = \mathrm{diag}(\sigma^2)`.

    For each of the ``B`` inputs :math:`x_b` of the batch, with :math:`J_b = \partial f(x_b \mid \theta) /
    \partial \theta` at ``params`` (``(out, dθ)``, over the ravelled parameters, by ``torch.func.jacrev``
    without autograd history):

    .. math::
        f(x_b) \sim \mathcal N\big(f(x_b \mid \theta_m),\ C_b\big), \qquad
        C_b = J_b\, \mathrm{diag}(\sigma^2)\, J_b^\top = L_b L_b^\top,

    and :math:`L_b` is the (lower) Cholesky factor, which needs :math:`C_b` positive definite
    (``out ≤ dθ`` and :math:`J_b` of full rank).

    Args:
        forward_func: ``forward_func(params, batch) -> (forward_vals, aux)``, ``forward_vals`` a 2-dimensional
            tensor ``(B, out)`` with the batch in its first axis.
        params: :math:`\theta_m`, a tree of tensors.
        batch: the inputs, passed to ``forward_func`` as they are.
        sd_diag: :math:`\sigma`, a tree of ``params``' structure and shapes.

    Returns:
        ``(forward_vals, chol, aux)``: ``forward_func``'s output at ``params`` (the predictive mean, with its
        autograd history), the ``(B, out, out)`` Cholesky factors :math:`L_b`, and ``forward_func``'s aux.

    Raises:
        TypeError: ``forward_func`` does not return ``(forward_vals, aux)`` or ``forward_vals`` is no tensor.
        ValueError: ``forward_vals`` is not 2-dimensional, or ``sd_diag`` differs from ``params`` in structure
            or shapes. ``torch.linalg.LinAlgError``: some :math:`C_b` is singular.

    Example:
        >>> import torch
        >>> from bayesflow.utils import linearized_forward_diag
        >>> def forward(params, x):  # two outputs: w_1 x and w_2 x
        ...     out = x[:, None] * params
        ...     return out, torch.tensor([])
        >>> mean, chol, aux = linearized_forward_diag(forward, torch.tensor([1.0, 2.0]), torch.tensor([3.0]),
        ...                                           torch.tensor([0.1, 0.2]))
        >>> mean, chol  # C = diag(x² σ²) = diag(0.09, 0.36)
        (tensor([[3., 6.]]), tensor([[[0.3000, 0.0000],
                 [0.0000, 0.6000]]]))
    """
    result = forward_func(params, batch)
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"linearized_forward_diag expects forward_func(params, batch) to return (forward_vals, aux), "
                        f"got {type(result).__name__}")
    forward_vals, aux = result
    if not isinstance(forward_vals, torch.Tensor) or forward_vals.ndim != 2:
        what = f"shape {tuple(forward_vals.shape)}" if isinstance(forward_vals, torch.Tensor) \
            else type(forward_vals).__name__
        raise (ValueError if isinstance(forward_vals, torch.Tensor) else TypeError)(
            f"linearized_forward_diag expects forward_vals to be a 2-dimensional tensor (batch, out), got {what}")
    param_leaves, spec = flatten(params)
    sd_leaves, sd_spec = flatten(sd_diag)
    if sd_spec != spec or any(tuple(s.shape) != tuple(p.shape) for s, p in zip(sd_leaves, param_leaves)):
        raise ValueError(f"linearized_forward_diag expects sd_diag with the structure and shapes of params "
                         f"({[tuple(p.shape) for p in param_leaves]}), got "
                         f"{[tuple(getattr(s, 'shape', ())) for s in sd_leaves]} in {sd_spec}")
    with torch.no_grad(), CatchAuxError():
        jac, _ = jacrev(forward_func, has_aux=True)(params, batch)  # tree like params of (B, out, *shape)
    size, out = forward_vals.shape
    jac = torch.cat([leaf.reshape(size, out, -1) for leaf in flatten(jac)[0]], dim=2)  # (B, out, dθ)
    variances = torch.cat([leaf.reshape(-1) for leaf in sd_leaves]) ** 2
    covariance = (jac * variances) @ jac.transpose(-1, -2)
    return forward_vals, torch.linalg.cholesky(covariance), aux
