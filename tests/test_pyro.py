"""bayesflow.integrations.pyro: a pyro model's log density as a per-datum log posterior, sampled by
bayesflow's SGHMC ensemble and checked against pyro's NUTS and the exact conjugate posterior.

The model is Normal–Gamma (precision τ ~ Gamma(a0, b0), mean μ | τ ~ N(m0, 1/(κ0 τ)), y_i ~ N(μ, 1/τ)),
conjugate, so the posterior moments are known in closed form: τ | y ~ Gamma(a_n, b_n) and μ | y a
Student t with 2 a_n degrees of freedom. τ is positive: it is sampled as log τ, so the change of
variables (the log-Jacobian) is part of what is checked.
"""

from __future__ import annotations

import math

import pytest

pyro = pytest.importorskip("pyro", reason="pyro-ppl is an [integrations] extra: pip install 'bayesflow[integrations]'")

import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC, NUTS  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_mean  # noqa: E402
from pyro.infer.mcmc.util import initialize_model  # noqa: E402

from bayesflow.ensemble import bayesian_deep_ensemble, ess, replicate  # noqa: E402
from bayesflow.integrations import pyro as bf_pyro  # noqa: E402
from bayesflow.sgmcmc import sghmc, sgld  # noqa: E402

A0, B0, KAPPA0, M0 = 2.0, 2.0, 1.0, 0.0
Y = 1.0 + 0.8 * torch.randn(20, generator=torch.Generator().manual_seed(1))
N = len(Y)
Z = 4.0
"""Two-sided tolerance in standard errors (p ≈ 6e-5 per comparison, ~1e-3 over the test's comparisons)."""


def normal_gamma(y):
    tau = pyro.sample("tau", dist.Gamma(y.new_tensor(A0), y.new_tensor(B0)))  # in y's dtype (float64 below)
    mu = pyro.sample("mu", dist.Normal(M0, (KAPPA0 * tau).rsqrt()))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, tau.rsqrt()), obs=y)


def exact_moments(y, jacobian: bool = True) -> dict:
    """Posterior (mean, sd) of μ and τ. ``jacobian=False``: what a sampler that forgot the log-Jacobian
    of τ = exp(u) would target — density p(τ)/τ, i.e. a_n one lower."""
    n, ybar = len(y), float(y.mean())
    kappa_n = KAPPA0 + n
    m_n = (KAPPA0 * M0 + n * ybar) / kappa_n
    a_n = A0 + n / 2 - (0.0 if jacobian else 1.0)
    b_n = B0 + 0.5 * float(((y - ybar) ** 2).sum()) + KAPPA0 * n * (ybar - M0) ** 2 / (2 * kappa_n)
    return {"mu": (m_n, math.sqrt(b_n / (kappa_n * (a_n - 1)))), "tau": (a_n / b_n, math.sqrt(a_n) / b_n)}


def moments_with_errors(draws: dict) -> dict:
    """(mean, sd, se of the mean, se of the sd) per site from draws shaped (chains, draws).

    se(mean) = sd / sqrt(ESS); se(sd) = se(var) / (2 sd) with se(var) = sd((x - x̄)²) / sqrt(ESS of
    (x - x̄)²): effective sample sizes from bayesflow's ESS ("mean" method: the ESS of a mean's estimate).
    """
    out = {}
    for name, x in draws.items():
        x = x.double()
        mean, sd = x.mean(), x.std()
        squares = (x - mean) ** 2
        se_mean = sd / ess(x, method="mean").sqrt()
        se_var = squares.std() / ess(squares, method="mean").sqrt()
        out[name] = (float(mean), float(sd), float(se_mean), float(se_var / (2 * sd)))
    return out


def z_scores(estimate: dict, reference: dict, bias: float = 0.0) -> dict:
    """|difference| / combined standard error per (site, moment); ``reference`` values are either
    (mean, sd) (exact, no error) or moments_with_errors' four numbers. ``bias``: an allowance, relative
    to the sd, for the sampler's discretisation bias, subtracted before dividing."""
    z = {}
    for name, (mean, sd, se_mean, se_sd) in estimate.items():
        ref = reference[name]
        ref_mean, ref_sd = ref[0], ref[1]
        ref_se_mean, ref_se_sd = (ref[2], ref[3]) if len(ref) == 4 else (0.0, 0.0)
        slack = bias * ref_sd
        z[(name, "mean")] = max(abs(mean - ref_mean) - slack, 0.0) / math.hypot(se_mean, ref_se_mean)
        z[(name, "sd")] = max(abs(sd - ref_sd) - slack, 0.0) / math.hypot(se_sd, ref_se_sd)
    return z


