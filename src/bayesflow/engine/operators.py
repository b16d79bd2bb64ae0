r"""Linear operators on the extended state: the D (diffusion), Q (curl) and N (data-size) of the SDE.

Every operator answers one protocol, used by every integrator:

* ``accumulate(out, v, alpha, ctx)``: ``out += alpha * O(z) v`` (foreach, in place on ``out``);
* ``sqrt_accumulate(out, noise, alpha, ctx)``: ``out += alpha * O(z)^{1/2} noise`` (diffusions);
* ``divergence(ctx)``: the block's contribution :math:`\sum_j \partial_j O_{ij}(z)` to Γ, or None
  where it is zero (constant operators);
* ``diagonal(ctx)``: a float or one tensor per leaf where O is diagonal (exact Ornstein–Uhlenbeck
  steps need it), else None;
* ``check(shapes, role, where)``: validation at ``init`` against the component's leaf shapes.

Operators here act on one component (or one block of a :class:`~bayesflow.engine.block.Block`).
Constant operators carry no state; :mod:`bayesflow.engine.preconditioners` adds stateful diagonals.

Example:
    >>> import torch
    >>> from bayesflow.engine import operators as ops
    >>> D = ops.Scalar(1.0)                                   # SGLD's identity diffusion
    >>> Q = ops.Dense(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))  # a rotation on flat 2-D params
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bayesflow.engine.accumulator import Accumulator, Leaves
from bayesflow.engine.context import Context, flat, split_like

__all__ = ["Dense", "Diagonal", "Function", "Operator", "Scalar", "Zero"]

ROLES = ("diffusion", "curl", "coupling")


class Operator:
    """Base class: a zero operator. Subclasses override what they support.

    Example (a user operator D = I/2 written against the protocol, used as SGLD's diffusion):
        >>> import math, torch
        >>> from bayesflow.engine import Operator, build
        >>> class Half(Operator):
        ...     def accumulate(self, out, v, alpha, ctx):           # out += alpha · O v
        ...         out.add(v, alpha=0.5 * alpha)
        ...     def sqrt_accumulate(self, out, noise, alpha, ctx):  # out += alpha · O^{1/2} noise
        ...         out.add(noise, alpha=alpha * math.sqrt(0.5))
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.1, diffusion=Half())
        >>> state, _ = transform.update(transform.init(torch.zeros(2), seed=0), batch=None)
    """

    state_dependent: bool = False
    """Whether O depends on z, so that Γ may be non-zero."""

    is_zero: bool = False

    def preconditioners(self) -> tuple:
        """Stateful preconditioners this operator reads (updated once per step by the engine)."""
        return ()

    def accumulate(self, out: Accumulator, v: Leaves, alpha: float, ctx: Context) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot multiply a vector")

    def accumulate_through_mass(self, out: Accumulator, v: Leaves, mass: Operator, alpha: float,
                                ctx: Context) -> None:
        """``out += alpha * O M⁻¹ v`` for a diagonal mass M; subclasses fuse or cancel the M⁻¹."""
        self.accumulate(out, mass.solve(v, ctx), alpha, ctx)

    def multiplier(self, ctx: Context, v: Leaves | None, alpha: float):
        """``c`` with ``alpha · O v = c · (the row)`` when this term is a multiple of its own row, else None.

        ``v`` is None for a diagonal block applied to the row itself.
        """
        return None

    def solve(self, v: Leaves, ctx: Context) -> Leaves:
        """``O⁻¹ v`` for diagonal operators (masses)."""
        raise ValueError(f"{type(self).__name__} cannot be inverted: a mass must be diagonal")

    def sqrt_accumulate(self, out: Accumulator, noise: Leaves, alpha: float, ctx: Context) -> None:
        raise ValueError(f"{type(self).__name__} has no square root: it cannot be a diffusion")

    def divergence(self, ctx: Context) -> Leaves | None:
        return None

    def diagonal(self, ctx: Context) -> float | Leaves | None:
        return None

    def tensors(self) -> list[torch.Tensor]:
        """Tensors the operator holds (their dtype and device must match the parameters')."""
        return []

    def symbol(self) -> tuple | None:
        """``(kind, reference, scale)`` for cheap symmetry checks between blocks, or None."""
        return None

    def check(self, shapes: list[torch.Size], role: str, where: str) -> None:
        """Raise a ValueError naming ``where`` if the operator does not fit ``shapes`` or ``role``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Zero(Operator):
    """The zero operator (no diffusion, no circulation).

    Example:
        >>> from bayesflow.engine import Block, Scalar, Zero
        >>> Zero().is_zero, Scalar(0.0).is_zero
        (True, True)
        >>> Block({("params", "params"): Zero()})   # zero blocks are dropped: nothing to compute
        Block({})
    """

    is_zero = True

    def accumulate(self, out, v, alpha, ctx):
        pass

    def sqrt_accumulate(self, out, noise, alpha, ctx):
        pass

    def diagonal(self, ctx):
        return 0.0

    def symbol(self):
        return ("scalar", None, 0.0)

    def __eq__(self, other):
        return isinstance(other, Zero)

    def __hash__(self):
        return hash(Zero)


class Scalar(Operator):
    r"""``c · I``. ``Scalar(1.0)`` is the identity (SGLD's diffusion).

    Args:
        value: the constant c (a Python float: it folds into foreach ``alpha`` at no cost).

    Example:
        >>> from bayesflow.engine import Block, Scalar
        >>> identity = Scalar(1.0)                                    # SGLD's diffusion D = I on θ
        >>> friction = Block({("momenta", "momenta"): Scalar(0.1)})   # SGHMC's D_mm = γ·I with γ = 0.1
        >>> friction.get("momenta", "momenta"), friction.get("momenta", "momenta").diagonal(ctx=None)
        (Scalar(0.1), 0.1)
    """

    def __init__(self, value: float = 1.0):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError("Scalar takes one number; use Diagonal for per-element values")
            value = value.item()
        if not math.isfinite(value):
            raise ValueError(f"Scalar operator value must be finite, got {value}")
        self.value = float(value)
        self.is_zero = self.value == 0.0

    def accumulate(self, out, v, alpha, ctx):
        if self.value != 0.0:
            out.add(v, alpha=alpha * self.value)

    def accumulate_through_mass(self, out, v, mass, alpha, ctx):
        if self.value == 0.0:
            return
        fused = getattr(mass, "fused_inverse", None)
        if fused is None:
            super().accumulate_through_mass(out, v, mass, alpha, ctx)
            return
        values, power, scale = fused(ctx)  # M = scale · values^power
        if power > 0:
            out.addcdiv(v, values, value=alpha * self.value / scale)
        else:
            out.addcmul(v, values, value=alpha * self.value / scale)

    def solve(self, v, ctx):
        return torch._foreach_div(v, self.value)

    def multiplier(self, ctx, v, alpha):
        return alpha * self.value if v is None else None

    def sqrt_accumulate(self, out, noise, alpha, ctx):
        if self.value != 0.0:
            out.add(noise, alpha=alpha * math.sqrt(self.value))

    def diagonal(self, ctx):
        return self.value

    def symbol(self):
        return ("scalar", None, self.value)

    def check(self, shapes, role, where):
        if role == "diffusion" and self.value < 0:
            raise ValueError(f"{where}: diffusion must be positive semi-definite, got Scalar({self.value})")
        if role == "curl" and self.value != 0:
            raise ValueError(
                f"{where}: a curl block on the diagonal must be skew-symmetric, got Scalar({self.value})"
            )

    def __eq__(self, other):
        return isinstance(other, Scalar) and other.value == self.value

    def __hash__(self):
        return hash(("Scalar", self.value))

    def __repr__(self):
        return f"Scalar({self.value:g})"


class Diagonal(Operator):
    """``diag(values)`` with one constant tensor per leaf (a tree matching the component).

    Args:
        values: a tensor or tree of tensors broadcastable to the component's leaves.

    Example (a fixed per-parameter diffusion: D = 1/2 on the weights, 1 on the bias):
        >>> import torch
        >>> from bayesflow.engine import Diagonal, build
        >>> D = Diagonal({"w": torch.full((3,), 0.5), "b": torch.ones(1)})   # the tree of params
        >>> transform = build(lambda p, batch: (-0.5 * (p["w"] ** 2).sum(), None), step_size=0.01, diffusion=D)
        >>> state = transform.init({"w": torch.zeros(3), "b": torch.zeros(1)}, seed=0)   # shapes checked here
    """

    def __init__(self, values):
        from bayesflow.tree import flatten

        self.values, _ = flatten(values)
        if not all(torch.isfinite(v).all() for v in self.values):
            raise ValueError("Diagonal operator values must be finite")
        self._sqrt = None

    def accumulate(self, out, v, alpha, ctx):
        out.addcmul(self.values, v, value=alpha)

    def sqrt_accumulate(self, out, noise, alpha, ctx):
        if self._sqrt is None:
            self._sqrt = torch._foreach_sqrt(self.values)
        out.addcmul(self._sqrt, noise, value=alpha)

    def diagonal(self, ctx):
        return self.values

    def tensors(self):
        return self.values

    def solve(self, v, ctx):
        return torch._foreach_div(v, self.values)

    def fused_inverse(self, ctx):
        return self.values, 1.0, 1.0

    def __eq__(self, other):
        return isinstance(other, Diagonal) and len(other.values) == len(self.values) and all(
            a.shape == b.shape and bool(torch.equal(a, b)) for a, b in zip(self.values, other.values))

    def __hash__(self):
        return hash(("Diagonal", len(self.values)))

    def symbol(self):
        return ("diagonal", id(self), 1.0)

    def check(self, shapes, role, where):
        if len(shapes) != len(self.values):
            raise ValueError(f"{where}: Diagonal has {len(self.values)} leaves, the state has {len(shapes)}")
        for i, (value, shape) in enumerate(zip(self.values, shapes)):
            try:
                broadcast = torch.broadcast_shapes(value.shape, shape)
            except RuntimeError:
                broadcast = None
            if broadcast != shape:
                raise ValueError(
                    f"{where}: Diagonal leaf {i} of shape {tuple(value.shape)} does not broadcast "
                    f"to the parameter shape {tuple(shape)}"
                )
            if role == "diffusion" and (value < 0).any():
                raise ValueError(f"{where}: diffusion must be positive semi-definite; leaf {i} has "
                                 f"negative diagonal entries (min {value.min().item():g})")
            if role == "curl" and (value != 0).any():
                raise ValueError(f"{where}: a diagonal curl must be zero (Q is skew-symmetric)")

    def __repr__(self):
        return f"Diagonal(<{len(self.values)} leaves>)"


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
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Dense needs a square matrix, got shape {tuple(matrix.shape)}")
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
