"""SGNHT's stationary law at a finite step (issue 15): the thermostat targets the discretisation's kinetic value.

The semi-implicit Euler step m' = (1 - hξ/M) m + h∇ℓ + sqrt(2AhT) ζ, θ' = θ + h m'/M (M = σ²) at a frozen ξ
is an affine map per Gaussian direction; its stationary covariance is computed here in float64 from that
map alone (a 2×2 discrete Lyapunov equation), and the thermostat's fixed point ξ* by bisection on its
target: T (the old scheme) or T / max(1 - hξ/(2M), 1/2) (``ThermostatCoupling(-1, step_size=h, mass=M)``).

Monte Carlo: one chain of n independent coordinates (a separable target, one shared ξ whose fluctuation
is sqrt(T·M/n)); each coordinate's time average of θ² is one estimate, the standard error is their spread
over sqrt(n). Tolerance 4.5 standard errors (Bonferroni-widened for vectors); each check is also shown to
reject the old scheme (or a wrong reference) by many standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow.engine import Block, Cyclical, Scalar, SDEConfig, SemiImplicitEuler, ThermostatCoupling, build
from bayesflow.ensemble import lift
from bayesflow.sgmcmc import sgnht

F64 = torch.float64
SIGMAS = 4.5


# ----- exact references -----------------------------------------------------------------------------
def step_covariance(lam, h, xi, alpha, T, M, V=0.0):
    """Stationary (Var θ, Var m) per direction of curvature ``lam`` of the step at frozen friction ``xi``
    (gradient noise of variance V added to ∇ℓ)."""
    lam = torch.as_tensor(lam, dtype=F64).reshape(-1)
    f = 1.0 - h * xi / M
    F = torch.zeros(lam.numel(), 2, 2, dtype=F64)
    F[:, 0, 0], F[:, 0, 1], F[:, 1, 0], F[:, 1, 1] = 1.0 - h * h * lam / M, h / M * f, -h * lam, f
    G = torch.tensor([h / M, 1.0], dtype=F64)
    noise = (2 * alpha * h * T + h * h * V) * torch.outer(G, G)
    kron = torch.einsum("bik,bjl->bijkl", F, F).reshape(-1, 4, 4)
    cov = torch.linalg.solve(torch.eye(4, dtype=F64) - kron, noise.reshape(4).expand(lam.numel(), 4)).reshape(-1, 2, 2)
    return cov[:, 0, 0], cov[:, 1, 1]


def target(h, xi, T, M, corrected):
    return T / max(1.0 - h * xi / (2 * M), 0.5) if corrected else T


def fixed_point(lam, h, alpha, T, M, V=0.0, corrected=True):
    """ξ* where the mean kinetic temperature E|m'|²/(dM) equals the thermostat's target."""
    def excess(xi):
        return step_covariance(lam, h, xi, alpha, T, M, V)[1].mean().item() / M - target(h, xi, T, M, corrected)

    lo, hi = 1e-3, M / h  # friction per step hξ/M in (0, 1]
    assert excess(lo) > 0 > excess(hi)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


# ----- the schemes ----------------------------------------------------------------------------------
def old_sgnht(log_posterior, lr, alpha, sigma, temperature):
    """The scheme before the fix: the same operators, the thermostat targeting T (Γ_ξ = -1)."""
    curl = Block({("params", "momenta"): Scalar(-1.0), ("momenta", "params"): Scalar(1.0),
                  ("momenta", "xi"): ThermostatCoupling(+1), ("xi", "momenta"): ThermostatCoupling(-1)})
    config = SDEConfig(step_size=lr, diffusion=Block({("momenta", "momenta"): Scalar(alpha)}), curl=curl,
                       mass=Scalar(sigma**2), thermostat_target=alpha, thermostat_mass=sigma**2,
                       temperature=temperature, integrator=SemiImplicitEuler(), check_finite="none")
    return build(log_posterior, config)


def new_sgnht(log_posterior, lr, alpha, sigma, temperature):
    return sgnht.build(log_posterior, lr=lr, alpha=alpha, sigma=sigma, temperature=temperature, check_finite="none")


def sample_squares(transform, lam, xi0, *, burn=300, steps=1000, seed=0, batch=None):
    """Per-coordinate time averages of θ² (θ started from N(0, T/λ), ξ at ``xi0``) and the mean ξ."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(lam.numel(), generator=g, dtype=torch.float32) / lam.float().sqrt()
    state = transform.init(x0, xi=xi0, seed=seed)
    sums, xis = torch.zeros(lam.numel(), dtype=F64), []
    for t in range(burn + steps):
        state, _ = transform.update(state, None if batch is None else batch(g), inplace=True)
        if t >= burn:
            sums += state.params.to(F64) ** 2
            xis.append(float(state.xi))
    return sums / steps, sum(xis) / len(xis)


