r"""The dense generalised Gauss-Newton matrix and its diagonal, from the full Jacobian.

posteriors' (normal-computing/posteriors) ``ggn`` and ``diag_ggn``, with the same names, signatures and
return conventions. Both materialise, as posteriors does, the whole Jacobian :math:`J_f` of the forward
output with respect to the ravelled parameters (``(dz, dθ)``) and the Hessian :math:`H_\ell` of the loss
at the output (``(dz, dz)``): memory :math:`O(dz\,dθ + dz^2)`. For large models use the matrix-free
:func:`~bayesflow.utils.ggnvp` instead.

Example:
    >>> import torch
    >>> from bayesflow.utils import diag_ggn, ggn
    >>> forward = lambda x: torch.stack([x[0] * x[1], x[0] + x[1]])  # J = [[2, 1], [1, 1]] at (1, 2)
    >>> loss = lambda z: 0.5 * (z**2).sum()  # H = I
    >>> ggn(forward, loss)(torch.tensor([1.0, 2.0]))  # JᵀHJ
    tensor([[5., 3.],
            [3., 2.]])
    >>> diag_ggn(forward, loss)(torch.tensor([1.0, 2.0]))
    tensor([5., 2.])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from optree.integrations.torch import tree_ravel
from torch.func import jacfwd, jacrev, vjp

from bayesflow.tree_utils import NAMESPACE
from bayesflow.types import TensorTree

__all__ = ["diag_ggn", "ggn"]


def _check_argnums(name: str, argnums: Any) -> None:
    if argnums != 0:
        raise ValueError(f"{name} differentiates its function's single argument (argnums=0), got argnums={argnums!r}")


def _jacobian_and_hessian(forward: Callable, loss: Callable, params: TensorTree, forward_has_aux: bool,
                          loss_has_aux: bool, normalize: bool, name: str,
                          ) -> tuple[torch.Tensor, torch.Tensor, list, Callable]:
    r""":math:`J_f` ``(dz, dθ)``, :math:`H_\ell` ``(dz, dz)`` (divided by the batch size with ``normalize``),
    the aux outputs present (forward's, then loss's) and the unravel function of the parameters."""
    flat, unravel = tree_ravel(params, namespace=NAMESPACE)
    pulled = vjp(lambda theta: forward(unravel(theta)), flat, has_aux=forward_has_aux)  # (z, pullback[, aux])
    z, pullback = pulled[0], pulled[1]
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} needs forward to return a tensor (its output z), got {type(z).__name__}")
    dz = z.numel()
    basis = torch.eye(dz, dtype=z.dtype, device=z.device).reshape(dz, *z.shape)
    jac = torch.vmap(pullback)(basis)[0]  # row i: ∂z_i/∂θ, the whole Jacobian (dz, dθ)
    curvature = jacfwd(jacrev(loss, has_aux=loss_has_aux), has_aux=loss_has_aux)(z)
    hess = curvature[0] if loss_has_aux else curvature
    if not isinstance(hess, torch.Tensor) or hess.numel() != dz * dz:
        raise ValueError(f"{name} needs loss to map forward's output (shape {tuple(z.shape)}) to a scalar; its "
                         f"Hessian has shape {tuple(getattr(hess, 'shape', ()))}")
    hess = hess.reshape(dz, dz)
    if normalize:
        if z.ndim == 0:
            raise ValueError(f"{name}(normalize=True) divides by the batch size, the leading dimension of "
                             "forward's output, but the output is 0-dimensional")
        hess = hess / z.shape[0]
    aux = [*pulled[2:]] + ([curvature[1]] if loss_has_aux else [])
    return jac, hess, aux, unravel


def ggn(forward: Callable, loss: Callable, argnums: int | Sequence[int] = 0, forward_has_aux: bool = False,
        loss_has_aux: bool = False, normalize: bool = False) -> Callable:
    r"""The function computing the dense GGN :math:`G(\theta) = J_f(\theta)^\top H_\ell(z)\, J_f(\theta)`.

    :math:`z = f(\theta)` is the (tensor) output of ``forward``, :math:`J_f` its Jacobian with respect to
    the ravelled parameters (order of ``optree.integrations.torch.tree_ravel``), :math:`H_\ell(z)` the
    Hessian of the scalar ``loss`` at :math:`z`; :math:`G` equals the Fisher when ``loss`` is the negative
    log likelihood of an exponential family in its natural parameter (Martens, 2020). ``normalize=True``
    divides by the leading dimension of :math:`z` (the batch size). Materialises :math:`J_f` and
    :math:`H_\ell` (see the module note); the result is ``(dθ, dθ)``.

    Args:
        forward: a function of the parameters (a tensor or a tree of tensors) returning a tensor :math:`z`.
        loss: a function of :math:`z` returning a scalar.
        argnums: only ``0`` (the function returned takes the parameters alone), as in posteriors.
        forward_has_aux: whether ``forward`` returns ``(z, aux)``.
        loss_has_aux: whether ``loss`` returns ``(value, aux)``.
        normalize: divide by the leading dimension of :math:`z`.

    Returns:
        ``ggn_fn(params)`` returning :math:`G`, or ``(G, forward_aux)``, ``(G, loss_aux)`` or
        ``(G, forward_aux, loss_aux)`` when the functions have aux outputs.

    Raises:
        ValueError: ``argnums`` is not 0; (when called) ``loss`` is not scalar, or ``normalize`` with a
            0-dimensional :math:`z`. TypeError: (when called) ``forward``'s output is not a tensor.

    Example:
        >>> import torch
        >>> from bayesflow.utils import ggn
        >>> def forward(params):  # logits of a 2-class linear model on two inputs
        ...     return torch.tensor([[1.0, 0.0], [0.0, 1.0]]) @ params["w"]
        >>> def loss(logits):  # -log softmax likelihood of class 0 for both rows
        ...     return -torch.log_softmax(logits, dim=-1)[:, 0].sum()
        >>> ggn(forward, loss, normalize=True)({"w": torch.zeros(2, 2)})  # mean over rows of x xᵀ ⊗ (diag(p) - ppᵀ)
        tensor([[ 0.1250, -0.1250,  0.0000,  0.0000],
                [-0.1250,  0.1250,  0.0000,  0.0000],
                [ 0.0000,  0.0000,  0.1250, -0.1250],
                [ 0.0000,  0.0000, -0.1250,  0.1250]])
    """
    _check_argnums("ggn", argnums)

    def ggn_fn(params: TensorTree) -> Any:
        jac, hess, aux, _ = _jacobian_and_hessian(forward, loss, params, forward_has_aux, loss_has_aux,
                                                  normalize, "ggn")
        matrix = jac.T @ (hess @ jac)
        return (matrix, *aux) if aux else matrix

    return ggn_fn


def diag_ggn(forward: Callable, loss: Callable, argnums: int | Sequence[int] = 0, forward_has_aux: bool = False,
             loss_has_aux: bool = False, normalize: bool = False) -> Callable:
    r"""The function computing the GGN's diagonal :math:`\mathrm{diag}(J_f^\top H_\ell J_f)`, as a parameter tree.

    :math:`G_{jj} = \sum_{a, b} (J_f)_{aj} (H_\ell)_{ab} (J_f)_{bj}`, with :math:`G` as in :func:`ggn`
    (``normalize=True`` divides by the batch size, the leading dimension of :math:`z`), returned with the
    structure and shapes of the parameters (unlike :func:`ggn`'s square matrix). Materialises
    :math:`J_f` and :math:`H_\ell` as posteriors does (see the module note), but never :math:`G`.

    Args:
        forward: a function of the parameters returning a tensor :math:`z`.
        loss: a function of :math:`z` returning a scalar.
        argnums: only ``0``, as in posteriors.
        forward_has_aux: whether ``forward`` returns ``(z, aux)``.
        loss_has_aux: whether ``loss`` returns ``(value, aux)``.
        normalize: divide by the leading dimension of :math:`z`.

    Returns:
        ``diag_fn(params)`` returning the diagonal as a tree like ``params``, followed (in a tuple) by
        ``forward``'s and then ``loss``'s aux outputs when they have one.

    Raises:
        ValueError, TypeError: as :func:`ggn`.

    Example:
        >>> import torch
        >>> from bayesflow.utils import diag_ggn
        >>> forward = lambda p: p["w"] * torch.tensor([1.0, 2.0]) + p["b"]
        >>> loss = lambda z: 0.5 * (z**2).sum()  # H = I: diagonal = column sums of J²
        >>> diag_ggn(forward, loss)({"b": torch.tensor(0.0), "w": torch.tensor([1.0, 1.0])})
        {'b': tensor(2.), 'w': tensor([1., 4.])}
    """
    _check_argnums("diag_ggn", argnums)

    def diag_fn(params: TensorTree) -> Any:
        jac, hess, aux, unravel = _jacobian_and_hessian(forward, loss, params, forward_has_aux, loss_has_aux,
                                                        normalize, "diag_ggn")
        diagonal = unravel(((hess @ jac) * jac).sum(dim=0))
        return (diagonal, *aux) if aux else diagonal

    return diag_fn
