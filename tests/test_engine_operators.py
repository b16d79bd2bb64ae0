"""Operators: Γ for state-dependent diffusions, dense D and Q, and the validation of D, Q and shapes.

Statistical tests compare with exact references for the discretised chain (a grid solution of the
Euler–Maruyama kernel for Γ, the discrete Lyapunov equation for dense operators) within 5 Monte-Carlo
standard errors estimated from independent chains.
"""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow.engine import (
    Block,
    Dense,
    Diagonal,
    Function,
    Scalar,
    SDEConfig,
    Splitting,
    build,
    hamiltonian_curl,
)
from engine_reference import DTYPE, SIGMAS, assert_close, euler_grid_moment, euler_map, lyapunov, run_chains


def standard_normal(x, batch):
    return -0.5 * (x * x).sum(), None


def quadratic_diffusion(divergence=None, diagonal=False):
    """D(x) = 1 + x² (elementwise), optionally with its closed-form divergence 2x."""
    return Function(lambda z, v: (1 + z * z) * v, sqrt_matvec=lambda z, v: torch.sqrt(1 + z * z) * v,
                    divergence=divergence, diagonal=diagonal)


# ----- Γ --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("diagonal", "chains", "samples"), [(False, 256, 1500), (True, 10_000, 2000)],
                         ids=["torch.func jvp (d products)", "diagonal=True (one backward pass)"])
def test_gamma_by_autodiff_restores_the_target(diagonal, chains, samples):
    """With Γ = 2x computed by autodiff, dx = (x - x³)dt + sqrt(2(1+x²))dW samples N(0, 1).

    The general path costs O(d²) per step, hence few chains (a looser but still derived tolerance).
    """
    h = 0.025
    x0 = torch.randn(chains, dtype=DTYPE, generator=torch.Generator().manual_seed(11))
    diffusion = quadratic_diffusion(diagonal=diagonal)
    transform = build(standard_normal, SDEConfig(step_size=h, diffusion=diffusion, gamma=True))
    state = transform.init(x0, seed=12)
    averages, _ = run_chains(transform, state, burn_in=100, samples=samples, statistics=lambda s: {"x": s.params**2})
    exact = euler_grid_moment(h, lambda x: x - x**3, lambda x: 1 + x * x)
    assert abs(exact - 1.0) < 2e-3  # the Euler bias at this h, accounted for in `exact`
    estimate, se = averages.estimate("x")
    assert_close(f"Var[x] with Γ ({'diagonal' if diagonal else 'general'} autodiff)", estimate, se, exact)
    assert abs(exact - 0.525) > 4 * SIGMAS * se  # dropping Γ would be detected


@pytest.mark.parametrize(("name", "diffusion", "continuous"), [
    ("1 + x²", quadratic_diffusion(), 0.525),
    ("sqrt(1 + x²)", Function(lambda z, v: torch.sqrt(1 + z * z) * v,
                              sqrt_matvec=lambda z, v: (1 + z * z) ** 0.25 * v), 0.715),
])
def test_dropping_gamma_samples_pi_over_d(name, diffusion, continuous):
    """gamma=False: dx = -D(x)x dt + sqrt(2D(x))dW has stationary law ∝ N(0,1)/D(x) (ENGINE.md §3)."""
    h, chains = 0.02, 10_000
    x0 = torch.randn(chains, dtype=DTYPE, generator=torch.Generator().manual_seed(13))
    transform = build(standard_normal, SDEConfig(step_size=h, diffusion=diffusion, gamma=False))
    state = transform.init(x0, seed=14)
    averages, _ = run_chains(transform, state, burn_in=250, samples=1500, statistics=lambda s: {"x": s.params**2})
    d = (lambda x: 1 + x * x) if continuous == 0.525 else (lambda x: torch.sqrt(1 + x * x))
    exact = euler_grid_moment(h, lambda x: -d(x) * x, d)
    assert abs(exact - continuous) < 0.015  # Euler bias of the chain; the test compares with `exact`
    estimate, se = averages.estimate("x")
    assert_close(f"Var[x] without Γ, D = {name}", estimate, se, exact)