def sghmc_draws(posterior, num_chains: int, burn_in: int, steps: int, seed: int = 0) -> dict:
    """Constrained draws (chains, steps) of a Bayesian deep ensemble of SGHMC chains (T = 1/N), full batch."""
    sampler = sghmc.build(posterior.log_posterior, lr=H, alpha=ALPHA)
    ensemble = bayesian_deep_ensemble(sampler, num_chains=num_chains, num_data=N)
    state = ensemble.init(replicate(posterior.params, num_chains, perturbation=0.3, seed=seed), seed=seed)
    trace = []
    for step in range(burn_in + steps):
        state, _ = ensemble.update(state, None, inplace=True)
        if step >= burn_in:
            trace.append(posterior.constrain(state.params))
    return {name: torch.stack([draw[name] for draw in trace], 1) for name in trace[0]}


H, ALPHA = 0.1, 1.5
"""SGHMC step and friction. Per datum, the posterior's frequencies are ω² = 1/(N Var) ≈ 1.4 (μ) and ≈ 0.6
(log τ), so hω ≤ 0.12 and α is near critical damping."""
BIAS = 0.015
"""Allowed discretisation bias, relative to the sd. Semi-implicit SGHMC is weak order 1: its stationary
law is off by O(h) (on a Gaussian only by the factor (1 - hα/2)/(1 - hα/2 - h²ω²/4) ≤ 1.004 on the
variance). Measured on this model with 2048 chains at h = 0.05, 0.1 and 0.2: every mean and sd within
0.8 % of the sd of the exact value, itself the Monte Carlo error of that measurement (0.5-1 %)."""


@pytest.fixture(scope="module")
def posterior():
    # chains start at the prior mean (τ = 1, μ = 0): 100 steps reach stationarity; from init_to_uniform's
    # draw (τ ≈ 0.15 here, deep in the tail) 250 are needed
    return bf_pyro.log_posterior(normal_gamma, (Y,), num_data=N, init_strategy=init_to_mean)


@pytest.fixture(scope="module")
def sghmc_moments(posterior):
    return moments_with_errors(sghmc_draws(posterior, num_chains=512, burn_in=150, steps=250))


# ----------------------------------------------------------------------------------------- exact values


