"""Gradient-noise correction from per-sample gradients (bayesflow.engine.noise_correction, sgmcmc.noise_corrected).

References are exact: the Bayesian linear regression posterior in closed form, the per-sample
gradients x_i (y_i - x_iᵀθ)/σ² - λθ in closed form, and the batch-mean variance by enumerating every
batch. Tolerances come from the Monte-Carlo error (the spread of independent groups of chains).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

from bayesflow.engine import build as engine_build
from bayesflow.engine.baoab_noise import baoab_noise_weight
from bayesflow.engine.noise_correction import GradientNoise, NoiseCorrected
from bayesflow.engine.per_sample import per_sample_log_posterior
from bayesflow.sgmcmc import baoab, noise_corrected, obabo, sghmc, sgld

N, B = 1000, 32
DTYPE = torch.float64


def regression(d: int, rotated: bool, seed: int = 0, prior: float = 1e-3):
    """Data, the per-datum log posterior (prior precision ``prior`` per datum) and the exact posterior."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(1.5, 0.75, d, dtype=DTYPE)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))[0] if rotated else torch.eye(d, dtype=DTYPE)
    X = torch.randn(N, d, generator=g, dtype=DTYPE) * scales.sqrt() @ Q.T
    y = X @ torch.linspace(1.0, -0.5, d, dtype=DTYPE) + torch.randn(N, generator=g, dtype=DTYPE)
    covariance = torch.linalg.inv(X.T @ X + N * prior * torch.eye(d, dtype=DTYPE))
    mean = covariance @ X.T @ y

    def log_posterior(theta, batch):  # per datum: mean log likelihood + log prior / N
        x, t = batch
        return -0.5 * ((t - x @ theta) ** 2).mean() - 0.5 * prior * (theta**2).sum(), None

    def batched(theta, batch):  # the same for K chains with one mini-batch each (the plain engine's)
        x, t = batch
        residual = t - torch.einsum("kbd,kd->kb", x, theta)
        return -0.5 * (residual**2).mean(-1) - 0.5 * prior * (theta**2).sum(-1), None

    return X, y, log_posterior, batched, mean, covariance


