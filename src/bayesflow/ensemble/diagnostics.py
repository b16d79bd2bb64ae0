r"""Convergence diagnostics across chains: rank-normalised split R-hat and effective sample size.

The estimators are those of Vehtari, Gelman, Simpson, Carpenter and Bürkner (2021), "Rank-normalization,
folding, and localization: an improved R-hat for assessing convergence of MCMC", as ArviZ (0.x) and Stan
compute them, vectorised over every parameter at once (torch, no per-parameter Python loop):

1. **split** each chain in half (an odd middle draw is dropped): ``(C, N) -> (2C, N // 2)``;
2. **rank-normalise** per parameter: average ranks :math:`r` over all :math:`S` draws of all chains,
   :math:`z = Φ^{-1}\big((r - 3/8) / (S + 1/4)\big)` (Blom's offsets);
3. **R-hat** from the within-chain variance :math:`W` (mean of the chain variances) and the between-chain
   variance :math:`B = n\,\mathrm{Var}(\bar z_c)` of ``C`` chains of ``n`` draws:
   :math:`\hat V^+ = \frac{n-1}{n} W + \frac{B}{n}`, :math:`\hat R = \sqrt{\hat V^+ / W}`;
4. **ESS** :math:`= S / \hat τ`, :math:`\hat τ = -1 + 2\sum_t \hat ρ_t` with the combined autocorrelation
   :math:`\hat ρ_t = 1 - (W - \overline{\mathrm{acov}_t}) / \hat V^+` (autocovariances by FFT), truncated by
   Geyer's initial positive sequence and made monotone (initial monotone sequence), :math:`\hat τ` floored at
   :math:`1/\log_{10} S`.

Samples are tensors shaped ``(chains, draws, *param_shape)`` or any tree of them (a dict of parameter
traces); every function returns the same tree with one value per parameter.

Example:
    >>> import torch
    >>> from bayesflow.ensemble import ess, rhat
    >>> samples = {"w": torch.randn(4, 1000, 10, 3), "b": torch.randn(4, 1000)}
    >>> rhat(samples)["w"].shape, ess(samples)["b"].shape
    (torch.Size([10, 3]), torch.Size([]))
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from bayesflow.tree import flatten, tree_map
from bayesflow.types import TensorTree

__all__ = ["ess", "rhat"]

RHAT_METHODS = ("rank", "z_scale", "folded", "split", "identity")
ESS_METHODS = ("bulk", "tail", "mean")
_RESOLUTION = float(np.finfo(np.float64).resolution)  # ArviZ's "constant chain" threshold


# --------------------------------------------------------------------------- building blocks on (C, N, P)


def _split(x: torch.Tensor) -> torch.Tensor:
    """(C, N, P) -> (2C, N // 2, P): first halves of every chain, then second halves."""
    half = x.shape[1] // 2
    return torch.cat([x[:, :half], x[:, x.shape[1] - half:]], dim=0)


def _columns(x: torch.Tensor) -> torch.Tensor:
    """(C, N, P) -> (P, C·N): one row of all draws per parameter."""
    return x.reshape(-1, x.shape[-1]).T.contiguous()


def _quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation (type 7, numpy's default) quantile of every row: (P, S) -> (P,), by selection."""
    pos = q * (rows.shape[1] - 1)
    lo, frac = math.floor(pos), pos - math.floor(pos)
    low = rows.kthvalue(lo + 1, dim=1).values
    if frac == 0:
        return low
    high = rows.kthvalue(lo + 2, dim=1).values
    return (1 - frac) * low + frac * high  # numpy's median (a + b) / 2 exactly: folded ties stay ties


def _z_scale(x: torch.Tensor) -> torch.Tensor:
    """Rank-normalise every column of (C, N, P) over its C·N values (average ranks for ties, Blom).

    One sort per column; a tie block occupying sorted positions ``first..last`` gets the average rank
    ``(first + last) / 2 + 1``, found with running maxima / minima instead of a search per draw.
    """
    c, n, p = x.shape
    size = c * n
    values, order = _columns(x).sort(dim=1)
    pos = torch.arange(size, device=x.device).expand(p, size)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.cummax(torch.where(starts, pos, 0), dim=1).values
    last = torch.cummin(torch.where(ends, pos, size).flip(1), dim=1).values.flip(1)
    rank = (first + last).to(x.dtype) / 2 + 1
    z = torch.special.ndtri((rank - 0.375) / (size + 0.25))
    return torch.empty_like(z).scatter_(1, order, z).T.reshape(c, n, p)


def _fold(x: torch.Tensor) -> torch.Tensor:
    """|x - median| per column (the median over all chains and draws)."""
    return (x - _quantile(_columns(x), 0.5)).abs()


def _rhat(x: torch.Tensor) -> torch.Tensor:
    r"""\sqrt{((n-1)/n W + B/n) / W} for (C, n, P); +inf where W = 0 < B, NaN where W = B = 0 (tested exactly)."""
    n = x.shape[1]
    between = n * x.mean(dim=1).var(dim=0, correction=1)
    within = x.var(dim=1, correction=1).mean(dim=0)
    out = ((between / within + n - 1) / n).sqrt()
    stuck = (x.amax(dim=1) == x.amin(dim=1)).all(dim=0)  # W = 0
    constant = x.amax(dim=(0, 1)) == x.amin(dim=(0, 1))  # W = B = 0
    return torch.where(stuck, torch.where(constant, math.nan, math.inf), out)


def _autocov(x: torch.Tensor) -> torch.Tensor:
    """Biased autocovariance of every chain and column at lags 0..N-1 by FFT: (C, N, P) -> (C, N, P)."""
    n = x.shape[1]
    m = 1 << (2 * n - 1).bit_length()  # ≥ 2N - 1: no circular wrap-around
    f = torch.fft.rfft(x - x.mean(dim=1, keepdim=True), n=m, dim=1)
    return torch.fft.irfft(f * f.conj(), n=m, dim=1)[:, :n] / n


def _ess(x: torch.Tensor) -> torch.Tensor:
    """ESS of every column of (C, N, P), Geyer's initial monotone sequence, as ArviZ's ``_ess``."""
    c, n, _ = x.shape
    size = c * n
    acov = _autocov(x).mean(dim=0)  # (N, P)
    mean_var = acov[0] * n / (n - 1)  # W
    var_plus = mean_var * (n - 1) / n
    if c > 1:
        var_plus = var_plus + x.mean(dim=1).var(dim=0, correction=1)
    rho = 1 - (mean_var - acov) / var_plus  # (N, P)
    rho[0] = 1
    # Pairs Γ_k = ρ_2k + ρ_2k+1 for the k that Geyer's loop can reach (ArviZ: t < N - 3).
    k_max = max(0, (n - 3) // 2)
    pairs = rho[0: 2 * k_max + 2: 2] + rho[1: 2 * k_max + 2: 2]  # (k_max + 1, P)
    # L: the last pair the loop evaluates: the first non-positive one, or k_max.
    leading_positive = torch.cumprod((pairs > 0).to(x.dtype), dim=0).sum(dim=0).long()
    last = leading_positive.clamp(max=k_max)  # (P,)
    # Initial monotone sequence over the positive pairs before L.
    monotone = torch.cummin(pairs, dim=0).values
    keep = torch.arange(k_max + 1, device=x.device).unsqueeze(1) < last
    tau = -1 + 2 * (monotone * keep).sum(dim=0)
    # ρ_2L enters once (ArviZ's "improve estimation" step): kept if positive or if its pair was stored.
    rho_even = rho.gather(0, (2 * last).unsqueeze(0)).squeeze(0)
    pair_last = pairs.gather(0, last.unsqueeze(0)).squeeze(0)
    tau = tau + torch.where((rho_even > 0) | (pair_last >= 0), rho_even, torch.zeros_like(rho_even))
    tau = tau.clamp(min=1 / math.log10(size))
    out = size / tau
    constant = (x.amax(dim=(0, 1)) - x.amin(dim=(0, 1))) < _RESOLUTION
    out = torch.where(constant, torch.full_like(out, float(size)), out)
    return torch.where(rho.isnan().any(dim=0) & ~constant, torch.full_like(out, math.nan), out)


def _rhat_of(x: torch.Tensor, method: str) -> torch.Tensor:
    s = x if method == "identity" else _split(x)
    if method in ("identity", "split"):
        return _rhat(s)
    bulk = _rhat(_z_scale(s)) if method in ("rank", "z_scale") else None
    tail = _rhat(_z_scale(_fold(s))) if method in ("rank", "folded") else None
    return torch.fmax(bulk, tail) if method == "rank" else tail if bulk is None else bulk  # fmax: NaN hides nothing


def _ess_of(x: torch.Tensor, method: str, prob: tuple[float, float]) -> torch.Tensor:
    if method == "mean":
        return _ess(_split(x))
    if method == "bulk":
        return _ess(_z_scale(_split(x)))
    rows = _columns(x)
    low, high = (_ess(_split((x <= _quantile(rows, q)).to(x.dtype))) for q in prob)
    return torch.minimum(low, high)  # "tail"


# --------------------------------------------------------------------------- leaves and trees


def _per_leaf(fn, samples: TensorTree, chunk_size: int | None, name: str) -> TensorTree:
    """Apply ``fn: (C, N, P) -> (P,)`` to every leaf, reshaped back to the leaf's parameter shape."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")

    def leaf(x: Any) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim < 2 or x.shape[1] < 4:
            raise ValueError(f"{name} expects samples shaped (chains, draws, *param_shape) with at least 4 draws; "
                             f"got a leaf of shape {tuple(x.shape)}")
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        flat = x.detach().to(dtype).reshape(x.shape[0], x.shape[1], -1)
        finite = flat.isfinite().all(dim=1).all(dim=0)  # (P,)
        flat = torch.where(finite, flat, torch.zeros_like(flat))
        step = flat.shape[-1] if chunk_size is None else chunk_size
        out = torch.cat([fn(flat[..., i: i + step]) for i in range(0, flat.shape[-1], max(step, 1))]
                        or [flat.new_empty(0)])
        out = torch.where(finite, out, torch.full_like(out, math.nan))
        return out.reshape(x.shape[2:])

    return tree_map(leaf, samples)


def rhat(
    samples: TensorTree,
    method: Literal["rank", "z_scale", "folded", "split", "identity"] = "rank",
    *,
    chunk_size: int | None = None,
) -> TensorTree:
    r"""Potential scale reduction :math:`\hat R` per parameter across chains (Vehtari et al. 2021).

    With ``C`` chains of ``n`` draws (after splitting), chain means :math:`\bar z_c`, within-chain
    variance :math:`W = \frac1C\sum_c s_c^2` and between-chain variance :math:`B = n\,\mathrm{Var}_c(\bar z_c)`:

    .. math::
        \hat V^+ = \frac{n-1}{n} W + \frac{B}{n}, \qquad \hat R = \sqrt{\hat V^+ / W}.

    Methods (those of ArviZ):

    - ``"rank"`` (default, recommended): :math:`\max(\hat R_{bulk}, \hat R_{tail})` of ``"z_scale"`` and ``"folded"``;
    - ``"z_scale"``: split chains, rank-normalise, then :math:`\hat R` (the bulk R-hat);
    - ``"folded"``: the same on :math:`|θ - \mathrm{median}(θ)|` (detects chains with different scales);
    - ``"split"``: classic split-:math:`\hat R` on the raw draws; ``"identity"``: unsplit (two chains or more).

    Values above 1.01 suggest the chains have not mixed. Chains stuck at different values (:math:`W = 0 < B`)
    get ``+inf``; a parameter constant over every draw (:math:`W = B = 0`) or with a non-finite draw, NaN.
    ``"rank"``'s maximum is ``torch.fmax``'s (NaN only if both parts are); ``"folded"`` alone is NaN for
    stuck values symmetric about the median (0 and 1: every fold is 1/2). One chain: its halves are compared.

    Args:
        samples: a tensor shaped ``(chains, draws, *param_shape)`` (``draws ≥ 4``) or a tree of them.
        method: one of ``"rank"``, ``"z_scale"``, ``"folded"``, ``"split"``, ``"identity"``.
        chunk_size: process at most this many parameters of a leaf at a time (bounds memory).

    Returns:
        The tree of ``samples`` with a tensor of shape ``param_shape`` per leaf.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import rhat
        >>> x = torch.randn(4, 500, 3, generator=torch.Generator().manual_seed(0))
        >>> x[0] += 5.0  # one chain stuck elsewhere
        >>> (rhat(x) > 1.1).all()
        tensor(True)
        >>> stuck = torch.tensor([[0.0], [0.0], [1.0], [1.0]]).expand(4, 200)  # chains stuck at 0 and 1
        >>> rhat(stuck), rhat(stuck, "folded"), rhat(torch.ones(4, 200))
        (tensor(inf), tensor(nan), tensor(nan))
    """
    if method not in RHAT_METHODS:
        raise ValueError(f"unknown R-hat method {method!r}; expected one of {RHAT_METHODS}")
    if method == "identity" and any(torch.as_tensor(x).shape[0] < 2 for x in flatten(samples)[0]):
        raise ValueError("the unsplit 'identity' R-hat needs at least 2 chains; use a split method for one chain")
    return _per_leaf(lambda x: _rhat_of(x, method), samples, chunk_size, "rhat")


def ess(
    samples: TensorTree,
    method: Literal["bulk", "tail", "mean"] = "bulk",
    *,
    prob: tuple[float, float] = (0.05, 0.95),
    chunk_size: int | None = None,
) -> TensorTree:
    r"""Effective sample size per parameter, pooled over chains (Vehtari et al. 2021; Geyer 1992).

    For ``C`` chains of ``n`` draws (after splitting), :math:`S = Cn`, the biased autocovariances
    :math:`\mathrm{acov}_{c,t}` (by FFT), :math:`W` and :math:`\hat V^+` as in :func:`rhat`:

    .. math::
        \hat ρ_t = 1 - \frac{W - \frac1C\sum_c \mathrm{acov}_{c,t}}{\hat V^+}, \qquad
        \hat τ = -1 + 2\sum_{k<L} \min_{j\le k} (\hat ρ_{2j} + \hat ρ_{2j+1}) + \hat ρ_{2L}^{+}, \qquad
        \mathrm{ESS} = S / \max(\hat τ, 1/\log_{10} S),

    where ``L`` is the first pair with :math:`\hat ρ_{2L} + \hat ρ_{2L+1} \le 0` (Geyer's initial positive
    sequence), the running minimum makes it monotone, and :math:`\hat ρ_{2L}^{+}` is the last even
    autocorrelation when positive (Stan's and ArviZ's truncation, reproduced to float precision).

    Methods (those of ArviZ):

    - ``"bulk"`` (default): on the split, rank-normalised draws — the efficiency of the posterior's bulk;
    - ``"tail"``: the lesser ESS of the indicators :math:`I(θ \le q_{5\%})`, :math:`I(θ \le q_{95\%})` (``prob``);
    - ``"mean"``: on the split raw draws — the ESS of the posterior mean's Monte Carlo estimate.

    For an AR(1) chain :math:`θ_t = ρθ_{t-1} + ε_t` the exact value is :math:`S(1-ρ)/(1+ρ)`. A constant
    parameter gets ``S``; one with a non-finite draw gets NaN. Chains stuck at different values (R-hat
    ``+inf``) have :math:`\hat ρ_t = 1`, :math:`\hat τ = 4\lfloor (n-3)/2 \rfloor`: ESS ≈ one draw per chain.

    Args:
        samples: a tensor shaped ``(chains, draws, *param_shape)`` (``draws ≥ 4``) or a tree of them.
        method: ``"bulk"``, ``"tail"`` or ``"mean"``.
        prob: the two quantile levels of the tail ESS.
        chunk_size: process at most this many parameters of a leaf at a time (bounds memory).

    Returns:
        The tree of ``samples`` with a tensor of shape ``param_shape`` per leaf.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import ess
        >>> x = torch.randn(4, 1000, 2, generator=torch.Generator().manual_seed(0))  # independent draws
        >>> ess(x).round()  # ≈ 4000 for each of the two parameters (± about 5%)
        tensor([3895., 3839.])
        >>> ess(torch.tensor([[0.0], [0.0], [1.0], [1.0]]).expand(4, 200))  # stuck chains: 800 / 192
        tensor(4.1667)
    """
    if method not in ESS_METHODS:
        raise ValueError(f"unknown ESS method {method!r}; expected one of {ESS_METHODS}")
    if not (0 < prob[0] < 1 and 0 < prob[1] < 1):
        raise ValueError(f"prob must hold two levels in (0, 1), got {prob!r}")
    return _per_leaf(lambda x: _ess_of(x, method, tuple(prob)), samples, chunk_size, "ess")
