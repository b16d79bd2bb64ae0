r"""Curvature-vector products: Hessian, empirical Fisher and generalised Gauss-Newton, matrix-free.

posteriors' (normal-computing/posteriors) ``hvp``, ``fvp``, ``empirical_fisher`` and ``ggnvp``, with the
same names, signatures and return conventions; they follow ``torch.func.jvp``'s API (``primals`` and
``tangents`` are tuples of the function's arguments). The products never form a matrix: each costs a
few forward/backward passes. :func:`empirical_fisher` is the one dense matrix here (``(dθ, dθ)`` over the
ravelled parameters); the dense GGN is in :mod:`bayesflow.utils.gauss_newton`.

Example:
    >>> import torch
    >>> from bayesflow.utils import empirical_fisher, fvp
    >>> def per_sample(x):  # two "samples": J = [[1, 1], [2 x_1, 2 x_2]]
    ...     return torch.stack([x.sum(), (x**2).sum()])
    >>> x = torch.tensor([1.0, 2.0])
    >>> empirical_fisher(per_sample)(x)  # JᵀJ
    tensor([[ 5.,  9.],
            [ 9., 17.]])
    >>> fvp(per_sample, (x,), (torch.tensor([1.0, 0.0]),))[1]  # JᵀJ v without forming JᵀJ
    tensor([5., 9.])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import grad, jacrev, jvp, vjp

from bayesflow.tree import tree_leaves, tree_map
from bayesflow.types import TensorTree

__all__ = ["empirical_fisher", "fvp", "ggnvp", "hvp"]


def _check_primals(name: str, primals: Any, tangents: Any) -> None:
    for label, value in (("primals", primals), ("tangents", tangents)):
        if not isinstance(value, tuple):
            raise TypeError(f"{name} expects {label} as a tuple of the function's arguments, e.g. (params,); "
                            f"got {type(value).__name__}")
    if len(primals) != len(tangents):
        raise ValueError(f"{name} expects one tangent per primal, got {len(primals)} primals and "
                         f"{len(tangents)} tangents")


def _batch_size(name: str, output: TensorTree) -> int:
    """The leading dimension of the first leaf of ``output``: the divisor of ``normalize=True``."""
    leaves = tree_leaves(output)
    if not leaves or not isinstance(leaves[0], torch.Tensor) or leaves[0].ndim == 0:
        shape = tuple(leaves[0].shape) if leaves and isinstance(leaves[0], torch.Tensor) else None
        raise ValueError(f"{name}(normalize=True) divides by the batch size, the leading dimension of the "
                         f"output, but the output's first leaf has shape {shape}")
    return leaves[0].shape[0]


def _ravel(tree: TensorTree) -> torch.Tensor:
    """The leaves of ``tree`` flattened and concatenated (optree order, as ``tree_ravel``)."""
    return torch.cat([torch.as_tensor(leaf).reshape(-1) for leaf in tree_leaves(tree)])


def hvp(f: Callable, primals: tuple, tangents: tuple, has_aux: bool = False) -> tuple:
    r"""Hessian-vector product :math:`H v` with :math:`H = \nabla^2 f(\theta)`, by forward-over-reverse.

    :math:`(\nabla f(\theta), H v) = \mathrm{jvp}(\nabla f, \theta, v)`: one gradient evaluation pushed
    forward along the tangent, never forming :math:`H`. The gradient is with respect to the first
    argument of ``f``; the tangents move all of ``primals`` (as ``torch.func.jvp``).

    Args:
        f: a function with scalar output (with ``has_aux``, returning ``(scalar, aux)``).
        primals: tuple of the arguments of ``f`` (tensors or trees of tensors) where :math:`H` is taken.
        tangents: tuple matching the structure of ``primals``, the vector :math:`v`.
        has_aux: whether ``f`` returns ``(output, aux)``.

    Returns:
        ``(gradient, hvp_out)``, or ``(gradient, hvp_out, aux)`` with ``has_aux``; ``gradient`` is
        :math:`\nabla f(\theta)` and ``hvp_out`` is :math:`Hv`, both shaped like the first primal.

    Raises:
        TypeError: ``primals`` or ``tangents`` is not a tuple. ValueError: their lengths differ.

    Example:
        >>> import torch
        >>> from bayesflow.utils import hvp
        >>> f = lambda x: (x**3).sum()  # ∇f = 3x², H = diag(6x)
        >>> hvp(f, (torch.tensor([1.0, 2.0]),), (torch.tensor([1.0, 1.0]),))
        (tensor([ 3., 12.]), tensor([ 6., 12.]))
    """
    _check_primals("hvp", primals, tangents)
    return jvp(grad(f, has_aux=has_aux), primals, tangents, has_aux=has_aux)


def fvp(f: Callable, primals: tuple, tangents: tuple, has_aux: bool = False, normalize: bool = False) -> tuple:
    r"""Empirical Fisher-vector product :math:`F v = J_f^\top (J_f v)`, with :math:`J_f` the Jacobian of ``f``.

    With ``f`` the per-sample log likelihood :math:`f_i(\theta) = \log p(y_i \mid x_i, \theta)`, the
    empirical Fisher is :math:`F(\theta) = \sum_i \nabla f_i \nabla f_i^\top = J_f^\top J_f`
    (:math:`J_f` of shape ``(n, dθ)``); with ``normalize=True`` it is divided by ``n``, the leading
    dimension of the output (the batch size). :math:`J_f v` is one ``jvp`` and :math:`J_f^\top u` one
    ``vjp``; no matrix is formed. With several primals the result is the first primal's block of
    :math:`J^\top (J v)` (posteriors' convention). See Martens (2020), *New insights and perspectives
    on the natural gradient method*, JMLR 21.

    Args:
        f: a function with tensor output (typically :func:`~bayesflow.utils.per_samplify`'d).
        primals: tuple of the arguments of ``f`` where :math:`F` is taken.
        tangents: tuple matching the structure of ``primals``, the vector :math:`v`.
        has_aux: whether ``f`` returns ``(output, aux)``.
        normalize: divide by the leading dimension of the output.

    Returns:
        ``(output, fvp_out)``, or ``(output, fvp_out, aux)`` with ``has_aux``: ``output = f(*primals)``
        and ``fvp_out`` :math:`= F v`, shaped like the first primal.

    Raises:
        TypeError: ``primals`` or ``tangents`` is not a tuple.
        ValueError: their lengths differ, or ``normalize=True`` with a 0-dimensional output.

    Example:
        >>> import torch
        >>> from bayesflow.utils import fvp
        >>> f = lambda x: torch.stack([x.sum(), (x**2).sum()])  # J = [[1, 1], [2, 4]] at x = (1, 2)
        >>> fvp(f, (torch.tensor([1.0, 2.0]),), (torch.tensor([1.0, 0.0]),), normalize=True)
        (tensor([3., 5.]), tensor([2.5000, 4.5000]))
    """
    _check_primals("fvp", primals, tangents)
    pushed = jvp(f, primals, tangents, has_aux=has_aux)  # (f(θ), J v[, aux])
    output, jv = pushed[0], pushed[1]
    pullback = vjp(f, *primals, has_aux=has_aux)[1]
    fv = pullback(jv)[0]
    if normalize:
        n = _batch_size("fvp", output)
        fv = tree_map(lambda leaf: leaf / n, fv)
    return (output, fv, *pushed[2:])


def empirical_fisher(f: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                     normalize: bool = False) -> Callable:
    r"""The function computing the dense empirical Fisher :math:`F(\theta) = J_f(\theta)^\top J_f(\theta)`.

    :math:`J_f` is the Jacobian of the ravelled output of ``f`` (``n`` entries, typically per-sample log
    likelihoods :math:`\log p(y_i \mid x_i, \theta)`) with respect to the ravelled argument(s)
    ``argnums`` (``dθ`` entries, in the order of ``optree.integrations.torch.tree_ravel``), taken with
    ``torch.func.jacrev``: :math:`F = \sum_i \nabla f_i \nabla f_i^\top`, of shape ``(dθ, dθ)``;
    ``normalize=True`` divides by ``n``. Memory :math:`O(n\,dθ + dθ^2)`.

    Args:
        f: a function of one or more arguments returning a tensor (or a tree of tensors).
        argnums: the positional argument(s) to differentiate with respect to, as in ``torch.func.jacrev``.
        has_aux: whether ``f`` returns ``(output, aux)``.
        normalize: divide by the number of outputs ``n`` (the batch size).

    Returns:
        ``fisher(*args, **kwargs)`` with ``f``'s arguments, returning ``F``, or ``(F, aux)`` with ``has_aux``.

    Example:
        >>> import torch
        >>> from bayesflow.utils import empirical_fisher
        >>> def residuals(params, x, y):  # per-sample residuals of a line
        ...     return y - params["slope"] * x - params["bias"]
        >>> params = {"bias": torch.tensor(0.0), "slope": torch.tensor(1.0)}
        >>> x, y = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
        >>> empirical_fisher(residuals, normalize=True)(params, x, y)  # mean of [1, x_i][1, x_i]ᵀ
        tensor([[1.0000, 1.5000],
                [1.5000, 2.5000]])
    """
    if not callable(f):
        raise TypeError(f"empirical_fisher expects a function f, got {type(f).__name__}")

    def f_ravelled(*args: Any, **kwargs: Any) -> Any:
        out = f(*args, **kwargs)
        if not has_aux:
            return _ravel(out)
        if not isinstance(out, tuple) or len(out) != 2:
            return out  # jacrev raises torch.func's "should be a tuple: (output, aux)" (see CatchAuxError)
        return _ravel(out[0]), out[1]

    def fisher(*args: Any, **kwargs: Any) -> Any:
        result = jacrev(f_ravelled, argnums=argnums, has_aux=has_aux)(*args, **kwargs)
        jac = result[0] if has_aux else result  # tree of (n, *leaf shape)
        leaves = tree_leaves(jac)
        rows = torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], dim=1)  # (n, dθ)
        fisher_matrix = rows.T @ rows
        if normalize:
            fisher_matrix = fisher_matrix / rows.shape[0]
        return (fisher_matrix, result[1]) if has_aux else fisher_matrix

    return fisher


def ggnvp(forward: Callable, loss: Callable, primals: tuple, tangents: tuple, forward_has_aux: bool = False,
          loss_has_aux: bool = False, normalize: bool = False) -> tuple:
    r"""Generalised Gauss-Newton-vector product :math:`G v = J_f^\top H_\ell J_f v`, matrix-free.

    :math:`G(\theta) = J_f(\theta)^\top H_\ell(z) J_f(\theta)` with :math:`z = f(\theta)` the output of
    ``forward``, :math:`J_f` its Jacobian (``(dz, dθ)``) and :math:`H_\ell(z)` the Hessian of the scalar
    ``loss`` at :math:`z` (``(dz, dz)``); it equals the Fisher when ``loss`` is the negative log likelihood
    of an exponential family in its natural parameter. Computed as a ``jvp`` of ``forward``
    (:math:`u = J_f v`), a :func:`hvp` of ``loss`` (:math:`H_\ell u`) and a ``vjp`` of ``forward``;
    ``normalize=True`` divides by the leading dimension of :math:`z` (the batch size).

    Args:
        forward: a function of ``primals`` with tensor output :math:`z`.
        loss: a function of :math:`z` with scalar output.
        primals: tuple of the arguments of ``forward`` where :math:`G` is taken.
        tangents: tuple matching the structure of ``primals``, the vector :math:`v`.
        forward_has_aux: whether ``forward`` returns ``(z, aux)``.
        loss_has_aux: whether ``loss`` returns ``(value, aux)``.
        normalize: divide by the leading dimension of :math:`z`.

    Returns:
        ``((z, grad_loss), ggnvp_out)`` with ``grad_loss`` :math:`= \nabla \ell(z)` and ``ggnvp_out``
        :math:`= G v` (shaped like the first primal), followed by ``forward``'s aux and then ``loss``'s
        aux for those that have one: ``(output, ggnvp_out[, forward_aux][, loss_aux])``.

    Raises:
        TypeError: ``primals`` or ``tangents`` is not a tuple.
        ValueError: their lengths differ, or ``normalize=True`` with a 0-dimensional :math:`z`.

    Example:
        >>> import torch
        >>> from bayesflow.utils import ggnvp
        >>> forward = lambda x: torch.stack([x[0] * x[1], x[0] + x[1]])  # J = [[2, 1], [1, 1]] at (1, 2)
        >>> loss = lambda z: 0.5 * (z**2).sum()  # H = I, so G = JᵀJ = [[5, 3], [3, 2]]
        >>> ggnvp(forward, loss, (torch.tensor([1.0, 2.0]),), (torch.tensor([1.0, 0.0]),))
        ((tensor([2., 3.]), tensor([2., 3.])), tensor([5., 3.]))
    """
    _check_primals("ggnvp", primals, tangents)
    pushed = jvp(forward, primals, tangents, has_aux=forward_has_aux)  # (z, J v[, forward aux])
    z, jv = pushed[0], pushed[1]
    curved = hvp(loss, (z,), (jv,), has_aux=loss_has_aux)  # (∇ℓ(z), H J v[, loss aux])
    hjv = curved[1]
    if normalize:
        n = _batch_size("ggnvp", z)
        hjv = tree_map(lambda leaf: leaf / n, hjv)
    pullback = vjp(forward, *primals, has_aux=forward_has_aux)[1]
    return ((z, curved[0]), pullback(hjv)[0], *pushed[2:], *curved[2:])
