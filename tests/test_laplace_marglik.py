"""Laplace's marginal likelihood of the prior precision against exact evidences.

Gaussian linear regression (known noise σ): the posterior is Gaussian, so Laplace's evidence at the MAP of
Λ *is* the evidence log N(y; 0, σ²I + Φ Λ⁻¹ Φᵀ), and with the MAP refitted MacKay's fixed point is its
maximiser; with a block-orthogonal design each leaf's maximiser is in closed form. Logistic regression in
two dimensions: the exact evidence by quadrature on a dense grid, against which Laplace is accurate to
O(1/N) with a known leading correction (Tierney & Kadane 1986; Shun & McCullagh 1995), and its maximiser
shifts by a predictable amount.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from bayesflow.laplace import dense_ggn, dense_hessian, diag_ggn, kfac
from bayesflow.laplace._common import DenseLaplaceState, DiagLaplaceState
from bayesflow.laplace.marglik import log_marginal_likelihood, optimize_prior_precision

F64 = torch.float64


def _normal_loglik(z, batch):
    return torch.distributions.Normal(z, SIGMA).log_prob(batch[1]).sum()


# ----------------------------------------------------------------------------------------------------
# Linear regression: params {"b": (1,), "w": (3,)}, ravelled in that (optree's sorted) order, Φ = [1, x]

SIGMA, N_LIN = 0.5, 30
_g = torch.Generator().manual_seed(1)
X_LIN = torch.randn(N_LIN, 3, generator=_g, dtype=F64)
Y_LIN = X_LIN @ torch.tensor([1.0, -0.5, 0.3], dtype=F64) + 0.2 + SIGMA * torch.randn(N_LIN, generator=_g, dtype=F64)
PHI = torch.cat([torch.ones(N_LIN, 1, dtype=F64), X_LIN], dim=1)


def _prior_vector(prior):
    """Λ's diagonal in the ravelled order [b, w0, w1, w2] from a number or {"b", "w"}."""
    if isinstance(prior, dict):
        return torch.tensor([prior["b"]] + 3 * [prior["w"]], dtype=F64)
    return torch.full((4,), float(prior), dtype=F64)


def _closed_form_evidence(prior_diag, phi=PHI, y=Y_LIN):
    cov = SIGMA**2 * torch.eye(len(y), dtype=F64) + (phi / prior_diag) @ phi.T
    return torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=F64), cov).log_prob(y)


def _linear_map(prior_diag, phi=PHI, y=Y_LIN):
    return torch.linalg.solve(phi.T @ phi / SIGMA**2 + torch.diag(prior_diag), phi.T @ y / SIGMA**2)


def _lin_forward(params, batch):
    return batch[0] @ params["w"] + params["b"], torch.tensor([])


def _lin_loglik(params, batch):
    return _normal_loglik(_lin_forward(params, batch)[0], batch), torch.tensor([])


def _linear_state(kind, theta, init_prec=0.0):
    """A state of the given kind at θ = [b, w] (likelihood curvature plus ``init_prec``), and its log lik."""
    batch, params = (X_LIN, Y_LIN), {"b": theta[:1], "w": theta[1:]}
    if kind == "kfac":   # {"bias", "weight"}: the same ravelled order [b, w]
        model = torch.nn.Linear(3, 1).double()
        state = kfac.init({"bias": theta[:1], "weight": theta[1:].reshape(1, 3)}, model, prior_prec=init_prec)
        state, _ = kfac.update(state, (X_LIN, Y_LIN.unsqueeze(1)), model, _normal_loglik)   # its prior is apart
    elif kind == "dense_ggn":
        state, _ = dense_ggn.update(dense_ggn.init(params, init_prec), batch, _lin_forward, _normal_loglik)
    else:
        state, _ = dense_hessian.update(dense_hessian.init(params, init_prec), batch, _lin_loglik)
    return state, _lin_loglik(params, batch)[0]


