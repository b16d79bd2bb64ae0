r"""Operators on the flattened component: dense matrices and user-defined (possibly state-dependent)
linear maps — the research end of D and Q, where a user writes the matrix or the matvec.

Both follow the protocol of :mod:`bayesflow.engine.operators` and are validated at ``init``: a
diffusion must be symmetric positive semi-definite, a curl skew-symmetric.

Example:
    >>> import torch
    >>> from bayesflow.engine import Dense, SDEConfig, build
    >>> D = Dense(torch.tensor([[2.0, 0.3], [0.3, 1.0]]))      # symmetric PSD
    >>> Q = Dense(torch.tensor([[0.0, 1.5], [-1.5, 0.0]]))     # skew-symmetric
    >>> transform = build(lambda p, b: (-0.5 * (p**2).sum(), None), SDEConfig(step_size=0.01, diffusion=D, curl=Q))
    >>> state, _ = transform.update(transform.init(torch.zeros(2), seed=0), None)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bayesflow.engine.accumulator import Leaves
from bayesflow.engine.context import Context, flat, split_like
from bayesflow.engine.operators import Operator

__all__ = ["Dense", "Function"]


def _check_matrix(matrix: torch.Tensor, role: str, where: str, atol: float | None = None) -> None:
    scale = matrix.abs().max().clamp_min(1.0).item()
    atol = atol if atol is not None else 1e-6 * scale
    if role == "diffusion":
        asymmetry = (matrix - matrix.T).abs().max().item()
        if asymmetry > atol:
            raise ValueError(f"{where}: diffusion D must be symmetric; max |D - Dᵀ| = {asymmetry:.3g}")
        smallest = torch.linalg.eigvalsh(matrix.double()).min().item()
        if smallest < -atol:
            raise ValueError(
                f"{where}: diffusion D must be positive semi-definite; smallest eigenvalue {smallest:.3g}"
            )
    elif role == "curl":
        asymmetry = (matrix + matrix.T).abs().max().item()
        if asymmetry > atol:
            raise ValueError(f"{where}: curl Q must be skew-symmetric; max |Q + Qᵀ| = {asymmetry:.3g}")


def check_finite_matrix(matrix: torch.Tensor, name: str) -> None:
    """A ValueError naming the operator and the first NaN or ±inf entry (a NaN defeats the symmetry and
    PSD tests, an inf their tolerance: both would pass silently and poison the parameters)."""
    finite = torch.isfinite(matrix)
    if not bool(finite.all()):
        i, j = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{name} matrix must be finite; entry ({i}, {j}) is {matrix[i, j].item()} "
                         f"({int((~finite).sum())} non-finite entries)")


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root via eigh (works for singular PSD matrices, unlike Cholesky)."""
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    return (vectors * eigenvalues.clamp_min(0).sqrt()) @ vectors.T


class Dense(Operator):
    """A constant d×d matrix acting on the flattened component (research use: flat parameters).

    Args:
        matrix: a ``(d, d)`` tensor, d the number of scalars in the component. A diffusion must be
            symmetric positive semi-definite, a curl skew-symmetric (checked at ``init``).

    Example (a correlated diffusion and a rotation on two flat parameters):
        >>> import torch
        >>> from bayesflow.engine import Dense, build
        >>> D = Dense(torch.tensor([[2.0, 0.5], [0.5, 1.0]]))    # symmetric positive definite
        >>> Q = Dense(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))   # skew-symmetric
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.01, diffusion=D, curl=Q)
        >>> state, _ = transform.update(transform.init(torch.zeros(2), seed=0), batch=None)
    """

    def __init__(self, matrix: torch.Tensor, joint=None):
        if not isinstance(matrix, torch.Tensor):
            raise TypeError(f"Dense needs a torch.Tensor matrix, got {type(matrix).__name__}")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Dense needs a square matrix, got shape {tuple(matrix.shape)}")
        check_finite_matrix(matrix, "Dense")
        self.matrix = matrix
        self._sqrt = None
        self.joint = joint  # the JointDiffusion this block was cut from (Block.dense), or None

    def accumulate(self, out, v, alpha, ctx):
        out.add(split_like(self.matrix @ flat(v), out.leaves), alpha=alpha)

    def sqrt_accumulate(self, out, noise, alpha, ctx):
        if self._sqrt is None:
            self._sqrt = _psd_sqrt(self.matrix)
        out.add(split_like(self._sqrt @ flat(noise), out.leaves), alpha=alpha)

    def diagonal(self, ctx):
        off = self.matrix - torch.diag(torch.diagonal(self.matrix))
        return None if off.any() else split_like(torch.diagonal(self.matrix), ctx.leaves("params"))

    def tensors(self):
        return [self.matrix]

    def __eq__(self, other):
        return isinstance(other, Dense) and other.matrix.shape == self.matrix.shape and bool(
            torch.equal(other.matrix, self.matrix))

    def __hash__(self):
        return hash(("Dense", tuple(self.matrix.shape)))

    def check(self, shapes, role, where):
        d = sum(math.prod(s) for s in shapes)
        if self.matrix.shape[0] != d:
            raise ValueError(f"{where}: Dense matrix is {tuple(self.matrix.shape)} but the component "
                             f"has {d} scalars")
        _check_matrix(self.matrix, role, where)

    def __repr__(self):
        return f"Dense({tuple(self.matrix.shape)})"


