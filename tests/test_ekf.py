"""Extended Kalman filters (bayesflow.ekf): exact references in float64, moments within Monte-Carlo error."""

from __future__ import annotations

import itertools

import pytest
import torch

from bayesflow.ekf import dense_fisher, diag_fisher
from bayesflow.tree import tree_leaves

DT = torch.float64
NOISE_SD = 0.5


# ----------------------------------------------------------------------------------------------------------
# Bayesian linear regression y = x·w + b + N(0, σ²): parameters {"b": (), "w": (2,)}, flattened as (b, w).


def _regression_data(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=DT)
    y = x @ torch.tensor([1.5, -0.7], dtype=DT) + 0.3 + NOISE_SD * torch.randn(n, generator=g, dtype=DT)
    return x, y


def _design(x):
    """Rows (1, x): the flat parameter order of {"b", "w"} (optree sorts dict keys)."""
    return torch.cat([torch.ones(x.shape[0], 1, dtype=DT), x], dim=1)


def _log_likelihood(params, batch):
    x, y = batch
    mean = x @ params["w"] + params["b"]
    return (-0.5 * ((y - mean) / NOISE_SD) ** 2).sum(), torch.tensor([])


def _prior():
    m0 = {"b": torch.tensor(0.2, dtype=DT), "w": torch.tensor([-0.5, 0.4], dtype=DT)}
    a = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, -0.4], [0.0, -0.4, 0.8]], dtype=DT)
    return m0, a @ a.T + 0.1 * torch.eye(3, dtype=DT)


def _flat(tree):
    return torch.cat([leaf.reshape(-1) for leaf in tree_leaves(tree)])


def _conjugate_posterior(m0_flat, s0, x, y):
    phi = _design(x)
    precision = torch.linalg.inv(s0) + phi.T @ phi / NOISE_SD**2
    cov = torch.linalg.inv(precision)
    return cov @ (torch.linalg.solve(s0, m0_flat) + phi.T @ y / NOISE_SD**2), cov


def _clone(tree):
    return {k: v.clone() for k, v in tree.items()}