def _closed_form_maximiser():
    """The maximiser of the closed-form evidence in λ: bisection on its autograd derivative in log λ."""
    def slope(t):
        t = torch.tensor(t, dtype=F64, requires_grad=True)
        (grad,) = torch.autograd.grad(_closed_form_evidence(torch.exp(t).expand(4)), t)
        return float(grad)

    low, high = -8.0, 8.0
    assert slope(low) > 0 > slope(high)
    while high - low > 1e-13:
        low, high = ((low + high) / 2, high) if slope((low + high) / 2) > 0 else (low, (low + high) / 2)
    return math.exp((low + high) / 2)


KINDS = ("dense_ggn", "dense_hessian", "kfac")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init_prec", [0.0, 3.0])
def test_linear_regression_laplace_evidence_is_the_closed_form(kind, init_prec):
    priors = [0.05, 1.0, 20.0] + ([] if kind == "kfac" else [{"b": 0.3, "w": 4.0}])
    for prior in priors:
        theta = _linear_map(_prior_vector(prior))   # the MAP of this prior: Laplace is exact there
        state, log_lik = _linear_state(kind, theta, init_prec)
        subtract = {} if kind == "kfac" else {"init_prec": init_prec}
        value = log_marginal_likelihood(state, log_lik, prior, **subtract)
        torch.testing.assert_close(value, _closed_form_evidence(_prior_vector(prior)), rtol=1e-12, atol=1e-10)
    if kind == "kfac":   # per layer: one dict entry for the one Linear layer
        value = log_marginal_likelihood(state, log_lik, {"": 20.0})
        torch.testing.assert_close(value, _closed_form_evidence(_prior_vector(20.0)), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_mackay_tuning_is_exact_for_linear_regression(kind):
    best = _closed_form_maximiser()
    state, _ = _linear_state(kind, _linear_map(_prior_vector(best)))
    # at the MAP of the optimum, the fixed-MAP optimum is the optimum (the evidence's λ-derivative is exact)
    assert float(optimize_prior_precision(state, tol=1e-11)) == pytest.approx(best, rel=1e-8)
    assert float(optimize_prior_precision(state, method="adam", tol=1e-7, max_steps=3000)) == pytest.approx(
        best, rel=1e-6)
    # MacKay's evidence procedure from far away: refit the MAP, re-tune, repeat
    prior, previous = 1e-2, 0.0
    for _ in range(50):
        state, _ = _linear_state(kind, _linear_map(_prior_vector(prior)))
        prior, previous = float(optimize_prior_precision(state, init=prior, tol=1e-11)), prior
        if abs(prior - previous) < 1e-12 * prior:
            break
    assert prior == pytest.approx(best, rel=1e-8)
    # post hoc at another MAP is a different (worse) λ: the check above can fail
    state, _ = _linear_state(kind, _linear_map(_prior_vector(30.0)))
    post_hoc = float(optimize_prior_precision(state, init=30.0))
    assert abs(math.log(post_hoc / best)) > 0.1
    assert _closed_form_evidence(_prior_vector(post_hoc)) < _closed_form_evidence(_prior_vector(best)) - 1e-3


# ----------------------------------------------------------------------------------------------------
# Per leaf: Φ = [Φ_a, Φ_b] with ΦᵀΦ = diag(k_a I₃, k_b I₂). The evidence separates by leaf; with
# h_g = k_g/σ², u_g = Φ_gᵀ y/σ², m_g = u_g/(h_g + λ_g), setting
#   ∂/∂λ_g log p = ½ [P_g/λ_g − |m_g|² − P_g/(h_g + λ_g)] = 0   gives   λ_g = P_g h_g² / (|u_g|² − P_g h_g).

K_BLOCK = {"a": 20.0, "b": 5.0}
_q, _ = torch.linalg.qr(torch.randn(40, 5, generator=torch.Generator().manual_seed(2), dtype=F64))
PHI_BLOCK = torch.cat([math.sqrt(K_BLOCK["a"]) * _q[:, :3], math.sqrt(K_BLOCK["b"]) * _q[:, 3:]], dim=1)
Y_BLOCK = PHI_BLOCK @ torch.tensor([1.0, -0.8, 0.6, 0.3, -0.25], dtype=F64) + SIGMA * torch.randn(
    40, generator=torch.Generator().manual_seed(3), dtype=F64)
SLICES = {"a": slice(0, 3), "b": slice(3, 5)}


def _block_optimum():
    optimum = {}
    for name, cols in SLICES.items():
        h, u = K_BLOCK[name] / SIGMA**2, PHI_BLOCK[:, cols].T @ Y_BLOCK / SIGMA**2
        size = cols.stop - cols.start
        assert float(u @ u) > size * h   # a finite optimum
        optimum[name] = size * h**2 / float(u @ u - size * h)
    return optimum


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 1, bias=False).double(), torch.nn.Linear(2, 1, bias=False).double()

    def forward(self, x):
        return self.a(x[:, :3]) + self.b(x[:, 3:])


