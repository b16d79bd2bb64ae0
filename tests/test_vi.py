"""Variational inference (bayesflow.vi.diag, bayesflow.vi.dense) against closed-form answers.

The target is a Bayesian linear regression with a Gaussian prior, whose posterior is exactly
N(m, P⁻¹) (precision P = XᵀX/s² + αI, mean m = P⁻¹Xᵀy/s²). For a Gaussian target the optima are
known in closed form: the dense family recovers N(m, T·P⁻¹) and the mean-field family N(m,
T·diag(1/P_ii)) (not the marginal variances (P⁻¹)_ii: the problem is built correlated enough
that the two differ by a factor 1.3–1.8, far outside the tolerances).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
import torchopt

import bayesflow.optim
from bayesflow import vi
from bayesflow.tree import flatten, tree_map
from bayesflow.utils import L_from_flat, L_to_flat
from bayesflow.vi.nelbo import noise_generator


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: one thread avoids OpenMP hand-offs, which on a loaded machine turn a
    4×40 matmul into milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Regression(NamedTuple):
    log_posterior: object
    precision: torch.Tensor
    mean: torch.Tensor


def regression(dtype=torch.float32) -> Regression:
    """y = Xw + N(0, s²) with correlated columns, prior w ~ N(0, I/α); params {"a": w[:2], "b": w[2]}."""
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.6, 0.3], [0.0, 0.0, 0.7]])
    X = (torch.randn(40, 3, generator=g) @ mix * 0.15).to(dtype)
    y = (X @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + 0.5 * torch.randn(40, generator=g).to(dtype))
    s2, alpha = 0.25, 1.0
    precision = X.T @ X / s2 + alpha * torch.eye(3, dtype=dtype)
    mean = torch.linalg.solve(precision, X.T @ y / s2)

    def log_posterior(params, batch):
        w = torch.cat([params["a"], params["b"].reshape(1)])
        r = y - X @ w
        return -0.5 * (r @ r) / s2 - 0.5 * alpha * (w @ w), r.detach()

    return Regression(log_posterior, precision, mean)


def ravel(tree) -> torch.Tensor:
    return torch.cat([tree["a"], tree["b"].reshape(1)])


def zeros(dtype=torch.float32):
    return {"a": torch.zeros(2, dtype=dtype), "b": torch.zeros((), dtype=dtype)}


class Recorder(NamedTuple):
    """A gradient transformation that records the NELBO gradients it is given and moves nothing."""

    init: object
    update: object


def recorder():
    seen = []

    def update(grads, state, params=None, inplace=True):
        seen.append(tree_map(torch.clone, grads))
        return tree_map(torch.zeros_like, grads), state

    return Recorder(lambda params: (), update), seen


def batch_means(trace: torch.Tensor, batches: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of a trace and its standard error from batch means (batches much longer than the ~10-step
    autocorrelation time of SGD at these step sizes, so the batch means are nearly independent)."""
    means = trace.reshape(batches, -1, *trace.shape[1:]).mean(1)
    return trace.mean(0), means.std(0) / math.sqrt(batches)


# ----- convergence to the closed-form optima ----------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_diag_converges_to_the_mean_field_optimum(temperature):
    """Mean μ = m and log σ_i = ½ log(T / P_ii) (the KL(q‖p_T) optimum over diagonal Gaussians).

    SGD at a constant step, 16 draws per step, Polyak averaging of the second half of the run. At the
    mean-field optimum the STL gradient is not zero (q ≠ p): the averages carry Monte-Carlo error,
    estimated by batch means; the bound is 5 standard errors plus 0.01 for the O(lr) bias of
    constant-step SGD on the non-quadratic log σ coordinate. The standard errors are checked to be
    small, so that the test has power: the marginal log sds ½ log(T (P⁻¹)_ii) are 0.2–0.3 away.
    """
    problem = regression()
    transform = vi.diag.build(problem.log_posterior, torchopt.sgd(lr=0.05 / temperature), temperature=temperature,
                              n_samples=16)
    state = transform.init(zeros(), seed=0)
    means, log_sds = [], []
    for step in range(1000):
        state, _ = transform.update(state, None)
        if step >= 500:
            means.append(ravel(state.params))
            log_sds.append(ravel(state.log_sd_diag))
    mean, mean_se = batch_means(torch.stack(means))
    log_sd, log_sd_se = batch_means(torch.stack(log_sds))
    exact_log_sd = 0.5 * torch.log(temperature / problem.precision.diagonal())
    marginal_log_sd = 0.5 * torch.log(temperature * torch.linalg.inv(problem.precision).diagonal())
    assert mean_se.max() < 0.01 and log_sd_se.max() < 0.01
    assert ((mean - problem.mean).abs() < 5 * mean_se + 0.01).all(), (mean, problem.mean, mean_se)
    assert ((log_sd - exact_log_sd).abs() < 5 * log_sd_se + 0.01).all(), (log_sd, exact_log_sd, log_sd_se)
    assert ((marginal_log_sd - exact_log_sd).abs() > 0.1).all()  # the wrong answer is far away


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_dense_converges_to_the_exact_posterior(temperature):
    """μ = m and LLᵀ = T·P⁻¹, to float32 precision: q can equal p_T, where the STL gradient is zero for
    every draw, so SGD contracts onto the optimum itself rather than a noise ball (its rate is
    (1 - lr·λ_min)^steps ≈ e⁻⁴⁰ here): the only error left is rounding."""
    problem = regression()
    transform = vi.dense.build(problem.log_posterior, torchopt.sgd(lr=0.05 / temperature), temperature=temperature)
    state = transform.init(zeros(), init_L=0.5, seed=0)
    for _ in range(600):
        state, _ = transform.update(state, None)
    L = L_from_flat(state.L_factor)
    exact_cov = temperature * torch.linalg.inv(problem.precision)
    assert torch.allclose(ravel(state.params), problem.mean, atol=1e-5)
    assert torch.allclose(L @ L.T, exact_cov, atol=1e-5)
    assert torch.isfinite(state.nelbo)