def test_explicit_divergence_equals_both_autodiff_paths():
    x0 = torch.randn(64, dtype=DTYPE, generator=torch.Generator().manual_seed(15))
    states = []
    for divergence, diagonal in ((lambda z: 2 * z, False), (None, False), (None, True)):
        diffusion = quadratic_diffusion(divergence, diagonal)
        transform = build(standard_normal, SDEConfig(step_size=0.05, diffusion=diffusion))
        state = transform.init(x0.clone(), seed=16)
        for _ in range(50):
            state, _ = transform.update(state, None)
        states.append(state.params)
    torch.testing.assert_close(states[1], states[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(states[2], states[0], rtol=1e-13, atol=1e-13)
    assert not torch.equal(states[0], x0)


def test_gamma_is_scaled_by_temperature_and_vanishes_at_zero():
    """At T = 0 the step is the plain drift x' = x - h(1+x²)x: no Γ, no noise."""
    x0 = torch.linspace(-2, 2, 9, dtype=DTYPE)
    transform = build(standard_normal, SDEConfig(step_size=0.1, diffusion=quadratic_diffusion(), temperature=0.0))
    state, _ = transform.update(transform.init(x0, seed=0), None)
    torch.testing.assert_close(state.params, x0 - 0.1 * (1 + x0**2) * x0, rtol=0, atol=1e-15)


# ----- dense D and Q ---------------------------------------------------------------------------------
ANGLE = 0.4
ROTATION = torch.tensor([[math.cos(ANGLE), -math.sin(ANGLE)], [math.sin(ANGLE), math.cos(ANGLE)]], dtype=DTYPE)
PRECISION = ROTATION @ torch.diag(torch.tensor([0.5, 50.0], dtype=DTYPE)) @ ROTATION.T  # condition number 100
D2 = torch.tensor([[1.38, 0.57], [0.57, 0.28]], dtype=DTYPE)  # SPD, close to 0.8·A⁻¹: a dense preconditioner
Q2 = torch.tensor([[0.0, 0.05], [-0.05, 0.0]], dtype=DTYPE)


def ill_conditioned(x, batch):
    return -0.5 * ((x @ PRECISION) * x).sum(), None


def test_dense_diffusion_and_curl_sample_an_ill_conditioned_gaussian():
    """C chains of a 2-D target held as one (C, 2) leaf; D and Q act on the flat 2C vector."""
    h, chains = 0.2, 256
    eye = torch.eye(chains, dtype=DTYPE)
    config = SDEConfig(step_size=h, diffusion=Dense(torch.kron(eye, D2)), curl=Dense(torch.kron(eye, Q2)))
    x0 = torch.randn(chains, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(17)) @ torch.linalg.cholesky(
        torch.linalg.inv(PRECISION)).T
    transform = build(ill_conditioned, config)
    state = transform.init(x0, seed=18)

    def statistics(s):
        x = s.params
        return {"xx": x[:, 0] ** 2, "yy": x[:, 1] ** 2, "xy": x[:, 0] * x[:, 1]}

    averages, _ = run_chains(transform, state, burn_in=100, samples=1500, statistics=statistics)
    exact = lyapunov(*euler_map(h, PRECISION, D2, Q2))
    for key, (i, j) in (("xx", (0, 0)), ("yy", (1, 1)), ("xy", (0, 1))):
        estimate, se = averages.estimate(key)
        assert_close(f"dense D+Q Cov[{i},{j}]", estimate, se, exact[i, j].item())
    # The chain's covariance is the discrete one (Euler bias ~9% of A⁻¹, resolved here).
    bias = (exact - torch.linalg.inv(PRECISION))[0, 0].item()
    assert abs(bias) > 2 * SIGMAS * averages.estimate("xx")[1]


@pytest.mark.parametrize("noise", ["per component", "coupled"])
def test_a_2d_by_2d_dense_curl_and_diffusion_over_params_and_momenta(noise):
    """Block.dense: one 2d×2d Q with a full θ–m coupling C and a 2d×2d D — block-diagonal (noise
    per component) or coupling θ and m (noise drawn jointly, D^{1/2} of the whole matrix) — sample
    exp(-H) for H = ½θᵀAθ + ½|m|²; the chain's covariance (θ, the θ–m cross terms, m) is the exact
    one of its Euler map (a 4×4 discrete Lyapunov equation)."""
    h, chains = 0.05, 256
    precision = ROTATION @ torch.diag(torch.tensor([0.5, 5.0], dtype=DTYPE)) @ ROTATION.T
    coupling = torch.tensor([[1.0, 0.3], [-0.2, 0.8]], dtype=DTYPE)
    zero, eye2 = torch.zeros(2, 2, dtype=DTYPE), torch.eye(2, dtype=DTYPE)
    curl4 = torch.cat([torch.cat([zero, -coupling], 1), torch.cat([coupling.T, zero], 1)])
    diffusion4 = torch.block_diag(torch.tensor([[0.2, 0.05], [0.05, 0.1]], dtype=DTYPE), eye2)
    if noise == "coupled":  # θ–m blocks B with D still positive definite (Schur complement > 0)
        cross = torch.tensor([[0.1, -0.05], [0.08, 0.12]], dtype=DTYPE)
        diffusion4[:2, 2:], diffusion4[2:, :2] = cross, cross.T
        assert torch.linalg.eigvalsh(diffusion4).min() > 0

    def per_chain(matrix):  # the same 4×4 system for every chain: kron over the chains, block by block
        eye = torch.eye(chains, dtype=DTYPE)
        blocks = [[torch.kron(eye, matrix[2 * i:2 * i + 2, 2 * j:2 * j + 2]) for j in range(2)] for i in range(2)]
        return torch.cat([torch.cat(row, 1) for row in blocks])

    def target(x, batch):
        return -0.5 * ((x @ precision) * x).sum(), None

    config = SDEConfig(step_size=h, diffusion=Block.dense(per_chain(diffusion4)), curl=Block.dense(per_chain(curl4)))
    assert config.components == ("params", "momenta")
    transform = build(target, config)
    x0 = torch.randn(chains, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(21))
    state = transform.init(x0, seed=22)

    def statistics(s):
        x, m = s.params, s.momenta
        return {"xx": x[:, 0] ** 2, "yy": x[:, 1] ** 2, "xy": x[:, 0] * x[:, 1], "x_my": x[:, 0] * m[:, 1],
                "mm": m[:, 0] ** 2}

    averages, _ = run_chains(transform, state, burn_in=400, samples=3000, statistics=statistics)
    F, S = euler_map(h, torch.block_diag(precision, eye2), diffusion4, curl4)
    assert torch.linalg.eigvals(F).abs().max() < 1  # the map is stable: a stationary law exists
    exact = lyapunov(F, S)
    for key, (i, j) in (("xx", (0, 0)), ("yy", (1, 1)), ("xy", (0, 1)), ("x_my", (0, 3)), ("mm", (2, 2))):
        estimate, se = averages.estimate(key)
        assert_close(f"2d×2d D+Q Cov[{i},{j}]", estimate, se, exact[i, j].item())
    # every block acts where it should: one T = 0 step of a single chain is z - h (D + Q) ∇H exactly
    cold = build(target, SDEConfig(step_size=h, temperature=0.0, diffusion=Block.dense(diffusion4),
                                   curl=Block.dense(curl4)))
    z0 = torch.tensor([0.7, -1.2, 0.4, 0.9], dtype=DTYPE)
    state, _ = cold.update(cold.init(z0[:2], momenta=z0[2:]), None)
    expected = z0 - h * (diffusion4 + curl4) @ (torch.block_diag(precision, eye2) @ z0)
    torch.testing.assert_close(torch.cat([state.params, state.momenta]), expected, rtol=0, atol=1e-15)


def test_dense_operators_on_a_tree_act_on_the_flattened_parameters():
    """T = 0: θ' = θ + h (D + Q) ∇ℓ over the flat vector (optree order: 'a' then 'b')."""
    D = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 0.5]], dtype=DTYPE)
    Q = torch.tensor([[0.0, 0.3, -0.2], [-0.3, 0.0, 0.7], [0.2, -0.7, 0.0]], dtype=DTYPE)
    targets = torch.tensor([1.0, -2.0, 3.0], dtype=DTYPE)

    def log_posterior(p, batch):
        flat = torch.cat([p["a"], p["b"]])
        return -0.5 * ((flat - targets) ** 2).sum(), None

    params = {"b": torch.tensor([0.25], dtype=DTYPE), "a": torch.tensor([0.5, -0.5], dtype=DTYPE)}
    transform = build(log_posterior, SDEConfig(step_size=0.1, diffusion=Dense(D), curl=Dense(Q), temperature=0.0))
    state, _ = transform.update(transform.init(params, seed=0), None)
    flat = torch.cat([params["a"], params["b"]])
    expected = flat + 0.1 * (D + Q) @ (targets - flat)
    torch.testing.assert_close(torch.cat([state.params["a"], state.params["b"]]), expected, rtol=0, atol=1e-15)
    assert state.params["b"].shape == (1,) and state.params["a"].shape == (2,)


