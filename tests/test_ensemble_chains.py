"""K chains in one batched state: equality with single chains, per-chain T and h, modules, sweeps."""

import math

import pytest
import torch

from bayesflow.engine import Block, EulerMaruyama, Scalar, SDEConfig, SemiImplicitEuler, build, hamiltonian_curl
from bayesflow.ensemble import (
    bayesian_deep_ensemble,
    deep_ensemble,
    lift,
    plot_sweep,
    replicate,
    stack,
    sweep,
    trace_plot,
    unstack,
)

DTYPE = torch.float64


def regression_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 3, generator=generator, dtype=DTYPE)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE) + 0.1 * torch.randn(40, generator=generator, dtype=DTYPE)

    def log_posterior(params, batch):
        index = batch
        residual = X[index] @ params["w"] + params["b"] - y[index]
        return -0.5 * (residual**2).mean() - 0.5 * (params["w"] ** 2).sum() / 40, residual.abs().mean()

    return log_posterior


def sghmc_config(temperature=0.05, step_size=0.1):
    return SDEConfig(step_size=step_size, temperature=temperature, integrator=SemiImplicitEuler(),
                     diffusion=Block({("momenta", "momenta"): Scalar(0.5)}), curl=hamiltonian_curl(1.0))


BATCHES = [torch.arange(i, i + 10) % 40 for i in range(0, 200, 7)]


