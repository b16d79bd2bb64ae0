"""bayesflow.continual: Gaussian priors from posterior states and sequential Bayesian updating.

Exact references: on linear-Gaussian tasks the curvature is constant, so a dense chain of Laplace
updates (each task's MAP under the previous posterior, precision accumulated from the prior's) is the
batch posterior to rounding; the diagonal chain equals its closed-form recursion.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchopt

from bayesflow import continual, ekf, laplace, vi
from bayesflow.continual import DenseGaussianPrior, DiagGaussianPrior, KFACGaussianPrior


@pytest.fixture(autouse=True)
def _float64():
    """float64 for the exact comparisons, restored afterwards (other test modules share the process)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


SIGMA, ALPHA, DIM = 0.5, 2.0, 3


def _tasks(seed=0, sizes=(12, 9, 15)):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(DIM, generator=g, dtype=torch.float64)
    out = []
    for n in sizes:
        x = torch.randn(n, DIM, generator=g, dtype=torch.float64)
        out.append((x, x @ truth + SIGMA * torch.randn(n, generator=g, dtype=torch.float64)))
    return out


def _loglik(theta, batch):
    x, y = batch
    return -0.5 * ((y - x @ theta) ** 2).sum() / SIGMA**2


def _batch_posterior(tasks):
    x = torch.cat([t[0] for t in tasks])
    y = torch.cat([t[1] for t in tasks])
    prec = ALPHA * torch.eye(DIM) + x.T @ x / SIGMA**2
    return torch.linalg.solve(prec, x.T @ y / SIGMA**2), prec


def _newton_map(log_post):
    """The MAP of a quadratic log posterior: one Newton step from 0 is exact."""
    theta = torch.zeros(DIM)
    grad = torch.func.grad(log_post)(theta)
    hess = torch.func.hessian(log_post)(theta)
    return theta - torch.linalg.solve(hess, grad)


def test_dense_chain_equals_batch_posterior():
    tasks = _tasks()
    prior = continual.gaussian_prior(laplace.dense_hessian.init(torch.zeros(DIM), init_prec=ALPHA))
    for batch in tasks:
        mean = _newton_map(lambda t, b=batch, pr=prior: _loglik(t, b) + pr(t))
        # the next Laplace starts from the prior's precision and adds this task's likelihood Hessian
        state = laplace.dense_hessian.init(mean, init_prec=prior.prec)
        state, _ = laplace.dense_hessian.update(state, batch, lambda t, b: (_loglik(t, b), torch.tensor([])))
        prior = continual.gaussian_prior(state)
    exact_mean, exact_prec = _batch_posterior(tasks)
    torch.testing.assert_close(prior.mean, exact_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prior.prec, exact_prec, rtol=1e-10, atol=1e-10)
    # the prior is the normalised Gaussian log density of the batch posterior
    point = torch.tensor([0.3, -0.2, 1.0])
    exact = torch.distributions.MultivariateNormal(exact_mean, precision_matrix=exact_prec).log_prob(point)
    torch.testing.assert_close(prior(point), exact, rtol=1e-10, atol=1e-10)


def test_dense_chain_with_prior_inside_the_log_posterior():
    """The other spelling: the prior in the log posterior, the Laplace starting from zero precision."""
    tasks = _tasks(seed=1)
    prior = continual.gaussian_prior(laplace.dense_hessian.init(torch.zeros(DIM), init_prec=ALPHA))
    for batch in tasks:
        def log_post(t, b, pr=prior):
            return _loglik(t, b) + pr(t), torch.tensor([])
        mean = _newton_map(lambda t, b=batch: log_post(t, b)[0])
        state, _ = laplace.dense_hessian.update(laplace.dense_hessian.init(mean), batch, log_post)
        prior = continual.gaussian_prior(state)
    exact_mean, exact_prec = _batch_posterior(tasks)
    torch.testing.assert_close(prior.mean, exact_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prior.prec, exact_prec, rtol=1e-10, atol=1e-10)


def test_forgetting_the_prior_precision_is_caught():
    """The check above fails on a wrong chain: restarting each Laplace from α I forgets earlier tasks."""
    tasks = _tasks()
    prior = continual.gaussian_prior(laplace.dense_hessian.init(torch.zeros(DIM), init_prec=ALPHA))
    for batch in tasks:
        mean = _newton_map(lambda t, b=batch, pr=prior: _loglik(t, b) + pr(t))
        state = laplace.dense_hessian.init(mean, init_prec=ALPHA)
        state, _ = laplace.dense_hessian.update(state, batch, lambda t, b: (_loglik(t, b), torch.tensor([])))
        prior = continual.gaussian_prior(state)
    _, exact_prec = _batch_posterior(tasks)
    assert (prior.prec - exact_prec).abs().max() > 1.0


