"""posteriors' optimizer wrappers: bayesflow.optim.build (torch.optim classes) and bayesflow.torchopt
(functional gradient transformations), checked step for step against hand-written loops."""

from __future__ import annotations

import copy
import doctest
import subprocess
import sys

import optree
import pytest
import torch
import torchopt

import bayesflow.optim
import bayesflow.torchopt
from bayesflow.optim import OptimState, torch_optim
from bayesflow.torchopt import TorchOptState

STEPS = 20
TARGET = {"a": torch.tensor([1.0, -2.0, 0.5]), "b": torch.tensor([[0.3, -0.7], [1.5, 0.0]])}


def quadratic(params, batch):
    """A quadratic bowl with minimum at TARGET (batch scales it); aux: the loss per block."""
    a = (params["a"] - TARGET["a"]) ** 2
    b = 0.5 * (params["b"] - TARGET["b"]) ** 2
    return batch * (a.sum() + b.sum()), {"a": a.sum().detach(), "b": b.sum().detach()}


def start(requires_grad: bool = True) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, generator=gen).requires_grad_(requires_grad),
            "b": torch.randn(2, 2, generator=gen).requires_grad_(requires_grad)}


def leaves(tree) -> list:
    return [leaf.detach().clone() if isinstance(leaf, torch.Tensor) else leaf
            for leaf in optree.tree_leaves(tree, none_is_leaf=True)]


def assert_trees_equal(x, y):
    lx, ly = leaves(x), leaves(y)
    assert len(lx) == len(ly)
    for u, v in zip(lx, ly):
        if isinstance(u, torch.Tensor):  # exact equality; NaN equals NaN (the engine's "not yet evaluated")
            torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)
        else:
            assert u == v, (u, v)


# --- torch.optim -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("cls", "options"), [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}),
])
def test_torch_optim_equals_the_hand_loop(cls, options):
    params = start()
    transform = bayesflow.optim.build(quadratic, cls, **options)
    state = transform.init(params)
    assert isinstance(state, OptimState) and state.params is params and state.loss.numel() == 0

    manual = {k: v.detach().clone().requires_grad_() for k, v in start().items()}
    optimizer = cls(list(manual.values()), **options)
    for _ in range(STEPS):
        state, aux = transform.update(state, 1.0)
        optimizer.zero_grad()
        loss, manual_aux = quadratic(manual, 1.0)
        loss.backward()
        optimizer.step()
        assert torch.equal(state.loss, loss.detach())
        assert_trees_equal(aux, manual_aux)
    assert_trees_equal(state.params, manual)
    assert state.params is params  # stepped in place: the caller's tensors
    assert not state.loss.requires_grad


def test_torch_optim_converges_on_the_quadratic():
    transform = bayesflow.optim.build(quadratic, torch.optim.SGD, lr=0.1)
    state = transform.init(start())
    for _ in range(200):
        state, _ = transform.update(state, 1.0)
    assert state.loss < 1e-8
    for key in TARGET:
        torch.testing.assert_close(state.params[key].detach(), TARGET[key])


def test_torch_optim_module_functions_and_no_grad_context():
    params = torch.ones(2, requires_grad=True)
    state = torch_optim.init(params, torch.optim.SGD, 0.1)  # lr positionally, as posteriors allows
    with torch.no_grad():  # the update enables grad for its own backward pass
        state, aux = torch_optim.update(state, None, lambda p, b: ((p**2).sum(), None))
    assert aux is None
    assert torch.equal(params.detach(), torch.full((2,), 0.8))
    assert torch.equal(state.loss, torch.tensor(2.0))


def test_torch_optim_inplace_false_is_not_implemented():
    transform = bayesflow.optim.build(quadratic, torch.optim.SGD, lr=0.1)
    state = transform.init(start())
    before = leaves(state.params)
    with pytest.raises(NotImplementedError, match="in place"):
        transform.update(state, 1.0, inplace=False)
    assert_trees_equal(state.params, before)
    assert state.loss.numel() == 0


@pytest.mark.parametrize(("optimizer", "match"), [
    ("sgd", "torch.optim.Optimizer subclass.*'sgd'"),
    (torch.nn.Linear, "torch.optim.Optimizer subclass.*Linear"),
    (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "pass the class"),
    (torchopt.sgd(lr=0.1), "bayesflow.torchopt.build"),
])
def test_torch_optim_rejects_what_is_not_an_optimizer_class(optimizer, match):
    with pytest.raises(TypeError, match=match):
        bayesflow.optim.build(quadratic, optimizer, lr=0.1)
    with pytest.raises(TypeError, match=match):
        torch_optim.init(start(), optimizer, lr=0.1)