def test_value_is_minus_pyros_potential_over_num_data(posterior):
    """N·ℓ(u) = -potential_fn(u) of pyro's initialize_model (log joint + log-Jacobian), at many points."""
    _, potential_fn, transforms, _ = initialize_model(normal_gamma, (Y,))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        params = {"tau": torch.randn((), generator=generator), "mu": torch.randn((), generator=generator)}
        value, constrained = posterior.log_posterior(params, None)
        torch.testing.assert_close(value * N, -potential_fn(params), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(constrained["tau"], params["tau"].exp())
        # and by hand: priors, likelihood and log|dτ/du| = u
        tau, mu = params["tau"].exp(), params["mu"]
        by_hand = (dist.Gamma(A0, B0).log_prob(tau) + dist.Normal(M0, (KAPPA0 * tau).rsqrt()).log_prob(mu)
                   + dist.Normal(mu, tau.rsqrt()).log_prob(Y).sum() + params["tau"])
        torch.testing.assert_close(value * N, by_hand, rtol=1e-6, atol=1e-5)
    assert set(transforms) == set(posterior.transforms) == set(posterior.params) == {"tau", "mu"}


def test_enumerated_discrete_sites_and_simplex_sites_match_pyro():
    """A two-component mixture: the assignments are summed out (parallel enumeration), the weights live
    on the simplex (stick-breaking, an event-dimension Jacobian): ℓ·N = -potential_fn, as in NUTS."""
    data = torch.tensor([-2.1, -1.7, 1.9, 2.3, 2.0])

    def mixture(x):
        weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
        locs = pyro.sample("locs", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("x", dist.Normal(locs[z], 1.0), obs=x)

    pyro.set_rng_seed(0)
    posterior = bf_pyro.log_posterior(mixture, (data,), num_data=len(data))
    _, potential_fn, _, _ = initialize_model(mixture, (data,))
    assert set(posterior.params) == {"weights", "locs"} and posterior.params["weights"].shape == (1,)
    params = {"weights": torch.tensor([0.3]), "locs": torch.tensor([-1.0, 2.0])}
    value, constrained = posterior.log_posterior(params, None)
    torch.testing.assert_close(value * len(data), -potential_fn(params), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(constrained["weights"].sum(), torch.tensor(1.0))
    state = sgld.build(posterior.log_posterior, lr=1e-3, temperature=1 / len(data)).init(params, seed=0)
    state, _ = sgld.build(posterior.log_posterior, lr=1e-3, temperature=1 / len(data)).update(state, None)
    assert not torch.equal(state.params["locs"], params["locs"])  # a gradient reached the continuous sites


def test_mini_batches_through_a_subsampled_plate_are_unbiased():
    """With ``pyro.plate("data", size=N, subsample=index)`` pyro scales a batch's likelihood by N/B: the
    mean of ℓ over a partition into equal batches is exactly the full-data ℓ."""
    index = torch.arange(N)

    def batched(idx, y):
        tau = pyro.sample("tau", dist.Gamma(A0, B0))
        mu = pyro.sample("mu", dist.Normal(M0, (KAPPA0 * tau).rsqrt()))
        with pyro.plate("data", size=N, subsample=idx):
            pyro.sample("y", dist.Normal(mu, tau.rsqrt()), obs=y)

    pyro.set_rng_seed(0)
    posterior = bf_pyro.log_posterior(batched, (index[:5], Y[:5]), num_data=N)
    params = {"tau": torch.tensor(0.2), "mu": torch.tensor(0.7)}
    batches = [(index[i:i + 5], Y[i:i + 5]) for i in range(0, N, 5)]
    mean_of_batches = torch.stack([posterior.log_posterior(params, batch)[0] for batch in batches]).mean()
    full, _ = posterior.log_posterior(params, (index, Y))
    torch.testing.assert_close(mean_of_batches, full, rtol=1e-6, atol=1e-6)
    reference = bf_pyro.log_posterior(normal_gamma, (Y,), num_data=N).log_posterior(params, None)[0]
    torch.testing.assert_close(full, reference, rtol=1e-6, atol=1e-6)
    # keyword arguments: a dict batch replaces those given at construction (positional ones stay)
    pyro.set_rng_seed(0)
    by_keyword = bf_pyro.log_posterior(batched, (index[:5],), {"y": Y[:5]}, num_data=N)
    torch.testing.assert_close(by_keyword.log_posterior(params, {"y": Y[5:10]})[0],
                               posterior.log_posterior(params, (index[:5], Y[5:10]))[0])


def test_per_datum_convention_is_the_full_log_posterior_at_temperature_one():
    """SGLD on ℓ = log p / N at T = 1/N with step h is SGLD on log p at T = 1 with step h/N, exactly:
    θ + h∇(log p)/N + sqrt(2h/N)ξ either way (same noise key)."""
    def trajectory(num_data, lr, temperature):
        pyro.set_rng_seed(0)
        posterior = bf_pyro.log_posterior(normal_gamma, (Y.double(),), num_data=num_data)
        params = {name: value.double() for name, value in posterior.params.items()}
        transform = sgld.build(posterior.log_posterior, lr=lr, temperature=temperature)
        state = transform.init(params, seed=3)
        points = []
        for _ in range(20):
            state, _ = transform.update(state, None)
            points.append(torch.stack([state.params["tau"], state.params["mu"]]))
        return torch.stack(points)

    per_datum = trajectory(N, 0.05, 1 / N)
    full = trajectory(1, 0.05 / N, 1.0)
    torch.testing.assert_close(per_datum, full, rtol=1e-10, atol=1e-12)
    assert per_datum.std(0).min() > 0  # it moved


# ------------------------------------------------------------------------------------- moments


def test_sghmc_ensemble_matches_the_exact_posterior(sghmc_moments):
    zs = z_scores(sghmc_moments, exact_moments(Y), bias=BIAS)
    assert max(zs.values()) < Z, zs
    # and the check is sharp: means to within ~5 % of an sd, sds to within ~3 % (one standard error)
    for name, (_, sd, se_mean, se_sd) in sghmc_moments.items():
        assert se_mean < 0.05 * sd and se_sd < 0.03 * sd, (name, sghmc_moments)


def test_the_comparison_has_power_against_a_forgotten_jacobian(sghmc_moments):
    """The Jacobian-less law (a_n - 1: τ's mean 7 % lower) is far outside the tolerance."""
    zs = z_scores(sghmc_moments, exact_moments(Y, jacobian=False), bias=BIAS)
    assert zs[("tau", "mean")] > Z, zs


def test_sghmc_ensemble_agrees_with_pyros_nuts(sghmc_moments):
    """pyro's NUTS (one chain, 300 draws after 150 warm-up steps, fixed seed) and bayesflow's SGHMC
    ensemble agree within their combined Monte Carlo error; NUTS also matches the exact moments."""
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(normal_gamma, jit_compile=True, ignore_jit_warnings=True), num_samples=300, warmup_steps=150,
                disable_progbar=True)
    mcmc.run(Y)
    nuts = moments_with_errors({name: draws[None] for name, draws in mcmc.get_samples().items()})
    zs = z_scores(sghmc_moments, nuts, bias=BIAS)
    assert max(zs.values()) < Z, (zs, nuts, sghmc_moments)
    assert max(z_scores(nuts, exact_moments(Y)).values()) < Z, nuts


def test_a_wrong_temperature_fails_the_same_check():
    """The classic mistake: a full log posterior (num_data=1) sampled at T = 1/N targets p^N — its sd
    is √N times too small, and the check says so."""
    full = bf_pyro.log_posterior(normal_gamma, (Y,), init_strategy=init_to_mean)  # num_data=1: ℓ = log p
    draws = sghmc_draws(full, num_chains=64, burn_in=50, steps=50)
    zs = z_scores(moments_with_errors(draws), exact_moments(Y), bias=BIAS)
    assert min(zs[("mu", "sd")], zs[("tau", "sd")]) > 10 * Z, zs


# --------------------------------------------------------------------------------------- boundaries


def test_constrain_maps_traces_and_copies_real_sites(posterior):
    trace = {"tau": torch.zeros(3), "mu": torch.arange(3.0)}
    constrained = posterior.constrain(trace)
    torch.testing.assert_close(constrained["tau"], torch.ones(3))
    assert torch.equal(constrained["mu"], trace["mu"]) and constrained["mu"] is not trace["mu"]
    with pytest.raises(ValueError, match="latent sites"):
        posterior.constrain({"tau": torch.zeros(3)})


def test_bad_input_is_refused_with_a_clear_message(posterior):
    with pytest.raises(TypeError, match="callable"):
        bf_pyro.log_posterior("model")
    with pytest.raises(TypeError, match="tuple"):
        bf_pyro.log_posterior(normal_gamma, [Y])
    with pytest.raises(TypeError, match="model_kwargs"):
        bf_pyro.log_posterior(normal_gamma, (Y,), [1])
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="num_data"):
            bf_pyro.log_posterior(normal_gamma, (Y,), num_data=bad)
    with pytest.raises(ValueError, match="no continuous latent"):
        bf_pyro.log_posterior(lambda: pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0)))
    with pytest.raises(ValueError, match="latent sites"):
        posterior.log_posterior({"tau": torch.tensor(0.0)}, None)  # pyro would sample mu from its prior
    with pytest.raises(TypeError, match="batch"):
        posterior.log_posterior(posterior.params, 3)
    with pytest.raises(ValueError, match="initial point"):
        bf_pyro.log_posterior(lambda: pyro.factor("bad", pyro.sample("x", dist.Normal(0.0, 1.0)) - math.inf),
                              max_tries=3)


def test_the_sgld_example_matches_the_exact_posterior():
    """examples/pyro_sgld.py (32 SGLD chains, mini-batches through a subsampled plate), shortened to 150
    epochs: means within 4 standard errors (from its ESS) plus 5 % of the sd, sds within 4 standard
    errors plus 5 % — SGLD's Euler bias hω²/2 ≈ 4 % of the variance (2 % of the sd) at h = 0.05, and
    the mini-batch noise."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "examples" / "pyro_sgld.py"
    spec = importlib.util.spec_from_file_location("example_pyro_sgld", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(epochs=150, verbose=False)
    for name in ("mu", "tau"):
        (mean, sd), (exact_mean, exact_sd), size = result["sgld"][name], result["exact"][name], result["ess"][name]
        assert abs(mean - exact_mean) < (Z / math.sqrt(size) + 0.05) * exact_sd, (name, result)
        assert abs(sd / exact_sd - 1) < Z / math.sqrt(2 * size) + 0.05, (name, result)