# ----- validation --------------------------------------------------------------------------------------
def init_with(params=None, **fields):
    params = torch.zeros(2, dtype=DTYPE) if params is None else params
    return build(standard_normal, SDEConfig(step_size=0.1, **fields)).init(params, seed=0)


ONES = torch.ones(2, dtype=DTYPE)
INVALID = [
    ("non-symmetric D", dict(diffusion=Dense(torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=DTYPE))),
     ["diffusion", "symmetric"]),
    ("indefinite D", dict(diffusion=Dense(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DTYPE))),
     ["positive semi-definite", "eigenvalue"]),
    ("non-skew Q", dict(curl=Dense(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DTYPE))), ["curl", "skew-symmetric"]),
    ("Q with a diagonal", dict(curl=Dense(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=DTYPE))), ["skew-symmetric"]),
    ("wrong-size Dense", dict(diffusion=Dense(torch.eye(3, dtype=DTYPE))), ["(3, 3)", "2 scalars"]),
    ("negative Scalar D", dict(diffusion=Scalar(-1.0)), ["positive semi-definite"]),
    ("non-zero Scalar curl", dict(curl=Scalar(1.0)), ["skew-symmetric"]),
    ("Diagonal with too many leaves", dict(diffusion=Diagonal([ONES, ONES])), ["2 leaves", "has 1"]),
    ("Diagonal of the wrong shape", dict(diffusion=Diagonal(torch.ones(3, dtype=DTYPE))),
     ["shape (3,)", "does not broadcast", "(2,)"]),
    ("negative Diagonal D", dict(diffusion=Diagonal(torch.tensor([1.0, -1.0], dtype=DTYPE))),
     ["positive semi-definite", "negative"]),
    ("non-zero Diagonal curl", dict(curl=Diagonal(ONES)), ["curl must be zero"]),
    ("unpaired off-diagonal Q", dict(curl=Block({("params", "momenta"): Scalar(-1.0)})), ["no partner block", "skew"]),
    ("off-diagonal Q blocks that are not negative transposes",
     dict(curl=Block({("params", "momenta"): Scalar(-1.0), ("momenta", "params"): Scalar(-1.0)})),
     ["not negative transposes"]),
    ("off-diagonal D block", dict(diffusion=Block({("params", "params"): Scalar(1.0),
                                                   ("params", "momenta"): Scalar(1.0),
                                                   ("momenta", "params"): Scalar(1.0)})), ["off-diagonal diffusion"]),
    ("2d×2d Q that is not skew-symmetric as a whole",
     dict(curl=Block.dense(torch.tensor([[0, 0, -1, 0.5], [0, 0, 0, -1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=DTYPE))),
     ["curl[params, momenta]", "not negative transposes", "max |Q_ij + Q_jiᵀ| = 0.5"]),
    ("2d×2d D indefinite as a whole",
     dict(diffusion=Block.dense(torch.kron(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DTYPE),
                                           torch.eye(2, dtype=DTYPE)))),
     ["diffusion[params, momenta] (the whole matrix)", "positive semi-definite", "eigenvalue -1"]),
    ("a Block.dense D mixed with another block",
     dict(diffusion=Block({**Block.dense(torch.eye(4, dtype=DTYPE) + 0.1).blocks,
                           ("momenta", "momenta"): Scalar(1.0)})),
     ["off-diagonal diffusion block", "Block.dense(D)"]),
    ("off-diagonal Dense of the wrong size",
     dict(curl=Block({("params", "momenta"): Dense(-torch.eye(3, dtype=DTYPE)),
                      ("momenta", "params"): Dense(torch.eye(3, dtype=DTYPE))})),
     ["(3, 3)", "maps 2 momenta scalars to 2 params scalars"]),
    ("indefinite Function D", dict(diffusion=Function(lambda z, v: -v, sqrt_matvec=lambda z, v: v)),
     ["positive semi-definite"]),
    ("Dense of another dtype", dict(diffusion=Dense(torch.eye(2, dtype=torch.float32))),
     ["diffusion[params, params]", "float32", "float64"]),
    ("Diagonal of another dtype", dict(diffusion=Diagonal(torch.ones(2, dtype=torch.float32))),
     ["diffusion[params, params]", "float32", "float64"]),
]


