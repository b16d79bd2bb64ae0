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

Practice (issue 15's protocol: BAOAB, 8 chains, 20,000 gradients of which 2,000 burn-in, W2 of each
chain's Gaussian fit / √tr Σ):

* the step is in whitened units: at T = 1 the best was h ≈ 1.6–1.7 (friction 0.2–1) whatever the
  conditioning; the initial mass needs the target's own small step until the last window
  (``burn_in_lr`` of the presets, ``learned_operators.BurnInStep``: 0.75·h in the last window);
* 2-D, condition 100, rotated: 0.0058 per chain (the identity's best 0.025; iid draws 0.008);
* 100-D, condition 100, rotated: 0.0325 with ``pool=True`` (identity 0.061, iid 0.029); one chain's
  1,000 correlated draws per 100-D window are too few (it diverges), and a diagonal mass cannot
  whiten a rotated target (0.063);
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
import math
from numbers import Real

import torch

from bayesflow.engine.accumulator import Leaves
from bayesflow.engine.block import Block
from bayesflow.engine.matrices import _check_matrix, check_finite_matrix

__all__ = ["LearnedMass"]

KINDS = ("dense", "diag")
SHRINKAGE = 5.0
"""Stan's pseudo-count: the weight of the regularising identity is 5 / (n + 5)."""


def _flat(leaves: Leaves, chains: int | None) -> torch.Tensor:
    """θ as a (d,) vector, or (K, d) with K chains."""
    if len(leaves) == 1:
        return leaves[0].reshape(-1) if chains is None else leaves[0].reshape(chains, -1)
    if chains is None:
        return torch.cat([leaf.reshape(-1) for leaf in leaves])
    return torch.cat([leaf.reshape(chains, -1) for leaf in leaves], 1)


def _split(vector: torch.Tensor, like: Leaves) -> Leaves:
    """A (d,) or (K, d) vector cut into views shaped like ``like``."""
    if len(like) == 1:
        return [vector.reshape(like[0].shape)]
    sizes = [leaf[0].numel() if vector.ndim == 2 else leaf.numel() for leaf in like]
    return [part.reshape(leaf.shape) for part, leaf in zip(vector.split(sizes, dim=-1), like)]


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
                 jitter: float = 1e-3, chains: int | None = None, pool: bool = False):
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
        self.kind, self.burn_in, self.windows = kind, burn_in, windows
        self.jitter, self.chains, self.pool = float(jitter), chains, bool(pool)
        self.initial = _check_initial(initial, kind)
        weights = [2**i for i in range(windows)]
        self.ends = [round(burn_in * sum(weights[:i + 1]) / sum(weights)) for i in range(windows)]
        if any(b - a < 2 for a, b in zip([0, *self.ends], self.ends)):
            raise ValueError(f"burn_in={burn_in} is too short for {windows} doubling windows of at least 2 steps")

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
        d = sum(leaf.numel() for leaf in params) // (K or 1)
        root = self._initial_root(d, like)
        if self.kind == "diag":
            parts = _split(root if K is None else root.expand(K, d), params)
            return ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                    [part.clone() for part in parts])
        batch = () if K is None else (K,)
        return (like.new_zeros(*batch, d), like.new_zeros(*batch, d, d), root.expand(*batch, d, d).clone())

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
        return initial.sqrt() if self.kind == "diag" else _root(initial)

    def update_state(self, statistics: tuple, grads: Leaves, step: int, inplace: bool) -> tuple:
        """The statistics this step writes (fresh copies unless ``inplace``); unchanged after burn-in.

        θ_t itself is absorbed by :meth:`absorb` when an operator first reads S (the engine hands
        preconditioners the gradient, operators the state).
        """
        if step >= self.burn_in or inplace:
            return statistics
        mean, scatter, root = statistics
        copy = _clone if self.kind == "dense" else (lambda leaves: [t.clone() for t in leaves])
        ends = step + 1 in self.ends
        return copy(mean), copy(scatter), copy(root) if ends else root

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
        window = bisect.bisect_right(self.ends, step)
        start = self.ends[window - 1] if window else 0
        n = step - start + 1
        mean, scatter, root = statistics
        if self.kind == "dense":
            _welford_dense(mean, scatter, _flat(params, chains), n, self.pool)
        else:
            _welford_diag(mean, scatter, params, n, self.pool)
        if step + 1 == self.ends[window]:
            samples = n * (chains if self.pool else 1)
            if self.kind == "dense":
                root.copy_(_root(self._regularised(scatter / (samples - 1), samples)))
            else:
                variances = torch._foreach_div(scatter, float(samples - 1))
                mean_variance = _flat(variances, chains).mean(-1)
                weight = samples / (samples + SHRINKAGE)
                for target, v in zip(root, variances):
                    floor = mean_variance.view(-1, *([1] * (v.ndim - 1))) if chains else mean_variance
                    target.copy_((weight * v + (1.0 - weight) * self.jitter * floor).clamp_min(0.0).sqrt())

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
        return f"LearnedMass({self.kind!r}, burn_in={self.burn_in}, windows={self.windows}{chains}{pooled})"


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


