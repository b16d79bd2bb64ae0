"""SG-MCMC presets: stationary moments against exact references, thermostat, temperature, T = 0 limits.

References are computed here, in float64, independently of the engine: on a Gaussian target every
preset's step is an affine map of its state, z' = F_B z + c_B + G_B ξ, whose coefficients depend on
the mini-batch B (uniform over a fixed partition, fresh each step). Its stationary mean solves
μ = E[F]μ + E[c] and its second moment S = E[F S Fᵀ + F μ cᵀ + c μᵀ Fᵀ + c cᵀ + G Gᵀ] (a Kronecker
linear system) — the discretisation- and mini-batch-aware law of the chain. The maps are written
below from each preset's documented update (Step/Expr), not read from the engine.

Monte Carlo: C chains in one tensor (rows, or elements for scalar targets) advanced together; each
chain's time average is one independent estimate, so standard errors are the spread across chains
divided by sqrt(C) (batch means with the chains as batches). Tolerance: 4.5 standard errors
(Bonferroni-widened for vectors, plus a mean-z² check). Gaussian-target chains run in float32 (the
noise is 5× cheaper to draw), averages and references in float64; T = 0 comparisons are float64.
Burn-in is computed from the slowest mode of each reference map.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from bayesflow import engine
from bayesflow.engine import Cyclical
from bayesflow.sgmcmc import adam_sghmc, baoa, baoab, csghmc, csgld, obabo, psgld, sghmc, sgld, sgnht

F64 = torch.float64
SIGMAS = 4.5


# ===== exact references: affine step maps ===========================================================
class Expr:
    """An affine expression ``zc @ z + const + Σ_k noise[k] @ ξ_k`` in one step's start state z."""

    def __init__(self, zc, const, noise):
        self.zc, self.const, self.noise = zc, const, noise

    def __add__(self, other):
        noise = dict(self.noise)
        for key, value in other.noise.items():
            noise[key] = noise[key] + value if key in noise else value
        return Expr(self.zc + other.zc, self.const + other.const, noise)

    def __sub__(self, other):
        return self + other.scale(-1.0)

    def scale(self, a):
        """``a * self`` with a a float or one factor per coordinate (shape ``(..., p)``)."""
        if isinstance(a, torch.Tensor):
            return Expr(a[..., None] * self.zc, a * self.const, {k: a[..., None] * v for k, v in self.noise.items()})
        return Expr(a * self.zc, a * self.const, {k: a * v for k, v in self.noise.items()})

    __rmul__ = scale

    def left(self, A):
        """``A @ self`` for a matrix A of shape ``(..., p, p)``."""
        return Expr(A @ self.zc, (A @ self.const[..., None])[..., 0], {k: A @ v for k, v in self.noise.items()})


class Step:
    """Builds one step's map z' = F z + c + G ξ over named p-dimensional components."""

    def __init__(self, batch: tuple, p: int, names: list[str]):
        self.batch, self.p, self.names = batch, p, names
        self.n = p * len(names)
        self.draws = 0

    def _zero(self):
        zeros = torch.zeros(*self.batch, self.p, self.n + 1, dtype=F64)
        return Expr(zeros[..., :-1], zeros[..., -1], {})

    def var(self, name: str) -> Expr:
        e = self._zero()
        i = self.names.index(name)
        e.zc[..., :, i * self.p:(i + 1) * self.p] = torch.eye(self.p, dtype=F64)
        return e

    def const(self, value: torch.Tensor) -> Expr:
        e = self._zero()
        e.const = e.const + value
        return e

    def noise(self, scale) -> Expr:
        """A fresh standard normal vector times ``scale`` (a float or per coordinate)."""
        self.draws += 1
        e = self._zero()
        scale = torch.as_tensor(scale, dtype=F64)
        eye = torch.eye(self.p, dtype=F64).expand(*self.batch, self.p, self.p)
        e.noise = {self.draws: (scale[..., None] if scale.ndim else scale) * eye}
        return e

    def map(self, out: dict):
        zero = torch.zeros(*self.batch, self.p, self.p, dtype=F64)
        F = torch.cat([out[k].zc for k in self.names], -2)
        c = torch.cat([out[k].const for k in self.names], -1)
        keys = sorted(set().union(*[out[k].noise for k in self.names]))
        G = torch.cat([torch.cat([out[k].noise.get(j, zero) for k in self.names], -2) for j in keys], -1)
        return F, c, G


def outer(a, b):
    return a[..., :, None] * b[..., None, :]


def stationary(maps):
    """Stationary (mean, covariance) of z' = F_B z + c_B + G_B ξ with B uniform over ``maps``."""
    F = torch.stack([m[0] for m in maps])
    c = torch.stack([m[1] for m in maps])
    n = F.shape[-1]
    mean = torch.linalg.solve(torch.eye(n, dtype=F64) - F.mean(0), c.mean(0)[..., None])[..., 0]
    Fm = (F @ mean[..., None])[..., 0]
    rhs = sum(outer(f, cc) + outer(cc, f) + outer(cc, cc) + G @ G.transpose(-1, -2)
              for f, (_, cc, G) in zip(Fm, maps)) / len(maps)
    system = torch.eye(n * n, dtype=F64) - kron_mean(F)
    second = torch.linalg.solve(system, rhs.reshape(*rhs.shape[:-2], n * n, 1)).reshape(rhs.shape)
    return mean, second - outer(mean, mean)


def kron_mean(F):
    n = F.shape[-1]
    return torch.einsum("b...ik,b...jl->b...ijkl", F, F).reshape(*F.shape[:-2], n * n, n * n).mean(0)


def burn_in(maps, decades: float = 7.0, extra: int = 0) -> int:
    """Steps for the second moments to forget the start by ``10**decades`` (slowest mode of E[F⊗F])."""
    radius = torch.linalg.eigvals(kron_mean(torch.stack([m[0] for m in maps]))).abs().max().item()
    return math.ceil(decades * math.log(10) / -math.log(radius)) + extra


# ----- each preset's step, written from its docstring -------------------------------------------------
MOMENTUM = ("sghmc", "sgnht", "baoa", "baoab", "obabo", "adam_sghmc")
CACHED = ("baoab", "obabo")


def components(name):
    return ["params"] + (["momenta"] if name in MOMENTUM else []) + (["cache"] if name in CACHED else [])