def _block_state(kind, prior):
    diag = torch.cat([torch.full((3,), prior["a"], dtype=F64), torch.full((2,), prior["b"], dtype=F64)])
    theta = _linear_map(diag, PHI_BLOCK, Y_BLOCK)
    params = {"a": theta[:3], "b": theta[3:]}
    forward = lambda p, batch: (batch[0][:, :3] @ p["a"] + batch[0][:, 3:] @ p["b"], torch.tensor([]))  # noqa: E731
    batch = (PHI_BLOCK, Y_BLOCK)
    if kind == "kfac":   # two Linear layers, no cross block: exact because Φ_aᵀΦ_b = 0
        model = TwoBlocks()
        state = kfac.init({"a.weight": theta[None, :3], "b.weight": theta[None, 3:]}, model)
        return kfac.update(state, (PHI_BLOCK, Y_BLOCK[:, None]), model, _normal_loglik)[0]
    if kind == "diag_ggn":   # ΦᵀΦ is diagonal: the diagonal state is exact
        return diag_ggn.update(diag_ggn.init(params), batch, forward, _normal_loglik)[0]
    return dense_ggn.update(dense_ggn.init(params), batch, forward, _normal_loglik)[0]


@pytest.mark.parametrize("kind", ["dense_ggn", "diag_ggn", "kfac"])
def test_per_layer_tuning_finds_each_leafs_closed_form_optimum(kind):
    optimum = _block_optimum()
    assert optimum["b"] > 3 * optimum["a"]   # the leaves want different precisions
    keys = {"a": "a", "b": "b"}
    state = _block_state(kind, optimum)
    tuned = optimize_prior_precision(state, per_layer=True, tol=1e-11)
    assert set(tuned) == set(keys)
    for name in keys:
        assert float(tuned[name]) == pytest.approx(optimum[name], rel=1e-8)
    prior, previous = {"a": 1.0, "b": 1.0}, {"a": 0.0, "b": 0.0}   # refit the MAP and re-tune, from far away
    for _ in range(50):
        tuned = optimize_prior_precision(_block_state(kind, prior), prior, per_layer=True, tol=1e-11)
        prior, previous = {k: float(v) for k, v in tuned.items()}, prior
        if all(abs(prior[k] - previous[k]) < 1e-12 * prior[k] for k in prior):
            break
    for name in keys:
        assert prior[name] == pytest.approx(optimum[name], rel=1e-8)
    scalar = float(optimize_prior_precision(state))
    assert optimum["a"] < scalar < optimum["b"]
    assert float(log_marginal_likelihood(state, 0.0, scalar)) < float(log_marginal_likelihood(state, 0.0, optimum))


# ----------------------------------------------------------------------------------------------------
# Logistic regression in 2-D: N = 40 labels from θ = (1.5, -1), x ~ N(0, I)

N_LOG = 40
_g = torch.Generator().manual_seed(0)
X_LOG = torch.randn(N_LOG, 2, generator=_g, dtype=F64)
Y_LOG = torch.bernoulli(torch.sigmoid(X_LOG @ torch.tensor([1.5, -1.0], dtype=F64)), generator=_g)


def _log_lik(theta):   # θ of shape (..., 2)
    z = theta @ X_LOG.T
    return (Y_LOG * z - torch.nn.functional.softplus(z)).sum(-1)


