"""The transform API: ``step`` (caller's gradient) equals ``update``, trees, per-leaf N, weight decay, orders."""

from __future__ import annotations

import pytest
import torch

from bayesflow.engine import (
    Block,
    EulerMaruyama,
    Nesterov,
    Preconditioned,
    Scalar,
    SDEConfig,
    SemiImplicitEuler,
    Splitting,
    SquaredGradientAverage,
    ThermostatCoupling,
    build,
    hamiltonian_curl,
)
from bayesflow.optim import rmsprop
from bayesflow.sgmcmc import adam_sghmc
from bayesflow.tree import flatten, tree_map, unflatten

DTYPE = torch.float64


def log_posterior(params, batch):
    """A non-quadratic objective on a nested tree; ``batch`` shifts its optimum (mini-batches)."""
    w, (b, c) = params["w"], params["rest"]
    value = -0.5 * ((w - batch) ** 2).sum() - 0.25 * (b**4).sum() - 0.5 * c**2 + 0.1 * (w[0] * c)
    return value, None


def gradient(params, batch):
    """∇ℓ computed by the caller (plain autograd), with the structure of params."""
    leaves, spec = flatten(params)
    detached = [leaf.detach().requires_grad_(True) for leaf in leaves]
    value, _ = log_posterior(unflatten(spec, detached), batch)
    return unflatten(spec, list(torch.autograd.grad(value, detached))), value.detach()


def make_params():
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, dtype=DTYPE, generator=generator),
            "rest": (torch.randn(2, 2, dtype=DTYPE, generator=generator),
                     torch.randn((), dtype=DTYPE, generator=generator))}


def batch_at(step):
    return torch.randn(3, dtype=DTYPE, generator=torch.Generator().manual_seed(50 + step))


def momentum(integrator, **fields):
    return SDEConfig(step_size=0.1, diffusion=Block({("momenta", "momenta"): Scalar(0.5)}), curl=hamiltonian_curl(1.0),
                     integrator=integrator, temperature=0.3, **fields)


STEPPABLE = {
    "SGLD": lambda: SDEConfig(step_size=0.05, temperature=0.3),
    "SGLD num_data, weight decay": lambda: SDEConfig(step_size=0.05, temperature=0.3, num_data=7.0, weight_decay=0.2),
    "SGLD decoupled decay": lambda: SDEConfig(step_size=0.05, temperature=0.3, decoupled_weight_decay=0.05),
    "SGHMC": lambda: momentum(SemiImplicitEuler()),
    "SGHMC decoupled decay": lambda: momentum(SemiImplicitEuler(), decoupled_weight_decay=0.05),
    "SGHMC full Euler": lambda: momentum(EulerMaruyama()),
    "Nesterov": lambda: momentum(Nesterov()),
    "pSGLD": lambda: SDEConfig(step_size=0.05, temperature=0.3,
                               diffusion=Preconditioned(SquaredGradientAverage(0.9, 1e-2), power=-1.0)),
    "SGNHT": lambda: SDEConfig(step_size=0.05, temperature=0.3, integrator=SemiImplicitEuler(),
                               diffusion=Block({("momenta", "momenta"): Scalar(1.0)}),
                               curl=Block({("params", "momenta"): Scalar(-1.0), ("momenta", "params"): Scalar(1.0),
                                           ("momenta", "xi"): ThermostatCoupling(+1),
                                           ("xi", "momenta"): ThermostatCoupling(-1)})),
    "BAOA": lambda: momentum(Splitting("BAOA")),
    # preconditioned momentum systems: P is computed into the gradient's memory after the kick in
    # update() (the engine owns that gradient) but into a scratch buffer in step() (the caller's)
    "Adam-SGHMC": lambda: adam_sghmc.config(lr=0.01, temperature=0.3),
    "Adam-SGHMC AMSGrad, weight decay": lambda: adam_sghmc.config(lr=0.01, temperature=0.3, amsgrad=True,
                                                                 weight_decay=0.1),
    "Adam-SGHMC num_data": lambda: adam_sghmc.config(lr=0.01, temperature=0.3, num_data=5.0),
    "RMSprop centered momentum (T>0)": lambda: rmsprop.config(lr=0.01, momentum=0.9, centered=True, temperature=0.3),
}