def assert_within(name, estimate, se, reference):
    z = ((estimate - reference).abs() / se).reshape(-1)
    threshold = max(SIGMAS, torch.special.ndtri(torch.tensor(1 - math.erfc(SIGMAS / math.sqrt(2)) / (2 * z.numel()),
                                                             dtype=F64)).item())
    print(f"{name}: max {z.max():.2f} SE (threshold {threshold:.2f})")
    assert float(z.max()) < threshold, f"{name}: {z.max():.1f} standard errors off"
    return threshold


# ----- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("lr", "alpha", "sigma"), [(0.2, 1.0, 1.0), (0.4, 4.0, 2.0)])
def test_isotropic_gaussian_is_sampled_exactly_at_a_finite_step(lr, alpha, sigma):
    """N(0, T/λ) at hξ/σ² = 0.2: Var θ = T/λ within Monte-Carlo error; the old scheme, run through the same
    check, is > 30 SE low (it samples its own exact law, T(1 - hξ*/(2σ²))/λ, 11 % low)."""
    n, lam_value, T, M = 10000, 1.0, 1.0, sigma**2
    lam = torch.full((n,), lam_value, dtype=F64)

    def log_posterior(x, batch):
        return -0.5 * lam_value * (x**2).sum(), None

    results = {}
    for name, make, corrected in (("new", new_sgnht, True), ("old", old_sgnht, False)):
        xi_star = fixed_point(lam_value, lr, alpha, T, M, corrected=corrected)
        squares, xi_mean = sample_squares(make(log_posterior, lr, alpha, sigma, T), lam, xi_star, seed=3,
                                          burn=200, steps=500)
        exact = step_covariance(lam_value, lr, xi_star, alpha, T, M)[0].item()
        results[name] = (squares.mean().item(), (squares.std() / math.sqrt(n)).item(), exact, xi_star, xi_mean)
        print(name, results[name])
    var, se, exact, xi_star, xi_mean = results["new"]
    assert exact == pytest.approx(T / lam_value, rel=1e-12)  # the corrected step's exact law is the target's
    assert_within("new Var θ vs the posterior", torch.tensor(var), torch.tensor(se), T / lam_value)
    assert abs(xi_mean - xi_star) < 0.01 * alpha  # ξ settles at its fixed point, near A
    old_var, old_se, old_exact, old_xi, _ = results["old"]
    assert_within("old Var θ vs its own exact law", torch.tensor(old_var), torch.tensor(old_se), old_exact)
    assert old_exact == pytest.approx(T / lam_value * (1 - lr * old_xi / (2 * M)), rel=1e-9)
    assert (T / lam_value - old_var) / old_se > 30  # the old scheme fails the posterior check


def test_gradient_noise_moves_the_thermostat_not_the_law_of_theta():
    """∇ℓ = -θ + ε, ε ~ N(0, V): ξ* rises to absorb the noise and Var θ stays T/λ exactly (the old
    scheme's exact law with the same noise is 6 % low, ≫ the Monte-Carlo error)."""
    n, lr, alpha, T, V = 20000, 0.1, 1.0, 1.0, 4.0
    lam = torch.ones(n, dtype=F64)

    def log_posterior(x, batch):
        return (-0.5 * x**2 + batch * x).sum(), None

    def batch(g):
        return math.sqrt(V) * torch.randn(n, generator=g)

    xi_star = fixed_point(1.0, lr, alpha, T, 1.0, V=V)
    assert step_covariance(1.0, lr, xi_star, alpha, T, 1.0, V)[0].item() == pytest.approx(T, rel=1e-12)
    squares, xi_mean = sample_squares(new_sgnht(log_posterior, lr, alpha, 1.0, T), lam, xi_star, seed=5, batch=batch)
    se = (squares.std() / math.sqrt(n)).item()
    assert_within("Var θ with gradient noise", squares.mean(), torch.tensor(se), T)
    assert xi_star > alpha + 0.1 and abs(xi_mean - xi_star) < 0.01  # the thermostat did the work
    old_xi = fixed_point(1.0, lr, alpha, T, 1.0, V=V, corrected=False)
    old = step_covariance(1.0, lr, old_xi, alpha, T, 1.0, V)[0].item()
    assert (T - old) / se > 30, (old, se)