def _log_curvature(theta):
    p = torch.sigmoid(X_LOG @ theta)
    return (X_LOG * (p * (1 - p))[:, None]).T @ X_LOG


def _log_map(prior):
    theta = torch.zeros(2, dtype=F64)
    for _ in range(100):   # Newton's method; the log posterior is strictly concave
        gradient = X_LOG.T @ (Y_LOG - torch.sigmoid(X_LOG @ theta)) - prior * theta
        step = torch.linalg.solve(_log_curvature(theta) + prior * torch.eye(2, dtype=F64), gradient)
        theta = theta + step
        if float(step.abs().max()) < 1e-14:
            return theta
    raise AssertionError("Newton did not converge")


def _exact_log_evidence(prior, points=81, span=10.0):
    """log ∫ p(D | θ) N(θ; 0, λ⁻¹I) dθ on a dense grid: ±10 posterior standard deviations in the Laplace-whitened
    coordinates, 81² points, log-sum-exp (against 161² points and ±14: agrees to 2e-9 for λ ∈ [0.01, 20])."""
    theta_map = _log_map(prior)
    root = torch.linalg.cholesky(torch.linalg.inv(_log_curvature(theta_map) + prior * torch.eye(2, dtype=F64)))
    u = torch.linspace(-span, span, points, dtype=F64)
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    theta = theta_map + grid @ root.T
    log_joint = _log_lik(theta) - 0.5 * prior * (theta**2).sum(-1) + math.log(prior) - math.log(2 * math.pi)
    return float(torch.logsumexp(log_joint, 0) + 2 * math.log(u[1] - u[0]) + root.diagonal().log().sum())


def _log_forward(params, batch):
    return batch @ params, torch.tensor([])


def _log_outer(z, batch):
    return (Y_LOG * z - torch.nn.functional.softplus(z)).sum()


def _log_state(kind, theta):
    """A state at θ with the likelihood curvature alone (init_prec 0)."""
    if kind == "dense_ggn":
        return dense_ggn.update(dense_ggn.init(theta), X_LOG, _log_forward, _log_outer)[0]
    if kind == "dense_hessian":   # the Hessian of the log likelihood (no prior in it)
        return dense_hessian.update(dense_hessian.init(theta), X_LOG,
                                    lambda p, b: (_log_outer(b @ p, b), torch.tensor([])))[0]
    return DenseLaplaceState(theta, _log_curvature(theta))   # by hand (the GGN), for the 1-D searches


def _laplace_log_evidence(prior, kind="by_hand", log_det=True):
    theta = _log_map(prior)   # refitted at each λ
    state = _log_state(kind, theta)
    value = float(log_marginal_likelihood(state, _log_lik(theta), prior))
    if not log_det:   # the wrong answer: drop −½ log det(H + λI)
        value += 0.5 * float(torch.logdet(state.prec + prior * torch.eye(2, dtype=F64)))
    return value


def _leading_correction(prior):
    """The O(1/N) term of log Z − Laplace: ⅛ f₄SS + ⅛ f₃f₃SSS + ¹⁄₁₂ f₃f₃SSS (the two contractions of the
    third derivatives), at the MAP, S the Laplace covariance. With w_n = Lᵀx_n (S = LLᵀ) and c_k the k-th
    z-derivative of log σ, these are sums over the data of c₄|w|⁴, (Σ c₃|w|²w)² and c₃c₃'(w·w')³."""
    theta = _log_map(prior)
    p = torch.sigmoid(X_LOG @ theta)
    s2 = p * (1 - p)
    c3, c4 = -s2 * (1 - 2 * p), -s2 * (1 - 6 * s2)
    w = X_LOG @ torch.linalg.cholesky(torch.linalg.inv(_log_curvature(theta) + prior * torch.eye(2, dtype=F64)))
    norm2 = (w**2).sum(1)
    return float((c4 * norm2**2).sum() / 8 + (((c3 * norm2)[:, None] * w).sum(0) ** 2).sum() / 8
                 + (c3[:, None] * c3[None] * (w @ w.T) ** 3).sum() / 12)


