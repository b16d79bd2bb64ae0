"""Chain-independent diagnostics: R-hat / ESS, kinetic and configurational temperature, running moments (SWAG).

Tolerances are Monte Carlo errors computed in each test (k standard errors, k stated) or float round-off.
"""

from __future__ import annotations

import importlib.util
import io
import math
import sys
from statistics import NormalDist

import numpy as np
import pytest
import torch

from bayesflow.ensemble import (
    MomentsState,
    configurational_temperature,
    configurational_terms,
    ess,
    format_summary,
    kinetic_temperature,
    rhat,
    running_moments,
    summary,
    to_inference_data,
    virial_temperature,
)
from bayesflow.ensemble.moments import sample

F64 = torch.float64


def ar1(chains: int, draws: int, params: int, rho: float, seed: int) -> torch.Tensor:
    """Stationary AR(1) chains x_t = ρ x_{t-1} + ε_t, ε ~ N(0, 1), started from the stationary law."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(chains, draws, params, generator=g, dtype=F64)
    x = torch.empty_like(eps)
    x[:, 0] = eps[:, 0] / math.sqrt(1 - rho**2)
    for t in range(1, draws):
        x[:, t] = rho * x[:, t - 1] + eps[:, t]
    return x


# --------------------------------------------------------------------------- a loop reference (ArviZ 0.x, Stan)
# A literal, per-parameter port of ArviZ's `_ess`, `_rhat`, `_z_scale` and `_split_chains` (numpy + stdlib),
# independent of the vectorised code under test: O(S²) ranks, Python loops for Geyer's sequences.


def _ref_split(a):
    half = a.shape[1] // 2
    return np.vstack([a[:, :half], a[:, a.shape[1] - half:]])


def _ref_z_scale(a):
    flat = a.ravel()
    rank = ((flat[None, :] < flat[:, None]).sum(1) + (flat[None, :] <= flat[:, None]).sum(1) + 1) / 2
    inv = np.vectorize(NormalDist().inv_cdf)
    return inv((rank - 3 / 8) / (flat.size - 3 / 4 + 1)).reshape(a.shape)


def _ref_rhat(a):
    n = a.shape[1]
    b = n * np.var(a.mean(axis=1), ddof=1)
    w = np.mean(np.var(a, axis=1, ddof=1))
    return np.sqrt((b / w + n - 1) / n)


def _ref_ess(a):
    a = np.asarray(a, dtype=float)
    if a.max() - a.min() < np.finfo(float).resolution:
        return float(a.size)
    n = a.shape[1]
    centred = a - a.mean(axis=1, keepdims=True)
    acov = np.stack([[np.dot(row[: n - t], row[t:]) / n for t in range(n)] for row in centred])
    mean_var = acov[:, 0].mean() * n / (n - 1)
    var_plus = mean_var * (n - 1) / n + np.var(a.mean(axis=1), ddof=1)
    rho = np.zeros(n)
    even, odd = 1.0, 1 - (mean_var - acov[:, 1].mean()) / var_plus
    rho[0], rho[1] = even, odd
    t = 1
    while t < n - 3 and even + odd > 0:
        even = 1 - (mean_var - acov[:, t + 1].mean()) / var_plus
        odd = 1 - (mean_var - acov[:, t + 2].mean()) / var_plus
        if even + odd >= 0:
            rho[t + 1], rho[t + 2] = even, odd
        t += 2
    max_t = t - 2
    if even > 0:
        rho[max_t + 1] = even
    t = 1
    while t <= max_t - 2:
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2
        t += 2
    tau = -1 + 2 * rho[: max_t + 1].sum() + rho[max_t + 1: max_t + 2].sum()
    return a.size / max(tau, 1 / np.log10(a.size))


def _ref_rhat_rank(a):
    s = _ref_split(a)
    return max(_ref_rhat(_ref_z_scale(s)), _ref_rhat(_ref_z_scale(np.abs(s - np.median(s)))))


def _ref_ess_tail(a):
    return min(_ref_ess(_ref_split((a <= np.quantile(a, q)).astype(float))) for q in (0.05, 0.95))


@pytest.mark.parametrize(("chains", "draws", "rho"), [(4, 60, 0.5), (3, 51, -0.6), (2, 9, 0.95), (1, 11, 0.3),
                                                      (4, 4, 0.0), (2, 25, -0.95)])
def test_rhat_and_ess_match_the_loop_reference(chains, draws, rho):
    """Vectorised Geyer truncation / monotone sequence / ranks equal the per-parameter loop to round-off,
    on odd and minimal draw counts, antithetic chains (early truncation), ties and a constant parameter."""
    x = ar1(chains, draws, 5, rho, seed=chains * 100 + draws)
    x[..., 3] = torch.round(x[..., 3])  # ties: average ranks
    x[..., 4] = 2.0  # constant: ESS = S, R-hat undefined
    a = x.numpy()
    got = {m: ess(x, m).numpy() for m in ("bulk", "tail", "mean")}
    for j in range(5):
        np.testing.assert_allclose(got["bulk"][j], _ref_ess(_ref_z_scale(_ref_split(a[..., j]))), rtol=1e-10)
        np.testing.assert_allclose(got["mean"][j], _ref_ess(_ref_split(a[..., j])), rtol=1e-10)
        np.testing.assert_allclose(got["tail"][j], _ref_ess_tail(a[..., j]), rtol=1e-10)
    got_rhat = rhat(x).numpy()
    for j in range(4):
        np.testing.assert_allclose(got_rhat[j], _ref_rhat_rank(a[..., j]), rtol=1e-10)
    assert math.isnan(got_rhat[4])
    assert got["bulk"][4] == 2 * chains * (draws // 2)


# --------------------------------------------------------------------------- AR(1): exact ESS and R-hat ≈ 1


@pytest.mark.parametrize("rho", [0.0, 0.5, -0.3, 0.9])
def test_ess_of_ar1_chains_matches_the_exact_value(rho):
    """ESS of AR(1) chains ≈ C·N·(1−ρ)/(1+ρ).

    200 independent parameters are 200 replicates of a 4 × 1000 run. Measured once over 500 replicates
    (seed 1, this code): ESS/exact has mean 0.984 / 1.002 / 1.009 / 1.020 and sd 0.043 / 0.075 / 0.072 /
    0.17 for ρ = 0 / 0.5 / -0.3 / 0.9 (Sokal's rule Var(τ̂)/τ² ≈ 2(2M+1)/S gives the same order). So:
    the mean over the 200 replicates (standard error sd/√200 ≤ 0.012) lies within 5% (bias ≤ 2% + 3 SE),
    and 95% of single runs lie within 20% (≥ 2.6 sd for ρ ≠ 0.9) or 40% for ρ = 0.9 (2.3 sd).
    """
    chains, draws = 4, 1000
    exact = chains * draws * (1 - rho) / (1 + rho)
    x = ar1(chains, draws, 200, rho, seed=7)
    for method in ("bulk", "mean"):
        ratio = ess(x, method) / exact
        assert abs(ratio.mean().item() - 1) < 0.05, (method, ratio.mean())
        width = 0.4 if rho == 0.9 else 0.2
        assert ((ratio - 1).abs() < width).double().mean() >= 0.95, (method, ratio.min(), ratio.max())


def test_ess_is_monotone_in_the_autocorrelation():
    x = torch.cat([ar1(4, 500, 50, rho, seed=3) for rho in (0.0, 0.3, 0.6, 0.9)], dim=-1)
    means = ess(x).reshape(4, 50).mean(dim=1)
    assert (means.diff() < 0).all(), means


def test_rhat_is_close_to_one_for_mixed_chains():
    """Stationary AR(1) chains: measured max over 500 parameters 1.003 (ρ = 0) and 1.008 (ρ = 0.5)."""
    for rho in (0.0, 0.5):
        r = rhat(ar1(4, 1000, 200, rho, seed=11))
        assert (r < 1.02).all() and (r > 0.99).all(), (r.min(), r.max())
        assert abs(r.median().item() - 1) < 0.005


def test_rhat_flags_chains_in_separate_modes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 500, 3, generator=g, dtype=F64)
    x[2:] += 3.0  # two chains in another mode
    for method in ("rank", "z_scale", "split", "identity"):
        assert (rhat(x, method) > 1.1).all(), method
    one = torch.randn(4, 500, 1, generator=g, dtype=F64)
    one[0] += 3.0  # a single stray chain
    assert rhat(one).item() > 1.1


def test_rhat_flags_a_drifting_chain_and_a_scale_mismatch():
    g = torch.Generator().manual_seed(1)
    drift = torch.randn(1, 1000, 2, generator=g, dtype=F64) + torch.linspace(0, 4, 1000, dtype=F64).view(1, -1, 1)
    assert (rhat(drift) > 1.1).all()  # one chain: its two halves disagree
    with pytest.raises(ValueError, match="at least 2 chains"):  # without the split one chain cannot be judged
        rhat(drift, "identity")
    scale = torch.randn(4, 1000, 2, generator=g, dtype=F64) * torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=F64).view(
        -1, 1, 1)
    assert (rhat(scale, "z_scale") < 1.05).all()  # same location: the bulk R-hat misses it
    assert (rhat(scale, "folded") > 1.1).all() and (rhat(scale) > 1.1).all()  # the folded one does not


def test_trees_shapes_chunks_and_nonfinite():
    x = ar1(3, 40, 12, 0.4, seed=5)
    tree = {"w": x.reshape(3, 40, 3, 4), "b": {"c": x[..., 0]}}
    out = rhat(tree)
    assert out["w"].shape == (3, 4) and out["b"]["c"].shape == ()
    torch.testing.assert_close(out["w"].reshape(-1), rhat(x), rtol=0, atol=0)
    torch.testing.assert_close(ess(x, chunk_size=5), ess(x), rtol=1e-12, atol=0)
    torch.testing.assert_close(rhat(x, chunk_size=5), rhat(x), rtol=1e-12, atol=0)
    assert ess(x.float()).dtype == torch.float32
    bad = x.clone()
    bad[1, 7, 2] = math.nan
    assert torch.isnan(ess(bad)[2]) and torch.isnan(rhat(bad)[2])
    assert torch.isfinite(ess(bad)[[0, 1, 3]]).all()
    with pytest.raises(ValueError, match="at least 4 draws"):
        rhat(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="unknown R-hat method"):
        rhat(x, "bulk")
    with pytest.raises(ValueError, match="unknown ESS method"):
        ess(x, "rank")


def test_summary_reports_quantiles_over_parameters():
    x = ar1(4, 200, 30, 0.5, seed=9)
    x[..., 0] = 1.0  # one constant parameter
    x[0, :, 1] += 5.0  # one stuck chain
    table = summary({"layer": {"weight": x[..., :20].reshape(4, 200, 4, 5)}, "bias": x[..., 20:]}, threshold=1.1)
    assert set(table) == {"layer.weight", "bias"}
    row = table["layer.weight"]
    r = rhat(x[..., :20])
    assert row["size"] == 20 and row["rhat_nan"] == 1
    assert row["rhat_max"] == pytest.approx(r.nanquantile(1.0).item(), rel=1e-12)
    assert row["rhat_q50"] == pytest.approx(r.nanquantile(0.5).item(), rel=1e-12)
    assert row["frac_rhat_above"] == pytest.approx(2 / 20)  # the stuck chain's parameter and the NaN (constant) one
    assert row["ess_bulk_min"] == pytest.approx(ess(x[..., :20]).min().item(), rel=1e-12)
    assert row["ess_tail_q05"] <= row["ess_tail_q50"] <= row["ess_tail_q95"]
    assert table["bias"]["rhat_max"] < 1.05
    text = format_summary(table)
    assert "layer.weight" in text and "rhat_max" in text and len(text.splitlines()) == 3


def test_to_inference_data_names_the_missing_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)  # `import arviz` now raises ImportError
    with pytest.raises(ImportError, match="pip install arviz"):
        to_inference_data({"w": torch.randn(2, 10, 3)})


def test_to_inference_data_exports_or_explains():
    samples = {"w": ar1(4, 100, 3, 0.5, seed=2), "b": {"c": ar1(4, 100, 1, 0.2, seed=3)[..., 0]}}
    if importlib.util.find_spec("arviz") is None:
        with pytest.raises(ImportError, match="pip install arviz"):
            to_inference_data(samples)
        return
    import arviz

    idata = to_inference_data(samples, sample_stats={"lp": torch.randn(4, 100)})
    posterior = idata.posterior if hasattr(idata, "posterior") else idata["posterior"]
    np.testing.assert_array_equal(np.asarray(posterior["w"]), samples["w"].numpy())
    np.testing.assert_array_equal(np.asarray(posterior["b.c"]), samples["b"]["c"].numpy())
    if hasattr(arviz, "rhat") and hasattr(idata, "posterior"):  # arviz 0.x: the same numbers as ArviZ's own
        np.testing.assert_allclose(np.asarray(arviz.rhat(idata)["w"]), rhat(samples["w"]).numpy(), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(arviz.ess(idata)["w"]), ess(samples["w"]).numpy(), rtol=1e-10)


# --------------------------------------------------------------------------- kinetic temperature


def test_kinetic_temperature_of_equilibrium_momenta():
    """m ~ N(0, T·M): each leaf's mean of m²/M estimates T with standard error T·sqrt(2/n); 4 SE."""
    g = torch.Generator().manual_seed(0)
    temperature = 0.37
    mass = {"w": torch.full((8, 50), 2.0, dtype=F64), "b": 0.5}
    momenta = {
        "w": torch.randn(4, 8, 50, generator=g, dtype=F64) * math.sqrt(temperature * 2.0),
        "b": torch.randn(4, 300, generator=g, dtype=F64) * math.sqrt(temperature * 0.5),
    }
    t = kinetic_temperature(momenta, mass)
    for key, n in (("w", 4 * 400), ("b", 4 * 300)):
        assert abs(t[key].item() - temperature) < 4 * temperature * math.sqrt(2 / n), (key, t[key])
    per_chain = kinetic_temperature(momenta, mass, per_chain=True)
    assert per_chain["w"].shape == (4,)
    assert (per_chain["w"] - temperature).abs().max() < 4 * temperature * math.sqrt(2 / 400)
    hot = kinetic_temperature({"w": momenta["w"] * math.sqrt(2)}, {"w": mass["w"]})["w"]
    assert abs(hot.item() - 2 * temperature) < 4 * 2 * temperature * math.sqrt(2 / 1600)
    with pytest.raises(ValueError, match="no kinetic temperature"):
        kinetic_temperature(None)


# --------------------------------------------------------------------------- configurational temperature


def _gaussian_case(seed=0):
    """U = ½ θᵀAθ / N over a 3-vector leaf 'a' and a (2,)-leaf 'b' coupled by a dense precision A."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(5, 5, generator=g, dtype=F64)
    precision = r @ r.T + 2 * torch.eye(5, dtype=F64)

    def log_posterior(params, batch):
        theta = torch.cat([params["a"], params["b"]])
        return -0.5 * theta @ precision @ theta, None

    return g, precision, log_posterior


def _draw(g, covariance, samples):
    chol = torch.linalg.cholesky(covariance)
    theta = torch.randn(samples, covariance.shape[0], generator=g, dtype=F64) @ chol.T
    return {"a": theta[:, :3], "b": theta[:, 3:]}


@pytest.mark.parametrize("num_data", [1.0, 50.0])
def test_configurational_temperature_on_a_gaussian(num_data):
    """θ ~ N(0, N·T·A⁻¹) is exp(−U/T) for U = ½θᵀAθ/N. (Aθ)_g ~ N(0, N·T·A_gg), so the estimate of leaf g
    has standard error T·sqrt(2·tr(A_gg²)/S)/tr(A_gg) (its Laplacian is the constant tr(A_gg)/N); 5 SE."""
    g, precision, log_posterior = _gaussian_case()
    temperature, samples = 0.3, 4000
    draws = _draw(g, num_data * temperature * torch.linalg.inv(precision), samples)
    est = configurational_temperature(log_posterior, draws, None, num_data=num_data)
    blocks = {"a": precision[:3, :3], "b": precision[3:, 3:]}
    for key, block in blocks.items():
        se = temperature * math.sqrt(2 * (block @ block).trace() / samples) / block.trace()
        assert abs(est[key].item() - temperature) < 5 * se, (key, est[key], se)
    hot = configurational_temperature(log_posterior, _draw(g, 2 * num_data * temperature * torch.linalg.inv(
        precision), samples), None, num_data=num_data)
    for key, block in blocks.items():  # the sampler ran at 2T: the check says so
        se = 2 * temperature * math.sqrt(2 * (block @ block).trace() / samples) / block.trace()
        assert abs(hot[key].item() - 2 * temperature) < 5 * se


def test_exact_laplacian_gradient_and_virial_terms_are_exact():
    """A non-Gaussian separable potential with known derivatives: U = Σ log cosh θ + θ⁴/4 (round-off)."""
    g = torch.Generator().manual_seed(4)

    def log_posterior(params, batch):
        u = sum((torch.log(torch.cosh(p)) + p**4 / 4).sum() for p in (params["x"], params["y"]))
        return -u, None

    params = {"x": torch.randn(7, 2, 3, generator=g, dtype=F64), "y": torch.randn(7, generator=g, dtype=F64)}
    terms = configurational_terms(log_posterior, params, None, chunk_size=4)
    for key in ("x", "y"):
        p = params[key].reshape(7, -1)
        grad = torch.tanh(p) + p**3
        torch.testing.assert_close(terms.grad_sq[key], (grad**2).sum(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(terms.laplacian[key], (1 - torch.tanh(p) ** 2 + 3 * p**2).sum(1), rtol=1e-12,
                                   atol=1e-12)
        torch.testing.assert_close(terms.virial[key], (p * grad).sum(1), rtol=1e-12, atol=1e-12)
    assert terms.size == {"x": 6, "y": 1}
    # A diagonal Hessian makes every Rademacher probe exact (z_i² = 1).
    hutch = configurational_terms(log_posterior, params, None, estimator="hutchinson", num_probes=2, generator=g)
    torch.testing.assert_close(hutch.laplacian["x"], terms.laplacian["x"], rtol=1e-12, atol=1e-12)


def test_hutchinson_laplacian_is_unbiased_with_the_predicted_spread():
    """For Rademacher z, X_g = Σ_{i∈g} z_i (Az)_i = tr(A_gg) + cross terms with variance
    4·Σ_{i<j∈g} A_ij² + Σ_{i∈g, j∉g} A_ij²; the mean of S·P probes lies within 5 SE of tr(A_gg)."""
    g, precision, log_posterior = _gaussian_case(seed=1)
    draws = _draw(g, torch.eye(5, dtype=F64), 500)
    probes = 8
    terms = configurational_terms(log_posterior, draws, None, estimator="hutchinson", num_probes=probes,
                                  generator=g)
    for key, idx in (("a", slice(0, 3)), ("b", slice(3, 5))):
        block = precision[idx, idx]
        inside = (block.triu(1) ** 2).sum() * 4
        outside = (precision[idx] ** 2).sum() - (block**2).sum()
        se = math.sqrt((inside + outside).item() / (500 * probes))
        assert abs(terms.laplacian[key].mean().item() - block.trace().item()) < 5 * se
        assert terms.laplacian[key].std() > 0  # a dense A: single probes do scatter


def test_virial_temperature_on_a_gaussian():
    """θ_gᵀ(Aθ)_g = θᵀBθ with B = ½(E_gA + AE_g); for θ ~ N(0, Σ) its variance is 2·tr((BΣ)²); 5 SE."""
    g, precision, log_posterior = _gaussian_case(seed=2)
    temperature, samples = 0.5, 4000
    covariance = temperature * torch.linalg.inv(precision)
    est = virial_temperature(log_posterior, _draw(g, covariance, samples), None)
    for key, idx, size in (("a", slice(0, 3), 3), ("b", slice(3, 5), 2)):
        e = torch.zeros(5, 5, dtype=F64)
        e[idx, idx] = torch.eye(size, dtype=F64)
        b = (e @ precision + precision @ e) / 2
        se = math.sqrt(2 * ((b @ covariance) @ (b @ covariance)).trace().item() / samples) / size
        assert abs(est[key].item() - temperature) < 5 * se, (key, est[key], se)


def test_configurational_temperature_of_a_bayesian_posterior_with_an_nn_module():
    """Per-datum log posterior of a linear-Gaussian regression (torch.nn.Linear through functional_call):
    the exact posterior is the engine's stationary law at T = 1/n, and both leaves report ≈ 1/n."""
    g = torch.Generator().manual_seed(3)
    n, noise, prior = 200, 0.5, 1.0
    x = torch.randn(n, 3, generator=g, dtype=F64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64) + 0.3 + noise * torch.randn(n, generator=g, dtype=F64)
    model = torch.nn.Linear(3, 1).double()

    def log_posterior(params, batch):
        inputs, targets = batch
        pred = torch.func.functional_call(model, params, (inputs,)).squeeze(-1)
        log_lik = -0.5 * ((targets - pred) ** 2).sum() / noise**2
        log_prior = -0.5 * sum((p**2).sum() for p in params.values()) / prior**2
        return (log_lik + log_prior) / n, None

    design = torch.cat([x, torch.ones(n, 1, dtype=F64)], dim=1)
    post_precision = design.T @ design / noise**2 + torch.eye(4, dtype=F64) / prior**2
    post_cov = torch.linalg.inv(post_precision)
    post_mean = post_cov @ design.T @ y / noise**2
    samples = 3000
    theta = post_mean + torch.randn(samples, 4, generator=g, dtype=F64) @ torch.linalg.cholesky(post_cov).T
    draws = {"weight": theta[:, :3].reshape(samples, 1, 3), "bias": theta[:, 3:]}
    est = configurational_temperature(log_posterior, draws, (x, y))
    for key, idx in (("weight", slice(0, 3)), ("bias", slice(3, 4))):
        block = post_precision[idx, idx]  # n·∇²U restricted to the leaf
        se = (1 / n) * math.sqrt(2 * (block @ block).trace() / samples) / block.trace()
        assert abs(est[key].item() - 1 / n) < 5 * se, (key, est[key], se)


def test_temperature_argument_errors():
    _, _, log_posterior = _gaussian_case()
    with pytest.raises(ValueError, match="leading sample axis"):
        configurational_temperature(log_posterior, {"a": torch.zeros(3, dtype=F64), "b": torch.zeros(2)}, None)
    with pytest.raises(ValueError, match="unknown estimator"):
        configurational_temperature(log_posterior, {"a": torch.zeros(1, 3), "b": torch.zeros(1, 2)}, None,
                                    estimator="exactly")
    with pytest.raises(ValueError, match="num_data"):
        virial_temperature(log_posterior, {"a": torch.zeros(1, 3), "b": torch.zeros(1, 2)}, None, num_data=0)


# --------------------------------------------------------------------------- running moments and SWAG


def test_running_moments_equal_the_batch_moments():
    """Dict params with a leading chain axis: mean, ddof-0 variance and the last K deviations θ_j − θ̄_j."""
    g = torch.Generator().manual_seed(0)
    steps, rank = 37, 5
    trace = {"w": 3 + 2 * torch.randn(steps, 3, 2, 4, generator=g, dtype=F64),
             "b": {"c": torch.randn(steps, 3, generator=g, dtype=F64) - 1}}
    moments = running_moments(max_rank=rank)
    state = moments.init({"w": trace["w"][0], "b": {"c": trace["b"]["c"][0]}})
    functional = moments.init({"w": trace["w"][0], "b": {"c": trace["b"]["c"][0]}})
    for t in range(steps):
        theta = {"w": trace["w"][t], "b": {"c": trace["b"]["c"][t]}}
        before = functional
        functional, aux = moments.update(functional, theta)
        state, _ = moments.update(state, theta, inplace=True)
        assert aux is None and int(before.count) == t  # the functional update left its input alone
    assert isinstance(state, MomentsState) and int(state.count) == steps
    for get in (lambda tr: tr["w"], lambda tr: tr["b"]["c"]):
        xs = get(trace)
        torch.testing.assert_close(get(state.mean), xs.mean(0), rtol=0, atol=1e-10)
        torch.testing.assert_close(get(state.variance), xs.var(0, correction=0), rtol=0, atol=1e-10)
        running_means = xs.cumsum(0) / torch.arange(1, steps + 1, dtype=F64).view(-1, *[1] * (xs.ndim - 1))
        for j in range(steps - rank, steps):  # update j+1 wrote slot j mod K
            torch.testing.assert_close(get(state.deviations)[j % rank], xs[j] - running_means[j], rtol=0, atol=1e-10)
        for field in ("mean", "variance", "deviations"):
            torch.testing.assert_close(get(getattr(functional, field)), get(getattr(state, field)), rtol=0, atol=0)
    buffer = io.BytesIO()  # the record itself is torch.save-able and loads with weights_only=True
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert isinstance(loaded, MomentsState) and torch.equal(loaded.mean["w"], state.mean["w"])


def test_running_variance_is_stable_under_a_large_offset():
    """Welford on 1e8 + N(0, 1) in float64: E[x²] − E[x]² would lose every digit (x² ~ 1e16, ulp 2)."""
    g = torch.Generator().manual_seed(1)
    xs = 1e8 + torch.randn(500, 4, generator=g, dtype=F64)
    moments = running_moments()
    state = moments.init(xs[0])
    for x in xs:
        state, _ = moments.update(state, x, inplace=True)
    centred = xs - 1e8  # exact in float64
    torch.testing.assert_close(state.variance, centred.var(0, correction=0), rtol=1e-6, atol=0)


def test_running_moments_accumulate_in_a_wider_dtype():
    moments = running_moments(max_rank=2, dtype=F64)
    state = moments.init(torch.zeros(3))
    state, _ = moments.update(state, torch.ones(3))
    assert state.mean.dtype == F64 and state.deviations.dtype == F64 and state.deviations.shape == (2, 3)


def _sample_covariance_check(draws, mean, cov, k=5.0):
    """Sample mean / covariance against the truth within k standard errors.

    For Gaussian draws Var(mean_i) = C_ii/n and Var(Ĉ_ij) ≈ (C_ii C_jj + C_ij²)/n.
    """
    n = draws.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((draws.mean(0) - mean).abs() < k * se_mean + 1e-12).all(), (draws.mean(0), mean)
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    emp = torch.cov(draws.T, correction=1)
    assert ((emp - cov).abs() < k * se_cov + 1e-12).all(), (emp, cov)


def test_swag_samples_have_the_swag_mean_and_covariance():
    """θ_t = c + a_t u + e_t (a rank-1 direction plus small noise): SWAG's covariance is
    ½·diag(σ²) + D Dᵀ/(2(K−1)) with D the last K deviations; 200 000 draws match it within 5 SE."""
    g = torch.Generator().manual_seed(2)
    steps, rank = 12, 4
    u = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    a = torch.randn(steps, generator=g, dtype=F64)
    xs = torch.tensor([0.5, 1.0, -1.0], dtype=F64) + a[:, None] * u + 0.1 * torch.randn(steps, 3, generator=g,
                                                                                         dtype=F64)
    moments = running_moments(max_rank=rank)
    state = moments.init({"p": xs[0]})
    for x in xs:
        state, _ = moments.update(state, {"p": x}, inplace=True)
    running_means = xs.cumsum(0) / torch.arange(1, steps + 1, dtype=F64)[:, None]
    d = (xs - running_means)[-rank:].T  # (3, K): the deviation matrix from the raw trace
    cov = torch.diag(xs.var(0, correction=0)) / 2 + d @ d.T / (2 * (rank - 1))
    draws = sample(state, g, 200_000)["p"]
    assert draws.shape == (200_000, 3)
    _sample_covariance_check(draws, xs.mean(0), cov)
    corr = cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt()
    assert corr < -0.5  # the low-rank term carries the direction u (negative 0-1 correlation)

    diagonal = running_moments()
    dstate = diagonal.init(xs[0])
    for x in xs:
        dstate, _ = diagonal.update(dstate, x)
    _sample_covariance_check(sample(dstate, g, 200_000), xs.mean(0), torch.diag(xs.var(0, correction=0)))


def test_swag_samples_with_a_chain_dimension_are_independent_across_chains():
    g = torch.Generator().manual_seed(3)
    steps, rank, chains = 10, 3, 2
    xs = torch.randn(steps, chains, 2, generator=g, dtype=F64) * torch.tensor([[1.0], [3.0]], dtype=F64)
    moments = running_moments(max_rank=rank)
    state = moments.init(xs[0])
    for x in xs:
        state, _ = moments.update(state, x, inplace=True)
    draws = sample(state, g, 100_000, chain_dim=True)
    assert draws.shape == (100_000, chains, 2)
    running_means = xs.cumsum(0) / torch.arange(1, steps + 1, dtype=F64).view(-1, 1, 1)
    full = torch.zeros(4, 4, dtype=F64)
    for c in range(chains):
        d = (xs[:, c] - running_means[:, c])[-rank:].T
        full[2 * c: 2 * c + 2, 2 * c: 2 * c + 2] = (torch.diag(xs[:, c].var(0, correction=0)) / 2
                                                    + d @ d.T / (2 * (rank - 1)))
    _sample_covariance_check(draws.reshape(-1, 4), xs.mean(0).reshape(-1), full)  # zero cross-chain blocks


def test_swag_sample_errors():
    moments = running_moments(max_rank=3)
    state = moments.init(torch.zeros(2))
    with pytest.raises(ValueError, match="no updates"):
        sample(state)
    state, _ = moments.update(state, torch.ones(2))
    with pytest.raises(ValueError, match="at least 2 stored deviations"):
        sample(state)
    with pytest.raises(ValueError, match="max_rank"):
        running_moments(max_rank=-1)
    with pytest.raises(ValueError, match="structure"):
        moments.update(state, {"w": torch.ones(2)})


# --------------------------------------------------------------------------- chains stuck at different values


STUCK_METHODS = ("rank", "z_scale", "folded", "split", "identity")


def test_rhat_of_chains_stuck_at_different_values_is_inf():
    """W = 0 < B reads +inf in every method (ArviZ: ~9e15 from round-off); the reported case gave NaN."""
    x = torch.zeros(4, 200)
    x[2:] = 1
    assert rhat(x).item() == math.inf  # was NaN: max(inf, NaN of the constant fold)
    assert rhat(x.double()).item() == math.inf and rhat(x.double()).dtype == F64
    for method in ("rank", "z_scale", "split", "identity"):
        assert rhat(x, method).item() == math.inf, method
    assert math.isnan(rhat(x, "folded").item())  # |θ − 1/2| = 1/2 everywhere: the folded draws are constant
    uneven = torch.tensor([0.0, 0.0, 1.0, 3.0], dtype=F64).view(4, 1).expand(4, 200)  # folds 1/2, 1/2, 1/2, 5/2
    for method in STUCK_METHODS:
        assert rhat(uneven, method).item() == math.inf, method
    odd = torch.tensor([0.1, 0.3, 0.3], dtype=torch.float32).view(3, 1).expand(3, 1001)  # no exact round-off
    for method in STUCK_METHODS:
        assert rhat(odd, method).item() == math.inf, method
    one = torch.cat([torch.zeros(1, 100), torch.ones(1, 100)], dim=1)  # one chain, its halves stuck apart
    assert rhat(one).item() == math.inf and rhat(one, "split").item() == math.inf


def test_rhat_stuck_constant_and_mixed_parameters_in_one_leaf():
    """Per parameter: mixed -> finite ≈ 1, stuck apart -> inf, constant -> NaN, one stuck chain among moving
    ones -> finite and large (W > 0), non-finite draw -> NaN; trees and chunks do not change it."""
    x = ar1(4, 200, 7, 0.3, seed=21)
    x[:1, :, 1], x[1:, :, 1] = -1.0, 2.0  # stuck apart (1 : 3, so not symmetric about the median for 'folded')
    x[..., 2] = 5.0  # constant
    x[0, :, 3] = 7.0  # one chain stuck far away, the others move
    x[:, :, 4] = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=F64).view(4, 1)  # four chains at four values
    x[1, 3, 5] = math.inf  # non-finite
    x[:2, :, 6], x[2:, :, 6] = 0.0, 1.0  # stuck 2 : 2 — 'folded' alone is NaN here, 'rank' must stay inf
    for method in STUCK_METHODS:
        r = rhat(x, method)
        assert r[1] == math.inf and r[4] == math.inf, (method, r)
        assert math.isnan(r[2]) and math.isnan(r[5]), (method, r)
        assert torch.isfinite(r[[0, 3]]).all() and r[3] > 1.1, (method, r)
    r = rhat(x)
    assert abs(r[0].item() - 1) < 0.05 and r[6] == math.inf and math.isnan(rhat(x, "folded")[6])
    torch.testing.assert_close(rhat({"a": {"b": x}}, chunk_size=2)["a"]["b"], r, rtol=0, atol=0, equal_nan=True)