def whitened_covariance(transform, X, y, mean, covariance, K, steps, burn_in, seed=0, groups=16):
    """(W, SE): the pooled covariance of the chains in the exact posterior's whitened coordinates
    (I when exact) and its standard error from the spread of ``groups`` independent groups of chains."""
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(covariance)
    start = mean + torch.randn(K, len(mean), generator=g, dtype=DTYPE) @ L.T  # exact posterior draws
    state = transform.init(start, seed=seed)
    scatter = torch.zeros(K, len(mean), len(mean), dtype=DTYPE)
    inverse = torch.linalg.inv(L)
    for t in range(burn_in + steps):
        index = torch.randint(N, (K, B), generator=g)
        state, _ = transform.update(state, (X[index], y[index]), inplace=True)
        if t >= burn_in:
            z = (state.params - mean) @ inverse.T
            scatter += z.unsqueeze(-1) * z.unsqueeze(-2)
    per_group = scatter.reshape(groups, K // groups, *scatter.shape[1:]).sum(1) / (steps * K // groups)
    return per_group.mean(0), per_group.std(0) / math.sqrt(groups), state


def matches(W, se, z=4.0) -> bool:
    """Whether W = I within z standard errors, entry by entry and in the trace."""
    d = W.shape[0]
    trace_se = se.diagonal().pow(2).sum().sqrt() / d
    return bool(((W - torch.eye(d, dtype=DTYPE)).abs() <= z * se).all()) and abs(
        float(W.trace() / d - 1.0)) <= z * float(trace_se)


def corrected_and_plain(base, d, rotated, K, steps, burn_in, structure="low_rank", seed=0):
    """(W, SE, state) of the noise-corrected ``base`` and (W, SE) of ``base`` itself on mini-batches."""
    X, y, log_posterior, batched, mean, covariance = regression(d, rotated=rotated, seed=seed)
    config = noise_corrected.config(base, structure=structure)
    corrected = noise_corrected.build(log_posterior, config, chains=K, chain_batches=True)
    W, se, state = whitened_covariance(corrected, X, y, mean, covariance, K, steps=steps, burn_in=burn_in)
    plain = engine_build(batched, base, chains=K, vectorize="batched")
    W_plain, se_plain, _ = whitened_covariance(plain, X, y, mean, covariance, K, steps=steps, burn_in=burn_in)
    return (W, se, state), (W_plain, se_plain)


def test_corrected_sgld_samples_the_exact_posterior_where_plain_sgld_is_biased():
    K = 128
    (W, se, state), (W_plain, se_plain) = corrected_and_plain(sgld.config(lr=0.01, temperature=1.0 / N), 3, True,
                                                              K, steps=800, burn_in=120)
    assert matches(W, se), (W, se)
    # the same check rejects a reference 15 % off, and the plain SGLD chain (gradient noise uncorrected)
    assert not matches(W / 1.15, se / 1.15)
    assert not matches(W_plain, se_plain)
    assert float(W_plain.trace() / 3) > 1.12  # inflated by ≈ h·N·V/2 per direction
    report = noise_corrected.noise_report(state)
    assert report.clipped_steps.shape == (K,) and float(report.clipped_steps.sum()) < 0.02 * K * 920


def test_corrected_sghmc_with_diagonal_estimate():
    base = sghmc.config(lr=0.03, alpha=2.0, temperature=1.0 / N)
    (W, se, _), (W_plain, se_plain) = corrected_and_plain(base, 2, False, 64, steps=600, burn_in=100,
                                                          structure="diagonal", seed=1)
    assert matches(W, se), (W, se)
    assert not matches(W_plain, se_plain)


def test_corrected_baoab_samples_the_exact_posterior_where_plain_baoab_is_biased():
    """BAOAB: the kick's noise enters θ only through the O step's momentum, corrected there with
    ((1 + c)/2)² h² V̂ (exact to leading order in ωh); plain BAOAB at this step is ≈ 21 % too wide."""
    base = baoab.config(lr=0.02, alpha=2.0, temperature=1.0 / N)
    (W, se, _), (W_plain, se_plain) = corrected_and_plain(base, 3, True, 128, steps=800, burn_in=120)
    assert matches(W, se), (W, se)
    assert not matches(W / 1.15, se / 1.15)
    assert not matches(W_plain, se_plain) and float(W_plain.trace() / 3) > 1.12


def test_baoab_correction_weights_the_o_step_budget():
    """The O step's budget is Tσ²(1 − c²) and the noise ((1 + c)/2)² G (c = e^{-αh/σ²})."""
    h, T, alpha, mass = 0.1, 0.01, 2.0, 4.0
    noise = GradientNoise(h, T, kick=1.0, structure="diagonal", friction=alpha, mass=mass).bind(None)
    centred = torch.tensor([[0.3, 0.0], [-0.3, 0.0]], dtype=DTYPE)
    report, (kind, root) = noise.factors(centred, diffusion=alpha)
    c = math.exp(-alpha * h / mass)
    ratio = ((1 + c) / 2) ** 2 * h**2 * 0.09 / (T * mass * (1 - c * c))
    torch.testing.assert_close(root, torch.tensor([math.sqrt(1 - ratio), 1.0], dtype=DTYPE))
    assert kind == "diagonal" and math.isclose(float(report.ratio), ratio, rel_tol=1e-12)


def test_baoab_correction_through_a_learned_root_uses_s_v_s():
    """With a learned mass the kick is h·S∇ℓ_B: F Fᵀ = I − ((1 + c)/2)² h² S V̂ S / (Tσ²(1 − c²)),
    F made at the O step from that step's S and h (a burn-in step may differ from lr)."""
    from bayesflow.engine.learned_mass import LearnedMass
    from bayesflow.engine.learned_operators import LearnedRoot

    h, T, alpha, mass, d, b = 0.3, 0.05, 1.5, 2.0, 3, 6
    root = LearnedRoot(LearnedMass("dense", burn_in=100), 1.0)
    noise = GradientNoise(1.0, T, kick=1.0, friction=alpha, mass=mass, kick_root=root).bind(None)
    g = torch.Generator().manual_seed(3)
    centred = torch.randn(b, d, generator=g, dtype=DTYPE) * 0.6
    centred -= centred.mean(0)
    A = torch.randn(d, d, generator=g, dtype=DTYPE)
    S = torch.linalg.matrix_exp(0.3 * (A + A.T))  # symmetric positive definite
    state = noise.init([torch.zeros(d, dtype=DTYPE)])
    noise.receive(centred)
    pending = noise.update_state(state, [torch.zeros(d, dtype=DTYPE)], 0, inplace=False)
    noise.finish(S, h)
    kind, diag_root, P, shrink = noise._factor
    F = torch.diag(diag_root) @ (torch.eye(d, dtype=DTYPE) - P @ torch.diag(shrink) @ P.T)
    c = math.exp(-alpha * h / mass)
    V = centred.T @ centred / (b * (b - 1))
    weight = baoab_noise_weight(h, alpha / mass, math.sqrt(T / mass))  # whitened: ω = k√T/σ, k = 1
    expected = torch.eye(d, dtype=DTYPE) - weight * h**2 * S @ V @ S / (T * mass * (1 - c * c))
    assert kind == "low_rank" and torch.linalg.eigvalsh(expected).min() > 0  # unclipped
    torch.testing.assert_close(F @ F.T, expected)
    largest = 1.0 - float(torch.linalg.eigvalsh(expected).min())  # the report of this step, written at the O step
    assert int(pending.clipped) == 0 and math.isclose(float(pending.ratio), largest, rel_tol=1e-9) and largest > 0.2
    assert int(state.clipped_steps) == 0 and float(state.ratio) == 0.0  # the old state untouched


def _per_sample_gradients(X, y, theta, prior):
    return X * (y - X @ theta).unsqueeze(-1) - prior * theta  # ∇ℓ_i in closed form


def test_estimate_is_the_per_sample_covariance_and_the_injected_noise_is_exact():
    X, y, log_posterior, _, _, _ = regression(3, rotated=True, seed=2)
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=DTYPE)
    x, t = X[:B], y[:B]
    received = []
    wrapped = per_sample_log_posterior(log_posterior, received.append)
    leaf = theta.clone().requires_grad_(True)
    value, _ = wrapped(leaf, (x, t))
    exact = _per_sample_gradients(x, t, theta, 1e-3)
    torch.testing.assert_close(torch.autograd.grad(value, leaf)[0], exact.mean(0))
    torch.testing.assert_close(value.detach(), log_posterior(theta, (x, t))[0])
    torch.testing.assert_close(received[0], exact - exact.mean(0))
    noise = GradientNoise(step_size=0.01, temperature=1.0 / N, kick=1.0).bind(None)
    V = torch.cov(exact.T) / B  # the sample covariance of the g_i over b: the batch mean's
    torch.testing.assert_close(noise.covariance(received[0]), V)
    torch.testing.assert_close(noise.variance(received[0]), V.diagonal())
    # F Fᵀ · 2Th = 2ThD - h²V̂ in every direction (low rank) and on the diagonal (diagonal)
    h, T, D = 0.01, 1.0 / N, 1.5
    report, (_, root, P, c) = noise.factors(received[0], diffusion=D)
    F = math.sqrt(D) * (torch.eye(3, dtype=DTYPE) - P @ torch.diag(c) @ P.T)
    assert int(report.clipped) == 0
    torch.testing.assert_close(2 * T * h * F @ F.T, 2 * T * h * D * torch.eye(3, dtype=DTYPE) - h**2 * V)
    diagonal = GradientNoise(h, T, kick=1.0, structure="diagonal").bind(None)
    _, (_, root) = diagonal.factors(received[0], diffusion=D)
    torch.testing.assert_close(2 * T * h * root**2, 2 * T * h * D - h**2 * V.diagonal())