def _newton_max(fn, t, step=1e-3):
    """The maximiser of a smooth fn of t = log λ by Newton's method on central differences; and fn''."""
    for _ in range(20):
        up, mid, down = fn(t + step), fn(t), fn(t - step)
        slope, curvature = (up - down) / (2 * step), (up - 2 * mid + down) / step**2
        assert curvature < 0
        t -= slope / curvature
        if abs(slope / curvature) < 1e-7:
            return t, curvature
    raise AssertionError("Newton did not converge")


def test_logistic_laplace_evidence_matches_quadrature():
    for prior in (0.01, 0.3, 1.0, 5.0, 20.0):
        exact = _exact_log_evidence(prior)
        laplace = {kind: _laplace_log_evidence(prior, kind) for kind in ("dense_ggn", "dense_hessian", "by_hand")}
        # the GGN is the Hessian for the canonical link: the same evidence from every dense state
        assert laplace["dense_ggn"] == pytest.approx(laplace["dense_hessian"], abs=1e-10)
        assert laplace["dense_ggn"] == pytest.approx(laplace["by_hand"], abs=1e-10)
        # Laplace's error is the O(1/N) correction (0.005 to 0.05 nats here) up to O(1/N²): the next
        # order is smaller by ~1/N = 0.025; allowed 0.1. A wrong ½ log det, log 2π or scatter term is off by ≥ 0.1.
        correction = _leading_correction(prior)
        assert 0.004 < correction < 0.05
        assert abs(exact - laplace["dense_ggn"] - correction) <= 0.1 * correction, prior


def test_logistic_laplace_optimal_prior_matches_the_exact_evidence_argmax():
    ts = [-2.0 + 0.25 * i for i in range(15)]
    exact_grid = [_exact_log_evidence(math.exp(t)) for t in ts]
    best = max(range(len(ts)), key=exact_grid.__getitem__)
    assert 0 < best < len(ts) - 1   # an interior maximum
    t_exact, curvature = _newton_max(lambda t: _exact_log_evidence(math.exp(t)), ts[best])
    t_laplace, _ = _newton_max(lambda t: _laplace_log_evidence(math.exp(t)), ts[best])
    # the grid search brackets both
    assert ts[best - 1] < t_exact < ts[best + 1] and ts[best - 1] < t_laplace < ts[best + 1]
    # Expected shift: with log Z = L + E, L'(t̂) = 0 gives t̂ − t* = E'(t*)/F''(t*) + O(E'²); E' is the leading
    # correction's slope (independent of the code under test) up to its O(1/N) relative error. Allowed: 25%.
    h = 1e-3
    slope = (_leading_correction(math.exp(t_exact + h)) - _leading_correction(math.exp(t_exact - h))) / (2 * h)
    predicted = slope / curvature
    assert 0.005 < abs(predicted) < 0.05
    assert abs(t_laplace - t_exact - predicted) <= 0.25 * abs(predicted)
    # wrong answers land far outside: dropping ½ log det(H + λI) (shift ≈ 0.43), and the fixed point of
    # "refit the MAP, then MacKay at it", which neglects how log det H(θ*(λ)) moves with λ (shift ≈ 0.2)
    t_no_log_det, _ = _newton_max(lambda t: _laplace_log_evidence(math.exp(t), log_det=False), ts[best])
    assert abs(t_no_log_det - t_exact - predicted) > 10 * abs(predicted)
    prior = 1.0
    for _ in range(30):
        prior = float(optimize_prior_precision(_log_state("by_hand", _log_map(prior)), init=prior))
    assert abs(math.log(prior) - t_exact - predicted) > 5 * abs(predicted)


