r"""Linear algebra on parameter trees: conjugate gradients, and flat lower-triangular factors.

posteriors' (normal-computing/posteriors) ``cg``, ``L_from_flat`` and ``L_to_flat``, with the same names,
signatures and return conventions. :func:`cg` solves :math:`(A + \lambda I) x = b` for a matrix given
only as a function ``A(x)`` on trees (e.g. a :func:`~bayesflow.utils.fvp` or
:func:`~bayesflow.utils.ggnvp`); it flattens the tree once and iterates on the leaf list.

Example:
    >>> import torch
    >>> from bayesflow.utils import L_from_flat, L_to_flat
    >>> L = L_from_flat(torch.tensor([1.0, 2.0, 3.0]))  # the rows of the lower triangle, in order
    >>> L, L_to_flat(L)
    (tensor([[1., 0.],
            [2., 3.]]), tensor([1., 2., 3.]))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

import torch

from bayesflow.tree import flatten, unflatten
from bayesflow.tree_utils import tree_size
from bayesflow.types import TensorTree

__all__ = ["L_from_flat", "L_to_flat", "cg"]


def check_psd(name: str, matrix: torch.Tensor, symbol: str = "P") -> None:
    """ValueError unless ``matrix`` is finite, symmetric and positive semi-definite (to round-off).

    The one check of the dense precisions (Laplace) and covariances (linearised predictives); not in
    ``__all__`` (posteriors' names only).
    """
    if not matrix.is_floating_point() or not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name} must hold finite floating-point numbers")
    tolerance = 100 * matrix.shape[0] * torch.finfo(matrix.dtype).eps * max(float(matrix.abs().max()), 1e-300)
    asymmetry = float((matrix - matrix.mT).abs().max())
    if asymmetry > tolerance:
        raise ValueError(f"{name} must be symmetric, but |{symbol} - {symbol}ᵀ| reaches {asymmetry:.3g}")
    smallest = float(torch.linalg.eigvalsh(matrix)[0])
    if smallest < -tolerance:
        raise ValueError(f"{name} must be positive semi-definite, but has the eigenvalue {smallest:.6g}")


def _check_non_negative(name: str, value: Any) -> None:
    """``cg``'s ``tol``, ``atol`` and ``damping``: a real number (Python, NumPy or a one-element real tensor) ≥ 0.

    A string, None or a sequence would otherwise fail inside a comparison with a bare ``'>=' not
    supported`` (no name); a bool is refused as a type, since ``True`` is no tolerance anyone means.
    """
    is_tensor = isinstance(value, torch.Tensor)
    real = (is_tensor and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool) or (
        isinstance(value, Real) and not isinstance(value, bool))
    if not real:
        got = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if is_tensor else repr(value)
        raise TypeError(f"cg expects {name} to be a real number ≥ 0, got {got}")
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"cg expects {name} ≥ 0, got {value!r}")


def _iteration_count(maxiter: Any) -> int:
    """``maxiter`` as a Python int ≥ 0: any integer (``np.int64`` included, as posteriors accepts), no bool/float."""
    if isinstance(maxiter, bool) or not isinstance(maxiter, Integral):
        raise TypeError(f"cg expects maxiter to be an int ≥ 0 or None, got {maxiter!r} ({type(maxiter).__name__})")
    if maxiter < 0:
        raise ValueError(f"cg expects maxiter to be an int ≥ 0 or None, got {maxiter!r}")
    return int(maxiter)


def _identity(x: TensorTree) -> TensorTree:
    return x


def _real_dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    r""":math:`\mathrm{Re}\, \langle x, y \rangle = \sum_i \mathrm{Re}(\bar x_i y_i)` over all the leaves."""
    return sum((torch.vdot(x.reshape(-1), y.reshape(-1)).real for x, y in zip(xs, ys)), torch.zeros(()))


def _axpy(alpha: torch.Tensor, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """``y + alpha x`` leaf-wise."""
    return torch._foreach_add(ys, torch._foreach_mul(xs, alpha))


def cg(A: Callable, b: TensorTree, x0: TensorTree = None, *, maxiter: int | None = None, damping: float = 0.0,
       tol: float = 1e-5, atol: float = 0.0, M: Callable = _identity) -> tuple[TensorTree, dict[str, Any]]:
    r"""Solve :math:`(A + \lambda I)\,x = b` by (preconditioned) conjugate gradients, ``A`` given as a function.

    With :math:`\tilde A = A + \lambda I` (``damping`` :math:`\lambda`) Hermitian positive definite and
    ``M`` :math:`\approx \tilde A^{-1}`: :math:`r_0 = b - \tilde A x_0`, :math:`p_0 = z_0 = M r_0`, and for
    :math:`k = 0, 1, \ldots`

    .. math::
        \alpha_k = \frac{\langle r_k, z_k\rangle}{\langle p_k, \tilde A p_k\rangle}, \quad
        x_{k+1} = x_k + \alpha_k p_k, \quad r_{k+1} = r_k - \alpha_k \tilde A p_k, \quad
        z_{k+1} = M r_{k+1}, \quad
        p_{k+1} = z_{k+1} + \frac{\langle r_{k+1}, z_{k+1}\rangle}{\langle r_k, z_k\rangle} p_k,

    with :math:`\langle u, v\rangle = \mathrm{Re}\, u^H v` summed over the leaves, until
    :math:`\|r_k\|^2 \le \max(\mathrm{tol}^2 \|b\|^2, \mathrm{atol}^2)` (SciPy's non-legacy criterion, as
    ``jax.scipy.sparse.linalg.cg``) or ``maxiter`` steps. One call of ``A`` per step. (posteriors starts
    from :math:`z_0 = r_0` even with a preconditioner; here :math:`z_0 = M r_0`, the textbook method:
    the same solution, reached in fewer steps.)

    Args:
        A: the linear map, ``A(x)`` returning a tree of ``x``'s structure and shapes.
        b: the right-hand side, a tensor or a tree of tensors.
        x0: the starting guess, with ``b``'s structure; zeros by default.
        maxiter: the most steps; ``10 * tree_size(b)`` by default (as SciPy).
        damping: :math:`\lambda \ge 0`, added to the diagonal of :math:`A` (regularisation).
        tol: relative tolerance on the residual norm.
        atol: absolute tolerance on the residual norm.
        M: the preconditioner, a function on trees approximating :math:`\tilde A^{-1}`.

    Returns:
        ``(x, info)``: the solution (``b``'s structure) and ``{"error": ..., "converged": ..., "niter": ...}``
        with ``error`` the last :math:`\|r\|^2` (a 0-dim tensor), ``converged`` whether it met the
        tolerance (a 0-dim bool tensor) and ``niter`` the steps taken (an int).

    Raises:
        TypeError: ``A`` or ``M`` is not callable, ``b`` has a leaf that is not a tensor, ``tol``,
            ``atol`` or ``damping`` is not a real number (a bool, a string, a many-element tensor), or
            ``maxiter`` is not an integer (a bool, a float; NumPy integers are accepted).
        ValueError: ``x0`` or ``A``'s output has another structure or shapes than ``b``; a negative
            (or NaN) ``tol``, ``atol``, ``damping`` or ``maxiter``.

    Example:
        >>> import torch
        >>> from bayesflow.utils import cg
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> b = {"x": torch.tensor([1.0, 2.0])}
        >>> x, info = cg(lambda v: {"x": A @ v["x"]}, b)
        >>> torch.allclose(x["x"], torch.linalg.solve(A, b["x"])), info["niter"], bool(info["converged"])
        (True, 2, True)
    """
    if not callable(A) or not callable(M):
        raise TypeError(f"cg expects functions A and M, got {type(A).__name__} and {type(M).__name__}")
    for name, value in (("tol", tol), ("atol", atol), ("damping", damping)):
        _check_non_negative(name, value)
    b_leaves, spec = flatten(b)
    if not all(isinstance(leaf, torch.Tensor) for leaf in b_leaves):
        raise TypeError(f"cg expects b to be a tensor or a tree of tensors, got leaves of types "
                        f"{sorted({type(leaf).__name__ for leaf in b_leaves})}")
    maxiter = 10 * tree_size(b) if maxiter is None else _iteration_count(maxiter)

    def as_leaves(tree: TensorTree, what: str) -> list[torch.Tensor]:
        leaves, tree_spec = flatten(tree)
        if tree_spec != spec or any(leaf.shape != ref.shape for leaf, ref in zip(leaves, b_leaves)):
            raise ValueError(f"cg: {what} must have the structure and shapes of b ({spec}, "
                             f"{[tuple(leaf.shape) for leaf in b_leaves]}), got {tree_spec}, "
                             f"{[tuple(getattr(leaf, 'shape', ())) for leaf in leaves]}")
        return leaves

    def damped(p: list[torch.Tensor]) -> list[torch.Tensor]:
        ap = as_leaves(A(unflatten(spec, p)), "A(x)")
        return torch._foreach_add(ap, p, alpha=damping) if damping else ap

    if M is _identity:
        precondition = _identity
    else:
        def precondition(r: list[torch.Tensor]) -> list[torch.Tensor]:
            return as_leaves(M(unflatten(spec, r)), "M(r)")

    x = [torch.zeros_like(leaf) for leaf in b_leaves] if x0 is None else as_leaves(x0, "x0")
    threshold = torch.clamp(_real_dot(b_leaves, b_leaves) * tol**2, min=atol**2)
    r = torch._foreach_sub(b_leaves, damped(x))
    z = precondition(r)
    p, gamma = z, _real_dot(r, z)
    residual = gamma if M is _identity else _real_dot(r, r)
    k = 0
    while k < maxiter and bool(residual > threshold):
        ap = damped(p)
        alpha = gamma / _real_dot(p, ap)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        z = precondition(r)
        gamma_next = _real_dot(r, z)
        p = _axpy(gamma_next / gamma, p, z)
        gamma, k = gamma_next, k + 1
        residual = gamma if M is _identity else _real_dot(r, r)
    info = {"error": residual, "converged": residual <= threshold, "niter": k}
    return unflatten(spec, x), info


def _triangle_side(count: int) -> int:
    """``n`` with ``n (n + 1) / 2 = count``, or -1 if ``count`` is not a triangular number."""
    n = (math.isqrt(8 * count + 1) - 1) // 2
    return n if n * (n + 1) // 2 == count else -1


def L_from_flat(L_flat: torch.Tensor) -> torch.Tensor:
    r"""The lower-triangular :math:`L \in \mathbb{R}^{n \times n}` whose lower triangle, row by row, is ``L_flat``.

    ``L_flat`` has :math:`k = n(n+1)/2` entries :math:`(L_{00}, L_{10}, L_{11}, L_{20}, \ldots)` (the order of
    ``torch.tril_indices``); :math:`n = (\sqrt{8k + 1} - 1)/2`. Built out of place, so differentiable and
    usable under ``torch.func`` transforms; dtype and device are ``L_flat``'s. Inverse of :func:`L_to_flat`.

    Args:
        L_flat: a 1-dimensional tensor of a triangular number of entries.

    Returns:
        The ``(n, n)`` lower-triangular tensor.

    Raises:
        TypeError: ``L_flat`` is not a tensor. ValueError: it is not 1-dimensional, or its length is not
            :math:`n(n+1)/2`.

    Example:
        >>> import torch
        >>> from bayesflow.utils import L_from_flat
        >>> L_from_flat(torch.tensor([1.0, -4.0, 2.0, -1.0, 4.0, -5.0]))
        tensor([[ 1.,  0.,  0.],
                [-4.,  2.,  0.],
                [-1.,  4., -5.]])
    """
    if not isinstance(L_flat, torch.Tensor):
        raise TypeError(f"L_from_flat expects a 1-dimensional tensor, got {type(L_flat).__name__}")
    n = _triangle_side(L_flat.shape[0]) if L_flat.ndim == 1 else -1
    if n < 0:
        raise ValueError(f"L_from_flat expects a 1-dimensional tensor of n (n + 1) / 2 entries, got shape "
                         f"{tuple(L_flat.shape)}")
    rows, cols = torch.tril_indices(n, n, device=L_flat.device)
    return L_flat.new_zeros(n, n).index_put((rows, cols), L_flat)


def L_to_flat(L: torch.Tensor) -> torch.Tensor:
    r"""The entries of the lower triangle of a square :math:`L`, row by row: :math:`(L_{00}, L_{10}, L_{11}, \ldots)`.

    A new tensor of :math:`n(n+1)/2` entries (entries above the diagonal are ignored); the inverse of
    :func:`L_from_flat` on lower-triangular matrices.

    Args:
        L: an ``(n, n)`` tensor.

    Returns:
        The 1-dimensional tensor of its lower-triangular entries.

    Raises:
        TypeError: ``L`` is not a tensor. ValueError: it is not a square matrix.

    Example:
        >>> import torch
        >>> from bayesflow.utils import L_to_flat
        >>> L_to_flat(torch.tensor([[1.0, 0.0, 0.0], [-4.0, 2.0, 0.0], [-1.0, 4.0, -5.0]]))
        tensor([ 1., -4.,  2., -1.,  4., -5.])
    """
    if not isinstance(L, torch.Tensor):
        raise TypeError(f"L_to_flat expects a square matrix tensor, got {type(L).__name__}")
    if L.ndim != 2 or L.shape[0] != L.shape[1]:
        raise ValueError(f"L_to_flat expects a square (n, n) matrix, got shape {tuple(L.shape)}")
    rows, cols = torch.tril_indices(L.shape[0], L.shape[0], device=L.device)
    return L[rows, cols]
