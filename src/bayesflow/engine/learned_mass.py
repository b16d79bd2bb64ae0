r"""A mass learned during burn-in: the running moments of θ as a preconditioner, frozen afterwards.

During the first ``burn_in`` steps :class:`LearnedMass` keeps Welford's running mean and scatter of
θ over a few doubling windows; at the end of each window it sets :math:`S = \hat Σ^{1/2}` (the
symmetric root of the window's regularised covariance) and starts the next window afresh. From
step ``burn_in`` on, S is a constant: the chain is Markov and samples exactly what a fixed operator
samples. S enters the engine as operators on θ:

* the **curl** :math:`Q = [[0, -S], [S, 0]]` (:meth:`LearnedMass.curl`) with mass σ² gives
  :math:`dθ = S m/σ^2\,dt`, :math:`dm = (S \nabla ℓ - α m/σ^2)\,dt + \sqrt{2αT}\,dW`: underdamped
  Langevin in the whitened coordinates :math:`φ = S^{-1}θ`, i.e. the kinetic mass
  :math:`M = σ^2 \hat Σ^{-1}` on the momenta :math:`p = S^{-1} m` (:math:`M^{-1} = \hat Σ/σ^2`);
  the momenta stay N(0, T σ²) whatever S is, and the exact O step needs no change;
* the **diffusion** :math:`D = \hat Σ = S^2` (:meth:`LearnedMass.diffusion`, square root S): SGLD
  preconditioned by the learned covariance.

Both (:mod:`bayesflow.engine.learned_operators`) are skew-symmetric / symmetric PSD for every S,
so :math:`\exp(-H/T)` is stationary. S does not depend on the current z (it is a function of the
past during burn-in and constant after), so Γ = 0 (during burn-in by the convention of pSGLD).
``kind="dense"`` holds a d×d matrix per chain (small d: it reaches rotated targets); ``kind="diag"``
one variance per parameter (any size).

**Gradient-informed estimate** (``gradients=True``, nutpie's; :mod:`bayesflow.engine.moments`): the
window also keeps the moments of the potential gradient :math:`g = \nabla H(θ_t)` the engine hands
preconditioners at each step, and sets :math:`\hat Σ = T\,\mathrm{gm}(C_θ, C_g)`, the SPD solution of
:math:`\hat Σ C_g \hat Σ = T^2 C_θ` (diagonal: :math:`T\sqrt{\operatorname{Var}θ_i/\operatorname{Var}g_i}`).
On a Gaussian ∝ exp(−H/T), :math:`C_g = T^2Σ^{-1}C_θΣ^{-1}` whatever the law of the draws, so the
estimate is Σ from any n > d draws — chains that have not mixed, or started far out — where
:math:`C_θ` alone is Σ only at stationarity. Mini-batch gradient noise inflates :math:`C_g` and
shrinks :math:`\hat Σ` (a smaller, safer step). T is the preset's (``mass=`` binds it through
:meth:`LearnedMass.at_temperature`); with the engine used directly give ``temperature=``.

Practice (issue 15's protocol: BAOAB, 8 chains, 20,000 gradients of which 2,000 burn-in, W2 of each
chain's Gaussian fit / √tr Σ):

* the step is in whitened units: at T = 1 the best was h ≈ 1.6–1.7 (friction 0.2–1) whatever the
  conditioning; the initial mass needs the target's own small step until the last window
  (``burn_in_lr`` of the presets, ``learned_operators.BurnInStep``: 0.75·h in the last window);
* 2-D, condition 100, rotated: 0.0058 per chain (the identity's best 0.025; iid draws 0.008);
* 100-D, condition 100, rotated: 0.0326 with ``pool=True, gradients=True`` at h = 1.6 (ESS per
  gradient 0.68; iid draws 0.029), 0.051 from the draws alone in the benchmark's grid (the estimate's
  error caps h at 0.64; identity 0.067); one chain's 1,000 correlated draws per 100-D window are too
  few (it diverges), and a diagonal mass cannot whiten a rotated target (0.063);
* h is limited by the estimate's error (a variance overestimated by a factor f raises that
  direction's frequency by √f): the best h lies just below one that diverges;
* a window much shorter than the chain's relaxation time underestimates the spread, and the next
  window then moves slower still: start from an overdispersed point, or keep windows long;
* S is set by Python control flow on the step count: ``compile=...`` falls back to the eager step.

Regularisation (Stan's, made scale-free): with n samples in a window,
:math:`\hat Σ_{reg} = \tfrac{n}{n+5}\hat Σ + \tfrac{5}{n+5}\,ε\,\bar σ^2 I`, :math:`\bar σ^2` the
mean variance and ε = ``jitter``.

Example (BAOAB whose mass is learned over 200 burn-in steps):
    >>> import torch
    >>> from bayesflow.engine import Block, Scalar, SDEConfig, Splitting, build
    >>> from bayesflow.engine.learned_mass import LearnedMass
    >>> mass = LearnedMass("dense", burn_in=200)
    >>> config = SDEConfig(step_size=0.5, diffusion=Block({("momenta", "momenta"): Scalar(1.0)}),
    ...                    curl=mass.curl(), integrator=Splitting("BAOAB"))
    >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), config)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> for _ in range(300):
    ...     state, _ = transform.update(state, None, inplace=True)
    >>> mass.covariance(state.preconditioner[0]).shape   # Σ̂ of the last window (≈ I here)
    torch.Size([3, 3])
"""