def test_torch_optim_checks_the_params():
    with pytest.raises(ValueError, match=r"params\['a'\].*requires_grad=False"):
        torch_optim.init(start(requires_grad=False), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        torch_optim.init({"a": torch.ones(2, requires_grad=True) * 2}, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="no tensors"):
        torch_optim.init({}, torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize(("loss_fn", "error", "match"), [
    (lambda p, b: (p**2).sum(), TypeError, r"must return \(loss, aux\)"),
    (lambda p, b: ((p**2).sum(), None, None), TypeError, r"must return \(loss, aux\)"),
    (lambda p, b: (p**2, None), ValueError, "scalar"),
    (lambda p, b: (3.0, None), TypeError, "floating-point tensor"),
])
def test_loss_fn_must_return_a_scalar_and_aux(loss_fn, error, match):
    transform = bayesflow.optim.build(loss_fn, torch.optim.SGD, lr=0.1)
    with pytest.raises(error, match=match):
        transform.update(transform.init(torch.ones(2, requires_grad=True)), None)
    transform = bayesflow.torchopt.build(loss_fn, torchopt.sgd(lr=0.1))
    with pytest.raises(error, match=match):
        transform.update(transform.init(torch.ones(2)), None)


def test_torch_optim_loss_must_depend_on_the_params():
    transform = bayesflow.optim.build(lambda p, b: (torch.tensor(1.0), None), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="does not depend on the params"):
        transform.update(transform.init(torch.ones(2, requires_grad=True)), None)


# --- torchopt --------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda: torchopt.sgd(lr=0.1),
    "sgd-momentum": lambda: torchopt.sgd(lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda: torchopt.adam(lr=0.05),
    "adamw": lambda: torchopt.adamw(lr=0.05, weight_decay=0.1),
}


def manual_torchopt(optimizer, steps: int = STEPS):
    params = start(requires_grad=False)
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(steps):
        grads, (loss, _) = torch.func.grad_and_value(quadratic, has_aux=True)(params, 1.0)
        updates, opt_state = optimizer.update(grads, opt_state, params=params, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
        losses.append(loss)
    return params, opt_state, losses


@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_torchopt_equals_the_manual_loop(name, inplace):
    params = start()
    transform = bayesflow.torchopt.build(quadratic, OPTIMIZERS[name]())
    state = transform.init(params)
    assert isinstance(state, TorchOptState) and state.loss.numel() == 0
    expected_params, expected_opt_state, losses = manual_torchopt(OPTIMIZERS[name]())
    for loss in losses:
        state, aux = transform.update(state, 1.0, inplace=inplace)
        assert torch.equal(state.loss, loss)
        assert set(aux) == {"a", "b"}
    assert_trees_equal(state.params, expected_params)
    assert_trees_equal(state.opt_state, expected_opt_state)
    if inplace:
        assert state.params is params and all(state.params[k] is params[k] for k in params)
    else:
        assert_trees_equal(params, start())  # the input is never written
        assert all(state.params[k].requires_grad and state.params[k].is_leaf for k in params)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_torchopt_functional_update_leaves_the_input_state_untouched(name):
    optimizer = OPTIMIZERS[name]()
    transform = bayesflow.torchopt.build(quadratic, optimizer)
    state, _ = transform.update(transform.init(start()), 1.0)  # a state with moments and a loss
    before = copy.deepcopy(leaves(state))
    new, _ = transform.update(state, 1.0, inplace=False)
    assert_trees_equal(state, before)
    assert not any(n is o for n, o in zip(optree.tree_leaves(new), optree.tree_leaves(state)))


def test_torchopt_inplace_update_writes_the_state_tensors():
    transform = bayesflow.torchopt.build(quadratic, torchopt.adam(lr=0.05))
    state, _ = transform.update(transform.init(start()), 1.0)
    a, loss = state.params["a"], state.loss
    before = a.detach().clone()
    new, _ = transform.update(state, 1.0, inplace=True)
    assert new.params["a"] is a and new.loss is loss
    assert not torch.equal(a, before)
    assert torch.equal(loss, new.loss)


def test_torchopt_converges_and_passes_non_tensor_aux():
    def loss_fn(p, batch):
        return ((p - batch) ** 2).sum(), {"note": "quadratic", "n": 3, "none": None, "p": p}

    transform = bayesflow.torchopt.build(loss_fn, torchopt.sgd(lr=0.1))
    state = transform.init(torch.zeros(2))
    for _ in range(200):
        state, aux = transform.update(state, torch.ones(2))
    assert state.loss < 1e-8
    torch.testing.assert_close(state.params, torch.ones(2))
    assert aux["note"] == "quadratic" and aux["n"] == 3 and aux["none"] is None
    assert isinstance(aux["p"], torch.Tensor) and not aux["p"].requires_grad


def test_torchopt_module_functions():
    optimizer = torchopt.adam(lr=0.1)
    state = bayesflow.torchopt.init(torch.ones(2), optimizer)
    state, aux = bayesflow.torchopt.update(state, None, lambda p, b: ((p**2).sum(), None), optimizer)
    assert aux is None
    torch.testing.assert_close(state.params, torch.full((2,), 0.9))


# --- bayesflow's own gradient transformations through bayesflow.torchopt ---------------------------

def manual_torch_optim(cls, options, steps: int = STEPS):
    params = {k: v.detach().clone().requires_grad_() for k, v in start().items()}
    optimizer = cls(list(params.values()), **options)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = quadratic(params, 1.0)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return {k: v.detach() for k, v in params.items()}, losses


@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
@pytest.mark.parametrize(("ours", "cls", "options"), [
    (lambda: bayesflow.optim.sgd.transformation(lr=0.1), torch.optim.SGD, {"lr": 0.1}),
    (lambda: bayesflow.optim.sgd.transformation(lr=0.05, momentum=0.9), torch.optim.SGD,
     {"lr": 0.05, "momentum": 0.9}),
    (lambda: bayesflow.optim.adam.transformation(lr=0.05), torch.optim.Adam, {"lr": 0.05}),
    (lambda: bayesflow.optim.as_gradient_transformation(bayesflow.optim.adamw.config(lr=0.05, weight_decay=0.1)),
     torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}),
], ids=["sgd", "sgd-momentum", "adam", "adamw-config"])
def test_bayesflow_gradient_transformations_run_in_bayesflow_torchopt(ours, cls, options, inplace):
    """bayesflow's presets as torchopt-protocol optimizers: their trajectory is torch.optim's."""
    params = start()
    transform = bayesflow.torchopt.build(quadratic, ours())
    state = transform.init(params)
    expected, losses = manual_torch_optim(cls, options)
    for loss in losses:
        state, _ = transform.update(state, 1.0, inplace=inplace)
        torch.testing.assert_close(state.loss, loss)
    for key in params:
        torch.testing.assert_close(state.params[key].detach(), expected[key])
    if inplace:
        assert state.params is params
    else:
        assert_trees_equal(params, start())


def test_bayesflow_functional_update_leaves_its_own_state_untouched():
    transform = bayesflow.torchopt.build(quadratic, bayesflow.optim.adam.transformation(lr=0.05))
    state, _ = transform.update(transform.init(start()), 1.0)
    before = copy.deepcopy(leaves(state))
    transform.update(state, 1.0, inplace=False)
    assert_trees_equal(state, before)


@pytest.mark.parametrize(("optimizer", "match"), [
    (torchopt.Adam, "lower-case functional optimizer"),
    (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "bayesflow.optim.build"),
    (bayesflow.optim.sgd.build(lambda p, b: (-(p**2).sum(), None), lr=0.1), "transformation"),
    (bayesflow.optim.sgd.config(lr=0.1), "as_gradient_transformation"),
    (object(), "no init and update"),
])
def test_torchopt_rejects_what_is_not_a_gradient_transformation(optimizer, match):
    with pytest.raises(TypeError, match=match):
        bayesflow.torchopt.build(quadratic, optimizer)
    with pytest.raises(TypeError, match=match):
        bayesflow.torchopt.init(start(), optimizer)


def test_missing_torchopt_says_how_to_install_it(monkeypatch):
    code = "import sys; sys.modules['torchopt'] = None; import bayesflow.torchopt, bayesflow.optim"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)  # importing needs no torchopt
    monkeypatch.setitem(sys.modules, "torchopt", None)  # `import torchopt` now raises ImportError
    tx = bayesflow.optim.sgd.transformation(lr=0.1)
    with pytest.raises(ImportError, match="pip install torchopt"):
        bayesflow.torchopt.build(quadratic, tx)
    state = bayesflow.torchopt.init(torch.ones(2), tx)
    with pytest.raises(ImportError, match="pip install torchopt"):
        bayesflow.torchopt.update(state, None, lambda p, b: ((p**2).sum(), None), tx)


# --- documentation and posteriors' own tests -------------------------------------------------------

@pytest.mark.parametrize("module", [bayesflow.optim.torch_optim, bayesflow.torchopt], ids=lambda m: m.__name__)
def test_docstring_examples(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    tests = doctest.DocTestFinder().find(module, module.__name__, globs={})
    documented = {test.name.rsplit(".", 1)[-1] for test in tests if test.examples}
    assert set(module.__all__) <= documented
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