def test_dense_without_stl_converges_in_expectation():
    """Without STL the gradient noise stays (the entropy term's score part); the Polyak average of the
    iterates still finds N(m, P⁻¹), within 5 batch-means standard errors."""
    problem = regression()
    transform = vi.dense.build(problem.log_posterior, torchopt.sgd(lr=0.03), stl=False, n_samples=16)
    state = transform.init(zeros(), seed=1)
    means, covs = [], []
    for step in range(800):
        state, _ = transform.update(state, None)
        if step >= 400:
            L = L_from_flat(state.L_factor)
            means.append(ravel(state.params))
            covs.append((L @ L.T).reshape(-1))
    mean, mean_se = batch_means(torch.stack(means))
    cov, cov_se = batch_means(torch.stack(covs))
    exact = torch.linalg.inv(problem.precision).reshape(-1)
    assert mean_se.max() < 0.01 and cov_se.max() < 0.01
    assert ((mean - problem.mean).abs() < 5 * mean_se + 0.005).all()
    assert ((cov - exact).abs() < 5 * cov_se + 0.01).all(), (cov, exact, cov_se)


# ----- the gradient estimators ------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_stl_gradient_has_zero_variance_at_the_optimum(temperature):
    """At q = p_T (dense: L = √T·chol(P⁻¹); diag: an independent Gaussian target) every draw's STL
    gradient is zero up to float64 rounding, and the full reparameterisation gradient is not."""
    problem = regression(torch.float64)
    cov = temperature * torch.linalg.inv(problem.precision)
    mean = {"a": problem.mean[:2], "b": problem.mean[2]}
    precision = problem.precision.diagonal()

    def independent(params, batch):  # N(m, diag(1/P_ii))
        d = ravel(params) - problem.mean
        return -0.5 * (precision * d * d).sum(), None

    cases = [
        (vi.dense, problem.log_posterior, {"init_L": torch.linalg.cholesky(cov)}),
        (vi.diag, independent, {"init_log_sds": {"a": 0.5 * torch.log(temperature / precision[:2]),
                                                 "b": 0.5 * torch.log(temperature / precision[2])}}),
    ]
    for module, log_posterior, kwargs in cases:
        for stl in (True, False):
            optimizer, seen = recorder()
            state = module.init(mean, optimizer, seed=0, **kwargs)
            for _ in range(20):  # the recorder never moves the state, so every step is at the optimum
                state, _ = module.update(state, None, log_posterior, optimizer, temperature, stl=stl)
            grads = torch.stack([torch.cat([g.reshape(-1) for g in flatten(tree)[0]]) for tree in seen])
            if stl:
                assert grads.abs().max() < 1e-10, (module.__name__, grads.abs().max())
            else:
                assert grads.var(0).max() > 0.1, module.__name__


