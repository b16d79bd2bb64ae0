r"""Block operators over the components of the extended state z = (θ, m, ξ).

A :class:`Block` maps ``(row, column)`` component pairs to operators; the drift of component i is
:math:`-\sum_j (D+Q)_{ij} \nabla_j H`. Helpers build the blocks every momentum method uses:

.. math::
    Q = \begin{pmatrix} 0 & -C \\ C^\top & 0 \end{pmatrix}, \qquad
    D = \begin{pmatrix} D_θ & 0 \\ 0 & D_m \end{pmatrix}

so that :math:`dθ = C M^{-1} m\,dt` and :math:`dm = (C^\top \nabla ℓ/N - D_m M^{-1} m)\,dt + \dots`.

Example (SGHMC with friction γ):
    >>> D = Block({("momenta", "momenta"): Scalar(gamma)})
    >>> Q = hamiltonian_curl(Scalar(1.0))
"""

from __future__ import annotations

import math

import torch

from bayesflow.engine.accumulator import Accumulator, Leaves
from bayesflow.engine.context import COMPONENTS, Context
from bayesflow.engine.operators import Dense, Operator, Scalar, Zero

__all__ = ["Block", "ThermostatCoupling", "as_block", "hamiltonian_curl"]


class Block:
    """Operators on pairs of components; missing pairs are zero.

    Args:
        blocks: ``{(row, column): Operator}`` with names among ``"params"``, ``"momenta"``, ``"xi"``.
    """

    def __init__(self, blocks: dict[tuple[str, str], Operator]):
        for (row, column), op in blocks.items():
            for name in (row, column):
                if name not in COMPONENTS:
                    raise ValueError(f"unknown component {name!r} in block {(row, column)}; "
                                     f"expected one of {COMPONENTS}")
            if not isinstance(op, Operator):
                raise TypeError(f"block {(row, column)} must be an Operator, got {type(op).__name__}")
        self.blocks = {key: op for key, op in blocks.items() if not op.is_zero}

    @classmethod
    def dense(cls, matrix: torch.Tensor, components: tuple[str, ...] = ("params", "momenta")) -> Block:
        """One dense matrix over equal-size components, cut into :class:`Dense` blocks (research use).

        For θ with momenta, a 2d×2d matrix ``[[A_θθ, A_θm], [A_mθ, A_mm]]`` over the flattened
        params then momenta; all-zero blocks are left out. As a curl it is checked (at ``init``) to
        be skew-symmetric as a whole; as a diffusion it must be block-diagonal (the noise is drawn
        per component) with symmetric positive semi-definite blocks.

        Example:
            >>> C = torch.tensor([[1.0, 0.3], [0.0, 1.0]])       # a full θ–m coupling, d = 2
            >>> Q = Block.dense(torch.cat([torch.cat([torch.zeros(2, 2), -C], 1),
            ...                            torch.cat([C.T, torch.zeros(2, 2)], 1)]))
            >>> D = Block.dense(torch.block_diag(torch.zeros(2, 2), torch.eye(2)))
        """
        if len(set(components)) != len(components) or not set(components) <= {"params", "momenta"}:
            raise ValueError(f"Block.dense spans distinct equal-size components among ('params', 'momenta'), "
                             f"got {components}")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] % len(components):
            raise ValueError(f"Block.dense needs a square matrix whose size is a multiple of {len(components)} "
                             f"(one d×d block per component pair), got shape {tuple(matrix.shape)}")
        d = matrix.shape[0] // len(components)
        blocks = {}
        for i, row in enumerate(components):
            for j, column in enumerate(components):
                part = matrix[i * d:(i + 1) * d, j * d:(j + 1) * d]
                if bool(part.any()):
                    blocks[(row, column)] = Dense(part.clone())
        return cls(blocks)

    def components(self) -> set[str]:
        return {name for key in self.blocks for name in key}

    def terms(self, row: str) -> list[tuple[str, Operator]]:
        """The row's blocks, the diagonal one first (it reads the row before anything writes it)."""
        terms = [(column, op) for (r, column), op in self.blocks.items() if r == row]
        return sorted(terms, key=lambda term: term[0] != row)

    def get(self, row: str, column: str) -> Operator:
        return self.blocks.get((row, column), Zero())

    def preconditioners(self) -> tuple:
        return tuple(p for op in self.blocks.values() for p in op.preconditioners())

    @property
    def state_dependent(self) -> bool:
        return any(op.state_dependent for op in self.blocks.values())

    def check(self, shapes: dict[str, list[torch.Size]], role: str, name: str) -> None:
        """Validate every block and the (skew-)symmetry between off-diagonal pairs."""
        for (row, column), op in self.blocks.items():
            where = f"{name}[{row}, {column}]"
            if row not in shapes or column not in shapes:
                missing = row if row not in shapes else column
                raise ValueError(f"{where}: the state has no {missing!r} component")
            if row == column:
                op.check(shapes[row], role, where)
                continue
            if role == "diffusion":
                raise ValueError(f"{where}: off-diagonal diffusion blocks are not supported: the noise is "
                                 "drawn per component, so D must be block-diagonal over (params, momenta, "
                                 "xi); couple components through the curl Q instead")
            rows, columns = _size(shapes[row]), _size(shapes[column])
            if isinstance(op, Dense) and tuple(op.matrix.shape) != (rows, columns):
                raise ValueError(f"{where}: Dense matrix is {tuple(op.matrix.shape)} but the block maps "
                                 f"{columns} {column} scalars to {rows} {row} scalars")
            partner = self.blocks.get((column, row))
            if partner is None:
                raise ValueError(f"{where} has no partner block {name}[{column}, {row}]: "
                                 f"Q must be skew-symmetric")
            if isinstance(op, Dense) or isinstance(partner, Dense):
                like = op.matrix if isinstance(op, Dense) else partner.matrix
                mine, theirs = _as_matrix(op, rows, like), _as_matrix(partner, columns, like)
                if mine is not None and theirs is not None:
                    gap = (mine + theirs.T).abs().max().item()
                    if gap > 1e-6 * max(1.0, mine.abs().max().item()):
                        raise ValueError(f"{where} and {name}[{column}, {row}] are not negative transposes "
                                         f"(max |Q_ij + Q_jiᵀ| = {gap:.3g}): Q must be skew-symmetric")
                continue
            mine, theirs = op.symbol(), partner.symbol()
            if mine is None or theirs is None:
                continue  # user-defined blocks: the user owns their skew-symmetry
            if mine[:2] != theirs[:2] or mine[2] != -theirs[2]:
                raise ValueError(f"{where} = {op!r} and {name}[{column}, {row}] = {partner!r} are not "
                                 "negative transposes: Q must be skew-symmetric")

    def __eq__(self, other):
        return isinstance(other, Block) and other.blocks == self.blocks

    def __hash__(self):
        return hash(tuple(sorted(self.blocks.items(), key=lambda item: item[0])))

    def __repr__(self):
        inner = ", ".join(f"({r}, {c}): {op!r}" for (r, c), op in self.blocks.items())
        return f"Block({{{inner}}})"


