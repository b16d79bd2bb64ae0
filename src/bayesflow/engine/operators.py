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
Constant operators carry no state; :mod:`bayesflow.engine.preconditioners` adds stateful diagonals,
:mod:`bayesflow.engine.matrices` dense and user-defined operators on the flattened component.

Example:
    >>> import torch
    >>> from bayesflow.engine import operators as ops
    >>> D = ops.Scalar(1.0)                                   # SGLD's identity diffusion
    >>> D_leaves = ops.Diagonal([torch.ones(3), 2 * torch.ones(2)])  # one tensor per params leaf
"""

from __future__ import annotations

import math

import torch

from bayesflow.engine.accumulator import Accumulator, Leaves
from bayesflow.engine.context import Context

__all__ = ["Diagonal", "Operator", "Scalar", "Zero"]

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
