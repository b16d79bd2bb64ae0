"""Stationary moments of every integrator against exact discrete-time references (ENGINE.md §3).

Target N(0, 1) (friction γ = 1, mass 1) with 10 000 independent chains held as one params tensor of
shape (C,): the target is separable, so each element is an independent chain. The exact stationary
variance of each discretisation is computed in the test from the discrete Lyapunov equation
(float64) and also checked against the table of ENGINE.md §3. Tolerances are 5 Monte-Carlo standard
errors (from the spread of per-chain time averages); where a scheme's step-size bias is large the
test also asserts that it is resolved, so sampling the continuous-time law instead would fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow.engine import (
    Block,
    EulerMaruyama,
    Scalar,
    SDEConfig,
    SemiImplicitEuler,
    Splitting,
    build,
    hamiltonian_curl,
)
from engine_reference import (
    DTYPE,
    SIGMAS,
    assert_close,
    euler_map,
    lyapunov,
    run_chains,
    sghmc_map,
    splitting_map,
)

CHAINS = 10_000
ONE = torch.eye(1, dtype=DTYPE)


def standard_normal(x, batch):
    return -0.5 * (x * x).sum(), None


def underdamped(h, integrator, **fields):
    return SDEConfig(step_size=h, diffusion=Block({("momenta", "momenta"): Scalar(1.0)}),
                     curl=hamiltonian_curl(1.0), integrator=integrator, **fields)


def reference(scheme, h):
    """Exact (Var x, Var m) of a scheme on N(0, 1) with γ = 1, mass 1."""
    if scheme == "SGLD":
        return lyapunov(*euler_map(h, ONE, ONE))[0, 0].item(), None
    if scheme in ("SGHMC", "SGHMC-Euler"):
        cov = lyapunov(*sghmc_map(h, ONE, semi_implicit=scheme == "SGHMC"))
    else:
        cov = lyapunov(*splitting_map(scheme, h, ONE))
    return cov[0, 0].item(), cov[1, 1].item()


def config_for(scheme, h):
    if scheme == "SGLD":
        return SDEConfig(step_size=h, temperature=1.0)
    if scheme == "SGHMC":
        return underdamped(h, SemiImplicitEuler())
    if scheme == "SGHMC-Euler":
        return underdamped(h, EulerMaruyama())
    return underdamped(h, Splitting(scheme))


# ENGINE.md §3, to its 4 decimals: (scheme, h) -> (Var x, Var m).
TABLE = {
    ("SGLD", 0.05): (1.0256, None), ("SGLD", 0.1): (1.0526, None), ("SGLD", 0.5): (1.3333, None),
    ("BAOAB", 0.05): (1.0, 0.9994), ("BAOAB", 0.1): (1.0, 0.9975), ("BAOAB", 0.5): (1.0, 0.9375),
    ("OBABO", 0.05): (1.0006, 1.0), ("OBABO", 0.1): (1.0025, 1.0), ("OBABO", 0.5): (1.0667, 1.0),
    ("SGHMC", 0.05): (1.0006, 1.0263), ("SGHMC", 0.1): (1.0026, 1.0554), ("SGHMC", 0.5): (1.0909, 1.4545),
    ("SGHMC-Euler", 0.05): (1.0533, 1.0789), ("SGHMC-Euler", 0.1): (1.1140, 1.1665),
    ("SGHMC-Euler", 0.5): (2.1538, 2.4615),
}


@pytest.mark.parametrize(("scheme", "h"), sorted(TABLE))
def test_lyapunov_references_match_engine_md(scheme, h):
    x, m = reference(scheme, h)
    expected_x, expected_m = TABLE[scheme, h]
    assert round(x, 4) == pytest.approx(expected_x, abs=1e-12)
    if expected_m is not None:
        assert round(m, 4) == pytest.approx(expected_m, abs=1e-12)
    closed = {"SGLD": (1 / (1 - h / 2), None), "BAOAB": (1.0, 1 - h * h / 4), "OBABO": (1 / (1 - h * h / 4), 1.0)}
    if scheme in closed:
        assert x == pytest.approx(closed[scheme][0], rel=1e-12)
        if m is not None:
            assert m == pytest.approx(closed[scheme][1], rel=1e-12)


CASES = [("SGLD", 0.05), ("SGLD", 0.1), ("SGLD", 0.5)] + [
    (scheme, h) for scheme in ("SGHMC", "SGHMC-Euler", "BAOAB", "OBABO", "ABOBA") for h in (0.1, 0.5)
]


@pytest.mark.parametrize(("scheme", "h"), CASES)
def test_stationary_variance_on_standard_normal(scheme, h):
    seed = 10 * CASES.index((scheme, h))  # independent noise for each case
    x0 = torch.randn(CHAINS, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))
    transform = build(standard_normal, config_for(scheme, h))
    state = transform.init(x0, seed=seed + 1)

    def statistics(s):
        out = {"x": s.params * s.params}
        if s.momenta is not None:
            out["m"] = s.momenta * s.momenta
        return out

    averages, _ = run_chains(transform, state, burn_in=math.ceil(15 / h), samples=math.ceil(80 / h),
                             statistics=statistics)
    exact = reference(scheme, h)
    for name, value in zip(("x", "m"), exact):
        if value is None:
            continue
        estimate, se = averages.estimate(name)
        assert_close(f"{scheme} h={h} Var[{name}]", estimate, se, value)
        if abs(value - 1.0) > 0.05:  # the step-size bias must be resolved, not just tolerated
            assert abs(value - 1.0) > 2 * SIGMAS * se, f"{scheme} h={h}: Monte-Carlo error too large"


@pytest.mark.parametrize(("num_data", "temperature", "h"), [(4.0, 0.25, 0.5), (1.0, 0.1, 0.5), (1.0, 2.0, 0.1)])
def test_tempered_sgld_variance(num_data, temperature, h):
    """x' = x - (h/N)x + sqrt(2hT)ξ: Var = N·T / (1 - h/(2N)); T = 1/N samples the posterior."""
    x0 = torch.randn(CHAINS, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    transform = build(standard_normal, SDEConfig(step_size=h, temperature=temperature, num_data=num_data))
    state = transform.init(x0, seed=4)
    relaxation = num_data / h  # steps per unit of the chain's own time scale
    averages, _ = run_chains(transform, state, burn_in=math.ceil(10 * relaxation), samples=math.ceil(60 * relaxation),
                             statistics=lambda s: {"x": s.params * s.params})
    exact = num_data * temperature / (1 - h / (2 * num_data))
    estimate, se = averages.estimate("x")
    assert_close(f"SGLD N={num_data} T={temperature} h={h}", estimate, se, exact)


PRECISION = torch.tensor([[1.5, 0.9], [0.9, 1.0]], dtype=DTYPE)  # eigenvalues 2.18 and 0.32


def correlated(x, batch):
    return -0.5 * ((x @ PRECISION) * x).sum(), None


def pair_statistics(v):
    return {"xx": v[:, 0] ** 2, "yy": v[:, 1] ** 2, "xy": v[:, 0] * v[:, 1]}


def assert_covariance(name, averages, exact, prefix=""):
    for key, (i, j) in (("xx", (0, 0)), ("yy", (1, 1)), ("xy", (0, 1))):
        estimate, se = averages.estimate(prefix + key)
        assert_close(f"{name} Cov[{i},{j}]", estimate, se, exact[i, j].item())


def test_sgld_covariance_of_correlated_gaussian():
    h = 0.2
    x0 = torch.randn(CHAINS, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    transform = build(correlated, SDEConfig(step_size=h, temperature=1.0))
    state = transform.init(x0, seed=6)
    averages, _ = run_chains(transform, state, burn_in=math.ceil(20 / h), samples=math.ceil(100 / h),
                             statistics=lambda s: pair_statistics(s.params))
    exact = lyapunov(*euler_map(h, PRECISION, torch.eye(2, dtype=DTYPE)))
    assert_covariance("SGLD", averages, exact)
    # The Euler bias (here ~5% of A⁻¹) is resolved: the chain samples Σ_h, not A⁻¹.
    bias = (exact - torch.linalg.inv(PRECISION)).abs().max().item()
    assert bias > 2 * SIGMAS * averages.estimate("yy")[1]


def test_baoab_covariance_of_correlated_gaussian_is_exact_in_position():
    h = 0.5
    x0 = torch.randn(CHAINS, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(7))
    transform = build(correlated, underdamped(h, Splitting("BAOAB")))
    state = transform.init(x0, seed=8)

    def statistics(s):
        out = pair_statistics(s.params)
        out.update({"m" + k: v for k, v in pair_statistics(s.momenta).items()})
        return out

    averages, _ = run_chains(transform, state, burn_in=math.ceil(30 / h), samples=math.ceil(120 / h),
                             statistics=statistics)
    exact = lyapunov(*splitting_map("BAOAB", h, PRECISION))
    # BAOAB is exact in position for Gaussians: the Lyapunov solution reproduces A⁻¹.
    torch.testing.assert_close(exact[:2, :2], torch.linalg.inv(PRECISION), rtol=1e-10, atol=1e-10)
    assert_covariance("BAOAB x", averages, exact[:2, :2])
    assert_covariance("BAOAB m", averages, exact[2:, 2:], prefix="m")