def _size(shapes: list[torch.Size]) -> int:
    return sum(math.prod(shape) for shape in shapes)


def _as_matrix(op: Operator, size: int, like: torch.Tensor) -> torch.Tensor | None:
    """The block as a (size × size) matrix where it is one (Dense, Scalar), else None."""
    if isinstance(op, Dense):
        return op.matrix
    if isinstance(op, Scalar):
        return op.value * torch.eye(size, dtype=like.dtype, device=like.device)
    return None


def as_block(operator: Operator | Block | None) -> Block:
    """An operator on θ alone becomes the (params, params) block."""
    if operator is None:
        return Block({})
    if isinstance(operator, Block):
        return operator
    return Block({("params", "params"): operator})


def hamiltonian_curl(coupling: Operator | float = 1.0) -> Block:
    """The symplectic curl ``[[0, -C], [C, 0]]`` between θ and m (C diagonal or scalar)."""
    if not isinstance(coupling, Operator):
        coupling = Scalar(float(coupling))
    return Block({("params", "momenta"): _negated(coupling), ("momenta", "params"): coupling})


def _negated(op: Operator) -> Operator:
    if isinstance(op, Scalar):
        return Scalar(-op.value)
    from bayesflow.engine.preconditioners import Preconditioned

    if isinstance(op, Preconditioned):
        return Preconditioned(op.preconditioner, op.power, -op.scale)
    raise TypeError(f"hamiltonian_curl takes a Scalar or Preconditioned coupling, got {op!r}")


class ThermostatCoupling(Operator):
    r"""SGNHT's state-dependent coupling between momenta m and the thermostat ξ.

    ``sign=+1`` is the block :math:`Q_{mξ} = m/d`, ``sign=-1`` the block :math:`Q_{ξm} = -m^\top/d`.
    Its divergence gives :math:`Γ_ξ = \sum_j \partial_{m_j}(-m_j/d) = -1`, the thermostat's −T.
    """

    state_dependent = True

    def __init__(self, sign: float):
        self.sign = float(sign)

    def accumulate(self, out: Accumulator, v: Leaves, alpha: float, ctx: Context) -> None:
        momenta = ctx.leaves("momenta")
        if self.sign > 0:  # row m, column ξ: out_m += alpha · m · v_ξ / d
            out.add(momenta, alpha=v[0] * (alpha / ctx.numel))
        else:  # row ξ, column m: out_ξ += -alpha · mᵀv / d (one dot product per chain)
            chains = ctx.leaves("xi")[0].shape
            if chains:  # one dot product per chain, without a product temporary
                dot = sum(torch.einsum("ki,ki->k", m.reshape(chains[0], -1), w.reshape(chains[0], -1))
                          for m, w in zip(momenta, v))
            else:
                dot = sum(torch.dot(m.reshape(-1), w.reshape(-1)) for m, w in zip(momenta, v))
            out.add([dot], alpha=-alpha / ctx.numel)

    def multiplier(self, ctx: Context, v: Leaves | None, alpha: float):
        # row m, column ξ: alpha · m · v_ξ / d is the row m times alpha · v_ξ / d
        return v[0] * (alpha / ctx.numel) if self.sign > 0 and v is not None else None

    def divergence(self, ctx: Context) -> Leaves | None:
        if self.sign > 0:
            return None
        return [torch.full_like(ctx.leaves("xi")[0], -1.0)]

    def symbol(self):
        return ("thermostat", None, self.sign)

    def __eq__(self, other):
        return isinstance(other, ThermostatCoupling) and other.sign == self.sign

    def __hash__(self):
        return hash(("ThermostatCoupling", self.sign))

    def __repr__(self):
        return f"ThermostatCoupling({self.sign:+g})"