from __future__ import annotations

import bisect
import copy
import math
from numbers import Real

import torch

from bayesflow.engine.accumulator import Leaves, flat_leaves, leaf_views
from bayesflow.engine.block import Block
from bayesflow.engine.matrices import _check_matrix, check_finite_matrix
from bayesflow.engine.moments import geometric_mean, symmetric_root, welford_dense, welford_diag

__all__ = ["LearnedMass"]

KINDS = ("dense", "diag")
SHRINKAGE = 5.0
"""Stan's pseudo-count: the weight of the regularising identity is 5 / (n + 5)."""


class LearnedMass:
    r"""Running moments of θ during burn-in, frozen as :math:`S = \hat Σ^{1/2}` after it.

    Args:
        kind: ``"dense"`` (a d×d covariance per chain; small d, rotated targets) or ``"diag"``
            (one variance per parameter; any model size).
        burn_in: steps over which the moments are learned (> 0); S is constant from then on.
        windows: number of doubling adaptation windows in the burn-in (lengths ∝ 1, 2, 4, ...); S is
            re-estimated at the end of each from that window's samples alone.
        initial: the covariance used before the first window ends: a positive float c (c·I), or a
            tensor, (d, d) symmetric PSD for ``"dense"``, (d,) non-negative for ``"diag"``.
        jitter: ε of the regularisation, relative to the mean variance (≥ 0).
        chains: K when the transform runs K chains (``build(..., chains=K)``), needed by ``"dense"``.
        pool: with chains, pool the moments of all chains (one S for all, K times the samples).
        gradients: also use the gradients, :math:`\hat Σ = T\,\mathrm{gm}(C_θ, C_g)` (module docstring):
            exact on Gaussians from few, non-stationary draws.
        temperature: T of the sampler, for ``gradients=True`` (presets given ``mass=`` pass theirs).

    The statistics live in ``state.preconditioner`` (mean, scatter, S); ``covariance(statistics)``
    is S² (the estimate in use). Steps ``t < burn_in`` absorb θ_t when an operator first reads S.

    Example (draws from N(0, diag(1, 4)) fed by hand: S² is their variance, shrunk by n/(n + 5)):
        >>> import torch
        >>> from bayesflow.engine.learned_mass import LearnedMass
        >>> mass = LearnedMass("diag", burn_in=1000, windows=1, jitter=0.0)
        >>> statistics = mass.init([torch.zeros(2, dtype=torch.float64)])
        >>> draws = torch.randn(1000, 2, dtype=torch.float64) * torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> for t, x in enumerate(draws):
        ...     mass.absorb(statistics, [x], t, numel=2)
        >>> torch.allclose(mass.covariance(statistics)[0], draws.var(0) * 1000 / 1005)
        True
    """

    def __init__(self, kind: str = "dense", burn_in: int = 1000, *, windows: int = 3, initial=1.0,
                 jitter: float = 1e-3, chains: int | None = None, pool: bool = False, gradients: bool = False,
                 temperature: float | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        for name, value in (("burn_in", burn_in), ("windows", windows)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, Real) or not 0.0 <= jitter < math.inf:
            raise ValueError(f"jitter must be a non-negative finite number, got {jitter!r}")
        if chains is not None and (isinstance(chains, bool) or not isinstance(chains, int) or chains < 1):
            raise ValueError(f"chains must be a positive integer or None, got {chains!r}")
        if pool and chains is None:
            raise ValueError("pool=True pools the moments of several chains: give chains=K")
        if not isinstance(gradients, bool):
            raise TypeError(f"gradients must be True or False, got {gradients!r}")
        if temperature is not None:
            temperature = _check_temperature(temperature)
        self.gradients, self.temperature = gradients, temperature
        self.kind, self.burn_in, self.windows = kind, burn_in, windows
        self.jitter, self.chains, self.pool = float(jitter), chains, bool(pool)
        self.initial = _check_initial(initial, kind)
        weights = [2**i for i in range(windows)]
        self.ends = [round(burn_in * sum(weights[:i + 1]) / sum(weights)) for i in range(windows)]
        if any(b - a < 2 for a, b in zip([0, *self.ends], self.ends)):
            raise ValueError(f"burn_in={burn_in} is too short for {windows} doubling windows of at least 2 steps")

    def at_temperature(self, temperature) -> LearnedMass:
        """This mass with the sampler's temperature T (which the gradient-informed estimate scales by);
        the presets call it with theirs. Itself when ``gradients=False`` or T is already set."""
        if not self.gradients or self.temperature is not None:
            return self
        bound = copy.copy(self)
        bound.temperature = _check_temperature(temperature)
        return bound

    @property
    def rough_until(self) -> int:
        """Steps whose S is the initial one or an estimate to be replaced before the last window: the
        start of the last window (``burn_in`` with one window)."""
        return self.ends[-2] if self.windows > 1 else self.burn_in

    # ----- the engine's preconditioner protocol -----------------------------------------------
    def init(self, params: Leaves) -> tuple:
        """``(mean, scatter, S)``: zeros and the root of ``initial``, shaped per chain."""
        like = params[0]
        K = self.chains
        if K is not None and any(leaf.ndim == 0 or leaf.shape[0] != K for leaf in params):
            raise ValueError(f"LearnedMass(chains={K}) needs every params leaf to lead with {K} chains, "
                             f"got shapes {[tuple(leaf.shape) for leaf in params]}")
        if self.gradients and self.temperature is None:
            raise ValueError("LearnedMass(gradients=True) scales its estimate by the temperature: give "
                             "temperature=T (the presets pass theirs through mass=)")
        d = sum(leaf.numel() for leaf in params) // (K or 1)
        root = self._initial_root(d, like)
        if self.kind == "diag":
            parts = leaf_views(root if K is None else root.expand(K, d), params)
            moments = [[torch.zeros_like(p) for p in params] for _ in range(4 if self.gradients else 2)]
            return (*moments[:2], [part.clone() for part in parts], *moments[2:])
        batch = () if K is None else (K,)
        moments = (like.new_zeros(*batch, d), like.new_zeros(*batch, d, d))
        return (*moments, root.expand(*batch, d, d).clone(), *(
            (like.new_zeros(*batch, d), like.new_zeros(*batch, d, d)) if self.gradients else ()))

    def _initial_root(self, d: int, like: torch.Tensor) -> torch.Tensor:
        initial = self.initial
        if isinstance(initial, float):
            scale = math.sqrt(initial)
            return torch.full((d,), scale, dtype=like.dtype, device=like.device) if self.kind == "diag" else (
                scale * torch.eye(d, dtype=like.dtype, device=like.device))
        if initial.shape[0] != d:
            raise ValueError(f"LearnedMass initial covariance has shape {tuple(initial.shape)}, but each chain "
                             f"has {d} parameters")
        initial = initial.to(dtype=like.dtype, device=like.device)
        return initial.sqrt() if self.kind == "diag" else symmetric_root(initial)

    def update_state(self, statistics: tuple, grads: Leaves, step: int, inplace: bool) -> tuple:
        """The statistics this step writes (fresh copies unless ``inplace``); unchanged after burn-in.

        θ_t itself is absorbed by :meth:`absorb` when an operator first reads S (the engine hands
        preconditioners the gradient, operators the state).
        """
        if step >= self.burn_in:
            return statistics
        if not inplace:
            clone = _clone if self.kind == "dense" else (lambda leaves: [t.clone() for t in leaves])
            ends = step + 1 in self.ends
            statistics = tuple(entry if i == 2 and not ends else clone(entry) for i, entry in enumerate(statistics))
        if self.gradients:
            self._absorb_gradient(statistics, grads, step)
        return statistics

    def _absorb_gradient(self, statistics: tuple, grads: Leaves, step: int) -> None:
        """Add ∇H(θ_t) to the window's gradient moments (the engine hands it to preconditioners)."""
        n = step - self._window_start(step) + 1
        mean, scatter = statistics[3], statistics[4]
        if self.kind == "diag":
            welford_diag(mean, scatter, list(grads), n, self.pool)
            return
        d = mean.shape[-1]
        chains = None if mean.ndim == 1 else mean.shape[0]
        if sum(g.numel() for g in grads) != d * (chains or 1):
            raise ValueError(f"LearnedMass(kind='dense', chains={self.chains}) got a gradient of "
                             f"{sum(g.numel() for g in grads)} entries for {chains or 1} chain(s) of {d} parameters")
        welford_dense(mean, scatter, flat_leaves(list(grads), chains), n, self.pool)

    def _window_start(self, step: int) -> int:
        window = bisect.bisect_right(self.ends, step)
        return self.ends[window - 1] if window else 0

    def values(self, statistics: tuple, step: int, out=None):
        """S of this step (the engine's ``out`` buffer is not needed)."""
        return statistics[2]

    def absorb(self, statistics: tuple, params: Leaves, step: int, numel: int) -> None:
        """Add θ_t (``params``) to the window of step ``t`` in place; at a window's end set S.

        ``numel`` is d, the parameters per chain (``ctx.numel``). Nothing happens from ``burn_in`` on.
        """
        if step >= self.burn_in:
            return
        total = sum(leaf.numel() for leaf in params)
        chains = None if total == numel else total // numel
        if self.kind == "dense" and chains != self.chains:
            raise ValueError(f"LearnedMass(kind='dense', chains={self.chains}) is driven by "
                             f"{chains or 1} chain(s): build it with chains={chains}")
        n = step - self._window_start(step) + 1
        mean, scatter, root = statistics[:3]
        if self.kind == "dense":
            welford_dense(mean, scatter, flat_leaves(params, chains), n, self.pool)
        else:
            welford_diag(mean, scatter, params, n, self.pool)
        if step + 1 in self.ends:
            samples = n * (chains if self.pool else 1)
            if self.kind == "dense":
                covariance = self._regularised(scatter / (samples - 1), samples)
                if self.gradients:  # Σ̂ = T·gm(C_θ, C_g): exact on a Gaussian from any n > d draws
                    gradients = self._regularised(statistics[4] / (samples - 1), samples)
                    covariance = self.temperature * geometric_mean(covariance, gradients)
                root.copy_(symmetric_root(covariance))
            else:
                variances = self._regularised_diag(scatter, samples, chains)
                if self.gradients:  # T·sqrt(Var θ_i / Var g_i)
                    gradients = self._regularised_diag(statistics[4], samples, chains)
                    variances = [self.temperature * (v / g).sqrt() for v, g in zip(variances, gradients)]
                for target, v in zip(root, variances):
                    target.copy_(v.sqrt())

    def _regularised_diag(self, scatter: Leaves, samples: int, chains: int | None) -> Leaves:
        """Per-element variances shrunk towards ε times their mean, as :meth:`_regularised` does."""
        variances = torch._foreach_div(scatter, float(samples - 1))
        mean_variance = flat_leaves(variances, chains).mean(-1)
        weight = samples / (samples + SHRINKAGE)
        out = []
        for v in variances:
            floor = mean_variance.view(-1, *([1] * (v.ndim - 1))) if chains else mean_variance
            out.append((weight * v + (1.0 - weight) * self.jitter * floor).clamp_min(0.0))
        return out

    def _regularised(self, covariance: torch.Tensor, samples: int) -> torch.Tensor:
        weight = samples / (samples + SHRINKAGE)
        average = torch.diagonal(covariance, dim1=-2, dim2=-1).mean(-1)
        eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
        return weight * covariance + ((1.0 - weight) * self.jitter * average)[..., None, None] * eye

    def covariance(self, statistics: tuple):
        """S² — the covariance estimate in use (a (d, d) / (K, d, d) tensor, or per-leaf variances)."""
        root = statistics[2]
        return root @ root if self.kind == "dense" else [r * r for r in root]

    # ----- operators that read S --------------------------------------------------------------
    def curl(self, coupling: float = 1.0) -> Block:
        """``Q = [[0, -cS], [cS, 0]]`` between θ and m: the learned kinetic mass (M⁻¹ = c²Σ̂/σ²)."""
        from bayesflow.engine.learned_operators import LearnedRoot

        return Block({("params", "momenta"): LearnedRoot(self, -float(coupling)),
                      ("momenta", "params"): LearnedRoot(self, float(coupling))})

    def diffusion(self, scale: float = 1.0):
        """``D = c·Σ̂ = c·S²`` on θ (square root √c·S): SGLD preconditioned by the learned covariance."""
        from bayesflow.engine.learned_operators import LearnedCovariance

        return LearnedCovariance(self, float(scale))

    def __repr__(self):
        pooled = ", pool=True" if self.pool else ""
        chains = f", chains={self.chains}" if self.chains is not None else ""
        gradients = "" if not self.gradients else (
            ", gradients=True" + ("" if self.temperature is None else f", temperature={self.temperature:g}"))
        return (f"LearnedMass({self.kind!r}, burn_in={self.burn_in}, windows={self.windows}{chains}{pooled}"
                f"{gradients})")


def _check_initial(initial, kind: str):
    if isinstance(initial, Real) and not isinstance(initial, bool):
        if not 0.0 < initial < math.inf:
            raise ValueError(f"initial covariance scale must be a positive finite number, got {initial!r}")
        return float(initial)
    if not isinstance(initial, torch.Tensor):
        raise TypeError(f"initial must be a positive float or a tensor, got {type(initial).__name__}")
    if kind == "diag":
        if initial.ndim != 1 or not bool(torch.isfinite(initial).all()) or bool((initial < 0).any()):
            raise ValueError(f"a diagonal initial covariance is a 1-D tensor of finite non-negative variances, "
                             f"got {initial!r}")
        return initial
    if initial.ndim != 2 or initial.shape[0] != initial.shape[1]:
        raise ValueError(f"a dense initial covariance is a square (d, d) matrix, got shape {tuple(initial.shape)}")
    check_finite_matrix(initial, "LearnedMass initial")
    _check_matrix(initial, "diffusion", "LearnedMass initial covariance")
    return initial


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.clone()


def _check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value < math.inf:
        raise ValueError(f"the gradient-informed mass needs a constant positive finite temperature, got {value!r} "
                         "(a schedule or T = 0 has no stationary law to whiten)")
    return float(value)