@pytest.mark.parametrize("replacement", [True, False])
def test_estimate_is_unbiased_over_every_batch(replacement):
    """Averaged over every possible batch, V̂ is the exact variance of the batch-mean gradient."""
    n, b = 6, 3
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(n, 2, generator=g, dtype=DTYPE) * torch.tensor([1.0, 3.0], dtype=DTYPE)
    batches = list(itertools.product(range(n), repeat=b)) if replacement else list(itertools.combinations(range(n), b))
    noise = GradientNoise(0.1, 1.0, structure="low_rank", data_size=None if replacement else n).bind(None)
    means = torch.stack([grads[list(i)].mean(0) for i in batches])
    estimates = torch.stack([noise.covariance(grads[list(i)] - grads[list(i)].mean(0)) for i in batches])
    exact = (means - means.mean(0)).T @ (means - means.mean(0)) / len(batches)
    torch.testing.assert_close(estimates.mean(0), exact)


def test_one_step_injects_the_corrected_covariance():
    """K chains from one θ with one batch: the increment minus the kick h∇ℓ_B has covariance 2ThI - h²V̂."""
    X, y, log_posterior, _, _, _ = regression(2, rotated=True, seed=4)
    K, h, T = 4000, 0.02, 1.0 / N
    transform = noise_corrected.build(log_posterior, noise_corrected.config(sgld.config(lr=h, temperature=T)),
                                      chains=K)
    theta = torch.tensor([0.5, -0.5], dtype=DTYPE)
    x, t = X[:B], y[:B]
    state, _ = transform.update(transform.init(theta.expand(K, 2).clone(), seed=0), (x, t))
    exact = _per_sample_gradients(x, t, theta, 1e-3)
    increment = state.params - theta - h * exact.mean(0)
    expected = 2 * T * h * torch.eye(2, dtype=DTYPE) - h**2 * torch.cov(exact.T) / B
    assert torch.linalg.eigvalsh(expected).min() > 0.3 * 2 * T * h  # a real reduction, not clipped
    se = (expected.diagonal().outer(expected.diagonal()) + expected**2).sqrt() / math.sqrt(K)
    assert ((torch.cov(increment.T) - expected).abs() <= 4 * se).all()
    uncorrected = 2 * T * h * torch.eye(2, dtype=DTYPE)
    assert not ((torch.cov(increment.T) - uncorrected).abs() <= 4 * se).all()


