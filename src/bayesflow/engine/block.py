r"""Block operators over the components of the extended state z = (θ, m, ξ).

A :class:`Block` maps ``(row, column)`` component pairs to operators; the drift of component i is
:math:`-\sum_j (D+Q)_{ij} \nabla_j H`. Helpers build the blocks every momentum method uses:

.. math::
    Q = \begin{pmatrix} 0 & -C \\ C^\top & 0 \end{pmatrix}, \qquad
    D = \begin{pmatrix} D_θ & 0 \\ 0 & D_m \end{pmatrix}

so that :math:`dθ = C M^{-1} m\,dt` and :math:`dm = (C^\top \nabla ℓ/N - D_m M^{-1} m)\,dt + \dots`.

Example (SGHMC with friction γ):
    >>> from bayesflow.engine import Block, Scalar, hamiltonian_curl
    >>> gamma = 0.5
    >>> D = Block({("momenta", "momenta"): Scalar(gamma)})
    >>> Q = hamiltonian_curl(Scalar(1.0))
"""

from __future__ import annotations

import math

import torch

from bayesflow.engine.accumulator import Accumulator, Leaves
from bayesflow.engine.context import COMPONENTS, Context, split_like
from bayesflow.engine.matrices import Dense, _check_matrix, _psd_sqrt, check_finite_matrix
from bayesflow.engine.operators import Operator, Scalar, Zero
from bayesflow.engine.schedules import Constant
from bayesflow.engine.validation import Untraceable

__all__ = ["Block", "JointDiffusion", "ThermostatCoupling", "as_block", "hamiltonian_curl"]


class Block:
    """Operators on pairs of components; missing pairs are zero.

    Args:
        blocks: ``{(row, column): Operator}`` with names among ``"params"``, ``"momenta"``, ``"xi"``.

    Example (SGHMC's diffusion: friction γ = 0.1 on the momenta, no noise on θ directly):
        >>> from bayesflow.engine import Block, Scalar
        >>> D = Block({("momenta", "momenta"): Scalar(0.1)})
        >>> D.get("momenta", "momenta"), D.get("params", "params")   # missing pairs are zero
        (Scalar(0.1), Zero())
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
        be skew-symmetric as a whole; as a diffusion, symmetric positive semi-definite as a whole,
        and where it couples the components their noise is drawn jointly (:class:`JointDiffusion`;
        Euler–Maruyama and semi-implicit Euler, not the exact O step of splitting words).

        Example:
            >>> C = torch.tensor([[1.0, 0.3], [0.0, 1.0]])       # a full θ–m coupling, d = 2
            >>> Q = Block.dense(torch.cat([torch.cat([torch.zeros(2, 2), -C], 1),
            ...                            torch.cat([C.T, torch.zeros(2, 2)], 1)]))
            >>> D = Block.dense(torch.block_diag(torch.zeros(2, 2), torch.eye(2)))   # noise on m only
        """
        if len(set(components)) != len(components) or not set(components) <= {"params", "momenta"}:
            raise ValueError(f"Block.dense spans distinct equal-size components among ('params', 'momenta'), "
                             f"got {components}")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] % len(components):
            raise ValueError(f"Block.dense needs a square matrix whose size is a multiple of {len(components)} "
                             f"(one d×d block per component pair), got shape {tuple(matrix.shape)}")
        check_finite_matrix(matrix, "Block.dense")
        d = matrix.shape[0] // len(components)
        parts = {(row, column): matrix[i * d:(i + 1) * d, j * d:(j + 1) * d]
                 for i, row in enumerate(components) for j, column in enumerate(components)}
        coupled = any(bool(part.any()) for (row, column), part in parts.items() if row != column)
        # as a diffusion, coupled blocks draw their noise together (one square root of the whole matrix)
        joint = JointDiffusion(matrix, tuple(components)) if coupled else None
        return cls({key: Dense(part.clone(), joint=joint) for key, part in parts.items() if bool(part.any())})

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
                joint = getattr(op, "joint", None)
                if joint is None or not joint.owns(self, row):
                    raise ValueError(f"{where}: an off-diagonal diffusion block needs the noise of both components "
                                     "drawn together: give the whole matrix as Block.dense(D) (all its blocks, "
                                     "nothing else for those components), or couple components through Q")
                joint.check(shapes, where)
                continue
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