def _root(covariance: torch.Tensor) -> torch.Tensor:
    """The symmetric PSD square root (batched; eigh in float64 for the small eigenvalues).

    Raises FloatingPointError when the window's covariance is not finite or not decomposable: the
    chains diverged while the mass was being learned (a check once per window, not per step).
    """
    problem = None
    if not bool(torch.isfinite(covariance).all()):
        problem = "is not finite"
    else:
        try:
            eigenvalues, vectors = torch.linalg.eigh(covariance.double())
        except torch.linalg.LinAlgError:
            problem = "has no eigendecomposition"
    if problem is not None:
        raise FloatingPointError(f"LearnedMass: the running covariance of θ at the end of a burn-in window "
                                 f"{problem}: the chains diverged while the mass was learned; lower "
                                 "burn_in_lr (the step in the target's own units) or lengthen the windows")
    root = (vectors * eigenvalues.clamp_min(0.0).sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)
    return root.to(covariance.dtype)


def _welford_dense(mean, scatter, x, n: int, pool: bool) -> None:
    """Welford's update of (mean, scatter) with sample(s) x, the n-th of the window (Chan's when pooled)."""
    if n == 1:
        scatter.zero_()
        mean.zero_()
    if pool:  # K samples at once: the chains' batch mean and scatter, merged (Chan, Golub & LeVeque)
        K = x.shape[0]
        batch_mean = x.mean(0)
        centred = x - batch_mean
        delta = batch_mean - mean[0]
        before = K * (n - 1)
        total = before + K
        merged = scatter[0] + centred.T @ centred + torch.outer(delta, delta) * (before * K / total)
        scatter.copy_(merged.expand_as(scatter))
        mean.copy_((mean[0] + delta * (K / total)).expand_as(mean))
        return
    delta = x - mean
    mean.add_(delta, alpha=1.0 / n)
    scatter.add_(delta.unsqueeze(-1) * (x - mean).unsqueeze(-2))


def _welford_diag(mean, scatter, x, n: int, pool: bool) -> None:
    if n == 1:
        torch._foreach_zero_(scatter)
        torch._foreach_zero_(mean)
    if pool:  # per element over the chain dimension, kept replicated per chain
        K = x[0].shape[0]
        for m, s, leaf in zip(mean, scatter, x):
            batch_mean = leaf.mean(0, keepdim=True)
            delta = batch_mean - m[:1]
            before = K * (n - 1)
            total = before + K
            s.copy_((s[:1] + ((leaf - batch_mean) ** 2).sum(0, keepdim=True)
                     + delta * delta * (before * K / total)).expand_as(s))
            m.copy_((m[:1] + delta * (K / total)).expand_as(m))
        return
    delta = torch._foreach_sub(x, mean)
    torch._foreach_add_(mean, delta, alpha=1.0 / n)
    torch._foreach_addcmul_(scatter, delta, torch._foreach_sub(x, mean))
