"""Laplace approximations against closed forms: Bayesian linear regression with a Gaussian prior.

The model: y_i = W x_i + b + noise, noise ~ N(0, σ² I₂), x_i ∈ R³, a prior N(0, α⁻¹ I) on the
parameters {"W": (2, 3), "b": (2,)} (d = 8, ravelled in bayesflow's order: W row-major, then b). With
A_i = ∂z_i/∂θ = [I₂ ⊗ x_iᵀ, I₂] the posterior is exactly N(m, S) with

    S⁻¹ = α I + Σ_i A_iᵀ A_i / σ²,    m = S Σ_i A_iᵀ y_i / σ²,

which every reference below is built from by hand (no autograd): the Hessian and GGN Laplace precisions
at m equal S⁻¹, the empirical Fisher equals Σ_i g_i g_iᵀ with g_i = A_iᵀ (y_i − A_i m) / σ².
"""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow.laplace import dense_fisher, dense_ggn, dense_hessian, diag_fisher, diag_ggn
from bayesflow.laplace._common import DenseLaplaceState, DiagLaplaceState

ALPHA, SIGMA, N = 2.0, 0.5, 40
D = 8
ROUNDOFF = dict(rtol=1e-10, atol=1e-10)


def _data():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(N, 1, generator=generator, dtype=torch.float64)
    x = base + 0.3 * torch.randn(N, 3, generator=generator, dtype=torch.float64)  # correlated features
    w_true = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]], dtype=torch.float64)
    y = x @ w_true.T + torch.tensor([0.5, -1.0], dtype=torch.float64)
    y = y + SIGMA * torch.randn(N, 2, generator=generator, dtype=torch.float64)
    return x, y


X, Y = _data()


def _design(x: torch.Tensor) -> torch.Tensor:
    """A_i for every row: (n, 2, 8), columns in the order [W00 W01 W02 W10 W11 W12 b0 b1]."""
    eye = torch.eye(2, dtype=x.dtype)
    return torch.cat([torch.einsum("kl,nj->nklj", eye, x).reshape(len(x), 2, 6), eye.expand(len(x), 2, 2)], dim=2)


A = _design(X)
EXACT_PREC = ALPHA * torch.eye(D, dtype=torch.float64) + torch.einsum("nki,nkj->ij", A, A) / SIGMA**2
EXACT_COV = torch.linalg.inv(EXACT_PREC)
EXACT_MEAN = EXACT_COV @ torch.einsum("nki,nk->i", A, Y) / SIGMA**2
SCORES = torch.einsum("nki,nk->ni", A, Y - torch.einsum("nki,i->nk", A, EXACT_MEAN)) / SIGMA**2
EXACT_FISHER = SCORES.T @ SCORES


def _tree(flat: torch.Tensor) -> dict:
    return {"W": flat[..., :6].reshape(*flat.shape[:-1], 2, 3), "b": flat[..., 6:]}


def _flat(tree: dict) -> torch.Tensor:
    return torch.cat([tree["W"].reshape(*tree["W"].shape[:-2], 6), tree["b"]], dim=-1)


MAP = _tree(EXACT_MEAN)


def forward(params, batch):
    x, _ = batch
    return x @ params["W"].T + params["b"], torch.tensor([])


def outer_log_likelihood(z, batch):
    return torch.distributions.Normal(z, SIGMA).log_prob(batch[1]).sum()


def log_likelihood(params, batch):  # the batch's log likelihood, a scalar
    return outer_log_likelihood(forward(params, batch)[0], batch), torch.tensor([])


def log_likelihood_per_sample(params, batch):  # one value per row
    z = forward(params, batch)[0]
    return torch.distributions.Normal(z, SIGMA).log_prob(batch[1]).sum(-1), torch.tensor([])


def log_posterior(params, batch):  # prior + the batch's likelihood
    prior = -0.5 * ALPHA * (params["W"].square().sum() + params["b"].square().sum())
    return prior + log_likelihood(params, batch)[0], torch.tensor([])