class JointDiffusion:
    r"""A dense diffusion over several components whose noise is drawn jointly, once per step.

    Row i of the step receives :math:`\sqrt{2 T h}\,(D^{1/2} ξ)_i` with one standard normal ξ over
    all the components (D's symmetric square root, computed once): the blocks of
    :meth:`Block.dense` carry it when D couples the components. Integrators whose noise is an exact
    Ornstein–Uhlenbeck step on the momenta alone (splitting words) need a diagonal D there and reject it.
    """

    def __init__(self, matrix: torch.Tensor, components: tuple[str, ...]):
        self.matrix = matrix
        self.components = components
        self.size = matrix.shape[0] // len(components)
        self._sqrt = None
        self._checked = False

    def owns(self, block: Block, row: str) -> bool:
        """Whether ``block`` holds this matrix's blocks (and nothing else) on its components' rows."""
        if row not in self.components:
            return False
        for (r, c), op in block.blocks.items():
            if r in self.components and c in self.components and getattr(op, "joint", None) is not self:
                return False
        return all(isinstance(block.blocks.get((c, c)), Dense) for c in self.components)

    def check(self, shapes: dict, where: str) -> None:
        if self._checked:
            return
        for component in self.components:
            if _size(shapes[component]) != self.size:
                raise ValueError(f"{where}: Block.dense matrix has {self.size} scalars per component, the "
                                 f"state's {component!r} has {_size(shapes[component])}")
        _check_matrix(self.matrix, "diffusion", where + " (the whole matrix)")
        self._checked = True

    def noise(self, row: str, ctx: Context, stream) -> Leaves:
        """The row's part of D^{1/2} ξ for this step (ξ drawn at the first row that asks)."""
        if ctx.draws is None:
            ctx.draws = {}
        joint = ctx.draws.get(id(self))
        if joint is None:
            if self._sqrt is None:
                self._sqrt = _psd_sqrt(self.matrix)
            like = [leaf for component in self.components for leaf in ctx.z[component].leaves]
            flat_noise, _ = stream.normal(like, "joint")
            joint = ctx.draws[id(self)] = self._sqrt @ flat_noise
        i = self.components.index(row)
        return split_like(joint[i * self.size:(i + 1) * self.size], ctx.z[row].leaves)


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
    """An operator on θ alone becomes the (params, params) block.

    Example:
        >>> from bayesflow.engine import Scalar, as_block
        >>> as_block(Scalar(1.0))   # SGLD's D = I on θ, as a block over the extended state
        Block({(params, params): Scalar(1)})
        >>> as_block(None)          # no curl
        Block({})
    """
    if operator is None:
        return Block({})
    if isinstance(operator, Block):
        return operator
    return Block({("params", "params"): operator})


