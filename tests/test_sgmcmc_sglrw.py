"""SGLRW and the lattice random walk integrator: SGD at T = 0, posteriors' step probabilities, the exact
stationary law of the lattice chain on N(0, 1), reproducibility, and the errors it raises.

Monte Carlo tolerances are 5 standard errors. The one-step checks use many chains (``ensemble.lift``)
from one point with one batch, so the increments are independent ±δx draws with exactly known
binomial standard errors. The stationary check uses one chain of n independent coordinates (D = I
on a separable target: every coordinate is its own birth–death chain with its own uniform draws);
each coordinate's time average is one independent estimate (batch means, coordinates as batches).
"""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow import engine
from bayesflow.engine import Block, Dense, Diagonal, Scalar, SDEConfig, hamiltonian_curl
from bayesflow.engine.lattice import LatticeRandomWalk
from bayesflow.ensemble import lift, replicate
from bayesflow.sgmcmc import sglrw
from bayesflow.tree import tree_map

F64 = torch.float64
SIGMAS = 5.0


# ===== T = 0: SGD step for step ==========================================================================
def regression(seed=0, n=48, features=3, size=12, steps=25):
    """Linear regression on a pytree {"w", "b"} with mini-batches that change every step."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, features, generator=g, dtype=F64)
    y = X @ torch.randn(features, generator=g, dtype=F64) + 0.1 * torch.randn(n, generator=g, dtype=F64)
    params = {"w": 0.5 * torch.randn(features, generator=g, dtype=F64), "b": torch.zeros((), dtype=F64)}

    def log_posterior(params, batch):
        residual = X[batch] @ params["w"] + params["b"] - y[batch]
        return -0.5 * (residual**2).mean() - 0.01 * (params["w"] ** 2).sum() / n, None

    batches = [torch.randperm(n, generator=g)[:size] for _ in range(steps)]
    return params, log_posterior, batches


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sglrw_at_zero_temperature_is_sgd(weight_decay):
    params, log_posterior, batches = regression()
    transform = sglrw.build(log_posterior, lr=0.2, temperature=0.0, weight_decay=weight_decay)
    state = transform.init({k: v.clone() for k, v in params.items()})
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.SGD(list(leaves.values()), lr=0.2, weight_decay=weight_decay)
    for t, batch in enumerate(batches):
        state, _ = transform.update(state, batch)
        optimizer.zero_grad()
        (-log_posterior(leaves, batch)[0]).backward()
        optimizer.step()
        for key in leaves:
            torch.testing.assert_close(state.params[key], leaves[key].detach(), rtol=1e-12, atol=1e-12,
                                       msg=lambda m, t=t, key=key: f"step {t}, {key}: {m}")


# ===== one step: posteriors' probabilities ================================================================
def posteriors_p_plus(g: torch.Tensor, lr: float, temperature: float):
    """posteriors 0.1.3 ``sgmcmc.sglrw``: p_plus of ``ternary_probs`` and δx, transcribed."""
    diffusion = (2.0 * temperature) ** 0.5
    delta_x = lr**0.5 * diffusion
    scaled_mean = lr * g / delta_x
    scaled_var = torch.clamp(torch.as_tensor(lr * diffusion**2 / delta_x**2, dtype=g.dtype), 0.0, 1.0)
    scaled_mean = torch.clamp(scaled_mean, -scaled_var, scaled_var)
    return torch.clamp(0.5 * (scaled_var + scaled_mean), 0.0, 1.0), delta_x


def fixed_batch_problem():
    """{"w": (3,), "c": ()}: a regression in w (|d| < δx) and a steep term in c (|d| > δx: clipped)."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 3, generator=g, dtype=F64)
    y = torch.randn(20, generator=g, dtype=F64)

    def log_posterior(params, batch):
        residual = X[batch] @ params["w"] - y[batch]
        return -0.5 * (residual**2).mean() - 50.0 * (params["c"] - 3.0) ** 2, None

    params = {"w": torch.tensor([0.3, -0.7, 1.1], dtype=F64), "c": torch.zeros((), dtype=F64)}
    batch = torch.arange(8)
    grads = torch.func.grad(lambda p: log_posterior(p, batch)[0])(params)
    return log_posterior, params, batch, grads


def assert_binary_mean(increments, delta_x, p_plus, what):
    """Every increment is ±δx, and their mean over chains is δx(2p₊ - 1) within 5 binomial s.e."""
    torch.testing.assert_close(increments.abs(), torch.broadcast_to(delta_x, increments.shape).clone(),
                               rtol=1e-13, atol=1e-15, msg=lambda m: f"{what}: increments are not ±δx: {m}")
    K = increments.shape[0]
    expected = delta_x * (2.0 * p_plus - 1.0)
    se = delta_x * (4.0 * p_plus * (1.0 - p_plus)).sqrt() / math.sqrt(K)
    z = (increments.mean(0) - expected).abs()
    assert bool((z <= SIGMAS * se + 1e-12).all()), (what, increments.mean(0), expected, se)