def test_rhat_rank_takes_the_fmax_of_bulk_and_tail():
    """'rank' = fmax(z_scale, folded): equal to the larger where both are numbers, inf where one is inf and the
    other NaN, NaN only where both are NaN."""
    x = ar1(4, 100, 4, 0.5, seed=4)
    x[0, :, 1] += 4.0
    x[:2, :, 2], x[2:, :, 2] = 0.0, 1.0  # bulk inf, tail NaN
    x[..., 3] = 1.0  # both NaN
    bulk, tail, rank = rhat(x, "z_scale"), rhat(x, "folded"), rhat(x)
    assert rank[0] == max(bulk[0], tail[0]) and rank[1] == max(bulk[1], tail[1])
    assert bulk[2] == math.inf and math.isnan(tail[2]) and rank[2] == math.inf
    assert math.isnan(bulk[3]) and math.isnan(tail[3]) and math.isnan(rank[3])


def test_ess_of_chains_stuck_at_different_values():
    """ρ̂_t = 1 at every lag (acov = 0 = W, V̂⁺ = Var of the chain means): τ̂ = 4⌊(n − 3)/2⌋ after splitting,
    so ESS = S / τ̂ ≈ the number of chains; a constant parameter keeps ESS = S."""
    x = torch.zeros(4, 200, dtype=F64)
    x[2:] = 1
    for method in ("bulk", "tail", "mean"):
        assert ess(x, method).item() == pytest.approx(800 / (4 * ((100 - 3) // 2)), rel=1e-12), method
    a = np.zeros((4, 200))
    a[2:] = 1
    assert ess(x).item() == pytest.approx(_ref_ess(_ref_z_scale(_ref_split(a))), rel=1e-12)  # the loop agrees
    assert ess(torch.ones(4, 200, dtype=F64)).item() == 800


def test_summary_flags_inf_and_nan_rhat():
    """Stuck (inf) and constant / non-finite (NaN) parameters count in frac_rhat_above; rhat_max is inf; the
    quantiles over the remaining values keep inf (torch.nanquantile would give NaN) and skip the NaNs."""
    x = torch.zeros(4, 200)
    x[2:] = 1
    row = summary(x)["params"]
    assert row["rhat_max"] == math.inf and row["frac_rhat_above"] == 1.0 and row["rhat_nan"] == 0
    assert row["rhat_q50"] == math.inf
    mixed = ar1(4, 200, 10, 0.0, seed=8)
    mixed[:2, :, 0], mixed[2:, :, 0] = 0.0, 1.0  # inf
    mixed[..., 1] = 3.0  # NaN
    mixed[2, 5, 2] = math.nan  # NaN
    row = summary({"w": mixed}, quantiles=(0.0, 0.5, 1.0))["w"]
    r = rhat(mixed)
    assert row["rhat_nan"] == 2 and row["frac_rhat_above"] == pytest.approx(3 / 10)
    assert row["rhat_max"] == math.inf and row["rhat_q100"] == math.inf
    assert row["rhat_q00"] == pytest.approx(r[3:].min().item(), rel=1e-12)
    finite = r[3:].sort().values  # 7 finite values below the inf: the median of the 8 is the mean of the 4th, 5th
    assert row["rhat_q50"] == pytest.approx(((finite[3] + finite[4]) / 2).item(), rel=1e-12)
    assert "inf" in format_summary({"w": row})