def test_post_hoc_tuning_at_a_fixed_map_maximises_the_laplace_evidence():
    theta = _log_map(1.0)   # as laplace-torch: one MAP, λ tuned after the fit
    state = _log_state("dense_ggn", theta)
    mackay = optimize_prior_precision(state, tol=1e-11)
    adam = optimize_prior_precision(state, method="adam", tol=1e-7, max_steps=2000)
    assert float(adam) == pytest.approx(float(mackay), rel=1e-6)
    log_prior = mackay.log().clone().requires_grad_(True)
    value = log_marginal_likelihood(state, _log_lik(theta), log_prior.exp())
    (gradient,) = torch.autograd.grad(value, log_prior)
    assert abs(float(gradient)) <= 1e-11
    for factor in (0.99, 1.01):
        nearby = log_marginal_likelihood(state, _log_lik(theta), float(mackay) * factor)
        assert float(nearby) < float(value.detach()) - 1e-6


# ----------------------------------------------------------------------------------------------------
# Consistency across states, gradients


def _mlp_state(prior_prec):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(16, 3, dtype=F64), torch.randint(0, 2, (16,))
    loglik = lambda logits, batch: -torch.nn.functional.cross_entropy(logits, batch[1], reduction="sum")  # noqa: E731
    state = kfac.init(params, model, prior_prec=prior_prec)
    return kfac.update(state, (x, y), model, loglik)[0]


