r"""The lattice random walk: first-order dynamics moved by exactly ±δx per coordinate and step.

On z = θ alone (no momenta, no thermostat), with a diagonal diffusion D, one step of length h first
computes the Euler drift increment of the engine's equation (no noise),

.. math::
    d = h\,\big[-(D + Q)\nabla H(θ) + T\,Γ(θ)\big],

then moves every coordinate by one site of a lattice of spacing
:math:`δx_i = \sqrt{2\,T\,h\,D_{ii}}`:

.. math::
    θ_i \leftarrow θ_i + δx_i\,s_i, \qquad s_i = \begin{cases} +1 & \text{with probability }
    p_i = \tfrac12\big(1 + \operatorname{clamp}(d_i/δx_i, -1, 1)\big) \\ -1 & \text{otherwise,}\end{cases}

with one uniform draw u_i per coordinate per step: :math:`s_i = +1` iff :math:`u_i < p_i`, i.e. iff
:math:`δx_i(2u_i - 1) < d_i` (no division, so no special case for |d_i| > δx_i). This is
posteriors' binary SGLRW update (Duffield et al. 2025; Mensch et al. 2026).

**Moments and weak order.** Where :math:`|d_i| \le δx_i` the step has mean :math:`d_i` exactly and
variance :math:`δx_i^2 - d_i^2 = 2ThD_{ii} - d_i^2`; its higher moments agree with those of the
Euler–Maruyama step :math:`d + \sqrt{2ThD}\,ξ` up to :math:`O(h^2)`, so the scheme has **weak order
1**, like Euler–Maruyama. Where :math:`|d_i| > δx_i` (a gradient large against the noise,
:math:`h\,|\partial_i ℓ|^2 > 2TD_{ii}` for D = I) the mean is clipped to :math:`\pm δx_i`: take h
small enough that this does not happen in the typical set.

**Why: mini-batch gradient noise.** Given a stochastic gradient, the step of coordinate i is
±δx_i with a probability *linear* in :math:`\hat d_i`; averaged over the mini-batch it is ±δx_i with
probability :math:`\tfrac12(1 + E\hat d_i/δx_i)`, the law of the full-batch step (while nothing is
clipped). The gradient noise thus leaves every coordinate's one-step law unchanged and enters only
through the :math:`O(h^2)` cross-covariances :math:`h^2\,\mathrm{Cov}(\hat g_i, \hat g_j)`, i ≠ j,
where the Gaussian Euler step adds all of :math:`h^2\,\mathrm{Cov}(\hat g)` (an effective
temperature rise :math:`h\,\mathrm{Var}(\hat g_i)/2` in SGLD). With constant h, T and D the chain
lives on the lattice :math:`θ_0 + δx\,\mathbb Z^d`; on a Gaussian target each coordinate is a
birth–death chain whose stationary law follows from detailed balance (the tests compare with it).

**T = 0:** the SDE is gradient flow and the step is its Euler step :math:`θ \leftarrow θ + d` (SGD at
D = I), drawing no noise. (The lattice walk itself degenerates as T → 0: δx → 0 with |d| > δx.
posteriors 0.1.3 divides by δx = 0 there and leaves θ unchanged.)

Chains (a leading chain dimension) and per-chain temperatures or step sizes are supported: a chain
at T = 0 among hot ones, or a zero entry of D, takes the Euler step in that coordinate.

Example (θ = 0 on N(0, 1), h = 1/2, T = 1: d = 0 and every coordinate moves by δx = 1):
    >>> import torch
    >>> from bayesflow.engine import build
    >>> from bayesflow.engine.lattice import LatticeRandomWalk
    >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.5,
    ...                   integrator=LatticeRandomWalk())
    >>> state, _ = transform.update(transform.init(torch.zeros(4, dtype=torch.float64), seed=0), batch=None)
    >>> state.params.abs()
    tensor([1., 1., 1., 1.], dtype=torch.float64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bayesflow.engine.accumulator import Accumulator, Leaves
from bayesflow.engine.block import as_block
from bayesflow.engine.integrators import Integrator, _h
from bayesflow.engine.matrices import Dense
from bayesflow.engine.operators import Operator

__all__ = ["LatticeRandomWalk"]

_DRIFT = ("lattice", "drift")
_SPACING = ("lattice", "spacing")


@dataclass(frozen=True)
class LatticeRandomWalk(Integrator):
    r"""θ_i ← θ_i ± δx_i with P(+) = ½(1 + clamp(d_i/δx_i, −1, 1)), δx_i = sqrt(2·T·h·D_ii); d the Euler drift.

    First-order dynamics only (z = θ) with a diagonal diffusion (Scalar, Diagonal, Preconditioned,
    or a diagonal Dense); weak order 1. See :mod:`bayesflow.engine.lattice` for the math.

    Example (the T = 0 step is the Euler step θ ← θ + h∇ℓ: here θ ← θ − 0.1·θ):
        >>> import torch
        >>> from bayesflow.engine import build
        >>> from bayesflow.engine.lattice import LatticeRandomWalk
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.1, temperature=0.0,
        ...                   integrator=LatticeRandomWalk())
        >>> transform.update(transform.init(torch.ones(2), seed=0), batch=None)[0].params
        tensor([0.9000, 0.9000])
    """

    weak_order: int = field(default=1, init=False)

    def validate(self, config) -> None:
        """Refuse configurations the lattice walk cannot integrate (momenta, thermostat, non-diagonal D).

        Raises:
            ValueError: naming what is wrong.
        """
        components = tuple(config.components)
        if components != ("params",):
            raise ValueError(_first_order_message(components))
        diffusion = as_block(config.diffusion).get("params", "params")
        if not _is_diagonal(diffusion):
            raise ValueError(_diagonal_message(diffusion))

    def advance(self, system, ctx, inputs, scales):
        rows = system.rows
        if len(rows) != 1 or "params" not in rows:
            raise ValueError(_first_order_message(tuple(rows)))
        h = _h(inputs, scales, "params", ctx.step)
        if not inputs.hot:  # T = 0: the Euler step (SGD), no draws
            system.row(ctx, inputs, "params", h)
            return
        diffusion = system.row_diffusion.get("params") or system.diffusion.get("params", "params")
        diagonal = diffusion.diagonal(ctx)
        if diagonal is None:
            raise ValueError(_diagonal_message(diffusion))
        like = ctx.leaves("params")
        chains = inputs.noise.chains

        # d = h·[-(D + Q)∇H + TΓ] into a zeroed flat buffer laid out like the noise buffer
        drift, drift_views = _flat_scratch(ctx, _DRIFT, like, chains)
        drift.zero_()
        target = Accumulator(drift_views, owned=True)
        system.row(ctx, inputs, "params", h, noise=False, target=target)
        if system.gamma and system.state_dependent.get("params", False):
            system._gamma(ctx, inputs, system.terms["params"], target, h)  # noise=False leaves Γ out

        temperature = inputs.temperature
        per_chain = isinstance(temperature, torch.Tensor) or isinstance(h, torch.Tensor)
        if isinstance(diagonal, float) and not per_chain:
            spacing = math.sqrt(2.0 * temperature * h * diagonal)
            if spacing == 0.0:  # no diffusion on θ (a pure curl): the Euler step
                ctx.z["params"].add(drift_views)
                return
            step, step_views = inputs.noise.uniform(like, "params")
            step.mul_(2.0 * spacing).sub_(spacing)  # w = δx(2u - 1)
            torch.lt(step, drift, out=step)  # [w < d] = [u < p₊]
            step.mul_(2.0 * spacing).sub_(spacing)  # ±δx, exactly
            ctx.z["params"].add(step_views)
            return

        # per-chain T or h, or per-entry D: δx as a tensor broadcastable to the flat buffer
        dtype, device = drift.dtype, drift.device
        scale = 2.0 * torch.as_tensor(temperature, dtype=dtype, device=device) * torch.as_tensor(
            h, dtype=dtype, device=device)
        scale = scale.reshape(-1, 1) if drift.ndim == 2 else scale.reshape(())
        if isinstance(diagonal, float):
            spacing = (scale * diagonal).sqrt_()
        else:
            spacing, spacing_views = _flat_scratch(ctx, _SPACING, like, chains)
            torch._foreach_copy_(spacing_views, diagonal)  # broadcasts each leaf's D_ii
            spacing.mul_(scale).sqrt_()
        step, step_views = inputs.noise.uniform(like, "params")
        step.mul_(2.0).sub_(1.0).mul_(spacing)  # w = δx(2u - 1)
        torch.where(step < drift, spacing, -spacing, out=step)
        torch.where(spacing > 0, step, drift, out=step)  # a zero spacing (T = 0 chain, D_ii = 0): Euler
        ctx.z["params"].add(step_views)


def _flat_scratch(ctx, key, like: Leaves, chains: int | None) -> tuple[torch.Tensor, Leaves]:
    """A reused flat buffer and its views shaped like ``like``, laid out as the noise stream's buffers
    (``(numel,)``, or ``(chains, numel per chain)`` with the chain dimension leading)."""
    buffers = ctx.buffers
    entry = buffers.get(key) if buffers is not None else None
    if (entry is None or len(entry[1]) != len(like) or entry[1][0].shape != like[0].shape
            or entry[0].dtype != like[0].dtype or entry[0].device != like[0].device):
        dtype, device = like[0].dtype, like[0].device
        if chains is None:
            sizes = [leaf.numel() for leaf in like]
            buffer = torch.empty(sum(sizes), dtype=dtype, device=device)
            views = [part.view(leaf.shape) for part, leaf in zip(buffer.split(sizes), like)]
        else:
            sizes = [leaf[0].numel() for leaf in like]
            buffer = torch.empty(chains, sum(sizes), dtype=dtype, device=device)
            views = [part.view(leaf.shape) for part, leaf in zip(buffer.split(sizes, dim=1), like)]
        entry = (buffer, views)
        if buffers is not None:
            buffers[key] = entry
    return entry


def _is_diagonal(op: Operator) -> bool:
    if isinstance(op, Dense):
        matrix = op.matrix
        return not bool((matrix - torch.diag(torch.diagonal(matrix))).any())
    return type(op).diagonal is not Operator.diagonal


def _first_order_message(components: tuple) -> str:
    return ("LatticeRandomWalk integrates first-order dynamics on params alone (z = θ); this SDE is on "
            f"{components}. Drop the momenta / thermostat (no curl coupling params to momenta, no "
            "momenta-needing integrator) and give a diffusion on params, e.g. SDEConfig(diffusion=Scalar(1.0))")


def _diagonal_message(op: Operator) -> str:
    return (f"LatticeRandomWalk needs a diagonal diffusion on params (Scalar, Diagonal, Preconditioned or a "
            f"diagonal Dense): each coordinate moves on its own lattice of spacing sqrt(2·T·h·D_ii); got {op!r}")