@pytest.mark.parametrize(("name", "fields", "fragments"), INVALID, ids=[case[0] for case in INVALID])
def test_invalid_operators_are_rejected_at_init(name, fields, fragments):
    with pytest.raises(ValueError) as error:
        init_with(**fields)
    for fragment in fragments:
        assert fragment in str(error.value), f"{name}: {fragment!r} not in {error.value}"


def test_invalid_operators_are_rejected_before_any_step():
    """Constructors reject what needs no parameters: non-square Dense, unknown block names, non-finite values."""
    with pytest.raises(ValueError, match="square"):
        Dense(torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown component 'velocity'"):
        Block({("params", "velocity"): Scalar(1.0)})
    with pytest.raises(ValueError, match="finite"):
        Diagonal(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="finite"):
        Scalar(math.inf)
    with pytest.raises(TypeError, match="Operator"):
        Block({("params", "params"): 1.0})
    with pytest.raises(ValueError, match="multiple of 2"):
        Block.dense(torch.eye(3))
    with pytest.raises(ValueError, match="equal-size components"):
        Block.dense(torch.eye(4), components=("params", "xi"))
    with pytest.raises(ValueError, match="exact Ornstein–Uhlenbeck step on the momenta alone"):
        build(standard_normal, SDEConfig(step_size=0.1, diffusion=Block.dense(torch.eye(4) + 0.1),
                                         curl=hamiltonian_curl(1.0), integrator=Splitting("BAOAB")))


def test_valid_block_operators_pass_validation():
    state = init_with(diffusion=Block({("momenta", "momenta"): Diagonal(torch.full((2,), 0.5, dtype=DTYPE))}),
                      curl=hamiltonian_curl(2.0))
    assert state.momenta.shape == (2,)