@pytest.mark.parametrize("module", [vi.diag, vi.dense])
@pytest.mark.parametrize("stl", [True, False])
@pytest.mark.parametrize("n_samples", [1, 3])
def test_update_gradient_is_the_gradient_of_the_nelbo(module, stl, n_samples):
    """The closed-form gradients of update equal autograd's gradient of nelbo(...) with the same noise
    (nelbo given the generator that update seeds from the state's key and step), and the reported
    NELBO is nelbo's value."""
    problem = regression()
    optimizer, seen = recorder()
    if module is vi.diag:
        state = module.init(zeros(), optimizer, init_log_sds={"a": torch.tensor([0.1, -0.3]), "b": torch.tensor(0.2)},
                            seed=3)
        scale = tree_map(lambda t: t.clone().requires_grad_(), state.log_sd_diag)
        scale_leaves = flatten(scale)[0]
        scale_arg = tree_map(torch.exp, scale)
    else:
        state = module.init(zeros(), optimizer, init_L=1.3 * torch.linalg.cholesky(torch.linalg.inv(problem.precision)),
                            seed=3)
        scale = state.L_factor.clone().requires_grad_()
        scale_leaves, scale_arg = [scale], scale
    state = state._replace(params={"a": torch.tensor([0.5, -1.0]), "b": torch.tensor(0.3)})
    new, _ = module.update(state, None, problem.log_posterior, optimizer, temperature=0.7, n_samples=n_samples, stl=stl)
    mean = tree_map(lambda t: t.clone().requires_grad_(), state.params)
    generator = noise_generator(state.rng, state.step, "cpu")
    value, _ = module.nelbo(mean, scale_arg, None, problem.log_posterior, 0.7, n_samples, stl, generator=generator)
    expected = torch.autograd.grad(value, flatten(mean)[0] + scale_leaves)
    got = flatten(seen[0])[0]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(new.nelbo, value.detach(), rtol=1e-6)


@pytest.mark.parametrize("module", [vi.diag, vi.dense])
@pytest.mark.parametrize("n_samples", [1, 2])
@pytest.mark.parametrize("log_posterior", [
    lambda p, batch: (p["a"].sum() + p["b"].sum(), None),       # both gradients: the seed, expanded
    lambda p, batch: (-0.5 * ((p["a"] + p["b"]) ** 2).sum(), None),  # one gradient tensor for a and b
], ids=["expanded", "shared"])
def test_gradients_that_autograd_aliases(module, n_samples, log_posterior):
    """The closed-form step writes gradients in place, so it must not write through autograd's aliases."""
    params = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([0.2, 0.1])}
    optimizer, seen = recorder()
    state = module.init(params, optimizer, seed=0)
    module.update(state, None, log_posterior, optimizer, n_samples=n_samples)
    mean = tree_map(lambda t: t.clone().requires_grad_(), params)
    scale = tree_map(lambda t: t.clone().requires_grad_(),
                     state.log_sd_diag if module is vi.diag else state.L_factor)
    scale_arg = tree_map(torch.exp, scale) if module is vi.diag else scale
    value, _ = module.nelbo(mean, scale_arg, None, log_posterior, 1.0, n_samples,
                            generator=noise_generator(state.rng, state.step, "cpu"))
    expected = torch.autograd.grad(value, flatten(mean)[0] + flatten(scale)[0])
    for a, b in zip(flatten(seen[0])[0], expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_dense_stl_detaches_the_mean():
    """The STL mean gradient has no score term: at q = p it is zero although -∇ log p alone is not
    (posteriors 0.1.3 keeps the mean's score term -Σ⁻¹(θ - μ) in its dense STL estimator)."""
    problem = regression(torch.float64)
    optimizer, seen = recorder()
    L = torch.linalg.cholesky(torch.linalg.inv(problem.precision))
    state = vi.dense.init({"a": problem.mean[:2], "b": problem.mean[2]}, optimizer, init_L=L, seed=0)
    vi.dense.update(state, None, problem.log_posterior, optimizer)
    grad_mean = ravel(seen[0][0])
    generator = noise_generator(state.rng, state.step, "cpu")
    eps = torch.randn(3, generator=generator, dtype=torch.float64)
    score = torch.linalg.solve_triangular(L.T, eps.unsqueeze(-1), upper=True).squeeze(-1)  # Σ⁻¹(θ - μ)
    assert grad_mean.abs().max() < 1e-10 and score.abs().max() > 0.1


# ----- randomness, state, in place --------------------------------------------------------------------

@pytest.mark.parametrize("module", [vi.diag, vi.dense])
def test_the_state_determines_the_trajectory(module):
    problem = regression()
    transform = module.build(problem.log_posterior, torchopt.adam(lr=1e-2), n_samples=2)

    def run(state, steps):
        trace = []
        for _ in range(steps):
            torch.manual_seed(len(trace))  # torch's global generator plays no part
            state, _ = transform.update(state, None)
            trace.append(state)
        return trace

    a = run(transform.init(zeros(), seed=5), 10)
    b = run(transform.init(zeros(), seed=5), 10)
    c = run(transform.init(zeros(), seed=6), 10)
    resumed = run(tree_map(torch.clone, a[4]), 5)  # a copy of the state at step 5 continues the same way
    for x, y in zip(a, b):
        assert all(map(torch.equal, flatten(x)[0], flatten(y)[0]))
    for x, y in zip(a[5:], resumed):
        assert all(map(torch.equal, flatten(x)[0], flatten(y)[0]))
    assert not torch.equal(ravel(a[-1].params), ravel(c[-1].params))
    assert int(a[-1].step) == 10 and torch.equal(a[-1].rng, a[0].rng)


def test_noise_is_the_engine_stream_of_the_key_and_step():
    """Step t of a state with key k draws from a generator seeded derive(k, t, STEP), as the engine does."""
    from bayesflow.engine.noise import STEP, derive, seed_key

    for key in (seed_key(0), seed_key(123), -5):
        for step in (0, 1, 1000, 2**33 + 7):
            expected = torch.Generator().manual_seed(derive(key, step, STEP))
            got = noise_generator(torch.tensor(key), torch.tensor(step), "cpu")
            assert torch.equal(torch.randn(5, generator=got), torch.randn(5, generator=expected))


@pytest.mark.parametrize("module", [vi.diag, vi.dense])
@pytest.mark.parametrize("make_optimizer", [lambda: torchopt.adam(lr=1e-2),
                                            lambda: bayesflow.optim.adam.transformation(lr=1e-2)],
                         ids=["torchopt.adam", "bayesflow.optim.adam"])
def test_inplace_equals_functional(module, make_optimizer):
    problem = regression()
    optimizer = make_optimizer()
    functional = module.init(zeros(), optimizer, seed=0)
    inplace = module.init(zeros(), optimizer, seed=0)
    original = inplace
    for _ in range(5):
        functional, _ = module.update(functional, None, problem.log_posterior, optimizer)
        inplace, _ = module.update(inplace, None, problem.log_posterior, optimizer, inplace=True)
    assert inplace is original and int(inplace.step) == 5
    for x, y in zip(flatten(functional)[0], flatten(inplace)[0]):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7, equal_nan=True), (x, y)  # bayesflow adam: NaN log_posterior