@pytest.mark.parametrize("name", sorted(STEPPABLE))
@pytest.mark.parametrize("inplace", [False, True])
def test_step_with_the_callers_gradient_equals_update(name, inplace):
    by_update, by_step = build(log_posterior, STEPPABLE[name]()), build(log_posterior, STEPPABLE[name]())
    a = by_update.init(make_params(), seed=4)
    b = by_step.init(make_params(), seed=4)
    for step in range(6):
        grads, value = gradient(b.params, batch_at(step))
        a, _ = by_update.update(a, batch_at(step), inplace=inplace)
        b = by_step.step(b, grads, inplace=inplace, log_posterior=value)
        for x, y in zip(flatten(a)[0], flatten(b)[0]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_params_trees_keep_their_structure():
    transform = build(log_posterior, momentum(SemiImplicitEuler()))
    state = transform.init(make_params(), seed=0)
    for step in range(3):
        state, _ = transform.update(state, batch_at(step))
    for tree in (state.params, state.momenta):
        assert set(tree) == {"w", "rest"} and isinstance(tree["rest"], tuple)
        assert tree["w"].shape == (3,) and tree["rest"][0].shape == (2, 2) and tree["rest"][1].shape == ()
        assert all(leaf.dtype == DTYPE for leaf in flatten(tree)[0])


@pytest.mark.parametrize("num_data", [(2.0, 5.0), {"a": 2.0, "b": 5.0}])
def test_num_data_per_leaf_scales_each_group(num_data):
    """T = 0, SGD: θ_leaf' = θ_leaf + h ∇_leaf ℓ / N_leaf."""
    def objective(p, batch):
        return -0.5 * (p["a"] ** 2).sum() - 0.5 * (p["b"] ** 2).sum(), None

    params = {"a": torch.tensor([1.0, 2.0], dtype=DTYPE), "b": torch.tensor([3.0], dtype=DTYPE)}
    transform = build(objective, SDEConfig(step_size=0.1, temperature=0.0, num_data=num_data))
    state, _ = transform.update(transform.init(params, seed=0), None)
    torch.testing.assert_close(state.params["a"], params["a"] * (1 - 0.1 / 2.0), rtol=1e-15, atol=0)
    torch.testing.assert_close(state.params["b"], params["b"] * (1 - 0.1 / 5.0), rtol=1e-15, atol=0)


@pytest.mark.parametrize("config", [
    lambda **f: SDEConfig(step_size=0.05, temperature=0.3, **f),
    lambda **f: momentum(SemiImplicitEuler(), **f),
    lambda **f: momentum(Splitting("BAOAB"), **f),
], ids=["SGLD", "SGHMC", "BAOAB"])
def test_weight_decay_equals_a_gaussian_prior_in_the_log_posterior(config):
    """λ in -∇θH = ∇ℓ/N - λθ is the prior term -(Nλ/2)|θ|² added to the user's ℓ."""
    lam, N = 0.3, 4.0

    def with_prior(params, batch):
        value, aux = log_posterior(params, batch)
        return value - 0.5 * N * lam * sum((leaf**2).sum() for leaf in flatten(params)[0]), aux

    decayed = build(log_posterior, config(num_data=N, weight_decay=lam))
    explicit = build(with_prior, config(num_data=N))
    a, b = decayed.init(make_params(), seed=1), explicit.init(make_params(), seed=1)
    for step in range(20):
        a, _ = decayed.update(a, batch_at(step))
        b, _ = explicit.update(b, batch_at(step))
    tree_map(lambda x, y: torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12), a.params, b.params)
    undecayed = build(log_posterior, config(num_data=N))
    plain = undecayed.init(make_params(), seed=1)
    for step in range(20):
        plain, _ = undecayed.update(plain, batch_at(step))
    assert (a.params["w"] - plain.params["w"]).abs().max() > 1e-3  # the decay matters in this test


def test_integrators_declare_their_weak_order():
    assert EulerMaruyama().weak_order == 1
    assert SemiImplicitEuler().weak_order == 1
    assert Nesterov().weak_order == 1
    for word in ("BAOAB", "OBABO", "ABOBA"):
        assert Splitting(word).weak_order == 2
    assert Splitting("BAOA").weak_order == 1