@pytest.mark.parametrize("inplace", [False, True])
def test_batched_chains_equal_independent_single_chains(inplace):
    log_posterior = regression_problem()
    single = build(log_posterior, sghmc_config())
    start = replicate({"w": torch.zeros(3, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}, 4,
                      perturbation=0.3, seed=1)
    ensemble = lift(single, 4)
    state = ensemble.init({k: v.clone() for k, v in start.items()}, seed=100)
    for batch in BATCHES:
        state, aux = ensemble.update(state, batch, inplace=inplace)
    assert aux.shape == (4,)
    for k, params in enumerate(unstack(start)):
        chain = single.init(params, seed=100 + k)
        for batch in BATCHES:
            chain, _ = single.update(chain, batch)
        for name in ("w", "b"):
            torch.testing.assert_close(state.params[name][k], chain.params[name], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(state.momenta[name][k], chain.momenta[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.log_posterior[k], chain.log_posterior, rtol=1e-12, atol=1e-12)


def test_inplace_ensemble_mutates_and_functional_does_not():
    log_posterior = regression_problem()
    ensemble = lift(build(log_posterior, sghmc_config()), 3)
    start = replicate(
        {"w": torch.zeros(3, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}, 3, perturbation=1.0, seed=0)
    state = ensemble.init(start, seed=0)
    before = state.params["w"].clone()
    new, _ = ensemble.update(state, BATCHES[0])
    assert torch.equal(state.params["w"], before) and not torch.equal(new.params["w"], before)
    pointer = state.params["w"].data_ptr()
    same, _ = ensemble.update(state, BATCHES[0], inplace=True)
    assert same.params["w"].data_ptr() == pointer
    torch.testing.assert_close(same.params["w"], new.params["w"], rtol=0, atol=0)


def test_batched_log_posterior_path_equals_vmap():
    log_posterior = regression_problem()

    def batched(params, batch):
        residual = torch.einsum("nd,kd->kn", X_of(batch), params["w"]) + params["b"][:, None] - Y_of(batch)
        return -0.5 * (residual**2).mean(-1) - 0.5 * (params["w"] ** 2).sum(-1) / 40, None

    generator = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=generator, dtype=DTYPE)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE) + 0.1 * torch.randn(40, generator=generator, dtype=DTYPE)

    def X_of(index):
        return X[index]

    def Y_of(index):
        return y[index]

    start = replicate(
        {"w": torch.zeros(3, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}, 5, perturbation=0.5, seed=0)
    via_vmap = lift(build(log_posterior, sghmc_config()), 5)
    via_batch = lift(build(batched, sghmc_config()), 5, vectorize="batched")
    a, b = via_vmap.init(start, seed=3), via_batch.init(start, seed=3)
    for batch in BATCHES[:10]:
        a, _ = via_vmap.update(a, batch)
        b, _ = via_batch.update(b, batch)
    torch.testing.assert_close(a.params["w"], b.params["w"], rtol=1e-10, atol=1e-12)


def _stationary_variance(transform, dim, steps, burn_in, seed):
    state = transform.init(torch.zeros(transform.chains, dim, dtype=DTYPE), seed=seed)
    snapshots = []
    for step in range(steps):
        state, _ = transform.update(state, None, inplace=True)
        if step >= burn_in and step % 10 == 0:
            snapshots.append(state.params.pow(2).mean(-1))  # (chains,)
    values = torch.stack(snapshots)  # (snapshots, chains); coordinates independent: d samples each
    return values.mean(0), values.std(0) / math.sqrt(values.shape[0])


def test_per_chain_temperature_scales_the_stationary_variance():
    def log_posterior(params, batch):
        return -0.5 * (params**2).sum(), None

    h = 0.2
    temperatures = torch.tensor([0.25, 1.0, 4.0], dtype=DTYPE)
    ensemble = lift(build(log_posterior, SDEConfig(step_size=h, integrator=EulerMaruyama())), 3,
                    temperature=temperatures)
    variance, error = _stationary_variance(ensemble, dim=2000, steps=1500, burn_in=100, seed=7)
    exact = temperatures / (1 - h / 2)  # Euler-Maruyama on N(0, T): T / (1 - h/2)
    # snapshots 10 steps apart decorrelate (contraction (1-h)^10 ≈ 0.1); 5 standard errors, plus a floor
    # from the d-sample estimate of each snapshot (2/d relative).
    tolerance = 5 * torch.maximum(error, exact * math.sqrt(2 / 2000 / 140))
    assert torch.all((variance - exact).abs() < tolerance), (variance, exact, tolerance)


def test_per_chain_step_size():
    def log_posterior(params, batch):
        return -0.5 * (params**2).sum(), None

    steps = torch.tensor([0.1, 0.5], dtype=DTYPE)
    ensemble = lift(build(log_posterior, SDEConfig(step_size=0.1, temperature=1.0)), 2, step_size=steps)
    variance, error = _stationary_variance(ensemble, dim=2000, steps=1500, burn_in=100, seed=3)
    exact = 1 / (1 - steps / 2)
    tolerance = 5 * torch.maximum(error, exact * math.sqrt(2 / 2000 / 140))
    assert torch.all((variance - exact).abs() < tolerance), (variance, exact)


def test_deep_ensemble_of_an_nn_module_equals_torch_sgd_per_member():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    inputs = torch.randn(32, 4, dtype=DTYPE)
    labels = torch.randint(0, 3, (32,))

    def log_posterior(params, batch):
        logits = torch.func.functional_call(model, params, (inputs,))
        return -torch.nn.functional.cross_entropy(logits, labels), logits

    members = [{k: v.detach().clone() + 0.1 * torch.randn_like(v) for k, v in model.named_parameters()}
               for _ in range(3)]
    ensemble = deep_ensemble(build(log_posterior, SDEConfig(step_size=0.1)), 3)
    state = ensemble.init(stack(members))
    for _ in range(15):
        state, logits = ensemble.update(state, None)
    assert logits.shape == (3, 32, 3)
    for k, member in enumerate(members):
        weights = {name: tensor.clone().requires_grad_(True) for name, tensor in member.items()}
        optimizer = torch.optim.SGD(weights.values(), lr=0.1)
        for _ in range(15):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, weights, (inputs,)), labels)
            loss.backward()
            optimizer.step()
        for name in member:
            torch.testing.assert_close(state.params[name][k], weights[name].detach(), rtol=1e-10, atol=1e-12)


def test_bayesian_deep_ensemble_temperature_and_errors():
    log_posterior = regression_problem()
    transform = bayesian_deep_ensemble(build(log_posterior, sghmc_config()), 2, num_data=40)
    assert transform.config.temperature == pytest.approx(1 / 40)
    with pytest.raises(ValueError, match="leading chain dimension"):
        transform.init({"w": torch.zeros(3, 3, dtype=DTYPE), "b": torch.zeros(3, dtype=DTYPE)})
    with pytest.raises(ValueError, match="3 values for 2 chains"):
        lift(build(log_posterior, sghmc_config()), 2, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="seeds"):
        transform.init(replicate({"w": torch.zeros(3, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}, 2),
                       seed=[1, 2, 3])


def test_sweep_returns_one_row_per_temperature_and_a_plot(tmp_path):
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], dtype=DTYPE)
    labels = torch.randint(0, 3, (120,), generator=generator)
    inputs = centers[labels] + torch.randn(120, 2, generator=generator, dtype=DTYPE)
    train = [(inputs[i:i + 30], labels[i:i + 30]) for i in range(0, 90, 30)]
    validation = [(inputs[90:], labels[90:])]

    def predict(params, x):
        return x @ params["w"] + params["b"]

    def log_posterior(params, batch):
        x, y = batch
        return (-torch.nn.functional.cross_entropy(predict(params, x), y)
                - 0.5 * (params["w"] ** 2).sum() / 90), None

    params = {"w": torch.zeros(2, 3, dtype=DTYPE), "b": torch.zeros(3, dtype=DTYPE)}
    temperatures = [0.0, 1 / 90, 10 / 90]
    rows = sweep(build(log_posterior, sghmc_config(step_size=0.1)), temperatures, params, train, steps=200,
                 predict=predict, validation=validation, chains_per_temperature=2, thin=5, progress=False)
    assert [row["temperature"] for row in rows] == pytest.approx(temperatures)
    for row in rows:
        assert row["num_samples"] == 20 and row["chains"] == 2
        assert row["predictive"].shape == (30, 3)
        torch.testing.assert_close(row["predictive"].sum(-1), torch.ones(30, dtype=DTYPE))
        assert row["accuracy"] > 0.6  # three well-separated blobs: chance is 1/3
        assert -2.0 < row["log_likelihood"] < 0 and 0 <= row["ece"] <= 1
    path = tmp_path / "sweep.png"
    plot_sweep(rows, "log_likelihood", path=str(path), num_data=90)
    assert path.stat().st_size > 1000
    traces = tmp_path / "trace.png"
    trace_plot(torch.randn(3, 50, 2), path=str(traces))
    assert traces.stat().st_size > 1000
    with pytest.raises(ValueError, match="chains, draws, parameters"):
        trace_plot(torch.randn(50, 2))