def hamiltonian_curl(coupling: Operator | float = 1.0) -> Block:
    """The symplectic curl ``[[0, -C], [C, 0]]`` between θ and m (C diagonal or scalar).

    Example:
        >>> from bayesflow.engine import hamiltonian_curl
        >>> hamiltonian_curl(1.0)   # Q = [[0, -I], [I, 0]]: dθ = M⁻¹m dt and dm = ∇ℓ/N dt + ...
        Block({(params, momenta): Scalar(-1), (momenta, params): Scalar(1)})
    """
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

    **Discretisation-aware target** (``step_size`` h and ``mass`` M given, on the ``-1`` block): an Euler
    friction step :math:`m \leftarrow (1 - hξ/M)\,m + \dots` at temperature T leaves the momenta at the
    kinetic temperature :math:`T/(1 - hξ/(2M))` (their stationary variance in a flat direction), not T,
    so a thermostat driving :math:`|m|^2/(dM)` to T lowers the sampled temperature by that factor.
    With ``step_size`` the block's Γ is

    .. math:: Γ_ξ = -\frac{1}{\max(1 - hξ/(2M),\ 1/2)},

    the thermostat's target becomes that discretisation's value, and the semi-implicit Euler step's
    law of θ is exact on an isotropic Gaussian at any stable h (see :mod:`bayesflow.sgmcmc.sgnht`).
    The floor 1/2 (reached at hξ/M = 1, where the friction step would flip the momenta's sign) keeps
    the thermostat's pull bounded at large ξ. ``step_size`` is a float, a schedule ``step -> h`` or one
    value per chain (a 1-D tensor); a step-size schedule cannot enter a compiled step (it runs eagerly).

    Example (SGNHT's curl: the Hamiltonian coupling of θ and m plus the thermostat's pair):
        >>> from bayesflow.engine import Block, ThermostatCoupling, hamiltonian_curl
        >>> Q = Block({**hamiltonian_curl(1.0).blocks,
        ...            ("momenta", "xi"): ThermostatCoupling(+1), ("xi", "momenta"): ThermostatCoupling(-1)})
        >>> sorted(Q.components()), Q.state_dependent
        (['momenta', 'params', 'xi'], True)
        >>> ThermostatCoupling(-1, step_size=0.2, mass=1.0)   # its Γ at ξ = 1 is -1/(1 - 0.1)
        ThermostatCoupling(-1, step_size=0.2, mass=1)
    """

    state_dependent = True

    def __init__(self, sign: float, step_size=None, mass: float = 1.0):
        self.sign = float(sign)
        if step_size is not None and not callable(step_size) and not isinstance(step_size, torch.Tensor):
            if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not (
                    math.isfinite(step_size) and step_size > 0):
                raise ValueError(f"ThermostatCoupling step_size must be a positive finite number, a schedule or a "
                                 f"tensor of one value per chain, got {step_size!r}")
            step_size = float(step_size)
        if isinstance(mass, bool) or not isinstance(mass, (int, float)) or not (math.isfinite(mass) and mass > 0):
            raise ValueError(f"ThermostatCoupling mass must be a positive finite number, got {mass!r}")
        self.step_size = step_size
        self.mass = float(mass)

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
        xi = ctx.leaves("xi")[0]
        if self.step_size is None:
            return [torch.full_like(xi, -1.0)]
        h = self._step_size(ctx.step)
        if isinstance(h, torch.Tensor):
            h = h.to(dtype=xi.dtype, device=xi.device)
        kinetic = torch.clamp(1.0 - xi * (h / (2.0 * self.mass)), min=0.5)  # T / (kinetic temperature)
        return [kinetic.reciprocal().neg_()]

    def _step_size(self, step):
        h = self.step_size
        if isinstance(h, torch.Tensor) or not callable(h):
            return h
        if isinstance(h, Constant):
            return h.value
        if isinstance(step, torch.Tensor):  # a traced step: the schedule would be read once and frozen
            raise Untraceable("ThermostatCoupling with a step-size schedule cannot be traced into a "
                                      "compiled step; it runs eagerly")
        return float(h(step))

    def symbol(self):
        return ("thermostat", None, self.sign)

    def _key(self):
        h = self.step_size
        h = ("tensor", tuple(h.tolist())) if isinstance(h, torch.Tensor) else h
        return (self.sign, h, self.mass if self.step_size is not None else None)

    def __eq__(self, other):
        return isinstance(other, ThermostatCoupling) and other._key() == self._key()

    def __hash__(self):
        return hash(("ThermostatCoupling", self._key()))

    def __repr__(self):
        if self.step_size is None:
            return f"ThermostatCoupling({self.sign:+g})"
        return f"ThermostatCoupling({self.sign:+g}, step_size={self.step_size!r}, mass={self.mass:g})"