def test_one_step_matches_posteriors_probabilities():
    log_posterior, params, batch, grads = fixed_batch_problem()
    lr, temperature, K = 0.05, 1.0, 4000
    transform = lift(sglrw.build(log_posterior, lr=lr, temperature=temperature), K)
    state = transform.init(replicate(params, K), seed=3)
    new, _ = transform.update(state, batch)
    for key in params:
        p_plus, delta_x = posteriors_p_plus(grads[key], lr, temperature)
        increments = new.params[key] - state.params[key]
        assert_binary_mean(increments, torch.tensor(delta_x, dtype=F64), p_plus, key)
    # the case checks what it means to: w is in the linear regime (mean = the Euler drift), c is clipped
    drift = lr * grads["w"]
    assert bool((drift.abs() < 0.9 * delta_x).all()), drift
    torch.testing.assert_close(posteriors_p_plus(grads["w"], lr, temperature)[0], 0.5 * (1 + drift / delta_x))
    assert float(posteriors_p_plus(grads["c"], lr, temperature)[0]) == 1.0
    assert torch.equal(new.params["c"] - state.params["c"], torch.full((K,), delta_x, dtype=F64))


def test_one_step_with_per_chain_temperature_step_size_and_diagonal_diffusion():
    """The tensor path: per-chain T and h, per-entry D; a chain at T = 0 and an entry D_ii = 0 take the Euler step."""
    log_posterior, params, batch, grads = fixed_batch_problem()
    half = 1500
    T = torch.tensor([1.0] * half + [0.25] * half + [0.0], dtype=F64)
    h = torch.tensor([0.05] * half + [0.02] * half + [0.05], dtype=F64)
    D = {"w": torch.tensor([1.0, 0.0, 2.0], dtype=F64), "c": torch.tensor(1.0, dtype=F64)}
    single = engine.build(log_posterior, step_size=0.05, diffusion=Diagonal(D), integrator=LatticeRandomWalk())
    transform = lift(single, 2 * half + 1, temperature=T, step_size=h)
    state = transform.init(replicate(params, 2 * half + 1), seed=5)
    new, _ = transform.update(state, batch)
    for key in params:
        increments = new.params[key] - state.params[key]
        shape = (-1,) + (1,) * grads[key].ndim
        drift = h.view(shape) * D[key] * grads[key]
        # Euler at T = 0 (last chain) and where D_ii = 0
        torch.testing.assert_close(increments[-1], drift[-1], rtol=1e-13, atol=1e-15)
        if key == "w":
            torch.testing.assert_close(increments[:, 1], drift[:, 1], rtol=1e-13, atol=1e-15)
        for rows in (slice(0, half), slice(half, 2 * half)):
            spacing = (2.0 * T[rows].view(shape) * h[rows].view(shape) * D[key]).sqrt()
            p_plus = 0.5 * (1.0 + (drift[rows] / spacing).clamp(-1.0, 1.0))
            keep = (spacing > 0).expand_as(increments[rows]).all(0)  # coordinates with a lattice
            assert_binary_mean(increments[rows][:, keep], spacing.expand_as(increments[rows])[:, keep],
                               p_plus[0][keep], f"{key} chains {rows}")


# ===== the exact stationary law on N(0, 1) ===============================================================
def lattice_law(h: float, theta0: float, temperature: float = 1.0, reach: int = 10_000):
    """Stationary law of the lattice walk on ℓ = -θ²/2 (D = 1) on the sites θ0 + kδx, δx = sqrt(2Th).

    A birth–death chain: detailed balance π(x + δx) p₋(x + δx) = π(x) p₊(x), walked outwards from θ0
    until a probability vanishes (p₊ = 0 beyond the clipping point: the lattice is finite).
    """
    dx = math.sqrt(2.0 * temperature * h)

    def p_plus(x):
        return 0.5 * (1.0 + max(-1.0, min(1.0, -h * x / dx)))

    log_pi = {0: 0.0}
    for direction in (1, -1):
        k = 0
        while abs(k) < reach:
            here, there = theta0 + k * dx, theta0 + (k + direction) * dx
            forward = p_plus(here) if direction == 1 else 1.0 - p_plus(here)
            back = 1.0 - p_plus(there) if direction == 1 else p_plus(there)
            if forward == 0.0:
                break
            log_pi[k + direction] = log_pi[k] + math.log(forward) - math.log(back)
            k += direction
    ks = sorted(log_pi)
    sites = torch.tensor([theta0 + k * dx for k in ks], dtype=F64)
    weights = torch.tensor([log_pi[k] for k in ks], dtype=F64).softmax(0)
    return sites, weights