class Function(Operator):
    r"""A user-defined, possibly state-dependent operator on the flattened component.

    Args:
        matvec: ``matvec(z, v) -> O(z) v`` on flat 1-D tensors.
        sqrt_matvec: ``sqrt_matvec(z, v) -> O(z)^{1/2} v``; needed for a diffusion. If omitted,
            the engine materialises O(z) (d matvecs) and takes a symmetric square root: research scale.
        divergence: ``divergence(z) -> Γ`` with :math:`Γ_i = \sum_j \partial_j O_{ij}(z)`. If omitted
            and ``state_dependent``, Γ is computed with ``torch.func`` (d forward-mode products).
        state_dependent: whether O depends on z (False: Γ = 0).
        diagonal: O(z) is diagonal with O_ii depending on z_i alone. Then Γ = ∂_i O_ii costs one
            backward pass instead of d forward-mode products, and the default square root is
            elementwise.

    Example (the Γ test of ENGINE.md, D(x) = 1 + x²):
        >>> import torch
        >>> from bayesflow.engine import Function
        >>> D = Function(lambda z, v: (1 + z**2) * v, sqrt_matvec=lambda z, v: (1 + z**2).sqrt() * v)
        >>> D.matvec(torch.tensor([1.0, 2.0]), torch.ones(2))  # D(z) v at z = (1, 2), v = (1, 1)
        tensor([2., 5.])
    """

    def __init__(self, matvec: Callable, sqrt_matvec: Callable | None = None,
                 divergence: Callable | None = None, state_dependent: bool = True, diagonal: bool = False):
        if not callable(matvec):
            raise TypeError(f"Function needs a callable matvec(z, v), got {type(matvec).__name__}")
        self.matvec = matvec
        self.sqrt_matvec = sqrt_matvec
        self.divergence_fn = divergence
        self.state_dependent = state_dependent
        self.is_diagonal = diagonal

    def _z(self, ctx: Context, like: Leaves) -> torch.Tensor:
        return flat(like)

    def matrix(self, z: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(z.numel(), dtype=z.dtype, device=z.device)
        return torch.func.vmap(lambda e: self.matvec(z, e))(eye).T

    def accumulate(self, out, v, alpha, ctx):
        z = flat(ctx.leaves("params")) if self.state_dependent else None
        out.add(split_like(self.matvec(z, flat(v)), out.leaves), alpha=alpha)

    def sqrt_accumulate(self, out, noise, alpha, ctx):
        z = flat(ctx.leaves("params")) if self.state_dependent else None
        if self.sqrt_matvec is not None:
            result = self.sqrt_matvec(z, flat(noise))
        elif self.is_diagonal:
            entries = flat(noise)
            result = self.matvec(z, torch.ones_like(entries)).clamp_min(0).sqrt() * entries
        else:
            result = _psd_sqrt(self.matrix(z)) @ flat(noise)
        out.add(split_like(result, out.leaves), alpha=alpha)

    def divergence(self, ctx):
        if not self.state_dependent:
            return None
        z = flat(ctx.leaves("params"))
        if self.divergence_fn is not None:
            gamma = self.divergence_fn(z)
        elif self.is_diagonal:  # ∂_j Σ_i O_ii(z) = ∂_j O_jj when O_ii depends on z_i alone
            with torch.enable_grad():
                point = z.detach().requires_grad_(True)
                gamma = torch.autograd.grad(self.matvec(point, torch.ones_like(point)).sum(), point)[0]
        else:
            # Γ_i = Σ_j ∂_j O_ij = Σ_j [∂/∂z_j (O(z) e_j)]_i: one jvp along each basis vector.
            def column_derivative(e):
                return torch.func.jvp(lambda x: self.matvec(x, e), (z,), (e,))[1]

            eye = torch.eye(z.numel(), dtype=z.dtype, device=z.device)
            gamma = torch.func.vmap(column_derivative)(eye).sum(0)
        return split_like(gamma, ctx.leaves("params"))

    def validate_at(self, z: torch.Tensor, role: str, where: str) -> None:
        """Check symmetry / skew-symmetry of O(z) at the initial point (for d ≤ 2048)."""
        if z.numel() <= 2048:
            _check_matrix(self.matrix(z), role, where)

    def __repr__(self):
        name = getattr(self.matvec, "__name__", "matvec")
        return f"Function({name}, state_dependent={self.state_dependent})"