def _batches(k: int):
    return [(X[i:i + N // k], Y[i:i + N // k]) for i in range(0, N, N // k)]


# --------------------------------------------------------------------------------------------------
# Precisions against the closed forms


def test_dense_hessian_at_the_map_is_the_exact_posterior_precision():
    state, aux = dense_hessian.update(dense_hessian.init(MAP), (X, Y), log_posterior)
    torch.testing.assert_close(state.prec, EXACT_PREC, **ROUNDOFF)
    assert state.prec.dtype == torch.float64 and int(state.step) == 1 and aux.shape == (0,)
    # epsilon and rescale: r H + ε I
    state, _ = dense_hessian.build(log_posterior, epsilon=0.25, rescale=0.5).update(dense_hessian.init(MAP), (X, Y))
    torch.testing.assert_close(state.prec, 0.5 * EXACT_PREC + 0.25 * torch.eye(D, dtype=torch.float64), **ROUNDOFF)


def test_dense_ggn_plus_prior_precision_is_the_exact_posterior_precision():
    transform = dense_ggn.build(forward, outer_log_likelihood, init_prec=ALPHA)
    state, aux = transform.update(transform.init(MAP), (X, Y))
    torch.testing.assert_close(state.prec, EXACT_PREC, **ROUNDOFF)
    assert aux.shape == (0,)


def test_diag_ggn_is_the_diagonal_of_the_exact_posterior_precision():
    transform = diag_ggn.build(forward, outer_log_likelihood, init_prec_diag=ALPHA)
    state, _ = transform.update(transform.init(MAP), (X, Y))
    assert state.prec_diag["W"].shape == (2, 3)
    torch.testing.assert_close(_flat(state.prec_diag), EXACT_PREC.diagonal(), **ROUNDOFF)


@pytest.mark.parametrize("per_sample", [False, True])
def test_dense_fisher_is_the_sum_of_score_outer_products(per_sample):
    fn = log_likelihood_per_sample if per_sample else log_likelihood
    transform = dense_fisher.build(fn, per_sample=per_sample, init_prec=ALPHA)
    state, _ = transform.update(transform.init(MAP), (X, Y))
    torch.testing.assert_close(state.prec, ALPHA * torch.eye(D, dtype=torch.float64) + EXACT_FISHER, **ROUNDOFF)


@pytest.mark.parametrize("per_sample", [False, True])
def test_diag_fisher_is_the_diagonal_of_the_empirical_fisher(per_sample):
    fn = log_likelihood_per_sample if per_sample else log_likelihood
    state, _ = diag_fisher.update(diag_fisher.init(MAP), (X, Y), fn, per_sample=per_sample)
    torch.testing.assert_close(_flat(state.prec_diag), EXACT_FISHER.diagonal(), **ROUNDOFF)


def test_ggn_of_logistic_regression_is_its_hessian():
    """Canonical link: the GGN of a Bernoulli-logit likelihood is the Hessian of its negative log."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    labels = (torch.rand(30, generator=generator, dtype=torch.float64) < 0.5).to(torch.float64)
    params = {"w": torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64), "c": torch.tensor(0.2, dtype=torch.float64)}

    def logits(p, batch):
        return batch[0] @ p["w"] + p["c"], torch.tensor([])

    def bernoulli(z, batch):
        return torch.distributions.Bernoulli(logits=z).log_prob(batch[1]).sum()

    ggn_state, _ = dense_ggn.update(dense_ggn.init(params), (x, labels), logits, bernoulli)
    hess_state, _ = dense_hessian.update(dense_hessian.init(params), (x, labels),
                                         lambda p, b: (bernoulli(logits(p, b)[0], b), torch.tensor([])))
    torch.testing.assert_close(ggn_state.prec, hess_state.prec, **ROUNDOFF)
    p = torch.sigmoid(x @ params["w"] + params["c"])
    features = torch.cat([torch.ones(30, 1, dtype=torch.float64), x], dim=1)  # optree order: "c" then "w"
    torch.testing.assert_close(ggn_state.prec, features.T @ (features * (p * (1 - p))[:, None]), **ROUNDOFF)


# --------------------------------------------------------------------------------------------------
# Accumulation


METHODS = {
    "diag_fisher": lambda: diag_fisher.build(log_likelihood, init_prec_diag=ALPHA),
    "dense_fisher": lambda: dense_fisher.build(log_likelihood, init_prec=ALPHA),
    "diag_ggn": lambda: diag_ggn.build(forward, outer_log_likelihood, init_prec_diag=ALPHA),
    "dense_ggn": lambda: dense_ggn.build(forward, outer_log_likelihood, init_prec=ALPHA),
    "dense_hessian": lambda: dense_hessian.build(log_likelihood, init_prec=ALPHA),
}


def _precision(state) -> torch.Tensor:
    return state.prec if isinstance(state, DenseLaplaceState) else _flat(state.prec_diag)


@pytest.mark.parametrize("name", METHODS)
def test_batches_accumulate_to_one_pass_over_all_data(name):
    transform = METHODS[name]()
    full, _ = transform.update(transform.init(MAP), (X, Y))
    batched = transform.init(MAP)
    for batch in _batches(4):
        batched, _ = transform.update(batched, batch)
    torch.testing.assert_close(_precision(batched), _precision(full), **ROUNDOFF)
    assert int(batched.step) == 4 and int(full.step) == 1
    reference = EXACT_PREC if "fisher" not in name else ALPHA * torch.eye(D, dtype=torch.float64) + EXACT_FISHER
    expected = reference if name.startswith("dense") else reference.diagonal()
    torch.testing.assert_close(_precision(batched), expected, **ROUNDOFF)


@pytest.mark.parametrize("name", METHODS)
def test_inplace_accumulates_into_the_states_own_tensors(name):
    transform = METHODS[name]()
    state = transform.init(MAP)
    tensors = state.prec if isinstance(state, DenseLaplaceState) else state.prec_diag["W"]
    pointer, step = tensors.data_ptr(), state.step
    functional = transform.init(MAP)
    for batch in _batches(2):
        out, _ = transform.update(state, batch, inplace=True)
        assert out is state
        functional, _ = transform.update(functional, batch)
    assert tensors.data_ptr() == pointer and state.step is step and int(step) == 2
    torch.testing.assert_close(_precision(state), _precision(functional), rtol=0, atol=0)
    assert MAP["W"].data_ptr() == state.params["W"].data_ptr()  # the mean is the parameters themselves


def test_functional_update_leaves_the_old_state_and_the_users_init_prec_alone():
    init_prec = 3.0 * torch.eye(D, dtype=torch.float64)
    state = dense_ggn.init(MAP, init_prec)
    new, _ = dense_ggn.update(state, (X, Y), forward, outer_log_likelihood)
    dense_ggn.update(new, (X, Y), forward, outer_log_likelihood, inplace=True)
    torch.testing.assert_close(state.prec, init_prec, rtol=0, atol=0)
    assert int(state.step) == 0
    torch.testing.assert_close(init_prec, 3.0 * torch.eye(D, dtype=torch.float64), rtol=0, atol=0)


def test_states_built_without_a_step_do_not_share_one():
    a, b = DenseLaplaceState(MAP, EXACT_PREC.clone()), DenseLaplaceState(MAP, EXACT_PREC.clone())
    dense_ggn.update(a, (X, Y), forward, outer_log_likelihood, inplace=True)
    assert int(a.step) == 1 and int(b.step) == 0 and int(DiagLaplaceState(MAP, MAP).step) == 0
    stacked = torch.stack([a, b])
    assert stacked.prec.shape == (2, D, D) and stacked.step.tolist() == [1, 0]


# --------------------------------------------------------------------------------------------------
# Sampling


def _within(estimate, target, standard_error, k: float = 5.0) -> bool:
    return bool(((estimate - target).abs() <= k * standard_error).all())


def test_dense_sample_matches_the_exact_posterior_on_a_tree_with_a_2d_leaf():
    n = 20000
    state = dense_hessian.init(MAP, EXACT_PREC)
    draws = dense_hessian.sample(state, (n,), generator=torch.Generator().manual_seed(3))
    assert draws["W"].shape == (n, 2, 3) and draws["b"].shape == (n, 2) and draws["W"].dtype == torch.float64
    flat = _flat(draws)
    var = EXACT_COV.diagonal()
    assert _within(flat.mean(0), EXACT_MEAN, (var / n).sqrt())
    cov_se = ((var[:, None] * var[None, :] + EXACT_COV**2) / n).sqrt()
    assert _within(torch.cov(flat.T), EXACT_COV, cov_se)
    # the test has power: the correlations are far outside 5 s.e. of an independent (diagonal) answer
    assert not _within(torch.cov(flat.T), torch.diag(var), cov_se)


def test_diag_sample_matches_its_diagonal_normal():
    n = 20000
    prec_diag = _tree(EXACT_PREC.diagonal())
    state = diag_ggn.init(MAP, prec_diag)
    draws = diag_ggn.sample(state, (n,), generator=torch.Generator().manual_seed(4))
    assert draws["W"].shape == (n, 2, 3)
    flat, var = _flat(draws), 1 / EXACT_PREC.diagonal()
    assert _within(flat.mean(0), EXACT_MEAN, (var / n).sqrt())
    cov_se = ((var[:, None] * var[None, :] + torch.diag(var) ** 2) / n).sqrt()
    assert _within(torch.cov(flat.T), torch.diag(var), cov_se)
    assert not _within(flat.var(0), EXACT_COV.diagonal(), var * math.sqrt(2 / n))  # not the full covariance


@pytest.mark.parametrize("module", [diag_fisher, dense_fisher])
def test_samples_are_reproducible_from_a_generator_and_shaped_by_sample_shape(module):
    state = module.init(MAP, 4.0)
    first = module.sample(state, (2, 3), generator=torch.Generator().manual_seed(5))
    again = module.sample(state, (2, 3), generator=torch.Generator().manual_seed(5))
    other = module.sample(state, (2, 3), generator=torch.Generator().manual_seed(6))
    assert first["W"].shape == (2, 3, 2, 3) and first["b"].shape == (2, 3, 2)
    assert torch.equal(first["W"], again["W"]) and not torch.equal(first["W"], other["W"])
    one = module.sample(state)
    assert one["W"].shape == (2, 3) and one["b"].shape == (2,)
    assert module.sample(state, 7)["b"].shape == (7, 2)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("module", [diag_ggn, dense_ggn])
def test_precision_and_samples_live_on_the_parameters_device(device, module):
    params = {key: value.to(device=device, dtype=torch.float32) for key, value in MAP.items()}
    batch = (X.to(device, torch.float32), Y.to(device, torch.float32))
    state = module.init(params, ALPHA)
    state, _ = module.update(state, batch, forward, outer_log_likelihood)
    precision = state.prec if module is dense_ggn else state.prec_diag["W"]
    assert precision.device.type == device and precision.dtype == torch.float32
    for generator in (None, torch.Generator().manual_seed(0)):  # a CPU generator for CUDA parameters too
        draws = module.sample(state, (5,), generator=generator)
        assert all(leaf.device.type == device and leaf.dtype == torch.float32 for leaf in draws.values())


# --------------------------------------------------------------------------------------------------
# Bad inputs


def test_a_non_scalar_log_posterior_value_is_a_value_error():
    vector = lambda p, b: (log_likelihood_per_sample(p, b)[0], torch.tensor([]))  # noqa: E731
    with pytest.raises(ValueError, match="scalar"):
        dense_hessian.update(dense_hessian.init(MAP), (X, Y), vector)
    with pytest.raises(ValueError, match="per_sample=False"):
        diag_fisher.update(diag_fisher.init(MAP), (X, Y), lambda p, b: (forward(p, b)[0], torch.tensor([])))
    with pytest.raises(ValueError, match="per_sample=True"):
        dense_fisher.update(dense_fisher.init(MAP), (X, Y), log_likelihood, per_sample=True)
    with pytest.raises(ValueError, match="outer_log_likelihood"):
        dense_ggn.update(dense_ggn.init(MAP), (X, Y), forward,
                         lambda z, b: torch.distributions.Normal(z, SIGMA).log_prob(b[1]).sum(-1))
    with pytest.raises(TypeError, match=r"\(value, aux\)"):
        dense_hessian.update(dense_hessian.init(MAP), (X, Y), lambda p, b: log_likelihood(p, b)[0])
    with pytest.raises(TypeError, match=r"\(value, aux\)"):
        diag_ggn.update(diag_ggn.init(MAP), (X, Y), lambda p, b: forward(p, b)[0], outer_log_likelihood)


def test_bad_initial_precisions_are_value_errors():
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        dense_fisher.init(MAP, torch.eye(7, dtype=torch.float64))
    indefinite = torch.eye(D, dtype=torch.float64)
    indefinite[0, 0] = -1.0
    with pytest.raises(ValueError, match="positive semi-definite"):
        dense_ggn.init(MAP, indefinite)
    asymmetric = torch.eye(D, dtype=torch.float64)
    asymmetric[0, 1] = 0.5
    with pytest.raises(ValueError, match="symmetric"):
        dense_hessian.init(MAP, asymmetric)
    with pytest.raises(ValueError, match="non-negative"):
        dense_hessian.build(log_posterior, init_prec=-1.0)
    with pytest.raises(ValueError, match="non-negative"):
        diag_fisher.init(MAP, -0.5)
    with pytest.raises(ValueError, match="non-negative"):
        diag_ggn.init(MAP, {"W": torch.ones(2, 3), "b": torch.tensor([1.0, -1.0])})
    with pytest.raises(ValueError, match="structure"):
        diag_ggn.init(MAP, {"W": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="broadcast"):
        diag_fisher.init(MAP, {"W": torch.ones(3, 2), "b": 1.0})
    with pytest.raises(ValueError, match="epsilon"):
        dense_hessian.build(log_posterior, epsilon=-1.0)
    dense_ggn.init(MAP, torch.zeros(D, D))  # PSD, not PD: a valid start before any data


def test_sampling_an_improper_state_or_with_a_bad_generator_raises():
    with pytest.raises(ValueError, match="positive definite"):
        dense_fisher.sample(dense_fisher.init(MAP))
    with pytest.raises(ValueError, match=r"prec_diag\['b'\]"):
        diag_fisher.sample(diag_fisher.init(MAP, {"W": torch.ones(2, 3), "b": 0.0}))
    with pytest.raises(TypeError, match=r"torch\.Generator"):
        dense_fisher.sample(dense_fisher.init(MAP, 1.0), (2,), generator=0)
    with pytest.raises(TypeError, match=r"must be a function"):
        diag_ggn.build(forward, "not a function")
