"""Temperature scaling of VI and Laplace against conjugate Gaussian models in closed form.

A Gaussian posterior :math:`p = N(m, P^{-1})` tempered by T is :math:`p_T \\propto p^{1/T} = N(m, T P^{-1})`:
the mean stays, the covariance scales by T.

* VI minimises :math:`\\mathrm{NELBO}_T(q) = \\mathbb E_q[-\\log p + T \\log q] = T\\,\\mathrm{KL}(q \\| p_T) +`
  const. When the family contains :math:`p_T` (dense always; diagonal when P is diagonal) the optimum is
  :math:`q = p_T` exactly, and there every draw's NELBO term is the same constant
  :math:`-\\log p(m) - \\tfrac T2 \\log\\det(2π T P^{-1})` (the quadratic forms of :math:`\\log p` and
  :math:`T \\log q` cancel) and every STL gradient is zero, so SGD contracts onto the optimum itself:
  float64 rounding is the only error left, and the tolerances are rounding-sized.
* Laplace states hold the untempered precision P (posteriors' Laplace has no temperature; ours does
  not temper the state either); ``sample(..., temperature=T)`` draws :math:`N(μ, T P^{-1})`. Checked by
  Monte-Carlo with a fixed seed and tolerances from the sampling distribution of the moments, and a
  check that a 10 % error in the scale (or √T instead of T) is far outside them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchopt

from bayesflow import vi
from bayesflow.laplace import dense_hessian, diag_fisher, diag_ggn
from bayesflow.tree import flatten
from bayesflow.utils import L_from_flat

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems: one thread avoids OpenMP hand-offs on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- conjugate models ----------------------------------------------------------------------------

def independent_model():
    """y_ij ~ N(θ_j, s_j²), i = 1..4, prior θ_j ~ N(0, 1): posterior N(m, diag(P)⁻¹) with
    P_j = 4/s_j² + 1 and m_j = (Σ_i y_ij / s_j²) / P_j. Params {"a": θ[:2], "b": θ[2:]}."""
    g = torch.Generator().manual_seed(0)
    s2 = torch.tensor([1.0, 2.0, 4.0], dtype=DTYPE)
    y = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE) + s2.sqrt() * torch.randn(4, 3, generator=g, dtype=DTYPE)
    precision = 4 / s2 + 1.0
    mean = (y / s2).sum(0) / precision

    def forward(params, batch):  # the model's output for every datum: θ, broadcast over the 4 rows
        theta = torch.cat([params["a"], params["b"]])
        return theta.repeat(4, 1), torch.tensor([])

    def outer_log_likelihood(z, batch):
        return -0.5 * (((y - z) ** 2) / s2).sum()

    def log_posterior(params, batch):
        theta = torch.cat([params["a"], params["b"]])
        return outer_log_likelihood(forward(params, batch)[0], batch) - 0.5 * (theta @ theta), None

    return log_posterior, forward, outer_log_likelihood, precision, mean


def correlated_model():
    """y_i ~ N(θ, C), i = 1..5, with a correlated C, prior θ ~ N(0, I): posterior N(m, P⁻¹) with
    P = 5 C⁻¹ + I and m = P⁻¹ C⁻¹ Σ_i y_i (correlations 0.4–0.6, far from diagonal)."""
    g = torch.Generator().manual_seed(1)
    C = torch.tensor([[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 2.0]], dtype=DTYPE)
    C_inv = torch.linalg.inv(C)
    y = torch.tensor([1.0, -0.5, 0.3], dtype=DTYPE) + torch.randn(5, 3, generator=g, dtype=DTYPE) @ \
        torch.linalg.cholesky(C).T
    precision = 5 * C_inv + torch.eye(3, dtype=DTYPE)
    mean = torch.linalg.solve(precision, C_inv @ y.sum(0))

    def log_posterior(params, batch):
        theta = torch.cat([params["a"], params["b"]])
        r = y - theta
        return -0.5 * ((r @ C_inv) * r).sum() - 0.5 * (theta @ theta), torch.tensor([])

    return log_posterior, precision, mean


def ravel(tree) -> torch.Tensor:
    return torch.cat([tree["a"].reshape(-1), tree["b"].reshape(-1)])


def start():
    return {"a": torch.zeros(2, dtype=DTYPE), "b": torch.zeros(1, dtype=DTYPE)}


# ----- VI ---------------------------------------------------------------------------------------------

TEMPERATURES = [0.25, 1.0, 4.0]


def _lr(temperature: float, precision_max: float) -> float:
    """Diagonal VI's SGD step: near the optimum the mean contracts at 1 - lr·P_j (stable below 2/P_j)
    and log σ_j at 1 - 2·lr·T (the NELBO's curvature in s_j is 2P_jσ_j² = 2T; stable below 1/T): half
    of the tighter limit."""
    return 0.5 / max(precision_max, 2 * temperature)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_diag_vi_converges_to_the_tempered_posterior(temperature):
    """μ = m and σ² = T/P_j (the tempered posterior; P diagonal, so the mean-field family contains it),
    and the reported NELBO is the closed-form optimum, all to float64 rounding after the contraction
    (its slowest rate (1 - lr·min(P_min, 2T))^steps is below 1e-12 here)."""
    log_posterior, _, _, precision, mean = independent_model()
    lr = _lr(temperature, float(precision.max()))
    transform = vi.diag.build(log_posterior, torchopt.sgd(lr=lr), temperature=temperature)
    state = transform.init(start(), init_log_sds=-1.0, seed=0)
    steps = math.ceil(30 / (lr * min(float(precision.min()), 2 * temperature)))
    for _ in range(steps):
        state, _ = transform.update(state, None, inplace=True)
    variance = ravel(state.log_sd_diag).mul(2).exp()
    tempered = temperature / precision
    assert torch.allclose(ravel(state.params), mean, rtol=0, atol=1e-9)
    assert torch.allclose(variance, tempered, rtol=1e-8, atol=0), (variance, tempered)
    if temperature != 1.0:  # the untempered posterior's variance is a factor T away
        assert not torch.allclose(variance, 1 / precision, rtol=0.1, atol=0)
    assert _tempered_nelbo_ok(state, log_posterior, mean, torch.diag(tempered), temperature)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dense_vi_converges_to_the_tempered_posterior(temperature):
    """μ = m and L Lᵀ = T·P⁻¹ for a correlated posterior, and the reported NELBO is the closed-form
    optimum, to float64 rounding. In L the NELBO's curvature at the optimum is that of P (λ) plus
    T/σ² along the same direction (again λ): SGD at lr = 0.5/λ_max contracts at ≤ 1 - 0.5·λ_min/λ_max
    ≈ 0.89 per step whatever T, ≈ e⁻¹¹⁰ over 1000 steps once the multiplicative gradient noise has
    died down (observed: ≤ 5e-11 from step 750 on)."""
    log_posterior, precision, mean = correlated_model()
    lr = 0.5 / float(torch.linalg.eigvalsh(precision).max())
    transform = vi.dense.build(log_posterior, torchopt.sgd(lr=lr), temperature=temperature)
    state = transform.init(start(), init_L=1.0, seed=0)
    for _ in range(1000):
        state, _ = transform.update(state, None, inplace=True)
    L = L_from_flat(state.L_factor)
    tempered = temperature * torch.linalg.inv(precision)
    assert torch.allclose(ravel(state.params), mean, rtol=0, atol=1e-9)
    assert torch.allclose(L @ L.T, tempered, rtol=0, atol=1e-9), (L @ L.T, tempered)
    if temperature != 1.0:
        assert (L @ L.T - torch.linalg.inv(precision)).abs().max() > 0.1
    assert _tempered_nelbo_ok(state, log_posterior, mean, tempered, temperature)


def _tempered_nelbo_ok(state, log_posterior, mean, cov, temperature) -> bool:
    """The state's NELBO (of its last draw) equals -log p(m) - (T/2) log det(2π·T P⁻¹) to rounding, and
    would not at the untempered covariance (a NELBO that ignored T in its log q term)."""
    log_p_mode = float(log_posterior({"a": mean[:2], "b": mean[2:]}, None)[0])
    expected = -log_p_mode - 0.5 * temperature * float(torch.logdet(2 * math.pi * cov))
    untempered = -log_p_mode - 0.5 * float(torch.logdet(2 * math.pi * cov))
    assert temperature == 1.0 or abs(expected - untempered) > 0.1
    return abs(float(state.nelbo) - expected) < 1e-8


# ----- Laplace ------------------------------------------------------------------------------------------

DRAWS = 20000
# With n draws of N(μ, Σ): the sample mean has standard error sqrt(Σ_ii / n) and the sample covariance
# entry S_ij (Wishart) sqrt((Σ_ii Σ_jj + Σ_ij²) / n) to O(1/n). Each standardised error is ~N(0, 1):
# |z| > 5 has probability 6e-7 per entry (a dozen entries per test, and a fixed seed). A covariance
# off by 10 % moves a diagonal z by 0.1·sqrt(n/2) = 10: the wrong scales tried below land at |z| ≥ 5.
Z_MAX = 5.0


def diag_state():
    """The diagonal GGN Laplace state of the independent model (prior precision 1): p = P exactly."""
    _, forward, outer_log_likelihood, precision, mean = independent_model()
    transform = diag_ggn.build(forward, outer_log_likelihood, init_prec_diag=1.0)
    state, _ = transform.update(transform.init({"a": mean[:2].clone(), "b": mean[2:].clone()}), None)
    return state, precision, mean


def dense_state():
    """The Hessian Laplace state of the correlated model: P exactly (the log posterior is quadratic)."""
    log_posterior, precision, mean = correlated_model()
    transform = dense_hessian.build(log_posterior)
    state, _ = transform.update(transform.init({"a": mean[:2].clone(), "b": mean[2:].clone()}), None)
    return state, precision, mean


def stacked(draws) -> torch.Tensor:
    """A tree of draws with leaves (n, *leaf.shape) as one (n, d) matrix, leaves in order."""
    leaves, _ = flatten(draws)
    return torch.cat([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], dim=1)


def z_scores(draws: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised errors of the sample mean and of the upper triangle of the sample covariance."""
    n = draws.shape[0]
    z_mean = (draws.mean(0) - mean) / (cov.diagonal() / n).sqrt()
    sample_cov = torch.cov(draws.T)
    se = ((torch.outer(cov.diagonal(), cov.diagonal()) + cov**2) / n).sqrt()
    rows, cols = torch.triu_indices(*cov.shape)
    return z_mean, ((sample_cov - cov) / se)[rows, cols]


CASES = {"diag": (diag_state, diag_fisher.sample), "dense": (dense_state, dense_hessian.sample)}


@pytest.mark.parametrize("kind", list(CASES))
def test_laplace_state_holds_the_untempered_precision(kind):
    """The state is not tempered (as posteriors' Laplace has no temperature): it holds P itself."""
    make, _ = CASES[kind]
    state, precision, _ = make()
    held = ravel(state.prec_diag) if kind == "diag" else state.prec
    assert torch.allclose(held, precision, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("temperature", [0.25, 4.0])
def test_laplace_draws_have_covariance_T_times_the_inverse_precision(kind, temperature):
    """Draws at T: mean μ and covariance T·P⁻¹ within Z_MAX standard errors; the untempered P⁻¹, √T·P⁻¹
    (a draw scaled by T instead of √T would give T²·P⁻¹, further still) and 1.1·T·P⁻¹ are not."""
    make, sample = CASES[kind]
    state, precision, mean = make()
    generator = torch.Generator().manual_seed(2)
    draws = stacked(sample(state, (DRAWS,), generator=generator, temperature=temperature))
    inverse = torch.diag(1 / precision) if kind == "diag" else torch.linalg.inv(precision)
    z_mean, z_cov = z_scores(draws, mean, temperature * inverse)
    assert z_mean.abs().max() < Z_MAX, z_mean
    assert z_cov.abs().max() < Z_MAX, z_cov
    for wrong in (1.0, math.sqrt(temperature), 1.1 * temperature):
        assert z_scores(draws, mean, wrong * inverse)[1].abs().max() > Z_MAX, wrong



@pytest.mark.parametrize("kind", list(CASES))
def test_laplace_draws_scale_by_the_root_of_T_on_the_same_noise(kind):
    """Exactly (to float64 rounding): with the same generator seed the noise is the same, so the draws at
    T are μ + √T (θ₁ - μ) with θ₁ the draws at T = 1; T = 1 is the default and draws as before."""
    make, sample = CASES[kind]
    state, _, mean = make()

    def draws(**kwargs):
        return stacked(sample(state, (50,), generator=torch.Generator().manual_seed(3), **kwargs))

    ones = draws()
    assert torch.equal(draws(temperature=1.0), ones)
    assert torch.equal(draws(temperature=torch.tensor(1.0)), ones)
    for temperature in (0.01, 0.25, 9.0):
        scaled = mean + math.sqrt(temperature) * (ones - mean)
        assert torch.allclose(draws(temperature=temperature), scaled, rtol=1e-12, atol=1e-12), temperature
    assert not torch.allclose(draws(temperature=9.0), mean + 9.0 * (ones - mean), atol=1e-3)  # T, not √T


@pytest.mark.parametrize("kind", list(CASES))
def test_laplace_at_zero_temperature_returns_the_mean_without_drawing(kind):
    """T = 0: every draw is μ (the mode), as new tensors shaped sample_shape + leaf.shape, and the
    generator is not advanced."""
    make, sample = CASES[kind]
    state, _, mean = make()
    generator = torch.Generator().manual_seed(4)
    before = generator.get_state()
    out = sample(state, (2, 5), generator=generator, temperature=0.0)
    assert torch.equal(generator.get_state(), before)
    assert out["a"].shape == (2, 5, 2) and out["b"].shape == (2, 5, 1)
    assert torch.equal(out["a"], mean[:2].expand(2, 5, 2)) and torch.equal(out["b"], mean[2:].expand(2, 5, 1))
    out["a"].add_(1.0)  # writable and not the state's memory
    assert torch.equal(state.params["a"], mean[:2])


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize(("temperature", "error"), [(-0.5, ValueError), (math.nan, ValueError),
                                                     (math.inf, ValueError), ("hot", TypeError),
                                                     (True, TypeError), (None, TypeError)])
def test_laplace_rejects_bad_temperatures(kind, temperature, error):
    make, sample = CASES[kind]
    state, _, _ = make()
    with pytest.raises(error, match="temperature"):
        sample(state, (3,), temperature=temperature)