def reference_step(s: Step, name: str, hp: dict, T: float, grad, P=None, friction=None) -> dict:
    """One step of preset ``name`` with hyper-parameters ``hp``; ``grad(θ)`` is the affine ∇ℓ."""
    th = s.var("params")
    if name == "sgld":
        return {"params": th + hp["lr"] * grad(th) + s.noise(math.sqrt(2 * T * hp["lr"]))}
    if name == "psgld":
        h = hp["lr"]
        return {"params": th + grad(th).scale(h / P) + s.noise((2 * T * h / P).sqrt())}
    m = s.var("momenta")
    M, alpha = hp.get("sigma", 1.0) ** 2, hp.get("alpha")
    if name in ("sghmc", "sgnht"):
        h = hp["lr"]
        f = alpha if friction is None else friction
        m = m + h * grad(th) - (h * f / M) * m + s.noise(math.sqrt(2 * T * h * alpha))
        return {"params": th + (h / M) * m, "momenta": m}
    if name == "adam_sghmc":
        b1 = hp["betas"][0]
        h = math.sqrt(hp["lr"] * (1 - b1))
        m = b1 * m + h * grad(th) + s.noise((2 * T * (1 - b1) * P).sqrt())
        return {"params": th + m.scale(h / P), "momenta": m}
    h = hp["lr"]

    def ou(m, dt):  # the exact Ornstein–Uhlenbeck step
        decay = math.exp(-alpha * dt / M)
        return decay * m + s.noise(math.sqrt(T * M * (1 - decay**2)))

    if name == "baoa":
        m = m + h * grad(th)
        th = th + (h / 2 / M) * m
        m = ou(m, h)
        return {"params": th + (h / 2 / M) * m, "momenta": m}
    cache = s.var("cache")  # first same as last: the opening kick reuses the previous closing gradient
    if name == "baoab":
        m = m + (h / 2) * cache
        th = th + (h / 2 / M) * m
        m = ou(m, h)
        th = th + (h / 2 / M) * m
    else:  # obabo
        m = ou(m, h / 2)
        m = m + (h / 2) * cache
        th = th + (h / M) * m
    cache = grad(th)
    m = m + (h / 2) * cache
    if name == "obabo":
        m = ou(m, h / 2)
    return {"params": th, "momenta": m, "cache": cache}


def gaussian_maps(name, hp, T, precision, mean, P=None, friction=None, gradient_noise=0.0):
    """Per-direction maps for a diagonal Gaussian target N(mean, diag(1/precision)) (deterministic ∇ℓ)."""
    d = precision.shape[0]
    s = Step((d,), 1, components(name))
    lam, mu = precision.reshape(d, 1).to(F64), mean.reshape(d, 1).to(F64)

    def grad(th):
        g = th.scale(-lam) + s.const(lam * mu)
        return g + s.noise(math.sqrt(gradient_noise)) if gradient_noise else g

    P = None if P is None else P.reshape(d, 1).to(F64)
    return [s.map(reference_step(s, name, hp, T, grad, P, friction))]


def thermostat_target(hp, T, friction):
    """SGNHT's thermostat target at friction ξ: the Euler friction step's kinetic temperature
    T / max(1 - hξ/(2σ²), 1/2) (ThermostatCoupling with step_size), not T."""
    return T / max(1.0 - hp["lr"] * friction / (2 * hp.get("sigma", 1.0) ** 2), 0.5)


def thermostat_friction(name, hp, T, precision, mean, gradient_noise=0.0):
    """SGNHT: the friction ξ* at which E|m|²/(dσ²) = T/(1 - hξ*/(2σ²)) (the thermostat's fixed point), by
    bisection (returned as the excess of the kinetic temperature over the target, compared with 0)."""
    def kinetic(friction):
        maps = gaussian_maps(name, hp, T, precision, mean, friction=friction, gradient_noise=gradient_noise)
        excess = stationary(maps)[1][:, 1, 1].mean().item() / hp.get("sigma", 1.0) ** 2
        return excess - thermostat_target(hp, T, friction) + T

    lo, hi = 1e-3, hp.get("sigma", 1.0) ** 2 / hp["lr"]  # friction per step h·ξ/σ² in (0, 1]
    assert kinetic(lo) > T > kinetic(hi), f"no thermostat fixed point for {hp} (the step is too large)"
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kinetic(mid) > T else (lo, mid)
    return 0.5 * (lo + hi)


# ===== Monte Carlo ===================================================================================
def run(transform, params, *, burn: int, steps: int, batch=None, seed=0, prepare=None, observe=None, full=False,
        trace=None):
    """Advance C chains; per-chain time averages of θ, θ² (or θθᵀ with ``full``), m, m² and observe().

    ``trace(state)`` (a scalar) is recorded at every kept step, for time series such as SGNHT's ξ.
    """
    state = transform.init(params, seed=seed)
    if prepare is not None:
        state = prepare(state)
    sums, count, series = {}, 0, []
    for t in range(burn + steps):
        state, _ = transform.update(state, None if batch is None else batch(t), inplace=True)
        if t < burn:
            continue
        x = state.params.to(F64)
        stats = {"x": x, "xx": outer(x, x) if full else x * x}
        if state.momenta is not None:
            m = state.momenta.to(F64)
            stats.update(m=m, mm=outer(m, m) if full else m * m)
        if observe is not None:
            stats.update(observe(state))
        for key, value in stats.items():
            sums[key] = sums[key] + value if key in sums else value.clone()
        count += 1
        if trace is not None:
            series.append(float(trace(state)))
    averages = {key: value / count for key, value in sums.items()}
    if trace is not None:
        averages["trace"] = torch.tensor(series, dtype=F64)
    return state, averages