def test_kfac_log_det_from_the_factors_matches_its_dense_precision():
    state = _mlp_state(prior_prec=0.7)   # the state's own prior is ignored
    curvature = kfac.precision_dense(state._replace(prior_prec=torch.zeros((), dtype=F64)))
    dense = DenseLaplaceState(state.params, curvature)
    per_layer = {"0": 0.5, "2": 2.0}
    per_leaf = {"0.bias": 0.5, "0.weight": 0.5, "2.bias": 2.0, "2.weight": 2.0}
    torch.testing.assert_close(log_marginal_likelihood(state, -3.0, per_layer),
                               log_marginal_likelihood(dense, -3.0, per_leaf), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(log_marginal_likelihood(state, -3.0, 1.5),
                               log_marginal_likelihood(dense, -3.0, 1.5), rtol=1e-12, atol=1e-10)
    tuned = optimize_prior_precision(state, per_layer=True)
    assert set(tuned) == {"0", "2"} and all(float(v) > 0 for v in tuned.values())


def test_diag_state_with_its_init_prec_subtracted_is_a_diagonal_dense_state():
    params = {"w": _log_map(1.0)}
    init_prec = {"w": torch.tensor([0.5, 2.0], dtype=F64)}
    state = diag_ggn.update(diag_ggn.init(params, init_prec), X_LOG, lambda p, b: _log_forward(p["w"], b),
                            _log_outer)[0]
    curvature = state.prec_diag["w"] - init_prec["w"]
    dense = DenseLaplaceState(params, torch.diag(curvature))
    for prior in (0.3, {"w": torch.tensor([1.0, 4.0], dtype=F64)}):
        torch.testing.assert_close(log_marginal_likelihood(state, -2.0, prior, init_prec=init_prec),
                                   log_marginal_likelihood(dense, -2.0, prior), rtol=1e-12, atol=1e-12)
    diag_tuned = optimize_prior_precision(state, init_prec=init_prec, per_layer=True)["w"]
    assert float(diag_tuned) == pytest.approx(float(optimize_prior_precision(dense)), rel=1e-8)


@pytest.mark.parametrize("case", ["diag", "dense_scalar", "dense_per_leaf", "kfac_per_layer"])
def test_gradient_in_the_prior_precision_matches_finite_differences(case):
    theta = _linear_map(_prior_vector(1.0))
    if case == "kfac_per_layer":
        state, names = _mlp_state(prior_prec=0.0), ["0", "2"]
    elif case == "diag":
        curvature = {"b": torch.tensor([3.0], dtype=F64), "w": torch.tensor([1.0, 2.0, 4.0], dtype=F64)}
        state, names = DiagLaplaceState({"b": theta[:1], "w": theta[1:]}, curvature), ["b", "w"]
    else:
        state, names = _linear_state("dense_ggn", theta)[0], ["b", "w"]
    values = torch.tensor([0.7, 2.5], dtype=F64, requires_grad=True)

    def evidence(v):
        prior = v[0] if case == "dense_scalar" else dict(zip(names, v.unbind()))
        return log_marginal_likelihood(state, 0.0, prior)

    (gradient,) = torch.autograd.grad(evidence(values), values)
    h = 1e-6
    for i in range(2):
        step = torch.zeros(2, dtype=F64)
        step[i] = h
        numeric = (evidence(values.detach() + step) - evidence(values.detach() - step)) / (2 * h)
        assert float(gradient[i]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-9)


# ----------------------------------------------------------------------------------------------------
# Errors


def _dense():
    return DenseLaplaceState({"b": torch.ones(1, dtype=F64), "w": torch.ones(2, dtype=F64)}, torch.eye(3, dtype=F64))


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: log_marginal_likelihood(_dense(), 0.0, -1.0), ValueError, "finite positive"),
    (lambda: log_marginal_likelihood(_dense(), 0.0, 0.0), ValueError, "finite positive"),
    (lambda: log_marginal_likelihood(_dense(), 0.0, float("nan")), ValueError, "finite positive"),
    (lambda: log_marginal_likelihood(_dense(), 0.0, {"w": 1.0}), ValueError, "structure of params"),
    (lambda: log_marginal_likelihood(_dense(), 0.0, {"b": 1.0, "w": torch.ones(3)}), ValueError, "broadcast"),
    (lambda: log_marginal_likelihood(_dense(), 0.0, {"b": 1.0, "w": "x"}), TypeError, "numbers or tensors"),
    (lambda: log_marginal_likelihood(_dense(), torch.zeros(2), 1.0), ValueError, "log_likelihood"),
    (lambda: log_marginal_likelihood(_dense(), 0.0, 1.0, init_prec=2.0), ValueError, "eigenvalue -1"),
    (lambda: log_marginal_likelihood(_dense(), 0.0, 1.0, init_prec=torch.eye(2)), ValueError, r"\(3, 3\)"),
    (lambda: log_marginal_likelihood(
        DenseLaplaceState(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])), 0.0, 1.0),
     ValueError, "positive semi-definite"),
    (lambda: log_marginal_likelihood(
        DiagLaplaceState(torch.zeros(2), torch.tensor([1.0, -1.0])), 0.0, 1.0), ValueError, "positive semi"),
    (lambda: log_marginal_likelihood(_mlp_state(0.0), 0.0, {"0": 1.0}), ValueError, "one number per Linear"),
    (lambda: log_marginal_likelihood(_mlp_state(0.0), 0.0, 1.0, init_prec=1.0), ValueError, "KFAC"),
    (lambda: log_marginal_likelihood(torch.eye(2), 0.0, 1.0), TypeError, "DiagLaplaceState"),
    (lambda: log_marginal_likelihood(DenseLaplaceState(torch.zeros(2), torch.eye(3)), 0.0, 1.0), ValueError,
     r"\(2, 2\) tensor"),
    (lambda: optimize_prior_precision(_dense(), method="newton"), ValueError, "method"),
    (lambda: optimize_prior_precision(_dense(), max_steps=0), ValueError, "max_steps"),
    (lambda: optimize_prior_precision(_dense(), init={"b": 1.0, "w": 1.0}), ValueError, "per_layer=True"),
    (lambda: optimize_prior_precision(_dense(), init={"b": 1.0, "w": torch.ones(2)}, per_layer=True),
     ValueError, "one number"),
    (lambda: optimize_prior_precision(_dense(), init=-2.0), ValueError, "finite positive"),
    (lambda: optimize_prior_precision(DenseLaplaceState(torch.zeros(2), torch.eye(2))), ValueError, "MAP of"),
    (lambda: optimize_prior_precision(DiagLaplaceState({"a": torch.ones(1), "b": torch.ones(1)},
                                                       {"a": torch.ones(1), "b": torch.zeros(1)}), per_layer=True),
     ValueError, r"curvature of params\['b'\] is zero"),
])
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_too_few_steps_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimize_prior_precision(_dense(), init=1e3, max_steps=1)
    assert any(issubclass(w.category, RuntimeWarning) and "did not reach" in str(w.message) for w in caught)