@pytest.mark.parametrize("objective", ["shared gradient", "broadcast gradient", "plain"])
def test_preconditioner_in_the_gradients_memory_is_safe_for_aliased_gradients(objective):
    """After the kick P may be written into the gradient autograd returned; autograd can return one
    tensor for two leaves (the inputs of an addition) or a broadcast view (the gradient of a sum).
    Those must not be written into: update() then equals step() with the caller's gradient."""
    def log_posterior(params, batch):
        a, b = params["a"], params["b"]
        if objective == "shared gradient":
            return -(((a + b) * batch) ** 2).sum() * 0.0 + ((a + b) * batch).sum(), None
        if objective == "broadcast gradient":
            return a.sum() - b.sum(), None
        return -0.5 * (a**2).sum() - 0.25 * (b**4).sum() + (a * batch).sum(), None

    def gradient(params, batch):
        leaves, spec = flatten(params)
        detached = [leaf.detach().requires_grad_(True) for leaf in leaves]
        value, _ = log_posterior(unflatten(spec, detached), batch)
        return unflatten(spec, [g.clone() for g in torch.autograd.grad(value, detached)]), value.detach()

    params = {"a": torch.linspace(-1, 1, 5, dtype=DTYPE), "b": torch.linspace(0.5, 2, 5, dtype=DTYPE)}
    for make in (lambda: adam_sghmc.config(lr=0.01, temperature=0.3), lambda: rmsprop.config(lr=0.01, momentum=0.9)):
        by_update, by_step = build(log_posterior, make()), build(log_posterior, make())
        a, b = by_update.init(params, seed=1), by_step.init(params, seed=1)
        for step in range(5):
            batch = batch_at(step)[:1].expand(5).clone()
            grads, value = gradient(b.params, batch)
            a, _ = by_update.update(a, batch, inplace=True)
            b = by_step.step(b, grads, inplace=True, log_posterior=value)
            for x, y in zip(flatten(a)[0], flatten(b)[0]):
                torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["shared gradient", "broadcast gradient"])
def test_weight_decay_and_per_leaf_num_data_with_aliased_gradients(objective):
    """The engine scales its own autograd gradient in place, except where autograd returned one
    tensor for two leaves or a broadcast view: -∇θH stays ∇ℓ/N - λθ leaf by leaf."""
    x = torch.tensor([1.0, 2.0, -1.0], dtype=DTYPE)

    def log_posterior(params, batch):
        if objective == "shared gradient":
            return ((params["a"] + params["b"]) * x).sum(), None
        return params["a"].sum() + params["b"].sum(), None

    gradient = x if objective == "shared gradient" else torch.ones(3, dtype=DTYPE)
    params = {"a": torch.ones(3, dtype=DTYPE), "b": 2 * torch.ones(3, dtype=DTYPE)}
    transform = build(log_posterior, SDEConfig(step_size=1.0, temperature=0.0, weight_decay=0.5,
                                               num_data={"a": 2.0, "b": 4.0}))
    state, _ = transform.update(transform.init(params), None)
    torch.testing.assert_close(state.params["a"], 1 + gradient / 2 - 0.5 * 1)
    torch.testing.assert_close(state.params["b"], 2 + gradient / 4 - 0.5 * 2)


@pytest.mark.parametrize("inplace", [True, False])
def test_module_parameters_as_in_the_quick_start(inplace):
    """``init(dict(model.named_parameters()))``: in place, the module's own nn.Parameters move (as
    a torch optimizer moves them); functionally, the new params carry no autograd graph (steps
    must not chain one), and the module is untouched."""
    from torch import nn

    from bayesflow.sgmcmc import sghmc

    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=DTYPE), torch.randn(8, 2, dtype=DTYPE)

    def log_posterior(params, batch):
        return -((torch.func.functional_call(model, params, (x,)) - y) ** 2).mean(), None

    before = model.weight.detach().clone()
    transform = sghmc.build(log_posterior, lr=1e-2, temperature=1e-3)
    state = transform.init(dict(model.named_parameters()), seed=0)
    for _ in range(3):
        state, _ = transform.update(state, None, inplace=inplace)
    if inplace:
        assert state.params["weight"] is model.weight and not torch.equal(model.weight.detach(), before)
    else:
        assert torch.equal(model.weight.detach(), before)
        assert all(not v.requires_grad and v.grad_fn is None for v in state.params.values())
        assert not torch.equal(state.params["weight"], before)