def test_clipped_directions_are_reported_and_get_no_noise():
    centred = torch.tensor([[3.0, 0.1], [-3.0, -0.1], [0.0, 0.0]], dtype=DTYPE)
    h, T = 0.1, 0.01  # budget 2Th = 2e-3; h²V̂ = 0.01 · (9, 0.01)/3 = (0.03, 3.3e-5)
    for structure in ("diagonal", "low_rank"):
        noise = GradientNoise(h, T, kick=1.0, structure=structure).bind(None)
        report, factor = noise.factors(centred, diffusion=1.0)
        assert int(report.clipped) == 1 and float(report.ratio) == pytest.approx(15.0, rel=1e-2)
        if structure == "diagonal":
            root = factor[1]
            assert float(root[0]) == 0.0 and float(root[1]) == pytest.approx(math.sqrt(1 - 0.01 * (0.02 / 6) / 2e-3))
        else:
            _, _, P, c = factor
            F = torch.eye(2, dtype=DTYPE) - P @ torch.diag(c) @ P.T
            assert torch.linalg.eigvalsh(F @ F.T).min() > -1e-12  # clipped to PSD, not negative
            p = P[:, c.argmax()]
            assert float(p @ F @ F.T @ p) < 1e-12  # no noise along the clipped direction
    # in a run, the state's report counts the steps that clipped
    X, y, log_posterior, _, _, _ = regression(2, rotated=False, seed=5)
    transform = noise_corrected.build(log_posterior, noise_corrected.config(sgld.config(lr=0.5, temperature=1.0 / N)))
    state = transform.init(torch.zeros(2, dtype=DTYPE), seed=0)
    for i in range(3):
        state, _ = transform.update(state, (X[B * i:B * (i + 1)], y[B * i:B * (i + 1)]))
    report = noise_corrected.noise_report(state)
    assert int(report.clipped_steps) == 3 and int(report.clipped) >= 1 and float(report.ratio) > 1.0


def test_recipe_corrects_overridden_values():
    config = noise_corrected.config(sgld.config(lr=0.01, temperature=1e-3), structure="diagonal")
    hotter = config.recipe(temperature=2e-3)
    noise = hotter.diffusion_block.get("params", "params").noise
    assert (noise.temperature, noise.step_size, noise.structure) == (2e-3, 0.01, "diagonal")