def test_diagonal_chain_equals_its_recursion():
    tasks = _tasks(seed=2)
    forward = lambda t, b: (b[0] @ t, torch.tensor([]))  # noqa: E731
    outer = lambda f, b: -0.5 * ((b[1] - f) ** 2).sum() / SIGMA**2  # noqa: E731
    prior = continual.gaussian_prior(laplace.diag_ggn.init(torch.zeros(DIM), init_prec_diag=ALPHA))
    mean_ref, prec_ref = torch.zeros(DIM), torch.full((DIM,), ALPHA)
    for x, y in tasks:
        mean = _newton_map(lambda t, b=(x, y), pr=prior: _loglik(t, b) + pr(t))
        state = laplace.diag_ggn.init(mean, init_prec_diag=prior.prec_diag)
        state, _ = laplace.diag_ggn.update(state, (x, y), forward, outer)
        prior = continual.gaussian_prior(state)
        hess = x.T @ x / SIGMA**2
        mean_ref = torch.linalg.solve(torch.diag(prec_ref) + hess, prec_ref * mean_ref + x.T @ y / SIGMA**2)
        prec_ref = prec_ref + hess.diagonal()
    torch.testing.assert_close(prior.mean, mean_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prior.prec_diag, prec_ref, rtol=1e-10, atol=1e-10)
    exact_mean, _ = _batch_posterior(tasks)
    assert (prior.mean - exact_mean).abs().max() > 1e-3   # an approximation, not the batch posterior


def test_strength_and_added_precision():
    state = laplace.diag_fisher.init({"w": torch.zeros(2)}, init_prec_diag={"w": torch.tensor([1.0, 3.0])})
    prior = continual.gaussian_prior(state, strength=2.0, prior_prec=0.5)
    torch.testing.assert_close(prior.prec_diag["w"], torch.tensor([2.5, 6.5]))
    value = prior({"w": torch.tensor([1.0, 1.0])})
    expected = -0.5 * (2.5 + 6.5) + 0.5 * math.log(2.5 * 6.5) - math.log(2 * math.pi)
    assert math.isclose(float(value), expected, rel_tol=1e-12)


def test_priors_of_ekf_and_vi_states():
    params = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([2.0])}
    ekf_diag = ekf.diag_fisher.init(params, init_sds={"a": torch.tensor([0.5, 2.0]), "b": torch.tensor([1.0])})
    torch.testing.assert_close(continual.gaussian_prior(ekf_diag).prec_diag["a"], torch.tensor([4.0, 0.25]))
    cov = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
    ekf_dense = ekf.dense_fisher.init(params, init_cov=cov)
    torch.testing.assert_close(continual.gaussian_prior(ekf_dense).prec, torch.linalg.inv(cov))
    vi_diag = vi.diag.init(params, torchopt.sgd(lr=0.1), init_log_sds=math.log(0.5), seed=0)
    torch.testing.assert_close(continual.gaussian_prior(vi_diag).prec_diag["b"], torch.tensor([4.0]))
    L = torch.linalg.cholesky(cov)
    vi_dense = vi.dense.init(params, torchopt.sgd(lr=0.1), init_L=L, seed=0)
    prior = continual.gaussian_prior(vi_dense)
    torch.testing.assert_close(prior.prec, torch.linalg.inv(cov))
    exact = torch.distributions.MultivariateNormal(torch.tensor([0.5, -1.0, 2.0]), cov).log_prob(torch.zeros(3))
    torch.testing.assert_close(prior({"a": torch.zeros(2), "b": torch.zeros(1)}), exact)


def test_kfac_prior_equals_its_dense_precision():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2, bias=False)).double()
    loglik = lambda z, b: -torch.nn.functional.cross_entropy(z, b[1], reduction="sum")  # noqa: E731
    transform = laplace.kfac.build(model, loglik, prior_prec=0.7)
    params = {k: v.detach() for k, v in model.named_parameters()}
    state, _ = transform.update(transform.init(params), (torch.randn(10, 3), torch.randint(0, 2, (10,))))
    prior = continual.gaussian_prior(state, strength=1.5)
    assert isinstance(prior, KFACGaussianPrior)
    prec = 1.5 * laplace.kfac.precision_dense(state)   # over the Linear parameters in state order
    keys = ["0.bias", "0.weight", "2.weight"]   # the sorted (optree) order of precision_dense
    point = {k: params[k] + 0.3 * torch.randn_like(params[k]) for k in keys}
    delta = torch.cat([(point[k] - params[k]).flatten() for k in keys])
    exact = torch.distributions.MultivariateNormal(torch.zeros(len(delta)), precision_matrix=prec).log_prob(delta)
    torch.testing.assert_close(prior(point), exact, rtol=1e-9, atol=1e-9)