def test_reference_law_on_the_centred_lattice_is_ehrenfest():
    """h = 1/2 on the sites k·δx: the Ehrenfest urn with 4 balls, Binomial(4, ½) - 2, variance exactly 1."""
    sites, weights = lattice_law(0.5, 0.0)
    assert sites.tolist() == [-2.0, -1.0, 0.0, 1.0, 2.0]
    torch.testing.assert_close(weights, torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=F64) / 16)


@pytest.mark.parametrize("theta0", [0.0, 0.5])
def test_stationary_law_matches_the_exact_lattice_chain(theta0):
    h, n, burn, steps = 0.5, 20_000, 100, 400  # δx = 1; an even number of steps (the chain has period 2)
    sites, weights = lattice_law(h, theta0)
    exact_var = float((weights * sites**2).sum() - (weights * sites).sum() ** 2)
    transform = sglrw.build(lambda p, batch: (-0.5 * (p**2).sum(), None), lr=h, temperature=1.0)
    state = transform.init(torch.full((n,), theta0, dtype=F64), seed=11)
    for _ in range(burn):
        state, _ = transform.update(state, None, inplace=True)
    first, second = torch.zeros(n, dtype=F64), torch.zeros(n, dtype=F64)
    occupation = torch.zeros(n, len(sites), dtype=F64)
    for _ in range(steps):
        state, _ = transform.update(state, None, inplace=True)
        first += state.params
        second += state.params**2
        occupation += state.params[:, None] == sites
    # the chain never leaves the finite lattice
    assert torch.equal(occupation.sum(1), torch.full((n,), float(steps), dtype=F64))
    # per-coordinate time averages are independent estimates
    mean_hat, second_hat, occupation = first / steps, second / steps, occupation / steps
    var_estimates = second_hat - mean_hat.mean() ** 2
    var, se = float(var_estimates.mean()), float(var_estimates.std() / math.sqrt(n))
    assert abs(var - exact_var) <= SIGMAS * se, (var, exact_var, se)
    assert abs(float(mean_hat.mean())) <= SIGMAS * float(mean_hat.std() / math.sqrt(n))
    frequency, frequency_se = occupation.mean(0), occupation.std(0) / math.sqrt(n)
    assert bool(((frequency - weights).abs() <= SIGMAS * frequency_se).all()), (frequency, weights)
    if theta0 == 0.5:
        # off the Ehrenfest lattice the exact variance is not the Gaussian's: the check tells them apart
        assert exact_var == pytest.approx(1.0452, abs=1e-4)
        assert abs(exact_var - 1.0) > 10 * SIGMAS * se
        assert abs(var - 1.0) > 10 * SIGMAS * se
    else:
        assert exact_var == pytest.approx(1.0, abs=1e-12)


# ===== reproducibility =================================================================================
def _trajectory(transform, params, batches, seed, inplace):
    state = transform.init(tree_map(torch.clone, params), seed=seed)
    out = []
    for batch in batches:
        state, _ = transform.update(state, batch, inplace=inplace)
        out.append(tree_map(torch.clone, state.params))
    return state, out


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_seed_state_and_inplace_reproducibility():
    params, log_posterior, batches = regression(steps=12)
    transform = sglrw.build(log_posterior, lr=0.05, temperature=0.5, weight_decay=0.01)
    _, functional = _trajectory(transform, params, batches, seed=7, inplace=False)
    _, again = _trajectory(transform, params, batches, seed=7, inplace=False)
    _, inplace = _trajectory(transform, params, batches, seed=7, inplace=True)
    _, other = _trajectory(transform, params, batches, seed=8, inplace=False)
    assert all(_equal(a, b) for a, b in zip(functional, again))
    assert all(_equal(a, b) for a, b in zip(functional, inplace))
    assert not _equal(functional[-1], other[-1])
    # a state alone determines its future: a copy, and the caller-gradient step, continue alike
    state = transform.init(tree_map(torch.clone, params), seed=7)
    for batch in batches[:5]:
        state, _ = transform.update(state, batch)
    copy = state._replace(params=tree_map(torch.clone, state.params))
    a, _ = transform.update(state, batches[5])
    b, _ = transform.update(copy, batches[5])
    grads = torch.func.grad(lambda p: log_posterior(p, batches[5])[0])(state.params)
    c = transform.step(state, grads)
    assert _equal(a.params, b.params) and _equal(a.params, c.params)
    assert _equal(a.params, functional[5])
    # in place keeps the parameter tensors
    before = state.params["w"]
    d, _ = transform.update(state, batches[5], inplace=True)
    assert d.params["w"] is before and _equal(d.params, a.params)