def test_bad_inputs_raise():
    X, y, log_posterior, _, _, _ = regression(2, rotated=False)
    base = sgld.config(lr=0.01, temperature=1.0 / N)
    with pytest.raises(TypeError, match="SDEConfig"):
        noise_corrected.config("sgld")
    with pytest.raises(ValueError, match="supports"):  # no friction: no O-step noise to lower
        noise_corrected.config(baoab.config(lr=0.01, alpha=0.0, temperature=1.0 / N))
    with pytest.raises(ValueError, match="supports"):
        noise_corrected.config(obabo.config(lr=0.01, temperature=1.0 / N))
    with pytest.raises(ValueError, match="constant"):
        noise_corrected.config(sgld.config(lr=lambda step: 0.01, temperature=1.0 / N))
    with pytest.raises(ValueError, match="beta"):
        noise_corrected.config(sgld.config(lr=0.01, beta=1.0, temperature=1.0 / N))
    with pytest.raises(ValueError, match="structure"):
        noise_corrected.config(base, structure="dense")
    with pytest.raises(ValueError, match="data_size"):
        noise_corrected.config(base, data_size=1)
    with pytest.raises(ValueError, match="supports"):
        noise_corrected.config(sghmc.config(lr=0.01, alpha=0.0, temperature=1.0 / N))
    with pytest.raises(TypeError, match="Scalar or Diagonal"):
        NoiseCorrected(object(), GradientNoise(0.1, 1.0))
    config = noise_corrected.config(base)
    with pytest.raises(ValueError, match="already"):
        noise_corrected.config(config)
    with pytest.raises(ValueError, match=r"noise_corrected\.build"):
        engine_build(log_posterior, config).init(torch.zeros(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="chains=K"):
        noise_corrected.build(log_posterior, config, chain_batches=True)
    transform = noise_corrected.build(log_posterior, config)
    state = transform.init(torch.zeros(2, dtype=DTYPE), seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        transform.update(state, (X[:1], y[:1]))
    with pytest.raises(ValueError, match="share"):
        transform.update(state, (X[:4], y[:3]))
    with pytest.raises(TypeError, match="tree of tensors"):
        transform.update(state, (X[:4], "labels"))
    with pytest.raises(RuntimeError, match="step"):
        transform.step(state, grads=torch.zeros(2, dtype=DTYPE))
    def summed_log_posterior(theta, batch):  # summed over the batch: not the per-datum convention
        x, t = batch
        return -0.5 * ((t - x @ theta) ** 2).sum() - 0.5e-3 * (theta**2).sum(), None

    summed = noise_corrected.build(summed_log_posterior, config)
    with pytest.raises(ValueError, match="MEAN"):
        summed.update(summed.init(torch.zeros(2, dtype=DTYPE), seed=0), (X[:B], y[:B]))
    swapped = noise_corrected.build(log_posterior, replace(config, temperature=2.0 / N))
    with pytest.raises(ValueError, match=r"noise_corrected\.config"):
        swapped.update(swapped.init(torch.zeros(2, dtype=DTYPE), seed=0), (X[:B], y[:B]))


def test_a_diverged_step_raises_a_floating_point_error_naming_the_cause():
    noise = GradientNoise(0.1, 0.01, kick=1.0).bind(None)
    centred = torch.randn(4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    centred[1, 2] = math.inf
    with pytest.raises(FloatingPointError, match="the chains diverged"):
        noise.factors(centred, diffusion=1.0)


@pytest.mark.parametrize("omega_h", [0.3, 1.0])
def test_baoab_noise_weight_makes_the_harmonic_variance_exact(omega_h):
    """Simulated BAOAB on θ'' = −ω²θ (T = 1) with a noisy kick (variance v) and the O noise lowered by
    κ·h²v: Var θ = 1/ω² within MC error with the exact κ; the leading-order ((1 + c)/2)² misses at ωh = 1."""
    h, gamma, v, K, steps = 0.5, 1.0, 0.8, 40000, 300
    omega = omega_h / h
    c = math.exp(-gamma * h)
    g = torch.Generator().manual_seed(11)

    def stationary_variance(weight):
        q = torch.randn(K, dtype=DTYPE, generator=g) / omega
        p = torch.randn(K, dtype=DTYPE, generator=g)
        o_noise = math.sqrt(1 - c * c - weight * h * h * v)
        for _ in range(steps):  # rotated BAOAB: the full kick (its gradient's noise), A, O, A
            p = p - h * omega**2 * q + h * math.sqrt(v) * torch.randn(K, dtype=DTYPE, generator=g)
            q = q + 0.5 * h * p
            p = c * p + o_noise * torch.randn(K, dtype=DTYPE, generator=g)
            q = q + 0.5 * h * p
        return float((q * omega).var()), math.sqrt(2.0 / K)  # whitened variance and its standard error

    exact, se = stationary_variance(baoab_noise_weight(h, gamma, omega))
    assert abs(exact - 1.0) < 4 * se
    uncorrected, _ = stationary_variance(0.0)
    assert uncorrected - 1.0 > 10 * se
    leading, _ = stationary_variance(((1 + c) / 2) ** 2)
    assert (abs(leading - 1.0) > 4 * se) == (omega_h == 1.0)