def test_bad_inputs():
    state = laplace.diag_fisher.init(torch.zeros(2), init_prec_diag=1.0)
    with pytest.raises(TypeError, match="gaussian_prior needs"):
        continual.gaussian_prior(object())
    with pytest.raises(ValueError, match="strength must be positive"):
        continual.gaussian_prior(state, strength=0.0)
    with pytest.raises(ValueError, match="strength must be a finite number"):
        continual.gaussian_prior(state, strength=float("nan"))
    with pytest.raises(ValueError, match="prior_prec must be a finite number"):
        continual.gaussian_prior(state, prior_prec=float("inf"))
    with pytest.raises(TypeError, match="strength must be a finite number"):
        continual.gaussian_prior(state, strength="1")
    with pytest.raises(ValueError, match="prior_prec must be non-negative"):
        continual.gaussian_prior(state, prior_prec=-1.0)
    prior = continual.gaussian_prior(state)
    with pytest.raises(ValueError, match="shape"):
        prior(torch.zeros(3))
    with pytest.raises(ValueError, match="positive definite"):
        DenseGaussianPrior.of(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        DenseGaussianPrior.of(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\(2, 2\) matrix"):
        DenseGaussianPrior.of(torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="finite and positive"):
        DiagGaussianPrior.of(torch.zeros(2), torch.tensor([1.0, float("nan")]))
    singular = laplace.dense_hessian.init(torch.zeros(2))
    with pytest.raises(ValueError, match="positive definite"):
        continual.gaussian_prior(singular)
    assert torch.isfinite(continual.gaussian_prior(singular, prior_prec=1.0)(torch.zeros(2)))


def test_prior_does_not_follow_the_state_trained_in_place():
    """The next task trains the state's params in place: the prior must keep the old task's mean and precision."""
    torch.manual_seed(0)
    params = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([2.0])}
    cov = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]])
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    kfac = laplace.kfac.build(model, lambda z, b: -(z - b[1]).square().sum(), prior_prec=1.0)
    kfac_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    kfac_state, _ = kfac.update(kfac.init(kfac_params), (torch.randn(5, 3).double(), torch.randn(5, 2).double()))
    states = [laplace.diag_fisher.init({k: v.clone() for k, v in params.items()}, init_prec_diag=2.0),
              laplace.dense_hessian.init({k: v.clone() for k, v in params.items()}, init_prec=torch.linalg.inv(cov)),
              ekf.dense_fisher.init({k: v.clone() for k, v in params.items()}, init_cov=cov),
              vi.diag.init({k: v.clone() for k, v in params.items()}, torchopt.sgd(lr=0.1), seed=0),
              kfac_state]
    for state in states:
        prior = continual.gaussian_prior(state)
        point = {k: v + 0.25 for k, v in state.params.items()}
        before = prior(point)
        for v in state.params.values():
            v.add_(0.25)                              # the next task's in-place training moves θ onto the point
        for v in getattr(state, "prec_diag", {}).values() if hasattr(state, "prec_diag") else ():
            v.mul_(3.0)                               # and a continued accumulation grows the state's precision
        for v in getattr(state, "A", {}).values() if hasattr(state, "A") else ():
            v.mul_(3.0)
        torch.testing.assert_close(prior(point), before, rtol=0, atol=0, msg=type(state).__name__)
        assert float(before) < float(prior.log_normalizer)   # the point is away from the old mean


def test_priors_check_parameter_names_not_only_shapes():
    from collections import OrderedDict
    mean = {"a": torch.zeros(2), "b": torch.zeros(2)}
    diag = DiagGaussianPrior.of(mean, {"a": torch.ones(2), "b": torch.full((2,), 2.0)})
    dense = DenseGaussianPrior.of(mean, torch.eye(4))
    for prior in (diag, dense):
        # a dict and an OrderedDict with the same names agree
        torch.testing.assert_close(prior(OrderedDict(a=torch.ones(2), b=torch.zeros(2))),
                                   prior({"a": torch.ones(2), "b": torch.zeros(2)}))
        with pytest.raises(ValueError, match=r"\['c'\] are not in the prior's mean, \['b'\] are missing"):
            prior({"a": torch.ones(2), "c": torch.zeros(2)})
    with pytest.raises(ValueError, match="does not have the prior's parameters"):
        DiagGaussianPrior.of(mean, {"a": torch.ones(2), "z": torch.ones(2)})