@pytest.mark.parametrize("sizes", [[1] * 12, [4, 4, 4], [12], [5, 2, 5]], ids=str)
def test_dense_one_pass_is_the_exact_kalman_posterior(sizes):
    """curvature="hessian", lr = batch size: one pass over the data, in any batching, is the conjugate posterior."""
    x, y = _regression_data()
    m0, s0 = _prior()
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    transform = dense_fisher.build(_log_likelihood, lr=lambda step: float(sizes[int(step)]), init_cov=s0,
                                   curvature="hessian")
    state = transform.init(_clone(m0))
    for lo, hi in itertools.pairwise(offsets):
        state, _ = transform.update(state, (x[lo:hi], y[lo:hi]))
    mean, cov = _conjugate_posterior(_flat(m0), s0, x, y)
    torch.testing.assert_close(_flat(state.params), mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(state.cov, cov, rtol=0, atol=1e-10)
    assert state.params["w"].shape == (2,) and state.params["b"].shape == () and int(state.step) == len(sizes)


def test_dense_per_sample_log_likelihood_gives_the_same_posterior():
    x, y = _regression_data()
    m0, s0 = _prior()

    def per_sample(params, batch):
        xb, yb = batch
        return -0.5 * ((yb - xb @ params["w"] - params["b"]) / NOISE_SD) ** 2, torch.tensor([])

    state = dense_fisher.init(_clone(m0), s0)
    state, _ = dense_fisher.update(state, (x, y), per_sample, lr=12.0, per_sample=True, curvature="hessian")
    mean, cov = _conjugate_posterior(_flat(m0), s0, x, y)
    torch.testing.assert_close(_flat(state.params), mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(state.cov, cov, rtol=0, atol=1e-10)


def test_dense_empirical_fisher_step_is_the_reference_recursion():
    """Σ' = ((Σ + Q)⁻¹ + ε/n Σ gᵢgᵢᵀ)⁻¹ and μ' = μ + ε Σ' ḡ, gᵢ = φᵢ rᵢ/σ² by hand; the precision grows."""
    x, y = _regression_data(n=9)
    m0, s0 = _prior()
    q = torch.tensor([[0.05, 0.01, 0.0], [0.01, 0.02, 0.0], [0.0, 0.0, 0.03]], dtype=DT)
    lr = 2.5
    transform = dense_fisher.build(_log_likelihood, lr=lr, transition_cov=q, init_cov=s0)
    state = transform.init(_clone(m0))
    mean, cov = _flat(m0), s0
    for lo in (0, 3, 6):
        xb, yb = x[lo:lo + 3], y[lo:lo + 3]
        state, _ = transform.update(state, (xb, yb))
        phi = _design(xb)
        g = phi * ((yb - phi @ mean) / NOISE_SD**2)[:, None]
        predict = cov + q
        fisher = g.T @ g / 3
        new_cov = torch.linalg.inv(torch.linalg.inv(predict) + lr * fisher)
        wrong_cov = torch.linalg.inv(torch.linalg.inv(predict) - lr * fisher)  # posteriors 0.1.3's sign
        mean, cov = mean + lr * new_cov @ g.mean(0), new_cov
        torch.testing.assert_close(state.cov, cov, rtol=0, atol=1e-10)
        torch.testing.assert_close(_flat(state.params), mean, rtol=0, atol=1e-10)
        assert not torch.allclose(state.cov, wrong_cov, atol=1e-3)
        assert torch.linalg.eigvalsh(predict - state.cov).min() > -1e-12  # Σ' ⪯ Σ + Q
    assert state.log_likelihood.shape == () and torch.isfinite(state.log_likelihood)


def _one_coordinate_problem(n: int = 20, d: int = 3, seed: int = 1):
    """Each sample observes one coordinate: yᵢ = θ_{kᵢ} + N(0, σ²); every gᵢ is one-hot, F is diagonal."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, d, (n,), generator=g)
    y = torch.tensor([1.0, -2.0, 0.5], dtype=DT)[idx] + NOISE_SD * torch.randn(n, generator=g, dtype=DT)
    return idx, y


def _one_coordinate_log_likelihood(params, batch):
    idx, y = batch
    return (-0.5 * ((y - params[idx]) / NOISE_SD) ** 2).sum(), torch.tensor([])


def test_diag_is_the_exact_diagonal_recursion_and_the_dense_filter_on_independent_coordinates():
    """σ'⁻² = 1/(σ² + τ²) + ε/n Σᵢ gᵢ², μ' = μ + ε σ'² ḡ per coordinate by hand; = dense EKF there."""
    idx, y = _one_coordinate_problem()
    sds0 = torch.tensor([1.0, 0.5, 2.0], dtype=DT)
    mu0 = torch.tensor([0.1, 0.0, -0.3], dtype=DT)
    tau, lr = 0.2, 5.0
    diag = diag_fisher.build(_one_coordinate_log_likelihood, lr=lr, transition_sd=tau, init_sds=sds0)
    dense = dense_fisher.build(_one_coordinate_log_likelihood, lr=lr, transition_cov=tau**2, init_cov=sds0**2)
    state, dense_state = diag.init(mu0.clone()), dense.init(mu0.clone())
    mean, var = mu0.clone(), sds0**2
    for lo in range(0, 20, 5):
        batch = (idx[lo:lo + 5], y[lo:lo + 5])
        state, _ = diag.update(state, batch)
        dense_state, _ = dense.update(dense_state, batch)
        g = torch.zeros(5, 3, dtype=DT)
        g[torch.arange(5), batch[0]] = (batch[1] - mean[batch[0]]) / NOISE_SD**2
        var = 1.0 / (1.0 / (var + tau**2) + lr * (g**2).mean(0))
        mean = mean + lr * var * g.mean(0)
        torch.testing.assert_close(state.params, mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.sd_diag, var.sqrt(), rtol=0, atol=1e-12)
        torch.testing.assert_close(dense_state.cov, torch.diag(var), rtol=0, atol=1e-12)
        torch.testing.assert_close(dense_state.params, mean, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.log_likelihood, dense_state.log_likelihood, rtol=0, atol=1e-12)


def test_diag_tree_params_and_per_sample():
    idx, y = _one_coordinate_problem(n=6, d=3)

    def per_sample(params, batch):
        theta = torch.cat([params["a"], params["b"].reshape(1)])
        return -0.5 * ((batch[1] - theta[batch[0]]) / NOISE_SD) ** 2, torch.tensor([])

    tree = {"a": torch.zeros(2, dtype=DT), "b": torch.zeros((), dtype=DT)}
    state = diag_fisher.init(tree, {"a": torch.tensor([1.0, 2.0], dtype=DT), "b": torch.tensor(0.5, dtype=DT)})
    state, _ = diag_fisher.update(state, (idx, y), per_sample, lr=6.0, per_sample=True)
    flat = diag_fisher.init(torch.zeros(3, dtype=DT), torch.tensor([1.0, 2.0, 0.5], dtype=DT))
    flat, _ = diag_fisher.update(flat, (idx, y), _one_coordinate_log_likelihood, lr=6.0)
    torch.testing.assert_close(_flat(state.params), flat.params, rtol=0, atol=1e-12)
    torch.testing.assert_close(_flat(state.sd_diag), flat.sd_diag, rtol=0, atol=1e-12)
    assert state.params["b"].shape == () and state.sd_diag["a"].shape == (2,)


def _flat_log_likelihood(params, batch):
    return -0.5 * ((batch - params) ** 2).sum(), torch.tensor([])


def test_transition_noise_adds_its_covariance_each_step():
    q = torch.tensor([[0.2, 0.1], [0.1, 0.3]], dtype=DT)
    s0 = torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=DT)
    batch = torch.ones(1, 2, dtype=DT)
    diagonal = torch.tensor([0.1, 0.4], dtype=DT)
    for transition, added in ((q, q), (0.25, 0.25 * torch.eye(2, dtype=DT)), (diagonal, torch.diag(diagonal))):
        state = dense_fisher.init(torch.zeros(2, dtype=DT), s0)
        for k in range(1, 4):
            state, _ = dense_fisher.update(state, batch, _flat_log_likelihood, lr=0.0, transition_cov=transition)
            torch.testing.assert_close(state.cov, s0 + k * added, rtol=0, atol=1e-12)
        torch.testing.assert_close(state.params, torch.zeros(2, dtype=DT))
    state = diag_fisher.init(torch.zeros(2, dtype=DT), torch.tensor([1.0, 0.5], dtype=DT))
    for k in range(1, 4):
        state, _ = diag_fisher.update(state, batch, _flat_log_likelihood, lr=0.0, transition_sd=0.3)
        torch.testing.assert_close(state.sd_diag**2, torch.tensor([1.0, 0.25], dtype=DT) + k * 0.09,
                                   rtol=0, atol=1e-12)


def test_dense_sample_moments_within_monte_carlo_error():
    m0, s0 = _prior()
    state = dense_fisher.init(m0, s0)
    n = 40_000
    draws = dense_fisher.sample(state, (n,), generator=torch.Generator().manual_seed(3))
    assert draws["b"].shape == (n,) and draws["w"].shape == (n, 2) and draws["w"].dtype == DT
    flat = torch.cat([draws["b"][:, None], draws["w"]], dim=1)
    mean_se = (s0.diagonal() / n).sqrt()
    assert ((flat.mean(0) - _flat(m0)).abs() < 5 * mean_se).all()
    cov_se = ((s0.diagonal()[:, None] * s0.diagonal()[None, :] + s0**2) / n).sqrt()
    assert ((torch.cov(flat.T) - s0).abs() < 5 * cov_se).all()
    again = dense_fisher.sample(state, (n,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(again["w"], draws["w"])
    # The global generator gives posteriors' draws: MultivariateNormal(μ, Σ).sample.
    torch.manual_seed(5)
    ours = dense_fisher.sample(state, (7, 2))
    torch.manual_seed(5)
    theirs = torch.distributions.MultivariateNormal(_flat(m0), covariance_matrix=s0).sample((7, 2))
    assert ours["w"].shape == (7, 2, 2)
    torch.testing.assert_close(torch.cat([ours["b"][..., None], ours["w"]], dim=-1), theirs)


def test_diag_sample_moments_within_monte_carlo_error():
    mu = {"a": torch.tensor([[1.0, -1.0, 0.0]], dtype=DT), "b": torch.tensor(3.0, dtype=DT)}
    sds = {"a": torch.tensor([[0.5, 1.0, 2.0]], dtype=DT), "b": torch.tensor(0.1, dtype=DT)}
    state = diag_fisher.init(mu, sds)
    n = 40_000
    for generator in (torch.Generator().manual_seed(4), None):
        draws = diag_fisher.sample(state, (n,), generator=generator)
        assert draws["a"].shape == (n, 1, 3) and draws["b"].shape == (n,)
        for key in mu:
            se_mean = sds[key] / n**0.5
            se_var = sds[key] ** 2 * (2 / n) ** 0.5
            assert ((draws[key].mean(0) - mu[key]).abs() < 5 * se_mean).all()
            assert ((draws[key].var(0) - sds[key] ** 2).abs() < 5 * se_var).all()


@pytest.mark.parametrize("module", ["diag", "dense"])
def test_inplace_equals_functional(module):
    x, y = _regression_data(n=4)
    m0, s0 = _prior()

    def lr(step):
        return 0.5 * (step + 1) ** -0.5

    if module == "diag":
        transform = diag_fisher.build(_log_likelihood, lr=lr, transition_sd=0.1, init_sds=0.7)
    else:
        transform = dense_fisher.build(_log_likelihood, lr=lr, transition_cov=0.01, init_cov=s0)
    functional = transform.init(_clone(m0))
    params = _clone(m0)
    inplace = transform.init(params)
    leaves_before = [id(leaf) for leaf in tree_leaves(inplace)]
    for lo in (0, 2):
        functional, _ = transform.update(functional, (x[lo:lo + 2], y[lo:lo + 2]))
        out, _ = transform.update(inplace, (x[lo:lo + 2], y[lo:lo + 2]), inplace=True)
        assert out is inplace
    assert [id(leaf) for leaf in tree_leaves(inplace)] == leaves_before  # the same tensors, new values
    assert params["w"] is inplace.params["w"] and not torch.equal(params["w"], m0["w"])
    for a, b in zip(tree_leaves(functional), tree_leaves(inplace), strict=True):
        assert torch.equal(a, b)
    assert int(inplace.step) == 2


def test_inplace_update_of_a_hand_built_state_leaves_the_class_defaults_alone():
    state = diag_fisher.EKFDiagState(torch.zeros(2), torch.ones(2))  # default log_likelihood and step
    new, _ = diag_fisher.update(state, torch.ones(1, 2), _flat_log_likelihood, lr=1.0, inplace=True)
    assert int(new.step) == 1 and new.params is state.params and not torch.equal(state.params, torch.zeros(2))
    assert diag_fisher.EKFDiagState._field_defaults["step"].item() == 0
    assert diag_fisher.EKFDiagState._field_defaults["log_likelihood"].shape == (0,)


def test_states_stack_and_index_like_tensors():
    state = dense_fisher.init(torch.zeros(2))
    states = [dense_fisher.update(state, torch.ones(1, 2) * k, _flat_log_likelihood, lr=1.0)[0] for k in range(3)]
    trace = torch.stack(states)
    assert trace.params.shape == (3, 2) and trace.cov.shape == (3, 2, 2)
    torch.testing.assert_close(trace[1].params, states[1].params)
    assert dense_fisher.EKFDenseState._fields == ("params", "cov", "log_likelihood", "step")
    assert diag_fisher.EKFDiagState._fields == ("params", "sd_diag", "log_likelihood", "step")
    assert state.log_likelihood.shape == (0,) and int(state.step) == 0 and state.step.dtype == torch.int64


def test_an_indefinite_hessian_gives_nan_not_a_wrong_posterior():
    def convex_log_likelihood(params, batch):  # −∇²ℓ = −1 < 0
        return 0.5 * (params**2).sum(), torch.tensor([])

    state = dense_fisher.init(torch.ones(1))
    state, _ = dense_fisher.update(state, torch.zeros(1, 1), convex_log_likelihood, lr=2.0, curvature="hessian")
    assert torch.isnan(state.cov).all() and torch.isnan(state.params).all()


def test_bad_inputs_raise_clear_errors():
    ll = _flat_log_likelihood
    params = torch.zeros(2)
    batch = torch.ones(1, 2)
    with pytest.raises(ValueError, match="lr"):
        dense_fisher.build(ll, lr=-1.0)
    with pytest.raises(TypeError, match="lr"):
        diag_fisher.build(ll, lr="fast")
    with pytest.raises(TypeError, match="log_likelihood"):
        diag_fisher.build(None, lr=1.0)
    with pytest.raises(TypeError, match="per_sample"):
        dense_fisher.build(ll, lr=1.0, per_sample="yes")
    with pytest.raises(ValueError, match="transition_sd"):
        diag_fisher.build(ll, lr=1.0, transition_sd=-0.1)
    with pytest.raises(ValueError, match="positive semi-definite"):
        dense_fisher.build(ll, lr=1.0, transition_cov=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="transition_cov"):
        dense_fisher.build(ll, lr=1.0, transition_cov=-1.0)
    with pytest.raises(ValueError, match="curvature"):
        dense_fisher.build(ll, lr=1.0, curvature="ggn")
    with pytest.raises(ValueError, match="positive definite"):
        dense_fisher.init(params, torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        dense_fisher.init(params, torch.eye(3))
    with pytest.raises(ValueError, match="init_cov holds NaN"):
        dense_fisher.init(params, torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="init_cov"):
        dense_fisher.init(params, 0.0)
    with pytest.raises(ValueError, match="init_sds"):
        diag_fisher.init(params, -1.0)
    with pytest.raises(ValueError, match="init_sds"):
        diag_fisher.init({"a": params}, {"a": torch.ones(3)})
    with pytest.raises(ValueError, match="init_sds"):
        diag_fisher.init({"a": params}, {"a": torch.tensor([1.0, 0.0])})
    with pytest.raises(ValueError, match=r"transition_cov .*\(2, 2\)"):
        dense_fisher.update(dense_fisher.init(params), batch, ll, lr=1.0, transition_cov=torch.ones(3, 3))
    with pytest.raises(TypeError, match="EKFDiagState"):
        diag_fisher.update(dense_fisher.init(params), batch, ll, lr=1.0)
    with pytest.raises(TypeError, match="EKFDenseState"):
        dense_fisher.sample(diag_fisher.init(params))
    with pytest.raises(ValueError, match="scalar log likelihood"):  # per_sample=False: one value per batch
        dense_fisher.update(dense_fisher.init(params), batch, lambda p, b: (-(b - p) ** 2, torch.tensor([])), lr=1.0)
    with pytest.raises(ValueError, match="one log likelihood per sample"):
        diag_fisher.update(diag_fisher.init(params), batch, ll, lr=1.0, per_sample=True)
    with pytest.raises(TypeError, match=r"\(value, aux\)"):
        diag_fisher.update(diag_fisher.init(params), batch, lambda p, b: -(p**2).sum(), lr=1.0)
    with pytest.raises(TypeError, match="made of tensors"):  # per_sample=False: torch.vmap needs tensors
        dense_fisher.update(dense_fisher.init(params), batch, lambda p, b: (-(p**2).sum(), None), lr=1.0)
    with pytest.raises(RuntimeError, match="Auxiliary output"):
        diag_fisher.update(diag_fisher.init(params), batch, lambda p, b: (-((b - p) ** 2).sum(-1), None), lr=1.0,
                           per_sample=True)


@pytest.mark.parametrize("module", [diag_fisher, dense_fisher])
@pytest.mark.parametrize(("schedule", "error"), [
    (lambda step: -1.0, ValueError), (lambda step: float("nan"), ValueError),
    (lambda step: torch.tensor(-0.5), ValueError), (lambda step: "fast", TypeError)])
def test_a_schedules_bad_lr_is_refused_naming_the_step_before_anything_is_written(module, schedule, error):
    """A negative inverse temperature would grow the covariance and move the mean backwards; NaN or
    inf would poison the state: each is refused when the schedule gives it, the state left whole."""
    params, batch = torch.zeros(2), torch.ones(1, 2)
    transform = module.build(_flat_log_likelihood, lr=lambda step: 1.0 if int(step) == 0 else schedule(step))
    state, _ = transform.update(transform.init(params), batch)
    before = [t.clone() for t in tree_leaves(state)]
    with pytest.raises(error, match=r"lr schedule returned .* at step 1"):
        transform.update(state, batch, inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(before, tree_leaves(state)))


@pytest.mark.parametrize("module", [diag_fisher, dense_fisher])
def test_integer_params_are_refused_at_init_naming_the_leaf(module):
    with pytest.raises(TypeError, match=r"floating-point tensor; params\['b'\] is torch.int64"):
        module.init({"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.int64)})


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("bad, error, match", [
    (float("nan"), ValueError, "transition_cov must be ≥ 0"),
    (-0.5, ValueError, "transition_cov must be ≥ 0"),
    ("0.1", TypeError, "transition_cov must be a number, a vector"),
    (torch.tensor([0.1, float("inf")]), ValueError, "transition_cov must be finite"),
    (torch.tensor([0.1, -0.1]), ValueError, "given as a diagonal, must be ≥ 0"),
    (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), ValueError, "symmetric"),
    (torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), ValueError, "diagonal has negative entries"),
])
def test_dense_update_checks_transition_cov_before_writing(bad, error, match, inplace):
    """``update`` called directly (not through ``build``) refuses a bad Q and leaves the state as it was."""
    ll = lambda p, b: (-0.5 * ((b - p) ** 2).sum(), torch.tensor([]))  # noqa: E731
    state = dense_fisher.init(torch.zeros(2))
    kept = [t.clone() for t in (state.params, state.cov, state.step)]
    with pytest.raises(error, match=match):
        dense_fisher.update(state, torch.ones(3, 2), ll, lr=1.0, transition_cov=bad, inplace=inplace)
    assert all(torch.equal(a, b) for a, b in zip(kept, (state.params, state.cov, state.step)))
    good, _ = dense_fisher.update(state, torch.ones(3, 2), ll, lr=1.0, transition_cov=0.1, inplace=inplace)
    assert bool(torch.isfinite(good.cov).all())