def batch_means(series: torch.Tensor, batches: int = 20) -> tuple[float, float]:
    """Mean of one time series and its standard error from ``batches`` consecutive batch means."""
    means = series[: len(series) // batches * batches].reshape(batches, -1).mean(1)
    return means.mean().item(), (means.std() / math.sqrt(batches)).item()


def chain_moments(avg, first="x", second="xx", full=False):
    """(mean, its SE, covariance, its SE) over chains (dim 0) of per-chain time averages."""
    chains = avg[first].shape[0]
    mean, per_chain = avg[first].mean(0), avg[first]
    # per chain: the time average of (x - mean)(x - mean)ᵀ, whose spread over chains is the SE's
    if full:
        centred = avg[second] - outer(per_chain, mean) - outer(mean, per_chain) + outer(mean, mean)
    else:
        centred = avg[second] - 2 * per_chain * mean + mean * mean
    root = math.sqrt(chains)
    return mean, avg[first].std(0) / root, centred.mean(0), centred.std(0) / root


def assert_within(name, estimate, se, reference, sigmas=SIGMAS):
    """Every entry within ``sigmas`` standard errors (Bonferroni-widened for many entries, so a vector
    has the false-alarm rate of one 4.5-SE comparison), and the mean squared z-score ≈ 1."""
    estimate, se, reference = (torch.as_tensor(v, dtype=F64).reshape(-1) for v in (estimate, se, reference))
    assert bool((se > 0).all()), f"{name}: zero standard error (the chains did not move)"
    z = (estimate - reference).abs() / se
    count = z.numel()
    threshold = max(sigmas, torch.special.ndtri(torch.tensor(1 - math.erfc(sigmas / math.sqrt(2)) / (2 * count),
                                                                      dtype=F64)).item())
    worst = int(z.argmax())
    print(f"{name}: max {z.max():.2f} SE (threshold {threshold:.2f}), mean z² {float((z**2).mean()):.2f}, at entry "
          f"{worst}: {estimate[worst]:.5g} ± {se[worst]:.2g} vs exact {reference[worst]:.5g}"
          + (f" (entry 0: {estimate[0]:.5g} vs {reference[0]:.5g})" if count > 1 else ""))
    assert float(z.max()) < threshold, (
        f"{name}: entry {worst}: Monte-Carlo {estimate[worst]:.6g} ± {se[worst]:.3g} vs exact {reference[worst]:.6g} "
        f"({z[worst]:.1f} standard errors; {int((z > 3).sum())} of {count} beyond 3)")
    if count >= 10:  # a systematic offset shared by many entries: E[z²] = 1, sd sqrt(2/count)
        assert float((z**2).mean()) < 1 + sigmas * math.sqrt(2 / count), f"{name}: mean z² {(z**2).mean():.2f}"


# ===== presets and their hyper-parameters ==============================================================
PRESETS = {"sgld": sgld, "sghmc": sghmc, "sgnht": sgnht, "baoa": baoa, "baoab": baoab, "obabo": obabo,
           "psgld": psgld, "adam_sghmc": adam_sghmc}
ADAPTIVE = ("psgld", "adam_sghmc")


def make(name, hp, log_posterior, temperature):
    options = {"check_finite": "none"}
    return PRESETS[name].build(log_posterior, temperature=temperature, **hp, **options)


def warm_preconditioner(name, hp, v0):
    """Adaptive presets start from v = v0 and (Adam) a late step count, so bias corrections are 1."""
    def prepare(state):
        v = v0.expand_as(state.params).to(state.params.dtype).clone()
        fields = (v, *(torch.zeros_like(v) for _ in state.preconditioner[0][1:]))
        step = torch.tensor(10**6 if name == "adam_sghmc" else 0, dtype=torch.int64)
        return state._replace(preconditioner=(tuple([f] for f in fields),), step=step)
    return prepare


def observe_preconditioner(name, hp):
    def observe(state):
        v = state.preconditioner[0][0][0].to(F64)
        return {"P": v.sqrt() + hp.get("eps", 1e-8)}
    return observe if name in ADAPTIVE else None


# (a) N(0, 1) and (b) the ill-conditioned Gaussian: step sizes where the discretisation bias is large
# (visible against the exact per-step law) but every direction is stable. The adaptive presets'
# reference freezes P at its measured average; the chain's P fluctuates with the recent gradients,
# which biases Var θ by O(1 - ρ) (measured on N(0, 1): +2% at ρ = 0.99, +0.3% at 0.999), so they run
# with ρ = 0.9999, where that bias is below the Monte-Carlo error, from a warm v.
STANDARD = {
    "sgld": dict(lr=0.5),
    "sghmc": dict(lr=0.5, alpha=1.0),
    "sghmc-sigma2": dict(lr=0.5, alpha=2.0, sigma=2.0),
    "sgnht": dict(lr=0.2, alpha=1.0),
    "sgnht-sigma2": dict(lr=0.4, alpha=4.0, sigma=2.0),  # the thermostat's inertia is σ² (friction ξ/σ²)
    "baoa": dict(lr=0.5, alpha=1.0),
    "baoab": dict(lr=0.5, alpha=1.0),
    "obabo": dict(lr=0.5, alpha=1.0),
    "psgld": dict(lr=0.3, alpha=0.9999, eps=1e-8),
    "adam_sghmc": dict(lr=1.0, betas=(0.9, 0.9999), eps=1e-8),
}
ILL = {
    "sgld": dict(lr=0.01),
    "sghmc": dict(lr=0.05, alpha=1.0),
    "sghmc-sigma2": dict(lr=0.1, alpha=4.0, sigma=2.0),
    "sgnht": dict(lr=0.05, alpha=1.0),
    "sgnht-sigma2": dict(lr=0.1, alpha=4.0, sigma=2.0),
    "baoa": dict(lr=0.05, alpha=1.0),
    "baoab": dict(lr=0.05, alpha=1.0),
    "obabo": dict(lr=0.05, alpha=1.0),
    "psgld": dict(lr=0.03, alpha=0.9999, eps=1e-8),
    "adam_sghmc": dict(lr=0.1, betas=(0.9, 0.9999), eps=1e-8),
}


def base(case):
    return case.split("-")[0]


def gaussian_check(case, hp, precision, mean, chains, steps, temperature=1.0, seed=0):
    """Run preset ``case`` on N(mean, diag(1/precision)) and compare with its exact stationary law."""
    name = base(case)
    d = precision.numel()
    lam32, mu32 = precision.float(), mean.float()

    def log_posterior(x, batch):
        return -0.5 * (lam32 * (x - mu32) ** 2).sum(), None

    transform = make(name, hp, log_posterior, temperature)
    start = torch.Generator().manual_seed(seed)
    x0 = mu32 + torch.randn(chains, d, generator=start) * 2.0 / lam32.sqrt()
    P_guess = (precision * temperature).sqrt()  # sqrt(E g²) for the exact law at h → 0
    prepare = warm_preconditioner(name, hp, precision.float() * temperature) if name in ADAPTIVE else None
    friction = (thermostat_friction(name, hp, temperature, precision, mean) if name == "sgnht" else None)
    guess = gaussian_maps(name, hp, temperature, precision, mean, P=P_guess, friction=friction)
    observe = observe_preconditioner(name, hp)
    trace = (lambda state: state.xi) if name == "sgnht" else None
    _, avg = run(transform, x0, burn=burn_in(guess, extra=200), steps=steps, prepare=prepare, observe=observe,
                 trace=trace, seed=seed)
    P = avg["P"].mean(0).to(F64) if name in ADAPTIVE else None
    maps = gaussian_maps(name, hp, temperature, precision, mean, P=P, friction=friction)
    exact_mean, exact_cov = stationary(maps)
    x_mean, x_mean_se, x_var, x_var_se = chain_moments(avg)
    assert_within(f"{case} mean θ", x_mean, x_mean_se, exact_mean[:, 0])
    assert_within(f"{case} Var θ", x_var, x_var_se, exact_cov[:, 0, 0])
    if name in MOMENTUM:
        _, _, m_var, m_var_se = chain_moments(avg, "m", "mm")
        assert_within(f"{case} Var m", m_var, m_var_se, exact_cov[:, 1, 1])
    if name == "sgnht":
        assert_thermostat(case, avg, friction, temperature, hp, d=x0.numel())
    return avg, exact_cov


def assert_thermostat(case, avg, friction, temperature, hp, d):
    """SGNHT: ξ settles at the exact friction ξ* whose stationary law has E|m|²/(dσ²) = T/(1 - hξ*/(2σ²))."""
    sigma2 = hp.get("sigma", 1.0) ** 2
    kinetic = (avg["mm"].mean() / sigma2).item()
    # ξ' = ξ + h(|m'|²/(dσ²) - T/(1 - hξ/(2σ²))) telescopes: the time average of the kinetic temperature is
    # that of the target up to (ξ_end - ξ_start)/(h·steps), whose spread is about sqrt(2·T·σ²/d)/(h·steps)
    # (ξ ~ N(ξ*, T·σ²/d): the thermostat's inertia is σ²). The trace holds ξ after each step, the target
    # reads it before: one step's shift, far below that spread.
    steps = avg["trace"].numel()
    target = sum(thermostat_target(hp, temperature, xi) for xi in avg["trace"].tolist()) / steps
    se = math.sqrt(2 * temperature * sigma2 / d) / (hp["lr"] * steps)
    assert abs(kinetic - target) < SIGMAS * se + 1e-6 * temperature, (case, kinetic, target, se)
    xi, xi_se = batch_means(avg["trace"])
    print(f"{case}: kinetic temperature {kinetic:.6f} (target {target:.6f}, T = {temperature}, SE {se:.2g}); "
          f"ξ {xi:.5f} ± {xi_se:.2g}, "
          f"ξ* = {friction:.5f}, A = {hp['alpha']}")
    assert_within(f"{case} mean ξ", xi, xi_se, friction)


# ===== tests ===========================================================================================
def test_reference_maps_reproduce_engine_md_table():
    """The reference step maps give ENGINE.md §3's exact N(0,1) variances (γ = 1, mass 1)."""
    table = {  # h: ULA, SGHMC semi-implicit x / m, BAOAB x / m, OBABO x / m
        0.05: (1.0256, 1.0006, 1.0263, 1.0000, 0.9994, 1.0006, 1.0000),
        0.1: (1.0526, 1.0026, 1.0554, 1.0000, 0.9975, 1.0025, 1.0000),
        0.5: (1.3333, 1.0909, 1.4545, 1.0000, 0.9375, 1.0667, 1.0000),
    }
    one, zero = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    for h, expected in table.items():
        got = []
        for name in ("sgld", "sghmc", "baoab", "obabo"):
            cov = stationary(gaussian_maps(name, dict(lr=h, alpha=1.0), 1.0, one, zero))[1][0]
            got += [cov[0, 0].item()] + ([cov[1, 1].item()] if name != "sgld" else [])
        assert got == pytest.approx(expected, abs=6e-5), (h, got)
    # closed forms of ENGINE.md: ULA 1/(1 - h/2), BAOAB Var m = 1 - h²/4, OBABO Var x = 1/(1 - h²/4)
    h = 0.3
    assert stationary(gaussian_maps("sgld", dict(lr=h), 1.0, one, zero))[1][0, 0, 0] == pytest.approx(1 / (1 - h / 2))
    cov = stationary(gaussian_maps("baoab", dict(lr=h, alpha=1.0), 1.0, one, zero))[1][0]
    assert (cov[0, 0].item(), cov[1, 1].item()) == pytest.approx((1.0, 1 - h**2 / 4))
    cov = stationary(gaussian_maps("obabo", dict(lr=h, alpha=1.0), 1.0, one, zero))[1][0]
    assert cov[0, 0].item() == pytest.approx(1 / (1 - h**2 / 4))


@pytest.mark.parametrize("case", list(STANDARD))
def test_standard_normal_matches_exact_discrete_law(case):
    """(a) N(0, 1) at a large step: θ (and m) variances equal the exact per-step law, not 1."""
    precision, mean = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    seed = 10 + list(STANDARD).index(case)
    gaussian_check(case, STANDARD[case], precision, mean, chains=20000, steps=600, seed=seed)  # 20 000 scalar chains


@pytest.mark.parametrize("case", list(ILL))
def test_ill_conditioned_gaussian_matches_exact_discrete_law(case):
    """(b) 100-D Gaussian with variances from 1e-2 to 1 and a non-zero mean: every direction."""
    precision = torch.logspace(0, 2, 100, dtype=F64)
    mean = torch.linspace(-1, 1, 100, dtype=F64)
    gaussian_check(case, ILL[case], precision, mean, chains=128, steps=2500, seed=30 + list(ILL).index(case))


# ----- (c) Bayesian linear regression with mini-batches at T = 1/num_data --------------------------------
class Regression:
    """y = Xw + N(0, 1) noise, prior w ~ N(0, I); a fixed partition into equal mini-batches.

    ``log_posterior(w, batch)`` is posteriors' per-datum value for K chains at once: w has shape (K, p)
    and ``batch`` holds each chain's mini-batch index, so every chain sees its own batches. The
    mini-batch mean of the squared residuals is evaluated from the batch's sufficient statistics
    (XᵀX, Xᵀy, yᵀy over the batch), which is the same function at a fraction of the cost.
    """

    def __init__(self, n=500, p=3, batches=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, p, generator=g, dtype=F64) * torch.tensor([1.0, 0.7, 1.4], dtype=F64)
        X[:, 1] += 0.5 * X[:, 0]
        y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + torch.randn(n, generator=g, dtype=F64)
        order = torch.randperm(n, generator=g)
        self.n, self.p, self.batches = n, p, batches
        self.XB, self.YB = X[order].reshape(batches, n // batches, p), y[order].reshape(batches, n // batches)
        precision = X.T @ X + torch.eye(p, dtype=F64)  # closed-form Gaussian posterior
        self.cov = torch.linalg.inv(precision)
        self.mean = self.cov @ (X.T @ y)
        size = n // batches
        self.H = self.XB.transpose(1, 2) @ self.XB / size + torch.eye(p, dtype=F64) / n  # -∇²ℓ per batch
        self.b = (self.XB.transpose(1, 2) @ self.YB[..., None])[..., 0] / size
        self.XX = self.XB.transpose(1, 2) @ self.XB / size
        self.yy = (self.YB**2).mean(1)

    def log_posterior(self, w, batch):
        # mean over the batch of -(y - xᵀw)²/2, plus the log prior / n
        XX, Xy, yy = self.XX[batch], self.b[batch], self.yy[batch]  # (K, p, p), (K, p), (K,)
        squares = (((XX * w[:, None, :]).sum(2) - 2 * Xy) * w).sum(1) + yy
        return (-0.5 * squares - 0.5 * (w**2).sum(1) / self.n).sum(), None

    def maps(self, name, hp, T, P=None, friction=None):
        out = []
        for B in range(self.batches):
            s = Step((), self.p, components(name))
            H, b = self.H[B], self.b[B]
            grad = lambda th, s=s, H=H, b=b: th.left(-H) + s.const(b)  # noqa: E731
            out.append(s.map(reference_step(s, name, hp, T, grad, P, friction)))
        return out

    def gradient_noise(self):
        """Per-coordinate variance of the mini-batch gradient at the posterior mean."""
        g = self.b - (self.H @ self.mean[:, None])[..., 0]
        return (g**2).mean(0)


REGRESSION = {
    "sgld": dict(lr=0.01),
    "sghmc": dict(lr=0.02, alpha=1.0),
    "sgnht": dict(lr=0.02, alpha=1.0),
    "baoa": dict(lr=0.02, alpha=1.0),
    "baoab": dict(lr=0.02, alpha=1.0),
    "obabo": dict(lr=0.02, alpha=1.0),
    "psgld": dict(lr=0.001, alpha=0.9999, eps=1e-8),
    "adam_sghmc": dict(lr=1e-3, betas=(0.9, 0.9999), eps=1e-8),
}


def regression_thermostat(problem, hp, T):
    def kinetic(friction):
        cov = stationary(problem.maps("sgnht", hp, T, friction=friction))[1]
        excess = cov[problem.p:2 * problem.p, problem.p:2 * problem.p].diagonal().mean().item()
        return excess - thermostat_target(hp, T, friction) + T

    lo, hi = 1e-3, 1.0 / hp["lr"]
    assert kinetic(lo) > T > kinetic(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kinetic(mid) > T else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("case", list(REGRESSION))
def test_linear_regression_posterior_with_minibatches(case):
    """(c) T = 1/num_data with mini-batches: the exact mini-batch law, within 6% of the posterior."""
    problem, hp, chains = Regression(), REGRESSION[case], 1000
    T, p = 1.0 / problem.n, problem.p
    transform = make(case, hp, problem.log_posterior, T)
    g = torch.Generator().manual_seed(50 + list(REGRESSION).index(case))
    w0 = problem.mean + 3 * problem.cov.diagonal().sqrt() * torch.randn(chains, p, generator=g, dtype=F64)
    v0 = problem.H.diagonal(dim1=1, dim2=2).mean(0) * T + problem.gradient_noise()
    friction = regression_thermostat(problem, hp, T) if case == "sgnht" else None
    guess = problem.maps(case, hp, T, P=v0.sqrt(), friction=friction)
    prepare = warm_preconditioner(case, hp, v0) if case in ADAPTIVE else None
    if case == "sgnht":  # the thermostat relaxes at a rate ∝ T = 1/n: start it at its fixed point ξ*
        def prepare(state):
            return state._replace(xi=torch.full_like(state.xi, friction))
    _, avg = run(transform, w0, burn=burn_in(guess, decades=5, extra=200), steps=2000, full=True,
                 seed=60 + list(REGRESSION).index(case), prepare=prepare, observe=observe_preconditioner(case, hp),
                 batch=lambda t: torch.randint(problem.batches, (chains,), generator=g),
                 trace=(lambda state: state.xi) if case == "sgnht" else None)
    P = avg["P"].mean(0) if case in ADAPTIVE else None
    exact_mean, exact_cov = stationary(problem.maps(case, hp, T, P=P, friction=friction))
    mean, mean_se, cov, cov_se = chain_moments(avg, full=True)
    assert_within(f"{case} posterior mean", mean, mean_se, exact_mean[:p])
    assert_within(f"{case} posterior covariance", cov, cov_se, exact_cov[:p, :p])
    # the exact mini-batch law of these settings is the Bayesian posterior up to a small, known bias
    assert (exact_mean[:p] - problem.mean).abs().max().item() < 1e-9 * problem.mean.abs().max().item()
    scale = problem.cov.diagonal().sqrt()
    bias = ((exact_cov[:p, :p] - problem.cov) / outer(scale, scale)).abs().max().item()
    print(f"{case}: largest covariance bias of the exact mini-batch law vs the posterior: {bias:.3f}")
    assert bias < 0.06
    if case == "sgnht":  # ξ stays at ξ* (with Γ dropped it would drift up by h·T per step: +0.08 here)
        drift = (avg["trace"][-250:].mean() - avg["trace"][:250].mean()).abs().item()
        assert drift < 0.01 * friction, (drift, friction)


# ----- SGNHT absorbs unknown gradient noise ---------------------------------------------------------------
def test_sgnht_thermostat_absorbs_gradient_noise():
    """With gradient noise of variance V the thermostat raises ξ until |m|²/d = T again; the law of θ is
    SGNHT's exact one at ξ*, while SGHMC with the same noise runs measurably hot."""
    hp, V, chains = dict(lr=0.1, alpha=1.0), 4.0, 20000
    precision, mean = torch.ones(1, dtype=F64), torch.zeros(1, dtype=F64)
    noise = torch.Generator().manual_seed(7)

    def log_posterior(x, batch):  # ∇ℓ = -x + ε, ε ~ N(0, V) fresh every step
        return (-0.5 * x**2 + batch * x).sum(), None

    def batch(t):
        return math.sqrt(V) * torch.randn(chains, 1, generator=noise)

    friction = thermostat_friction("sgnht", hp, 1.0, precision, mean, gradient_noise=V)
    exact = stationary(gaussian_maps("sgnht", hp, 1.0, precision, mean, friction=friction, gradient_noise=V))[1][0]
    hot = stationary(gaussian_maps("sghmc", hp, 1.0, precision, mean, gradient_noise=V))[1][0]
    transform = sgnht.build(log_posterior, temperature=1.0, **hp)
    x0 = torch.randn(chains, 1, generator=torch.Generator().manual_seed(8))
    guess = gaussian_maps("sgnht", hp, 1.0, precision, mean, friction=friction, gradient_noise=V)
    _, avg = run(transform, x0, burn=burn_in(guess, extra=300), steps=1000, batch=batch, seed=9,
                 trace=lambda state: state.xi)
    _, _, var, var_se = chain_moments(avg)
    assert_within("sgnht + gradient noise Var θ", var, var_se, exact[0, 0])
    assert_thermostat("sgnht + gradient noise", avg, friction, 1.0, hp, d=chains)
    assert friction > hp["alpha"] + 0.1  # the thermostat did work: ξ* ≈ A + hV/2
    assert (hot[0, 0] - exact[0, 0]).item() > 10 * var_se.item()  # and SGHMC would be off by > 10 SE


# ----- cold and warm posteriors -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgld", "sghmc"])
def test_temperature_scales_the_covariance_by_num_data_times_T(name):
    """Full-batch regression at T = c/n, c ∈ {1/4, 1, 4}, as three chains of one temperature sweep (the
    preset's configuration with a tensor of temperatures): Cov_T = nT · Cov_{1/n} exactly."""
    problem, chains, hp = Regression(), 300, REGRESSION[name]
    n, p = problem.n, problem.p
    factors = torch.tensor([0.25, 1.0, 4.0], dtype=F64)
    XX, Xy, yy = problem.XX.mean(0), problem.b.mean(0), problem.yy.mean(0)  # all n data

    def log_posterior(w, batch):  # w: (3, chains, p) -> one value per temperature
        squares = (((w @ XX) - 2 * Xy) * w).sum(-1) + yy
        return (-0.5 * squares - 0.5 * (w**2).sum(-1) / n).sum(-1), None

    s = Step((), p, components(name))
    H, b = problem.H.mean(0), problem.b.mean(0)
    maps = [s.map(reference_step(s, name, hp, 1.0 / n, lambda th: th.left(-H) + s.const(b)))]
    exact_mean, exact_cov = stationary(maps)
    config = dataclasses.replace(PRESETS[name].config(temperature=1.0 / n, **hp), temperature=factors / n)
    transform = engine.build(log_posterior, config, chains=3, vectorize="batched")
    w0 = problem.mean + 2 * problem.cov.diagonal().sqrt() * torch.randn(3, chains, p, dtype=F64,
                                                                          generator=torch.Generator().manual_seed(3))
    _, avg = run(transform, w0, burn=burn_in(maps, decades=5, extra=200), steps=1500, full=True, seed=[70, 71, 72])
    traces = []
    for k in range(3):
        mean, mean_se, cov, cov_se = chain_moments({key: value[k] for key, value in avg.items()}, full=True)
        assert_within(f"{name} T = {factors[k]:g}/n mean", mean, mean_se, exact_mean[:p])
        # a linear chain's covariance is proportional to T
        assert_within(f"{name} T = {factors[k]:g}/n covariance", cov, cov_se, factors[k] * exact_cov[:p, :p])
        traces.append((cov.trace().item(), math.sqrt((cov_se.diagonal() ** 2).sum().item())))
    posterior, posterior_se = traces[1]
    for (value, se), factor in zip(traces[::2], (0.25, 4.0)):
        ratio = value / posterior
        ratio_se = ratio * math.hypot(se / value, posterior_se / posterior)
        assert_within(f"{name} tr Cov_T / tr Cov_1/n at nT = {factor}", ratio, ratio_se, factor)


# ===== cyclical schedules ==============================================================================
def test_csgld_and_csghmc_follow_their_exact_time_dependent_law():
    """cSGLD / cSGHMC on a Gaussian: the law of θ_t over 3 cycles equals the exact per-step recursion with
    h_t = h₀(cos(π r)+1)/2 and T_t = 0 while exploring (r < β), T while sampling."""
    precision = torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=F64)
    mean = torch.tensor([0.5, -0.5, 1.0, 0.0], dtype=F64)
    chains, d, period, beta, T = 5000, 4, 40, 0.5, 1.0

    def log_posterior(x, batch):
        return -0.5 * (precision * (x - mean) ** 2).sum(), None

    x0 = mean + 0.3 * torch.randn(chains, d, generator=torch.Generator().manual_seed(4), dtype=F64)
    for name, module, hp in (("sgld", csgld, dict(lr=0.05)), ("sghmc", csghmc, dict(lr=0.1, alpha=2.0))):
        transform = module.build(log_posterior, cycle_length=period, exploration=beta, temperature=T, **hp)
        assert transform.config.step_size == Cyclical(hp["lr"], period)
        state = transform.init(x0.clone(), seed=5)
        n = len(components(name))
        moment_mean = torch.zeros(d, n, dtype=F64)
        moment_mean[:, 0] = mean  # x0's law: N(mean, 0.3²) in θ, m = 0 (T = 0 at step 0)
        moment_cov = torch.zeros(d, n, n, dtype=F64)
        moment_cov[:, 0, 0] = 0.09
        for t in range(3 * period):
            r = (t % period) / period
            h, T_t = 0.5 * hp["lr"] * (math.cos(math.pi * r) + 1), (0.0 if r < beta else T)
            F, c, G = gaussian_maps(name, dict(hp, lr=h), T_t, precision, mean)[0]
            moment_mean = (F @ moment_mean[..., None])[..., 0] + c
            moment_cov = F @ moment_cov @ F.transpose(-1, -2) + G @ G.transpose(-1, -2)
            state, _ = transform.update(state, None, inplace=True)
            if (t + 1) % (period // 4) == 0:  # four checkpoints per cycle
                x = state.params
                assert_within(f"c{name} mean θ at step {t + 1}", x.mean(0), x.std(0) / math.sqrt(chains),
                              moment_mean[:, 0])
                centred = (x - x.mean(0)) ** 2
                assert_within(f"c{name} Var θ at step {t + 1}", centred.mean(0), centred.std(0) / math.sqrt(chains),
                              moment_cov[:, 0, 0])


def test_cyclical_exploration_stage_is_noise_free():
    """During exploration (T = 0) chains with different seeds coincide; once sampling starts they differ."""
    def log_posterior(x, batch):
        return -0.5 * (x**2).sum(), None

    transform = csghmc.build(log_posterior, lr=0.1, cycle_length=20, exploration=0.5, alpha=1.0, temperature=1.0)
    x0 = torch.linspace(-2, 2, 8, dtype=F64)
    a, b = transform.init(x0, seed=0), transform.init(x0, seed=1)
    for t in range(20):
        a, _ = transform.update(a, None)
        b, _ = transform.update(b, None)
        assert torch.equal(a.params, b.params) == (t + 1 <= 10), t  # steps 0..9 explore (phase < 0.5)


# ===== temperature zero: the optimizers =================================================================
def classification(seed=0, n=64, features=4, classes=3, size=16):
    """Softmax regression on a pytree {"w", "b"} with mini-batches that change every step."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, features, generator=g, dtype=F64)
    y = torch.randint(classes, (n,), generator=g)
    params = {"w": 0.3 * torch.randn(features, classes, generator=g, dtype=F64),
              "b": 0.1 * torch.randn(classes, generator=g, dtype=F64)}

    def log_posterior(params, batch):
        logits = X[batch] @ params["w"] + params["b"]
        log_lik = torch.log_softmax(logits, -1).gather(1, y[batch, None]).mean()
        return log_lik - 0.05 * (params["w"] ** 2).sum() / n, None

    batches = [torch.randperm(n, generator=g)[:size] for _ in range(30)]
    return params, log_posterior, batches


def torch_trajectory(optimizer_cls, params, log_posterior, batches, lr_schedule=None, **kwargs):
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = optimizer_cls(list(leaves.values()), **kwargs)
    out = []
    for t, batch in enumerate(batches):
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(t)
        optimizer.zero_grad()
        (-log_posterior(leaves, batch)[0]).backward()
        optimizer.step()
        out.append({k: v.detach().clone() for k, v in leaves.items()})
    return out


def preset_trajectory(transform, params, batches, momenta=None):
    state = transform.init({k: v.clone() for k, v in params.items()}, **({} if momenta is None else
                                                                        {"momenta": momenta}))
    out = []
    for batch in batches:
        state, _ = transform.update(state, batch)
        out.append(state.params)
    return out


def assert_trajectories_equal(ours, theirs, rtol=1e-12, atol=1e-14):
    for t, (a, b) in enumerate(zip(ours, theirs)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol,
                                       msg=lambda m, t=t, key=key: f"step {t}, {key}: {m}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sgld_at_zero_temperature_is_sgd(weight_decay):
    params, log_posterior, batches = classification()
    ours = preset_trajectory(sgld.build(log_posterior, lr=0.3, temperature=0.0, weight_decay=weight_decay),
                             params, batches)
    assert_trajectories_equal(ours, torch_trajectory(torch.optim.SGD, params, log_posterior, batches, lr=0.3,
                                                     weight_decay=weight_decay))


@pytest.mark.parametrize(("lr", "momentum", "sigma", "weight_decay"),
                         [(0.1, 0.9, 1.0, 0.0), (0.03, 0.5, 2.0, 0.01), (0.5, 0.99, 0.3, 0.0)])
def test_sghmc_at_zero_temperature_is_sgd_with_momentum(lr, momentum, sigma, weight_decay):
    """SGD(lr=η, momentum=μ) = sghmc(lr = σ√η, alpha = σ(1 - μ)/√η, sigma = σ, temperature = 0)."""
    params, log_posterior, batches = classification(1)
    transform = sghmc.build(log_posterior, lr=sigma * math.sqrt(lr), alpha=sigma * (1 - momentum) / math.sqrt(lr),
                            sigma=sigma, temperature=0.0, weight_decay=weight_decay)
    theirs = torch_trajectory(torch.optim.SGD, params, log_posterior, batches, lr=lr, momentum=momentum,
                              weight_decay=weight_decay)
    assert_trajectories_equal(preset_trajectory(transform, params, batches), theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("centered", "weight_decay"), [(False, 0.0), (True, 0.01)])
def test_psgld_at_zero_temperature_is_rmsprop(centered, weight_decay):
    params, log_posterior, batches = classification(2)
    transform = psgld.build(log_posterior, lr=0.01, alpha=0.9, eps=1e-6, temperature=0.0, centered=centered,
                            weight_decay=weight_decay)
    theirs = torch_trajectory(torch.optim.RMSprop, params, log_posterior, batches, lr=0.01, alpha=0.9, eps=1e-6,
                              centered=centered, weight_decay=weight_decay)
    assert_trajectories_equal(preset_trajectory(transform, params, batches), theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("amsgrad", "weight_decay"), [(False, 0.0), (True, 0.01)])
def test_adam_sghmc_at_zero_temperature_is_adam(amsgrad, weight_decay):
    params, log_posterior, batches = classification(3)
    transform = adam_sghmc.build(log_posterior, lr=0.01, betas=(0.8, 0.99), eps=1e-7, temperature=0.0,
                                 amsgrad=amsgrad, weight_decay=weight_decay)
    theirs = torch_trajectory(torch.optim.Adam, params, log_posterior, batches, lr=0.01, betas=(0.8, 0.99), eps=1e-7,
                              amsgrad=amsgrad, weight_decay=weight_decay)
    assert_trajectories_equal(preset_trajectory(transform, params, batches), theirs, rtol=1e-10, atol=1e-12)


def test_csgld_at_zero_temperature_is_sgd_with_cosine_restarts():
    params, log_posterior, batches = classification(4)
    transform = csgld.build(log_posterior, lr=0.5, cycle_length=7, temperature=0.0)

    def schedule(t):
        return 0.25 * (math.cos(math.pi * (t % 7) / 7) + 1)

    theirs = torch_trajectory(torch.optim.SGD, params, log_posterior, batches, lr=0.5, lr_schedule=schedule)
    assert_trajectories_equal(preset_trajectory(transform, params, batches), theirs)


def test_baoa_at_zero_temperature_is_posteriors_baoa():
    """posteriors' BAOA update (its source, T = 0): m += h g; θ += h/(2σ²) m; m ← e^{-hα/σ²} m; θ += h/(2σ²) m."""
    params, log_posterior, batches = classification(5)
    h, alpha, sigma = 0.2, 0.7, 1.5
    momenta = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    ours = preset_trajectory(baoa.build(log_posterior, lr=h, alpha=alpha, sigma=sigma, temperature=0.0, momenta=0.1),
                             params, batches)
    theta, m, theirs = {k: v.clone() for k, v in params.items()}, momenta, []
    for batch in batches:
        leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        grads = dict(zip(leaves, torch.autograd.grad(log_posterior(leaves, batch)[0], list(leaves.values()))))
        m = {k: m[k] + h * grads[k] for k in m}
        theta = {k: theta[k] + h / 2 / sigma**2 * m[k] for k in m}
        m = {k: math.exp(-h * alpha / sigma**2) * m[k] for k in m}
        theta = {k: theta[k] + h / 2 / sigma**2 * m[k] for k in m}
        theirs.append(theta)
    assert_trajectories_equal(ours, theirs)


# ===== configurations are data ========================================================================
BITWISE = {
    "sgld": (sgld, dict(lr=0.01)),
    "sghmc": (sghmc, dict(lr=0.05, alpha=0.3, sigma=1.5)),
    "sgnht": (sgnht, dict(lr=0.05, alpha=0.3)),
    "baoa": (baoa, dict(lr=0.05, alpha=0.3)),
    "baoab": (baoab, dict(lr=0.05, alpha=0.3)),
    "obabo": (obabo, dict(lr=0.05, alpha=0.3)),
    "psgld": (psgld, dict(lr=0.01, centered=True)),
    "adam_sghmc": (adam_sghmc, dict(lr=0.01, amsgrad=True)),
    "csgld": (csgld, dict(lr=0.05, cycle_length=4)),
    "csghmc": (csghmc, dict(lr=0.05, cycle_length=4, alpha=0.5)),
}


@pytest.mark.parametrize("name", list(BITWISE))
def test_engine_built_from_the_preset_config_reproduces_the_preset_bitwise(name):
    module, hp = BITWISE[name]
    params, log_posterior, batches = classification(6)
    preset = module.build(log_posterior, temperature=0.1, **hp)
    rebuilt = engine.build(log_posterior, module.config(temperature=0.1, **hp))
    assert repr(rebuilt.config) == repr(preset.config)  # the configuration prints as data
    a = preset.init({k: v.clone() for k, v in params.items()}, seed=3)
    b = rebuilt.init({k: v.clone() for k, v in params.items()}, seed=3)
    for batch in batches[:12]:
        a, _ = preset.update(a, batch)
        b, _ = rebuilt.update(b, batch)
    flat_a, flat_b = bayesflow_leaves(a), bayesflow_leaves(b)
    assert len(flat_a) == len(flat_b)
    assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b))
    assert not torch.equal(a.params["w"], params["w"])


def bayesflow_leaves(state):
    from bayesflow.tree import flatten

    return flatten(state)[0]


# ===== posteriors' arguments: beta, momenta, xi ========================================================
@pytest.mark.parametrize(("name", "hp"), [("sgld", dict(lr=0.1)), ("sghmc", dict(lr=0.1, alpha=0.5, sigma=2.0)),
                                          ("sgnht", dict(lr=0.1, alpha=0.5))])
@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_beta_lowers_the_injected_noise_like_posteriors(name, hp, beta):
    """One step from a fixed state: the injected noise has posteriors' variance lr·T·(2α - lr·β·T) (α = 1
    for SGLD) around posteriors' deterministic update."""
    T, n = 0.5, 200_000
    h, alpha, M = hp["lr"], hp.get("alpha", 1.0), hp.get("sigma", 1.0) ** 2

    def log_posterior(x, batch):
        return -0.5 * (x**2).sum(), None

    transform = PRESETS[name].build(log_posterior, beta=beta, temperature=T, **hp)
    x = torch.linspace(-2, 2, n, dtype=F64)
    state = transform.init(x.clone(), **({} if name == "sgld" else {"momenta": 0.3}), seed=11)
    new, _ = transform.update(state, None)
    if name == "sgld":
        residual = new.params - (x + h * (-x))
    else:  # the momenta row, posteriors' friction α/σ² (SGHMC) or ξ/σ² with ξ = α at the start (SGNHT)
        residual = new.momenta - (0.3 + h * (-x) - h * alpha / M * 0.3)
    variance = h * T * (2 * alpha - h * beta * T)
    assert_within(f"{name} beta={beta} noise mean", residual.mean(), residual.std() / math.sqrt(n), 0.0)
    centred = residual**2
    assert_within(f"{name} beta={beta} noise variance", centred.mean(), centred.std() / math.sqrt(n), variance)


def test_beta_validation():
    def log_posterior(x, batch):
        return -0.5 * (x**2).sum(), None

    with pytest.raises(ValueError, match="too large"):
        sghmc.build(log_posterior, lr=0.1, alpha=0.01, beta=1.0)  # 2α - lr·β·T < 0
    with pytest.raises(ValueError, match="too large"):
        sgnht.build(log_posterior, lr=0.1, alpha=0.01, beta=1.0)
    with pytest.raises(ValueError, match="constant lr"):
        sgld.build(log_posterior, lr=Cyclical(0.1, 10), beta=0.5)
    with pytest.raises(ValueError, match="beta must be"):
        sgld.build(log_posterior, lr=0.1, beta=-1.0)
    with pytest.raises(ValueError, match="lr must be"):
        sghmc.build(log_posterior, lr=-0.1)
    with pytest.raises(ValueError, match="sigma must be"):
        baoab.build(log_posterior, lr=0.1, sigma=0.0)
    with pytest.raises(ValueError, match="betas"):
        adam_sghmc.build(log_posterior, lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="constant lr"):
        adam_sghmc.build(log_posterior, lr=Cyclical(0.1, 10))
    with pytest.raises(ValueError, match="cycle_length"):
        csgld.build(log_posterior, lr=0.1, cycle_length=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        sgld.build(log_posterior, lr=0.1, diffusion=None)
    # beta = 0 and T = 0 need no constant schedule
    assert sgld.config(Cyclical(0.1, 10), beta=0.0).temperature == 1.0
    assert sghmc.config(0.1, alpha=1.0, beta=2.0, temperature=0.0).temperature == 0.0


def test_initial_momenta_are_drawn_at_the_temperature():
    """Default momenta ~ N(0, T·σ²), not N(0, I); a number sets every entry (posteriors); T = 0 starts at rest;
    SGNHT's thermostat starts at alpha; Adam-SGHMC starts at rest (its mass is unknown before a gradient)."""
    def log_posterior(x, batch):
        return -0.5 * (x**2).sum(), None

    n, T, sigma = 200_000, 1e-3, 2.0
    x = torch.zeros(n, dtype=F64)
    for module in (sghmc, sgnht, baoa, baoab, obabo):
        m = module.build(log_posterior, lr=0.1, alpha=1.0, sigma=sigma, temperature=T).init(x, seed=1).momenta
        squares = m**2
        assert_within(f"{module.__name__} initial Var m", squares.mean(), squares.std() / math.sqrt(n), T * sigma**2)
        assert_within(f"{module.__name__} initial mean m", m.mean(), m.std() / math.sqrt(n), 0.0)
    m = sghmc.build(log_posterior, lr=0.1, temperature=T, momenta=0.25).init(x).momenta
    assert torch.equal(m, torch.full_like(x, 0.25))
    assert torch.equal(sghmc.build(log_posterior, lr=0.1, temperature=0.0).init(x, seed=1).momenta, torch.zeros_like(x))
    state = sgnht.build(log_posterior, lr=0.1, alpha=0.3, temperature=T).init(x, seed=1)
    assert state.xi.item() == 0.3
    assert torch.equal(adam_sghmc.build(log_posterior, lr=0.1, temperature=T).init(x, seed=1).momenta,
                       torch.zeros_like(x))
    assert set(state._fields) >= {"params", "momenta", "xi", "log_posterior", "step"}  # posteriors' names