@pytest.mark.parametrize("kind", ["per chain", "constant", "none", "python values"])
def test_vmap_route_aux_per_chain_constant_none_and_python_values(kind):
    """aux that depends on the chain comes back with one entry per chain; aux that does not
    (a constant tensor: broadcast to K as vmap broadcasts it; None; Python values) leaves the mapped
    forward directly."""
    constant = torch.tensor([3.0, 4.0], dtype=DTYPE)

    def log_posterior(params, batch):
        value = -0.5 * (params ** 2).sum()
        aux = {"per chain": lambda: {"square": params ** 2}, "constant": lambda: constant, "none": lambda: None,
               "python values": lambda: {"name": "gauss", "scale": 2.0}}[kind]()
        return value, aux

    ensemble = lift(build(log_posterior, SDEConfig(step_size=0.1, temperature=0.0)), 3)
    params = torch.arange(6, dtype=DTYPE).view(3, 2)
    state, aux = ensemble.update(ensemble.init(params.clone(), seed=0), None)
    if kind == "per chain":
        torch.testing.assert_close(aux["square"], params ** 2, rtol=0, atol=0)
        assert not aux["square"].requires_grad
    elif kind == "constant":
        assert aux.shape == (3, 2) and torch.equal(aux, constant.expand(3, 2))
    elif kind == "none":
        assert aux is None
    else:
        assert aux == {"name": "gauss", "scale": 2.0}
    torch.testing.assert_close(state.params, 0.9 * params, rtol=0, atol=1e-15)


@pytest.mark.parametrize(("chains", "perturbation", "fragment"), [
    (0, None, "num_chains must be a positive integer"), (2.0, None, "num_chains must be a positive integer"),
    (3, -0.1, "non-negative standard deviation"), (3, math.nan, "non-negative standard deviation"),
])
def test_replicate_rejects_bad_counts_and_spreads(chains, perturbation, fragment):
    with pytest.raises(ValueError, match=fragment):
        replicate({"w": torch.zeros(3, dtype=DTYPE)}, chains, perturbation=perturbation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("model", ["elementwise", "matrix"])
def test_chain_k_is_bitwise_the_single_run_seeded_s_plus_k(model, dtype):
    """The README's bitwise promise: elementwise ops and ``x @ W`` with a weight matrix batch into kernels
    that sum in the same order, so chain k equals the single chain seeded s + k exactly (SGLD, SGHMC, BAOAB)."""
    from bayesflow.sgmcmc import baoab, sghmc, sgld
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 20, generator=generator, dtype=dtype), torch.randint(0, 3, (64,), generator=generator)
    if model == "matrix":
        start = torch.zeros(20, 3, dtype=dtype)
        def log_posterior(W, batch):
            return -torch.nn.functional.cross_entropy(x @ W, y) - 0.5 * W.square().sum() / 64, None
    else:
        start = torch.zeros(20, dtype=dtype)
        def log_posterior(w, batch):
            return -0.5 * (w - x[0]).square().sum() - 0.1 * w.pow(4).sum(), None
    for preset in (sgld, sghmc, baoab):
        single = preset.build(log_posterior, lr=1e-2, temperature=1 / 64)
        ensemble = lift(single, 3)
        state = ensemble.init(replicate(start, 3), seed=5)
        chain = single.init(start.clone(), seed=7)
        for _ in range(30):
            state, _ = ensemble.update(state, None)
            chain, _ = single.update(chain, None)
        assert torch.equal(state.params[2], chain.params), preset.__name__
        assert not torch.equal(state.params[1], chain.params)   # the comparison can fail: other seeds differ
