"""Linearised and Monte Carlo predictives of Laplace states, against exact references in float64.

linearized_forward_dense against J Σ Jᵀ from explicit per-datum Jacobians (and the fallbacks for forwards
that mix data or cannot be vmapped); the GLM predictive of a linear-Gaussian model against Bayesian linear
regression's exact predictive; the probit formula, and its error against 1-D quadrature within the bound
2 sup|σ(x) - Φ(√(π/8) x)|; Monte Carlo estimates within 4.5 standard errors of quadrature or closed forms
(each with a check that the tolerance separates the right answer from a plausible wrong one); chunking
reproducing the laplace sample functions' draws; shapes; bad inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.func import functional_call

from bayesflow.laplace import DenseLaplaceState, DiagLaplaceState, dense_ggn, kfac
from bayesflow.laplace.predictive import glm_predictive, mc_predictive, predictive_samples
from bayesflow.laplace.sampling import dense_sample, diag_sample
from bayesflow.tree import flatten, ravel, unraveller
from bayesflow.utils import linearized as linearized_module
from bayesflow.utils.linearized import linearized_forward_dense, linearized_forward_diag

F64 = torch.float64
CLOSE = {"rtol": 1e-10, "atol": 1e-10}
Z = 4.5  # Monte Carlo tolerance in standard errors: two-sided tail 7e-6 per check


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def mlp(params, x):
    return torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"], {"x": x}


MLP_PARAMS = {"w1": rand(3, 4, seed=1), "b1": rand(4, seed=2), "w2": rand(4, 2, seed=3)}  # d = 24


def ravelled(params):
    leaves, spec = flatten(params)
    return ravel(leaves), unraveller(leaves, spec)


def per_datum_jacobians(forward, params, x):
    """(B, out, d): the Jacobian of f(x_b | θ) for each datum on its own."""
    flat, unravel = ravelled(params)
    return torch.stack([jacobian(lambda t, b=b: forward(unravel(t), x[b:b + 1])[0][0], flat) for b in range(len(x))])


def whole_batch_jacobian(forward, params, x):
    flat, unravel = ravelled(params)
    return jacobian(lambda t: forward(unravel(t), x)[0], flat)  # (B, out, d)


def random_cov(d: int, seed: int) -> torch.Tensor:
    a = rand(d, d, seed=seed)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)


# --------------------------------------------------------------------------- linearized_forward_dense


def test_linearized_forward_dense_is_j_sigma_jt_per_datum():
    x = rand(5, 3, seed=4)
    cov = random_cov(24, seed=5)
    mean, chol, aux = linearized_forward_dense(mlp, MLP_PARAMS, x, cov)
    jac = per_datum_jacobians(mlp, MLP_PARAMS, x)
    torch.testing.assert_close(chol @ chol.mT, jac @ cov @ jac.mT, **CLOSE)
    assert torch.equal(chol, torch.tril(chol)) and chol.shape == (5, 2, 2)
    torch.testing.assert_close(mean, mlp(MLP_PARAMS, x)[0], **CLOSE)
    assert aux["x"] is x
    # a diagonal Σ gives posteriors' linearized_forward_diag
    sd = {name: rand(*p.shape, seed=6 + i).abs() for i, (name, p) in enumerate(MLP_PARAMS.items())}
    _, chol_diag, _ = linearized_forward_diag(mlp, MLP_PARAMS, x, sd)
    _, chol_dense, _ = linearized_forward_dense(mlp, MLP_PARAMS, x, torch.diag(ravelled(sd)[0] ** 2))
    torch.testing.assert_close(chol_dense, chol_diag, **CLOSE)


def _spy_on_paths(monkeypatch):
    """Records whether the whole-batch jacrev (posteriors' way, the fallback) was taken."""
    calls = []
    original = linearized_module.jacrev

    def spy(fn, *args, **kwargs):
        calls.append(getattr(fn, "__name__", ""))
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(linearized_module, "jacrev", spy)
    return calls


def test_the_jacobian_is_per_datum_for_independent_data(monkeypatch):
    calls = _spy_on_paths(monkeypatch)
    x = rand(4, 3, seed=7)
    linearized_forward_dense(mlp, MLP_PARAMS, x, random_cov(24, seed=8))
    assert calls == ["output"]  # the per-datum jacrev only, inside vmap


def centred_mlp(params, x):  # mixes the data: every output depends on the whole batch
    hidden = torch.tanh(x @ params["w1"] + params["b1"])
    return (hidden - hidden.mean(0)) @ params["w2"], torch.tensor([])


def item_mlp(params, x):  # a host sync vmap cannot trace
    scale = 1.0 if float(x.abs().sum()) > -1.0 else 2.0
    return scale * mlp(params, x)[0], torch.tensor([])


@pytest.mark.parametrize("forward", [centred_mlp, item_mlp], ids=["mixes-data", "not-vmappable"])
def test_forwards_the_per_datum_path_cannot_take_fall_back_to_the_whole_batch(forward, monkeypatch):
    calls = _spy_on_paths(monkeypatch)
    x = rand(4, 3, seed=9)
    cov = random_cov(24, seed=10)
    _, chol, _ = linearized_forward_dense(forward, MLP_PARAMS, x, cov)
    jac = whole_batch_jacobian(forward, MLP_PARAMS, x)
    torch.testing.assert_close(chol @ chol.mT, jac @ cov @ jac.mT, **CLOSE)
    assert calls[-1] == forward.__name__
    if forward is centred_mlp:  # the check matters: the per-datum Jacobian is another (wrong) one here
        assert (per_datum_jacobians(forward, MLP_PARAMS, x) - jac).abs().max() > 0.1


def test_a_batch_without_a_data_axis_is_passed_whole():
    x = rand(3, 3, seed=11)
    forward = lambda p, batch: mlp(p, batch["x"] * batch["scale"])  # noqa: E731
    batch = {"x": x, "scale": torch.tensor(2.0, dtype=F64)}  # a 0-d leaf
    cov = random_cov(24, seed=12)
    _, chol, _ = linearized_forward_dense(forward, MLP_PARAMS, batch, cov)
    jac = per_datum_jacobians(mlp, MLP_PARAMS, 2 * x)
    torch.testing.assert_close(chol @ chol.mT, jac @ cov @ jac.mT, **CLOSE)


# --------------------------------------------------------------------------- the linear-Gaussian model


def linear(params, x):
    return x @ params["w"] + params["b"], torch.tensor([])


def bayesian_linear_regression(out: int = 2, n: int = 20, prior: float = 2.0, noise: float = 0.25):
    """A Laplace state of the exact posterior (the GGN of a Gaussian likelihood is its Hessian) and the
    closed form: Φ_n the (out, d) design of datum n, P = αI + Σ Φ_nᵀΦ_n / σ², μ = P⁻¹ Σ Φ_nᵀ y_n / σ²."""
    x, y = rand(n, 3, seed=13), rand(n, out, seed=14)
    params = {"w": torch.zeros(3, out, dtype=F64), "b": torch.zeros(out, dtype=F64)}
    design = per_datum_jacobians(linear, params, x)  # (n, out, d): constant in θ
    prec = prior * torch.eye(design.shape[-1], dtype=F64) + torch.einsum("noi,noj->ij", design, design) / noise
    mu = torch.linalg.solve(prec, torch.einsum("noi,no->i", design, y) / noise)
    params = ravelled(params)[1](mu)
    loglik = lambda z, batch: -0.5 * ((batch[1] - z) ** 2).sum() / noise  # noqa: E731
    transform = dense_ggn.build(lambda p, batch: linear(p, batch[0]), loglik, init_prec=prior)
    state, _ = transform.update(transform.init(params), (x, y))
    torch.testing.assert_close(state.prec, prec, **CLOSE)
    return state, prec, noise


def test_the_glm_predictive_of_a_linear_gaussian_model_is_the_exact_predictive():
    state, prec, noise = bayesian_linear_regression()
    x_test = rand(6, 3, seed=15)
    phi = per_datum_jacobians(linear, state.params, x_test)  # (6, 2, d)
    mean, cov = glm_predictive(state, linear, x_test, "regression", noise_var=noise)
    exact_mean = phi @ ravelled(state.params)[0]
    exact_cov = phi @ torch.linalg.inv(prec) @ phi.mT + noise * torch.eye(2, dtype=F64)
    torch.testing.assert_close(mean, exact_mean, **CLOSE)
    torch.testing.assert_close(cov, exact_cov, **CLOSE)
    noise_per_output = torch.tensor([0.1, 0.3], dtype=F64)
    _, cov2 = glm_predictive(state, linear, x_test, "regression", noise_var=noise_per_output)
    torch.testing.assert_close(cov2 - cov, torch.diag(noise_per_output - noise).expand(6, 2, 2), **CLOSE)


def test_mc_predictive_of_a_linear_gaussian_model_is_within_monte_carlo_error():
    state, prec, noise = bayesian_linear_regression()
    x_test = rand(5, 3, seed=16)
    phi = per_datum_jacobians(linear, state.params, x_test)
    exact_mean = phi @ ravelled(state.params)[0]
    f_cov = phi @ torch.linalg.inv(prec) @ phi.mT  # of the model output
    n = 20000
    mean, cov = mc_predictive(state, linear, x_test, "regression", n, noise_var=noise, generator=gen(17),
                              chunk_size=4096)
    var = torch.diagonal(f_cov, dim1=-2, dim2=-1)
    mean_se = (var / n).sqrt()  # sd of the mean of n Gaussian draws
    cov_se = ((f_cov**2 + var.unsqueeze(-1) * var.unsqueeze(-2)) / (n - 1)).sqrt()  # of a sample covariance
    assert ((mean - exact_mean).abs() <= Z * mean_se).all()
    assert ((cov - noise * torch.eye(2, dtype=F64) - f_cov).abs() <= Z * cov_se).all()
    assert (Z * cov_se.diagonal(dim1=-2, dim2=-1) < 0.1 * var).all()  # a 10 % error in the variance fails


# --------------------------------------------------------------------------- the probit approximation


def sigmoid_gaussian_moments(m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E σ(f) and Var σ(f), f ~ N(m, v), by the trapezoid rule on ±12 sd (error ≪ 1e-9)."""
    u = torch.linspace(-12, 12, 24001, dtype=F64)
    weights = torch.exp(-0.5 * u**2) / math.sqrt(2 * math.pi)
    s = torch.sigmoid(m.unsqueeze(-1) + v.sqrt().unsqueeze(-1) * u)
    first = torch.trapezoid(s * weights, u)
    return first, torch.trapezoid(s**2 * weights, u) - first**2


def binary_state(prec: float) -> DiagLaplaceState:
    """f(x) = x w, w ~ N(0.7, 1/prec): m = 0.7 x, v = x² / prec."""
    return DiagLaplaceState(torch.full((1, 1), 0.7, dtype=F64), torch.full((1, 1), prec, dtype=F64))


X_BINARY = torch.tensor([[-4.0], [-1.0], [0.5], [2.0], [6.0]], dtype=F64)


def test_binary_probit_is_mackays_formula_within_its_bound_of_the_exact_integral():
    state = binary_state(prec=0.2)
    m, v = 0.7 * X_BINARY.squeeze(1), X_BINARY.squeeze(1) ** 2 / 0.2
    probs = glm_predictive(state, linear_w, X_BINARY, "classification")
    torch.testing.assert_close(probs.squeeze(1), torch.sigmoid(m / torch.sqrt(1 + math.pi / 8 * v)), **CLOSE)
    exact, _ = sigmoid_gaussian_moments(m, v)
    grid = torch.linspace(-20, 20, 400001, dtype=F64)
    standard_normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    delta = float((torch.sigmoid(grid) - standard_normal.cdf(math.sqrt(math.pi / 8) * grid)).abs().max())
    assert 0.015 < delta < 0.02
    assert ((probs.squeeze(1) - exact).abs() <= 2 * delta).all()
    assert (torch.sigmoid(m) - exact).abs().max() > 2 * delta  # the plug-in σ(m) is outside the bound


def linear_w(w, x):
    return x @ w, torch.tensor([])


def test_multiclass_probit_is_the_softmax_of_scaled_logits():
    x = rand(4, 3, seed=18)
    params = rand(3, 3, seed=19)
    prec = rand(3, 3, seed=20).abs() + 0.5
    probs = glm_predictive(DiagLaplaceState(params, prec), linear_w, x, "classification")
    # f_k = x · w_k: C = diag over classes, C_kk = Σ_i x_i² / p_ik
    variances = (x**2) @ (1 / prec)
    torch.testing.assert_close(probs, torch.softmax(x @ params / torch.sqrt(1 + math.pi / 8 * variances), -1),
                               **CLOSE)


def test_glm_monte_carlo_approaches_the_exact_integral():
    state = binary_state(prec=0.2)
    m, v = 0.7 * X_BINARY.squeeze(1), X_BINARY.squeeze(1) ** 2 / 0.2
    exact, variance = sigmoid_gaussian_moments(m, v)
    n = 40000
    probs = glm_predictive(state, linear_w, X_BINARY, "classification", "mc", n_samples=n, generator=gen(21))
    tolerance = Z * (variance / n).sqrt()
    assert ((probs.squeeze(1) - exact).abs() <= tolerance).all()
    assert ((torch.sigmoid(m) - exact).abs() > 5 * tolerance).sum() >= 3  # the plug-in would fail


def test_glm_and_parameter_monte_carlo_agree_for_a_linear_model():
    # f = x W is exactly Gaussian under the Laplace posterior, so both estimate the same E[softmax f]
    x = torch.tensor([[1.0, 0.5], [-0.5, 2.0], [0.0, 0.0]], dtype=F64)
    params = torch.tensor([[1.0, 0.0, -1.0], [0.5, -0.5, 0.0]], dtype=F64)
    cov = random_cov(6, seed=22) * 4
    state = DenseLaplaceState(params, torch.linalg.inv(cov))
    n = 40000
    glm = glm_predictive(state, linear_w, x, "classification", "mc", n_samples=n, generator=gen(23))
    nn = mc_predictive(state, linear_w, x, "classification", n, generator=gen(24), chunk_size=8192)
    tolerance = Z * 0.5 * math.sqrt(2 / n)  # sd of a probability ≤ 1/2
    assert (glm - nn).abs().max() <= tolerance
    plug_in = torch.softmax(x @ params, -1)
    assert (nn - plug_in)[:2].abs().max() > 5 * tolerance
    torch.testing.assert_close(nn[2], torch.full((3,), 1 / 3, dtype=F64), **CLOSE)  # x = 0: f = 0 exactly


def test_mc_predictive_binary_is_within_monte_carlo_error_of_the_exact_integral():
    state = binary_state(prec=0.2)
    m, v = 0.7 * X_BINARY.squeeze(1), X_BINARY.squeeze(1) ** 2 / 0.2
    exact, variance = sigmoid_gaussian_moments(m, v)
    n = 40000
    probs = mc_predictive(state, linear_w, X_BINARY, "classification", n, generator=gen(25), chunk_size=8192)
    tolerance = Z * (variance / n).sqrt()
    assert ((probs.squeeze(1) - exact).abs() <= tolerance).all()
    assert ((torch.sigmoid(m) - exact).abs() > 5 * tolerance).sum() >= 3


# --------------------------------------------------------------------------- diagonal and KFAC states


def test_the_glm_covariance_of_a_diagonal_state_is_j_diag_inverse_p_jt():
    x = rand(4, 3, seed=26)
    prec = {name: rand(*p.shape, seed=27 + i).abs() + 0.2 for i, (name, p) in enumerate(MLP_PARAMS.items())}
    _, cov = glm_predictive(DiagLaplaceState(MLP_PARAMS, prec), mlp, x, "regression")
    jac = per_datum_jacobians(mlp, MLP_PARAMS, x)
    torch.testing.assert_close(cov, jac @ torch.diag(1 / ravelled(prec)[0]) @ jac.mT, **CLOSE)


def kfac_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    loglik = lambda logits, batch: -torch.nn.functional.cross_entropy(logits, batch[1], reduction="sum")  # noqa: E731
    transform = kfac.build(model, loglik, prior_prec=0.5)
    state, _ = transform.update(transform.init(dict(model.named_parameters())),
                                (rand(16, 3, seed=30), torch.randint(0, 3, (16,), generator=gen(31))))

    def forward(params, x):
        return functional_call(model, params, (x,)), torch.tensor([])

    return state, forward


def test_the_glm_covariance_of_a_kfac_state_is_j_inverse_p_jt():
    state, forward = kfac_state()
    params = {name: p.detach() for name, p in state.params.items()}
    x = rand(5, 3, seed=32)
    _, cov = glm_predictive(state, forward, x, "regression")
    jac = per_datum_jacobians(forward, params, x)  # every parameter is a Linear layer's: precision_dense's order
    torch.testing.assert_close(cov, jac @ torch.linalg.inv(kfac.precision_dense(state)) @ jac.mT, **CLOSE)
    draws = predictive_samples(state, forward, x, "classification", 6, generator=gen(33))
    assert draws.shape == (6, 5, 3)
    torch.testing.assert_close(draws.sum(-1), torch.ones(6, 5, dtype=F64), **CLOSE)


# --------------------------------------------------------------------------- chunks, draws and shapes


@pytest.mark.parametrize("kind", ["diag", "dense"])
def test_chunks_of_draws_are_the_sample_functions_draws(kind):
    x = rand(3, 3, seed=34)
    if kind == "diag":
        state = DiagLaplaceState(MLP_PARAMS, {k: torch.full_like(p, 4.0) for k, p in MLP_PARAMS.items()})
        sample = diag_sample
    else:
        state = DenseLaplaceState(MLP_PARAMS, torch.linalg.inv(random_cov(24, seed=35)))
        sample = dense_sample
    outputs = predictive_samples(state, mlp, x, "regression", 7, generator=gen(36), chunk_size=3)
    reference_gen, rows = gen(36), []
    for count in (3, 3, 1):
        draws = sample(state, (count,), reference_gen)
        rows += [mlp({k: v[s] for k, v in draws.items()}, x)[0] for s in range(count)]
    reference = torch.stack(rows)
    torch.testing.assert_close(outputs, reference, **CLOSE)
    # the running sums of mc_predictive are the mean and covariance of the same draws
    mean, cov = mc_predictive(state, mlp, x, "regression", 7, generator=gen(36), chunk_size=3)
    torch.testing.assert_close(mean, reference.mean(0), **CLOSE)
    centred = reference - reference.mean(0)
    torch.testing.assert_close(cov, torch.einsum("sbi,sbj->bij", centred, centred) / 6, **CLOSE)
    probs = mc_predictive(state, mlp, x, "classification", 7, generator=gen(36), chunk_size=3)
    torch.testing.assert_close(probs, torch.softmax(reference, -1).mean(0), **CLOSE)


def test_a_forward_that_cannot_be_vmapped_is_looped_over_the_draws():
    state = DiagLaplaceState(MLP_PARAMS, {k: torch.full_like(p, 4.0) for k, p in MLP_PARAMS.items()})
    x = rand(3, 3, seed=37)
    looped = predictive_samples(state, item_mlp, x, "classification", 5, generator=gen(38), chunk_size=2)
    vmapped = predictive_samples(state, mlp, x, "classification", 5, generator=gen(38), chunk_size=2)
    torch.testing.assert_close(looped, vmapped, **CLOSE)


@pytest.mark.parametrize("size", [1, 5])
@pytest.mark.parametrize("out", [1, 3])
def test_shapes_for_single_and_batched_inputs_and_outputs(size, out):
    params = rand(2, out, seed=39)
    state = DiagLaplaceState(params, torch.ones(2, out, dtype=F64))
    x = rand(size, 2, seed=40)
    for probs in (glm_predictive(state, linear_w, x, "classification"),
                  glm_predictive(state, linear_w, x, "classification", "mc", n_samples=10, generator=gen(0)),
                  mc_predictive(state, linear_w, x, "classification", 10, generator=gen(0))):
        assert probs.shape == (size, out)
        assert ((probs > 0) & (probs < 1)).all()
        if out > 1:
            torch.testing.assert_close(probs.sum(-1), torch.ones(size, dtype=F64), **CLOSE)
    for mean, cov in (glm_predictive(state, linear_w, x, "regression"),
                      mc_predictive(state, linear_w, x, "regression", 10, generator=gen(0))):
        assert mean.shape == (size, out) and cov.shape == (size, out, out)
    assert predictive_samples(state, linear_w, x, "regression", 4).shape == (4, size, out)
    assert linearized_forward_dense(linear_w, params, x, torch.eye(2 * out, dtype=F64))[1].shape == (size, out, out)


def test_predictions_carry_no_autograd_history():
    params = rand(2, 3, seed=41).requires_grad_()
    state = DiagLaplaceState(params, torch.ones(2, 3, dtype=F64))
    x = rand(4, 2, seed=42)
    assert not glm_predictive(state, linear_w, x, "classification").requires_grad
    assert not any(t.requires_grad for t in glm_predictive(state, linear_w, x, "regression"))
    assert not mc_predictive(state, linear_w, x, "classification", 3).requires_grad


# --------------------------------------------------------------------------- bad inputs


DIAG = DiagLaplaceState(torch.zeros(2, 1, dtype=F64), torch.ones(2, 1, dtype=F64))
X = torch.ones(3, 2, dtype=F64)
W0 = torch.zeros(2, 1, dtype=F64)

BAD_INPUTS = [
    (lambda: linearized_forward_dense(linear_w, W0, X, torch.eye(3, dtype=F64)), ValueError,
     r"cov of shape \(2, 2\) \(params has 2 entries\), got shape \(3, 3\)"),
    (lambda: linearized_forward_dense(linear_w, W0, X, torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=F64)),
     ValueError, "cov must be positive semi-definite, but has the eigenvalue -1"),
    (lambda: linearized_forward_dense(linear_w, W0, X, torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64)),
     ValueError, "cov must be symmetric"),
    (lambda: linearized_forward_dense(linear_w, W0, X, [[1.0, 0.0], [0.0, 1.0]]), TypeError,
     r"cov to be a \(2, 2\) tensor, got list"),
    (lambda: linearized_forward_dense(linear_w, W0, X, torch.full((2, 2), math.nan, dtype=F64)), ValueError,
     "finite"),
    (lambda: linearized_forward_dense(lambda p, x: (x @ p[:, 0], None), W0, X, torch.eye(2, dtype=F64)),
     ValueError, r"2-dimensional tensor \(batch, out\), got shape \(3,\)"),
    (lambda: glm_predictive(DIAG, linear_w, X, "classificaton"), ValueError,
     "likelihood must be one of 'classification', 'regression'; got 'classificaton'"),
    (lambda: glm_predictive(DIAG, linear_w, X, "classification", "bridge"), ValueError,
     "link_approx must be one of 'probit', 'mc'; got 'bridge'"),
    (lambda: glm_predictive(DIAG, linear_w, X, "regression", noise_var=-1.0), ValueError, "non-negative"),
    (lambda: glm_predictive(DIAG, linear_w, X, "regression", noise_var=torch.ones(2, dtype=F64)), ValueError,
     r"\(1,\) tensor, got shape \(2,\)"),
    (lambda: glm_predictive(DIAG, linear_w, X, "classification", noise_var=0.1), ValueError,
     "classification takes none"),
    (lambda: glm_predictive(DIAG, linear_w, X, "classification", "mc", n_samples=0), ValueError,
     "n_samples must be a positive int, got 0"),
    (lambda: glm_predictive({"params": 1}, linear_w, X, "classification"), TypeError,
     "expected a Laplace state .* got dict"),
    (lambda: glm_predictive(DIAG, lambda p, x: x @ p, X, "classification"), TypeError,
     r"return \(forward_vals, aux\), got Tensor"),
    (lambda: glm_predictive(DiagLaplaceState(W0, W0), linear_w, X, "regression"),
     ValueError, "finite and positive"),
    (lambda: glm_predictive(DenseLaplaceState(W0, torch.zeros(2, 2, dtype=F64)), linear_w, X, "regression"),
     ValueError, "positive definite"),
    (lambda: mc_predictive(DenseLaplaceState(W0, -torch.eye(2, dtype=F64)), linear_w, X, "regression"),
     ValueError, "positive definite"),
    (lambda: glm_predictive(kfac.init(dict(torch.nn.Linear(2, 1).double().named_parameters()),
                                      torch.nn.Linear(2, 1), prior_prec=0.0),
                            lambda p, x: (x @ p["weight"].T + p["bias"], None), X, "regression"),
     ValueError, "Linear layer '' is not positive definite"),
    (lambda: mc_predictive(DIAG, linear_w, X, "regression", 1), ValueError, "n_samples ≥ 2"),
    (lambda: mc_predictive(DIAG, linear_w, X, "classification", 10, chunk_size=0), ValueError,
     "chunk_size must be a positive int"),
    (lambda: predictive_samples(DIAG, linear_w, X, "ordinal"), ValueError, "likelihood must be one of"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_inputs_raise_naming_the_value(call, error, match):
    with pytest.raises(error, match=match):
        call()