@pytest.mark.parametrize("module", [vi.diag, vi.dense])
def test_bayesflow_and_torchopt_adam_agree(module):
    """The optimizer is any gradient transformation: bayesflow's Adam and torchopt's take the same steps."""
    problem = regression()
    states = []
    for optimizer in (torchopt.adam(lr=1e-2), bayesflow.optim.adam.transformation(lr=1e-2)):
        transform = module.build(problem.log_posterior, optimizer)
        state = transform.init(zeros(), seed=0)
        for _ in range(20):
            state, _ = transform.update(state, None)
        states.append(state)
    a, b = states
    scale = "log_sd_diag" if module is vi.diag else "L_factor"
    assert torch.allclose(ravel(a.params), ravel(b.params), atol=1e-5)
    assert all(map(lambda x, y: torch.allclose(x, y, atol=1e-5),
                   flatten(getattr(a, scale))[0], flatten(getattr(b, scale))[0]))
    assert not torch.equal(ravel(a.params), ravel(zeros()))


def test_temperature_schedule_reads_the_step():
    problem = regression()
    seen = []

    def schedule(step):
        seen.append(int(step))
        return 0.5

    constant = vi.diag.build(problem.log_posterior, torchopt.sgd(lr=1e-2), temperature=0.5)
    scheduled = vi.diag.build(problem.log_posterior, torchopt.sgd(lr=1e-2), temperature=schedule)
    a, b = constant.init(zeros(), seed=0), scheduled.init(zeros(), seed=0)
    for _ in range(3):
        a, _ = constant.update(a, None)
        b, _ = scheduled.update(b, None)
    assert seen == [0, 1, 2]
    assert torch.equal(ravel(a.params), ravel(b.params)) and torch.equal(a.nelbo, b.nelbo)


def test_states_stack_and_aux_is_returned():
    problem = regression()
    transform = vi.diag.build(problem.log_posterior, torchopt.sgd(lr=1e-2))
    state = transform.init(zeros(), seed=0)
    trace = []
    for _ in range(3):
        state, aux = transform.update(state, None)
        trace.append(state)
    assert aux.shape == (40,)  # the residuals at the draw
    stacked = torch.stack(trace)
    assert stacked.params["a"].shape == (3, 2) and stacked.step.tolist() == [1, 2, 3]
    _, aux = vi.diag.update(state, None, problem.log_posterior, torchopt.sgd(lr=1e-2), n_samples=4)
    assert aux.shape == (4, 40)  # one per draw