def test_chain_k_of_a_lifted_run_is_the_single_run_seeded_seed_plus_k():
    params, log_posterior, batches = regression(steps=6)
    single = sglrw.build(log_posterior, lr=0.05, temperature=1.0)
    lifted = lift(single, 3)
    state = lifted.init(replicate(params, 3), seed=20)
    for batch in batches:
        state, _ = lifted.update(state, batch)
    for k in range(3):
        final, _ = _trajectory(single, params, batches, seed=20 + k, inplace=False)
        assert _equal({key: v[k] for key, v in state.params.items()}, final.params)


# ===== errors ============================================================================================
def _run(config):
    transform = engine.build(lambda p, batch: (-0.5 * (p**2).sum(), None), config)
    transform.update(transform.init(torch.zeros(2, dtype=F64), seed=0), None)


def test_lattice_walk_refuses_momenta_and_non_diagonal_diffusion():
    momenta = SDEConfig(step_size=0.1, diffusion=Block({("momenta", "momenta"): Scalar(1.0)}),
                        curl=hamiltonian_curl(1.0), integrator=LatticeRandomWalk())
    with pytest.raises(ValueError, match="first-order dynamics"):
        LatticeRandomWalk().validate(momenta)
    with pytest.raises(ValueError, match="first-order dynamics"):
        _run(momenta)
    dense = SDEConfig(step_size=0.1, diffusion=Dense(torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=F64)),
                      integrator=LatticeRandomWalk())
    with pytest.raises(ValueError, match="diagonal diffusion"):
        LatticeRandomWalk().validate(dense)
    with pytest.raises(ValueError, match="diagonal diffusion"):
        _run(dense)
    # a diagonal Dense is a diagonal diffusion
    diagonal = SDEConfig(step_size=0.1, diffusion=Dense(torch.diag(torch.tensor([1.0, 2.0], dtype=F64))),
                         integrator=LatticeRandomWalk())
    LatticeRandomWalk().validate(diagonal)
    _run(diagonal)
    assert LatticeRandomWalk().weak_order == 1


def test_preset_argument_errors():
    with pytest.raises(ValueError, match="lr"):
        sglrw.config(lr=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        sglrw.config(lr=0.1, temperature=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        sglrw.config(lr=0.1, alpha=0.1)
    config = sglrw.config(lr=0.1, temperature=0.5, num_data=100)
    assert isinstance(config.integrator, LatticeRandomWalk) and config.components == ("params",)
    assert config.diffusion == Scalar(1.0) and config.curl is None and config.num_data == 100


def test_ternary_probs_match_the_euler_moments_and_clip():
    """posteriors' public helper: probabilities on δx·{−1, 0, 1} with mean h·a and second moment h·σ²."""
    torch.manual_seed(0)
    drift, sigma, h, dx = torch.linspace(-2.0, 2.0, 50, dtype=F64), 0.7, 0.01, 0.2
    probs = sglrw.ternary_probs(drift, sigma, h, dx)
    assert probs.shape == (50, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(50, dtype=F64))
    sites = torch.tensor([-dx, 0.0, dx], dtype=F64)
    # |h a|/δx ≤ 0.1 < hσ²/δx² = 0.1225: no clipping
    torch.testing.assert_close(probs @ sites, h * drift)
    torch.testing.assert_close(probs @ sites.square(), torch.full((50,), h * sigma**2, dtype=F64))
    # a drift too large for the noise is clipped to the variance (no negative probabilities)
    big = sglrw.ternary_probs(torch.tensor([100.0, -100.0]), sigma, h, dx)
    torch.testing.assert_close(big, torch.tensor([[0.0, 1 - h * sigma**2 / dx**2, h * sigma**2 / dx**2],
                                                  [h * sigma**2 / dx**2, 1 - h * sigma**2 / dx**2, 0.0]]))
    # at the sampler's own spacing δx = sqrt(2Th) (σ² = 2T) the zero move vanishes: the binary step
    T = 0.5
    binary = sglrw.ternary_probs(drift, math.sqrt(2 * T), h, math.sqrt(2 * T * h))
    assert float(binary[:, 1].abs().max()) < 1e-12
    with pytest.raises(TypeError, match="drift_val must be a tensor"):
        sglrw.ternary_probs([1.0], sigma, h, dx)


def test_posteriors_names_are_exported():
    from bayesflow import optim
    assert callable(optim.init) and callable(optim.update) and callable(sglrw.ternary_probs)
    params = torch.ones(2, requires_grad=True)
    state = optim.init(params, torch.optim.SGD, lr=0.5)
    state, _ = optim.update(state, None, lambda p, b: ((p ** 2).sum(), None))
    torch.testing.assert_close(state.params.detach(), torch.zeros(2))
