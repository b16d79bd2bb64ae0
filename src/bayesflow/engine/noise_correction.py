r"""Gradient-noise correction from per-sample gradients (Chen, Fox & Guestrin 2014's :math:`\hat B`, per direction).

In a row of the step that receives the gradient kick and its noise at the same sub-step (SGLD's θ
under Euler–Maruyama, SGHMC's m under semi-implicit Euler) the increment is

.. math::
    h\,k\,\nabla ℓ_B/N + \sqrt{2Th}\,D^{1/2}ξ
    \quad\text{with}\quad \operatorname{Cov}[h\,k\,\nabla ℓ_B/N] = h^2 k^2 V/N^2 =: G,

k the kick's coefficient (SGLD: D; SGHMC: the coupling Q_mθ), N the engine's normaliser and V the
covariance of the mini-batch mean gradient. The full-batch step injects 2ThD; with a mini-batch,
injecting :math:`2ThD - G` instead makes the total noise exactly the full-batch one.
:class:`GradientNoise` estimates V at every step from the b per-sample gradients of the batch
(:mod:`bayesflow.engine.per_sample`), unbiased for sampling with replacement:

.. math::
    \hat V = \frac{f}{b(b-1)} \sum_i (g_i - \bar g)(g_i - \bar g)^\top, \qquad
    f = 1 \text{ (with replacement) or } 1 - b/n \text{ (without, from n data)},

and :class:`NoiseCorrected` injects :math:`\sqrt{2Th}\,F ξ` with :math:`FF^\top = D - \hat G/(2Th)`:

* ``structure="diagonal"``: :math:`F = \operatorname{diag}(\sqrt{D\,(1 - r)})`, :math:`r = \hat G_{jj}/(2ThD_j)`;
* ``structure="low_rank"``: :math:`\hat G = UU^\top` has rank ≤ b − 1 (U is d × b);
  with :math:`A = 2ThD`, :math:`A^{-1/2}U = P S R^\top` (thin SVD, from the smaller Gram matrix),
  :math:`F = D^{1/2}\,(I - P\,\operatorname{diag}(1 - \sqrt{1 - s^2})\,P^\top)`: the exact
  :math:`D - \hat G/(2Th)` in every direction, at O(d b²) per step.

Where the gradient noise alone exceeds the budget (r > 1, s² > 1) the injected variance is clipped
to 0 along that direction and the step is flagged in the :class:`NoiseReport` (the state's
``preconditioner`` entry): the chain is then hotter than T there — lower the step or raise the
batch (or the friction). Feasible means :math:`h \le 2TD/(k^2 V/N^2)` per direction.

**BAOAB** (``GradientNoise(friction=α, mass=σ²)``): one gradient serves the closing kick of a step
and the opening kick of the next, so a step is, rotated, a full kick h (noise G) then A, O, A — the
kick's noise reaches θ through A before O, and cannot be cancelled exactly. In the linear-Gaussian
model it is cancelled to leading order in ωh, whatever ω, by lowering the exact O step's noise
:math:`Tσ^2(1 - c^2)` (:math:`c = e^{-αh/σ^2}`) by :math:`((1 + c)/2)^2 G` (the discrete Lyapunov
equation of the step; at ωh = 0.5, α = 1 the residual is 7 % of the uncorrected excess). With a
learned mass the kick goes through S (V̂ → S V̂ S) and the whitened dynamics have the one frequency
ω = k√T/σ: κ is then the exact value of that equation
(:func:`~bayesflow.engine.baoab_noise.baoab_noise_weight`). The O step then injects
:math:`\sqrt{Tσ^2(1 - c^2)}\,F ξ` with F from that budget.

The estimator is a preconditioner of the engine (state: the report; values: F), the operator a
diffusion whose drift is the base D and whose square root is F. Build with
:func:`bayesflow.sgmcmc.noise_corrected.build`, which also installs the per-sample gradient source.

Example (the operator pieces; ``noise_corrected.build`` assembles them):
    >>> from bayesflow.engine import Scalar
    >>> from bayesflow.engine.noise_correction import GradientNoise, NoiseCorrected
    >>> noise = GradientNoise(step_size=0.01, temperature=1e-3, kick=1.0, structure="diagonal")
    >>> D = NoiseCorrected(Scalar(1.0), noise)     # SGLD's D = I with the corrected noise
    >>> D.preconditioners() == (noise,)
    True
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple

import torch

from bayesflow.engine.accumulator import Leaves, flat_leaves, leaf_views
from bayesflow.engine.baoab_noise import baoab_noise_weight
from bayesflow.engine.learned_operators import _read
from bayesflow.engine.operators import Diagonal, Operator, Scalar
from bayesflow.records import record

__all__ = ["STRUCTURES", "GradientNoise", "NoiseCorrected", "NoiseReport"]

STRUCTURES = ("diagonal", "low_rank")


@record
class NoiseReport(NamedTuple):
    """Where the gradient noise exceeded the injected-noise budget (one value per chain with chains).

    Attributes:
        clipped: directions clipped at the last step (coordinates, or singular directions of ``low_rank``).
        clipped_steps: steps so far with at least one clipped direction.
        ratio: the last step's largest ratio of gradient-noise variance to the budget 2ThD (> 1: clipped).
    """

    clipped: torch.Tensor
    clipped_steps: torch.Tensor
    ratio: torch.Tensor


def _number(name, value, *, positive=True):
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or (
            value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, got {value!r}")
    return float(value)


class GradientNoise:
    r"""Per-step estimate of the mini-batch gradient noise and the corrected noise factor F.

    Args:
        step_size: h of the row the gradient kicks (a constant: F depends on it).
        temperature: T ≥ 0 (a constant; at T = 0 nothing is injected and nothing corrected).
        kick: k, the coefficient of ∇ℓ_B/N in that row per unit h: a float, or ``"diffusion"`` for
            k = D (SGLD, whose drift is D∇ℓ).
        num_data: the engine's normaliser N (``SDEConfig.num_data``, 1 for per-datum values).
        structure: ``"diagonal"`` or ``"low_rank"`` (see the module docstring).
        data_size: n for batches drawn without replacement from n data (factor 1 − b/n); None for
            batches drawn with replacement.
        chains, chain_batches: set by :func:`bayesflow.sgmcmc.noise_corrected.build` (:meth:`bind`).
        friction, mass: for a BAOAB step, α and σ² of its exact O step (module docstring, *BAOAB*):
            the budget is then the O step's :math:`Tσ^2(1 - c^2)` and the noise
            :math:`((1 + c)/2)^2 G`, :math:`c = e^{-αh/σ^2}`; None for the kicked-row correction.

    Example (the estimate V̂ of one batch's per-sample gradients, and its clipped directions):
        >>> import torch
        >>> from bayesflow.engine.noise_correction import GradientNoise
        >>> noise = GradientNoise(step_size=0.1, temperature=0.01, kick=1.0, structure="diagonal").bind(None)
        >>> centred = torch.tensor([[1.0, 0.1], [-1.0, -0.1]])   # b = 2 centred g_i, d = 2
        >>> noise.variance(centred)                               # V̂_jj = Σ_i g_ij² / (b (b - 1))
        tensor([1.0000, 0.0100])
        >>> report, F = noise.factors(centred, diffusion=1.0)    # budget 2Th = 0.002 per unit D
        >>> int(report.clipped), round(float(report.ratio), 2)   # h² V̂ / 2Th: 5 and 0.05
        (1, 5.0)
    """

    def __init__(self, step_size: float, temperature: float, kick: float | str = 1.0, num_data: float = 1.0,
                 structure: str = "low_rank", data_size: int | None = None, chains: int | None = None,
                 chain_batches: bool = False, bound: bool = False, friction: float | None = None, mass: float = 1.0,
                 kick_root=None):
        self.step_size = _number("step_size", step_size)
        self.temperature = _number("temperature", temperature, positive=False)
        if kick != "diffusion":
            kick = _number("kick", kick)
        self.kick = kick
        self.num_data = _number("num_data", num_data)
        if structure not in STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; expected one of {STRUCTURES}")
        self.structure = structure
        if data_size is not None and (isinstance(data_size, bool) or not isinstance(data_size, int) or data_size < 2):
            raise ValueError(f"data_size must be an integer ≥ 2 (the data set's size) or None, got {data_size!r}")
        self.data_size = data_size
        self.chains, self.chain_batches, self.bound = chains, bool(chain_batches), bound
        self.friction = None if friction is None else _number("friction", friction)
        self.mass = _number("mass", mass)
        self.kick_root = kick_root  # the LearnedRoot operator the kick goes through (BAOAB with a learned mass)
        self._pending = None
        self._centred = None  # the step's centred per-sample gradients (from the gradient source)
        self._factor = None  # the step's F (from update_state, for values)

    def bind(self, chains: int | None, chain_batches: bool = False) -> GradientNoise:
        """A fresh estimator with these settings for a transform of ``chains`` chains."""
        return GradientNoise(self.step_size, self.temperature, self.kick, self.num_data, self.structure,
                             self.data_size, chains, chain_batches, bound=True, friction=self.friction, mass=self.mass,
                             kick_root=self.kick_root)

    def receive(self, centred: torch.Tensor) -> None:
        """The gradient source's ``sink``: this step's centred per-sample gradients ``([K,] b, d)``."""
        self._centred = centred.detach()

    # ----- the estimate -----------------------------------------------------------------------
    def _scale(self, b: int) -> float:
        """f / (b (b - 1)) times (h k' / N)² without the kick: the factor of Σ_i c_i c_iᵀ in V̂·(h/N)²."""
        if self.data_size is not None and b > self.data_size:
            raise ValueError(f"batch of {b} data from data_size={self.data_size}: without replacement b ≤ n")
        fpc = 1.0 if self.data_size is None else 1.0 - b / self.data_size
        return fpc / (b * (b - 1))

    def variance(self, centred: torch.Tensor) -> torch.Tensor:
        """diag V̂ ``([K,] d)`` from centred per-sample gradients ``([K,] b, d)``."""
        return (centred * centred).sum(-2) * self._scale(centred.shape[-2])

    def covariance(self, centred: torch.Tensor) -> torch.Tensor:
        """V̂ ``([K,] d, d)`` (dense: for tests and small d)."""
        return centred.transpose(-1, -2) @ centred * self._scale(centred.shape[-2])

    def factors(self, centred: torch.Tensor, diffusion, step_size: float | None = None) -> tuple[NoiseReport, tuple]:
        """``(report, F)`` for base diffusion D (a float or a ``([K,] d)`` tensor) at this step.

        F is ``("diagonal", root)`` with root ``([K,] d)``, or ``("low_rank", sqrt D, P, c)`` with
        :math:`F ξ = \\sqrt D (ξ - P (c ⊙ P^\\top ξ))`.
        """
        h = self.step_size if step_size is None else step_size  # the O step passes its own
        T = self.temperature
        lead = centred.shape[:-2]
        d = centred.shape[-1]
        if not isinstance(diffusion, torch.Tensor):
            _positive_diffusion(diffusion)
            diffusion = torch.full((d,), float(diffusion), dtype=centred.dtype, device=centred.device)
        D = diffusion  # (a tensor D was checked once, by NoiseCorrected.check: no sync per step)
        kick = D if self.kick == "diffusion" else self.kick
        budget, weight = 2.0 * T * h * D, 1.0  # 2ThD, G
        if self.friction is not None:  # BAOAB: the O step's T σ² (1 - c²) less κ G; F relative
            c = math.exp(-self.friction * h / self.mass)
            D = torch.ones_like(D)
            budget, weight = T * self.mass * (1.0 - c * c) * D, ((1.0 + c) / 2.0) ** 2
            if self.kick_root is not None:  # whitened by the learned mass: ω = k√T/σ, κ exact for it
                weight = baoab_noise_weight(h, self.friction / self.mass, abs(self.kick) * math.sqrt(T / self.mass))
        if self.structure == "diagonal":
            noise = self.variance(centred) * (h / self.num_data) ** 2 * kick**2 * weight  # diag G
            ratio = noise / budget
            root = (D * (1.0 - ratio).clamp(min=0.0)).sqrt()
            return _report(ratio, lead), ("diagonal", root)
        scale = math.sqrt(self._scale(centred.shape[-2]) * weight) * h / self.num_data
        U = centred.transpose(-1, -2) * (kick.unsqueeze(-1) if isinstance(kick, torch.Tensor) else kick) * scale
        W = U / budget.sqrt().unsqueeze(-1)
        P, ratio = _left_singular(W)
        c = 1.0 - (1.0 - ratio).clamp(min=0.0).sqrt()
        return _report(ratio, lead), ("low_rank", D.sqrt(), P, c)

    # ----- the preconditioner protocol ------------------------------------------------------
    def init(self, params: Leaves) -> NoiseReport:
        if not self.bound:
            raise ValueError("GradientNoise needs the per-sample gradient source: build the transform with "
                             "bayesflow.sgmcmc.noise_corrected.build(log_posterior, config), not engine.build")
        K = self.chains
        if K is not None and any(leaf.ndim == 0 or leaf.shape[0] != K for leaf in params):
            raise ValueError(f"GradientNoise(chains={K}) needs every params leaf to lead with {K} chains")
        shape = () if K is None else (K,)
        zeros = torch.zeros(shape, dtype=torch.int64, device=params[0].device)
        return NoiseReport(zeros, zeros.clone(), torch.zeros(shape, dtype=params[0].dtype, device=params[0].device))

    def update_state(self, state: NoiseReport, grads: Leaves, step: int, inplace: bool) -> NoiseReport:
        """Read this step's per-sample gradients, compute F and the report."""
        centred, self._centred = self._centred, None
        if centred is None:
            raise RuntimeError("no per-sample gradients for this step: the noise-corrected transform evaluates "
                               "them itself; use update(state, batch) of noise_corrected.build, not step(state, grads)")
        self._factor = None
        if self.temperature == 0.0:  # nothing injected, nothing to correct
            return state
        if self.kick_root is not None:  # F needs this step's S: made when the O step reads it (finish)
            self._pending = (centred, state if inplace else NoiseReport(*(t.clone() for t in state)))
            return self._pending[1]
        report, self._factor = self.factors(centred, self._diffusion)
        return _write_report(state, report, inplace)

    def finish(self, root, h: float) -> None:
        """F of this step for a kick through the learned root S (``root`` = S, read by the caller):
        the per-sample gradients become S g_i, and the report this step's state holds is written."""
        centred, state = self._pending
        self._pending = None
        self._factor = None
        if isinstance(root, list):  # diagonal S, per leaf: one flat ([K,] d) vector
            transformed = centred * flat_leaves(root, self.chains).unsqueeze(-2)
        else:  # dense S ([K,] d, d), symmetric: S g_i for every row g_i
            transformed = centred @ root
        report, self._factor = self.factors(transformed, self._diffusion, h)
        _write_report(state, report, True)

    def values(self, state: NoiseReport, step: int, out=None):
        """F of this step (computed by :meth:`update_state`)."""
        return self._factor

    _diffusion = 1.0  # the base D as a flat vector, set by NoiseCorrected.check


def _write_report(state: NoiseReport, report: NoiseReport, inplace: bool) -> NoiseReport:
    clipped_steps = state.clipped_steps + (report.clipped > 0).to(torch.int64)
    new = NoiseReport(report.clipped, clipped_steps, report.ratio.to(state.ratio.dtype))
    if inplace:
        for old, value in zip(state, new):
            old.copy_(value)
        return state
    return new


def _left_singular(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, s²)`` of the thin SVD :math:`W = P S R^\top` (``[K,] d × b``) from the smaller Gram matrix's eigh
    (several times cheaper than an SVD for the small side ≤ 64 that mini-batches give)."""
    d, b = W.shape[-2:]
    gram = W @ W.transpose(-1, -2) if d <= b else W.transpose(-1, -2) @ W
    try:
        squared, vectors = torch.linalg.eigh(gram)
    except torch.linalg.LinAlgError as error:  # no check per step: the eigh that fails says it
        raise FloatingPointError("gradient-noise correction: the per-sample gradients of this step have no "
                                 "eigendecomposition (not finite: the chains diverged — lower the step)") from error
    if d <= b:
        return vectors, squared.clamp(min=0.0)
    R = vectors
    squared = squared.clamp(min=0.0)
    s = squared.sqrt()
    # columns of zero singular value carry no noise (c = 0 there): any direction does, 0 is safe
    P = (W @ R) / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-2)
    return P, squared


def _positive_diffusion(value) -> None:
    if not (value > 0 if isinstance(value, float) else bool((value > 0).all())):
        raise ValueError("gradient-noise correction needs a positive diffusion D in the kicked row "
                         "(no injected noise there to reduce)")


def _report(ratio: torch.Tensor, lead) -> NoiseReport:
    clipped = (ratio > 1.0).sum(-1)
    return NoiseReport(clipped, torch.zeros(lead, dtype=torch.int64, device=ratio.device), ratio.amax(-1))


class NoiseCorrected(Operator):
    r"""A diffusion whose drift is the base D and whose noise is the corrected :math:`\sqrt{2Th}\,F ξ`.

    Args:
        base: the row's D, a :class:`~bayesflow.engine.Scalar` or constant :class:`~bayesflow.engine.Diagonal`.
        noise: the :class:`GradientNoise` estimator giving F each step.

    Integrators whose noise for the row is the operator's square root at the sub-step of the gradient
    kick correct exactly (Euler–Maruyama, semi-implicit Euler); BAOAB's exact O step corrects through
    :meth:`ou_accumulate` (a ``GradientNoise`` with ``friction``); other splitting words refuse it.

    Example:
        >>> from bayesflow.engine import Scalar
        >>> from bayesflow.engine.noise_correction import GradientNoise, NoiseCorrected
        >>> friction = NoiseCorrected(Scalar(2.0), GradientNoise(0.05, 1e-3, kick=1.0))   # SGHMC's D_mm = 2
        >>> friction
        NoiseCorrected(Scalar(2), low_rank)
    """

    def __init__(self, base: Operator, noise: GradientNoise):
        if not isinstance(base, (Scalar, Diagonal)):
            raise TypeError(f"NoiseCorrected corrects a constant Scalar or Diagonal diffusion, got {base!r}")
        if not isinstance(noise, GradientNoise):
            raise TypeError(f"noise must be a GradientNoise, got {type(noise).__name__}")
        self.base, self.noise = base, noise

    def preconditioners(self):
        return (self.noise,)

    def accumulate(self, out, v, alpha, ctx):
        self.base.accumulate(out, v, alpha, ctx)

    def accumulate_through_mass(self, out, v, mass, alpha, ctx):
        self.base.accumulate_through_mass(out, v, mass, alpha, ctx)

    def solve(self, v, ctx):
        return self.base.solve(v, ctx)

    def sqrt_accumulate(self, out, noise, alpha, ctx):
        if self.noise.friction is not None:
            raise ValueError("this correction was set up for a BAOAB O step (friction given), not a kicked row")
        expected = math.sqrt(2.0 * self.noise.temperature * self.noise.step_size)
        if isinstance(alpha, torch.Tensor) or not math.isclose(alpha, expected, rel_tol=1e-6):
            raise ValueError(f"the engine injects noise at sqrt(2Th) = {alpha!r} but the correction was set up for "
                             f"T = {self.noise.temperature:g}, h = {self.noise.step_size:g}: change T or h through "
                             "noise_corrected.config, not on the engine configuration")
        self._inject(out, noise, alpha, ctx)

    def ou_accumulate(self, out, noise, h, alpha, ctx):
        """The exact O step's noise ``alpha·F ξ`` (``alpha`` = √(Tσ²(1 − c²)), F from BAOAB's budget)."""
        if self.noise.friction is None:
            raise ValueError("this correction was set up for a kicked row (SGLD / SGHMC), not a BAOAB O step")
        learned = self.noise.kick_root is not None  # a learned mass's burn-in may run other steps: F follows h
        decay = math.exp(-self.noise.friction * h / self.noise.mass) if isinstance(h, float) else math.nan
        same = (learned or math.isclose(h, self.noise.step_size, rel_tol=1e-6)) and math.isclose(
            alpha * alpha, self.noise.temperature * self.noise.mass * (1.0 - decay**2), rel_tol=1e-6)
        if not same:
            raise ValueError(f"the O step runs at h = {h!r} with noise {alpha!r} but the correction was set up for "
                             f"T = {self.noise.temperature:g}, h = {self.noise.step_size:g}: change T or h through "
                             "noise_corrected.config, not on the engine configuration")
        if self.noise.kick_root is not None:
            self.noise.finish(_read(self.noise.kick_root.mass, ctx), h)  # F needs this step's S and h
        self._inject(out, noise, alpha, ctx)

    def _inject(self, out, noise, alpha, ctx):
        factor = ctx.values(self.noise)
        chains = self.noise.chains
        if factor[0] == "diagonal":
            out.addcmul(leaf_views(factor[1], noise), noise, value=alpha)
            return
        _, root, P, c = factor
        xi = flat_leaves(noise, chains)
        projected = (P.transpose(-1, -2) @ xi.unsqueeze(-1)).squeeze(-1) * c
        shaped = root * (xi - (P @ projected.unsqueeze(-1)).squeeze(-1))
        out.add(leaf_views(shaped, noise), alpha=alpha)

    def diagonal(self, ctx):
        return None

    def check(self, shapes, role, where):
        if role != "diffusion":
            raise ValueError(f"{where}: NoiseCorrected is a diffusion, not a {role}")
        self.base.check(shapes, role, where)
        if isinstance(self.base, Scalar):
            self.noise._diffusion = self.base.value
        else:
            self.noise._diffusion = flat_leaves([torch.broadcast_to(v, s) for v, s in zip(self.base.values, shapes)],
                                          self.noise.chains)
        _positive_diffusion(self.noise._diffusion)

    def tensors(self):
        return self.base.tensors()

    def __repr__(self):
        return f"NoiseCorrected({self.base!r}, {self.noise.structure})"