# ----- sampling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(), (5,), (2, 3), 4])
def test_sample_shapes_for_trees(shape):
    params = {"w": torch.zeros(2, 3), "b": torch.zeros(()), "nested": (torch.zeros(4),)}
    expected = torch.Size((shape,) if isinstance(shape, int) else shape)
    for module in (vi.diag, vi.dense):
        draws = module.sample(module.init(params, torchopt.sgd(lr=0.1), seed=0), shape)
        assert draws["w"].shape == (*expected, 2, 3)
        assert draws["b"].shape == expected
        assert draws["nested"][0].shape == (*expected, 4)


def test_samples_have_the_state_moments():
    """Moments of 20 000 draws, within 5 standard errors (sd/√n for the mean; for a covariance entry
    √((Σ_ii Σ_jj + Σ_ij²)/n))."""
    n = 20_000
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([1.0, -2.0, 0.5])
    L = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]])
    state = vi.dense.init(mean, torchopt.sgd(lr=0.1), init_L=L, seed=0)
    draws = vi.dense.sample(state, (n,), generator=g)
    cov = L @ L.T
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert ((draws.mean(0) - mean).abs() < 5 * cov.diagonal().sqrt() / math.sqrt(n)).all()
    assert ((torch.cov(draws.T) - cov).abs() < 5 * se_cov).all()
    log_sd = torch.tensor([0.0, -1.0, 0.5])
    state = vi.diag.init(mean, torchopt.sgd(lr=0.1), init_log_sds=log_sd, seed=0)
    draws = vi.diag.sample(state, (n,), generator=g)
    sd = log_sd.exp()
    assert ((draws.mean(0) - mean).abs() < 5 * sd / math.sqrt(n)).all()
    assert ((draws.std(0) - sd).abs() < 5 * sd / math.sqrt(2 * n)).all()


# ----- bad input --------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    problem = regression()
    optimizer = torchopt.sgd(lr=0.1)
    for module in (vi.diag, vi.dense):
        state = module.init(zeros(), optimizer, seed=0)
        with pytest.raises(ValueError, match="must be a scalar"):
            module.update(state, None, lambda p, batch: (p["a"] ** 2, None), optimizer)
        with pytest.raises(TypeError, match=r"\(value, aux\)"):
            module.update(state, None, lambda p, batch: -(p["a"] ** 2).sum(), optimizer)
        with pytest.raises(TypeError, match="GradientTransformation"):
            module.build(problem.log_posterior, torchopt.Adam)
        with pytest.raises(ValueError, match="n_samples"):
            module.build(problem.log_posterior, optimizer, n_samples=0)
        with pytest.raises(ValueError, match="temperature"):
            module.build(problem.log_posterior, optimizer, temperature=-1.0)
        scale = state.log_sd_diag if module is vi.diag else state.L_factor
        with pytest.raises(ValueError, match="scalar"):
            module.nelbo(zeros(), scale, None, lambda p, batch: (p["a"] ** 2, None))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        vi.dense.init(zeros(), optimizer, init_L=torch.eye(2))
    with pytest.raises(ValueError, match="lower triangular"):
        vi.dense.init(zeros(), optimizer, init_L=torch.eye(3) + torch.triu(torch.ones(3, 3), 1))
    with pytest.raises(ValueError, match="positive diagonal"):
        vi.dense.init(zeros(), optimizer, init_L=torch.diag(torch.tensor([1.0, -1.0, 1.0])))
    with pytest.raises(ValueError, match="> 0"):
        vi.dense.init(zeros(), optimizer, init_L=0.0)
    with pytest.raises(ValueError, match="init_log_sds"):
        vi.diag.init(zeros(), optimizer, init_log_sds={"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="init_log_sds"):
        vi.diag.init(zeros(), optimizer, init_log_sds={"a": torch.zeros(3), "b": torch.zeros(())})
    with pytest.raises(ValueError, match="finite"):
        vi.diag.init(zeros(), optimizer, init_log_sds=float("nan"))
    dense = vi.dense.init(zeros(), optimizer, seed=0)
    with pytest.raises(ValueError, match="L_factor"):
        vi.dense.update(dense._replace(L_factor=L_to_flat(torch.eye(2))), None, problem.log_posterior, optimizer)