def test_ill_conditioned_gaussian_matches_the_exact_law_and_its_trace_is_closer():
    """Curvatures 1..100 (condition 100) at h = 0.1: every direction's Var θ equals the corrected step's exact
    law (and the same check rejects the old scheme's law). What remains against the posterior is the
    semi-implicit step's O(h²λ) spread between directions: exact trace errors -1.1 % at h = 0.05 (old
    scheme: -3.7 %) and -5.1 % at h = 0.1 (old: -10.5 %)."""
    lr, alpha, T, copies = 0.1, 1.0, 1.0, 1000
    levels = torch.logspace(0, 2, 20, dtype=F64)
    lam = levels.repeat(copies)
    lam32 = lam.float()

    def log_posterior(x, batch):
        return -0.5 * (lam32 * x**2).sum(), None

    xi_star = fixed_point(levels, lr, alpha, T, 1.0)
    squares, _ = sample_squares(new_sgnht(log_posterior, lr, alpha, 1.0, T), lam, xi_star, seed=7)
    per_level = squares.reshape(copies, -1)
    var, se = per_level.mean(0), per_level.std(0) / math.sqrt(copies)
    exact = step_covariance(levels, lr, xi_star, alpha, T, 1.0)[0]
    threshold = assert_within("Var θ per curvature", var, se, exact)
    old_exact = step_covariance(levels, lr, fixed_point(levels, lr, alpha, T, 1.0, corrected=False), alpha, T, 1.0)[0]
    z_old = ((var - old_exact) / se).abs().max().item()
    print(f"largest deviation from the old scheme's law: {z_old:.1f} SE")
    assert z_old > 2 * threshold
    levels = torch.logspace(0, 2, 100, dtype=F64)  # the target (b): trace errors of the exact laws
    posterior = (T / levels).sum().item()
    for h, factor in ((0.05, 3.0), (0.1, 2.0)):
        errors = [step_covariance(levels, h, fixed_point(levels, h, alpha, T, 1.0, corrected=c), alpha, T,
                                  1.0)[0].sum().item() / posterior - 1 for c in (True, False)]
        print(f"h = {h}: trace error corrected {errors[0]:+.4f}, old {errors[1]:+.4f}")
        assert abs(errors[0]) < abs(errors[1]) / factor


def test_one_step_of_the_thermostat_is_the_corrected_update():
    """ξ' = ξ + h(|m'|²/(dσ²) - T/max(1 - hξ/(2σ²), 1/2)) with m' the new momenta: a float lr, a schedule
    (h read at the step) and one lr per chain (the floor 1/2 active in the last chain)."""
    d, T, sigma = 7, 0.3, 1.5
    M = sigma**2

    def log_posterior(x, batch):
        return -0.5 * (x**2).sum(), None

    def expected(state, new, h):
        kinetic = (new.momenta**2).sum(-1) / (d * M)
        return state.xi + h * (kinetic - T / torch.clamp(1 - h * state.xi / (2 * M), min=0.5))

    x = torch.linspace(-1, 1, d, dtype=F64)
    transform = sgnht.build(log_posterior, lr=0.1, alpha=0.5, sigma=sigma, temperature=T)
    state = transform.init(x, xi=1.3, seed=0)
    new, _ = transform.update(state, None)
    torch.testing.assert_close(new.xi, expected(state, new, 0.1), rtol=1e-14, atol=1e-15)
    schedule = Cyclical(initial=0.2, period=10)
    transform = sgnht.build(log_posterior, lr=schedule, alpha=0.5, sigma=sigma, temperature=T)
    state = transform.init(x, xi=1.3, seed=0)
    for step in range(4):
        new, _ = transform.update(state, None)
        torch.testing.assert_close(new.xi, expected(state, new, schedule(step)), rtol=1e-14, atol=1e-15)
        state = new
    lrs = torch.tensor([0.05, 0.1, 0.4], dtype=F64)
    ensemble = lift(sgnht.build(log_posterior, lr=0.1, alpha=0.5, sigma=sigma, temperature=T), 3, step_size=lrs)
    state = ensemble.init(x.expand(3, d).clone(), xi=torch.tensor([1.3, -0.4, 9.0], dtype=F64), seed=0)
    assert float(lrs[2] * state.xi[2] / M) > 1  # the floor: the target is 2T there
    new, _ = ensemble.update(state, None)
    torch.testing.assert_close(new.xi, expected(state, new, lrs), rtol=1e-14, atol=1e-15)


def test_zero_temperature_is_unchanged():
    """At T = 0 the correction vanishes with Γ: the preset is, bitwise, the scheme before the fix."""
    def log_posterior(x, batch):
        return -0.5 * (torch.arange(1, 6, dtype=x.dtype) * x**2).sum(), None

    a = new_sgnht(log_posterior, 0.1, 0.5, 1.0, 0.0)
    b = old_sgnht(log_posterior, 0.1, 0.5, 1.0, 0.0)
    x = torch.linspace(-2, 2, 5, dtype=F64)
    m = torch.ones(5, dtype=F64)
    sa, sb = a.init(x.clone(), momenta=m.clone(), seed=0), b.init(x.clone(), momenta=m.clone(), seed=0)
    for _ in range(20):
        sa, _ = a.update(sa, None)
        sb, _ = b.update(sb, None)
    assert torch.equal(sa.params, sb.params) and torch.equal(sa.xi, sb.xi)
    assert float(sa.xi) > 0.5  # ξ grew with the kinetic energy


def test_thermostat_coupling_validates_its_step_size_and_mass():
    for bad in (-0.1, 0.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="step_size"):
            ThermostatCoupling(-1, step_size=bad)
    with pytest.raises(ValueError, match="mass"):
        ThermostatCoupling(-1, step_size=0.1, mass=0.0)
    assert ThermostatCoupling(-1, step_size=0.1) != ThermostatCoupling(-1)
    assert ThermostatCoupling(-1, step_size=0.1, mass=2.0) == ThermostatCoupling(-1, step_size=0.1, mass=2.0)
