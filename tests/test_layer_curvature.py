"""The per-layer module routes (bayesflow.utils.layer_curvature, laplace.module_diag, ekf.module_diag)
against the torch.func routes they replace, to float64 round-off: laplace.diag_fisher on the
per-sample log likelihood, laplace.diag_ggn with the module as forward, ekf.diag_fisher; their
in-place variants, parameter subsets, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from bayesflow.ekf import diag_fisher as ekf_diag_fisher
from bayesflow.laplace import diag_fisher, diag_ggn
from bayesflow.utils.layer_curvature import layer_diagonal, output_hessian

DTYPE = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-13}
_NO_AUX = torch.tensor([])


def _cross_entropy(z, batch):
    return -torch.nn.functional.cross_entropy(z, batch[1], reduction="sum")


def _gaussian(z, batch):
    return -0.5 * ((z - batch[1]) ** 2).sum() / 0.7**2


def _heteroscedastic(z, batch):   # z[:, 0] the mean, z[:, 1] the log variance: H_ℓ is indefinite
    mean, log_var = z[:, 0], z[:, 1]
    return -0.5 * (((batch[1] - mean) ** 2) * torch.exp(-log_var) + log_var).sum()


class TwoHeads(torch.nn.Module):
    """A trunk and two Linear heads stacked into a (batch, 2, outputs) output."""

    def __init__(self, outputs=2):
        super().__init__()
        self.trunk = torch.nn.Linear(3, 6)
        self.mean = torch.nn.Linear(6, outputs)
        self.log_var = torch.nn.Linear(6, outputs, bias=False)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return torch.stack([self.mean(h), self.log_var(h)], dim=1)


class Dangling(torch.nn.Module):
    """One Linear layer used, one called whose output is thrown away, one never called."""

    def __init__(self):
        super().__init__()
        self.used, self.dangling, self.unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

    def forward(self, x):
        self.dangling(x)
        return self.used(x)


def _mlp(bias=True, outputs=4):
    linear = torch.nn.Linear
    return torch.nn.Sequential(linear(3, 5, bias=bias), torch.nn.Tanh(), linear(5, outputs, bias=bias))


def _case(name, seed=0, n=7):
    torch.manual_seed(seed)
    x = torch.randn(n, 3, dtype=DTYPE)
    if name == "cross_entropy":
        return _mlp().to(DTYPE), _cross_entropy, (x, torch.randint(0, 4, (n,)))
    if name == "gaussian_no_bias":
        return _mlp(bias=False, outputs=2).to(DTYPE), _gaussian, (x, torch.randn(n, 2, dtype=DTYPE))
    return TwoHeads().to(DTYPE), _heteroscedastic, (x, torch.randn(n, 2, dtype=DTYPE))


CASES = ["cross_entropy", "gaussian_no_bias", "two_heads"]


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _forward(model):
    return lambda params, batch: (functional_call(model, params, (batch[0],)), _NO_AUX)


def _log_posterior(model, loglik):
    return lambda params, batch: (loglik(functional_call(model, params, (batch[0],)), batch), _NO_AUX)


def _assert_trees_close(ours, ref, **tol):
    assert list(ours) == list(ref)
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], **(tol or TOL))


def _split(batch):
    return [tuple(t[rows] for t in batch) for rows in (slice(0, 3), slice(3, None))]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("inplace", [False, True])
def test_laplace_diag_fisher_equals_the_per_sample_scores_route(case, inplace):
    model, loglik, batch = _case(case)
    ours = diag_fisher.build_for_module(model, loglik, init_prec_diag=0.5)
    ref = diag_fisher.build(_log_posterior(model, loglik), init_prec_diag=0.5)
    state, ref_state = ours.init(_params(model)), ref.init(_params(model))
    prec = state.prec_diag
    for part in _split(batch):
        state, output = ours.update(state, part, inplace=inplace)
        ref_state, _ = ref.update(ref_state, part)
    _assert_trees_close(state.prec_diag, ref_state.prec_diag)
    assert int(state.step) == 2 and (state.prec_diag is prec) == inplace
    torch.testing.assert_close(output, model(batch[0][3:]).detach())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("inplace", [False, True])
def test_laplace_diag_ggn_equals_the_jacobian_route(case, inplace):
    model, loglik, batch = _case(case, seed=1)
    ours = diag_ggn.build_for_module(model, loglik)
    ref = diag_ggn.build(_forward(model), loglik)
    state, ref_state = ours.init(_params(model)), ref.init(_params(model))
    for part in _split(batch):
        state, _ = ours.update(state, part, inplace=inplace)
        ref_state, _ = ref.update(ref_state, part)
    _assert_trees_close(state.prec_diag, ref_state.prec_diag)
    assert int(state.step) == 2


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("inplace", [False, True])
def test_ekf_diag_fisher_equals_the_jacobian_route(case, inplace):
    model, loglik, batch = _case(case, seed=2)
    kwargs = {"lr": lambda step: 3.0 + step, "transition_sd": 0.1, "init_sds": 0.8}
    ours = ekf_diag_fisher.build_for_module(model, loglik, **kwargs)
    ref = ekf_diag_fisher.build(_log_posterior(model, loglik), **kwargs)
    state, ref_state = ours.init(_params(model)), ref.init(_params(model))
    params = state.params
    for part in _split(batch):   # the second update is at the moved mean
        state, _ = ours.update(state, part, inplace=inplace)
        ref_state, _ = ref.update(ref_state, part)
    _assert_trees_close(state.params, ref_state.params)
    _assert_trees_close(state.sd_diag, ref_state.sd_diag)
    torch.testing.assert_close(state.log_likelihood, ref_state.log_likelihood, **TOL)
    assert int(state.step) == 2 and (state.params is params) == inplace
    assert not torch.equal(state.params["trunk.weight" if case == "two_heads" else "0.weight"],
                           _params(model)["trunk.weight" if case == "two_heads" else "0.weight"])


def test_the_checks_would_fail_on_a_wrong_answer():
    model, loglik, batch = _case("cross_entropy", seed=3)
    params = _params(model)
    fisher = layer_diagonal(model, params, batch, loglik, with_gradient=True)
    squared_sum = {k: g.square() for k, g in fisher.gradient.items()}   # (Σ_n g_n)², not Σ_n g_n²
    with pytest.raises(AssertionError):
        _assert_trees_close(squared_sum, fisher.diagonal)
    with pytest.raises(AssertionError):   # the empirical Fisher is not the GGN
        _assert_trees_close(layer_diagonal(model, params, batch, loglik, "ggn").diagonal, fisher.diagonal)
    # the gradient itself is the exact batch gradient
    grad = torch.func.grad(lambda p: loglik(functional_call(model, p, (batch[0],)), batch))(params)
    _assert_trees_close(fisher.gradient, grad)
    # H of the heteroscedastic Gaussian is indefinite: a clamped root (KFAC's) would give another diagonal
    model, loglik, batch = _case("two_heads", seed=3)
    z = model(batch[0]).detach().requires_grad_(True)
    assert float(torch.linalg.eigvalsh(output_hessian(-loglik(z, batch), z)).min()) < -1e-3


def test_output_hessian_is_the_per_row_block_of_the_full_hessian():
    torch.manual_seed(4)
    z, y = torch.randn(3, 4, dtype=DTYPE, requires_grad=True), torch.tensor([0, 3, 1])
    hess = output_hessian(-_cross_entropy(z, (None, y)), z)
    full = torch.func.hessian(lambda v: -_cross_entropy(v, (None, y)))(z.detach())   # (3, 4, 3, 4)
    for n in range(3):
        torch.testing.assert_close(hess[n], full[n, :, n], **TOL)


def test_parameter_subsets_unused_layers_and_no_grad():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).to(DTYPE)
    batch = (torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"params\['1.weight'\] is not the weight or bias of a torch.nn.Linear"):
        diag_fisher.build_for_module(model, _gaussian).init(_params(model))
    subset = {k: v for k, v in _params(model).items() if not k.startswith("1.")}   # LayerNorm held fixed
    with torch.no_grad():
        state, _ = diag_fisher.build_for_module(model, _gaussian).update(
            diag_fisher.build_for_module(model, _gaussian).init(subset), batch)
    ref_state, _ = diag_fisher.build(_log_posterior(model, _gaussian)).update(diag_fisher.init(subset), batch)
    _assert_trees_close(state.prec_diag, ref_state.prec_diag)
    # a Linear layer that is never called is an error (its weight could be used directly), unless left out;
    # one whose output does not reach the log likelihood adds zero curvature
    model = Dangling().to(DTYPE)
    with pytest.raises(ValueError, match="called 0 times"):
        layer_diagonal(model, _params(model), batch, _gaussian)
    called = {k: v for k, v in _params(model).items() if not k.startswith("unused")}
    out = layer_diagonal(model, called, batch, _gaussian, "ggn", with_gradient=True)
    assert float(out.diagonal["dangling.weight"].abs().sum()) == 0 and float(out.diagonal["used.bias"].min()) > 0
    grad = torch.func.grad(lambda p: _gaussian(functional_call(model, p, (batch[0],)), batch))(called)
    _assert_trees_close(out.gradient, grad)


def test_bad_inputs_raise_clear_errors():
    model, loglik, batch = _case("cross_entropy")
    builders = [diag_fisher.build_for_module, diag_ggn.build_for_module,
                lambda m, f: ekf_diag_fisher.build_for_module(m, f, lr=1.0)]
    for build in builders:
        with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
            build(lambda x: x, loglik)
        with pytest.raises(ValueError, match=r"no torch\.nn\.Linear layer"):
            build(torch.nn.Sequential(torch.nn.Tanh()), loglik)
        with pytest.raises(TypeError, match="outer_log_likelihood must be a function"):
            build(model, None)
        transform = build(model, loglik)
        state = transform.init(_params(model))
        with pytest.raises(ValueError, match="mismatched batch"):
            transform.update(state, (batch[0], batch[1][:-1]))
        with pytest.raises(ValueError, match="scalar value"):
            build(model, lambda z, b: -(z**2)).update(state, batch)
        with pytest.raises(TypeError, match="tuple"):
            transform.update(state, batch[0])
        with pytest.raises(ValueError, match="has shape"):
            transform.init({"0.weight": torch.zeros(2, 2, dtype=DTYPE)})
        with pytest.raises(TypeError, match="dict"):
            transform.init(torch.zeros(3))
        shared = torch.nn.Linear(2, 2).to(DTYPE)
        twice = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)
        with pytest.raises(ValueError, match="called 2 times"):
            build(twice, loglik).update(build(twice, loglik).init(_params(twice)),
                                        (torch.randn(3, 2, dtype=DTYPE), torch.zeros(3, dtype=torch.long)))
        with pytest.raises(ValueError, match=r"\(batch, features\)"):
            transform.update(state, (torch.randn(2, 7, 3, dtype=DTYPE), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="init_prec_diag"):
        diag_ggn.build_for_module(model, loglik, init_prec_diag=-1.0)
    with pytest.raises(ValueError, match="transition_sd"):
        ekf_diag_fisher.build_for_module(model, loglik, lr=1.0, transition_sd=-1.0)
    with pytest.raises(TypeError, match="EKFDiagState"):
        ekf_diag_fisher.build_for_module(model, loglik, lr=1.0).update(diag_fisher.init(_params(model)), batch)
    with pytest.raises(ValueError, match="curvature"):
        layer_diagonal(model, _params(model), batch, loglik, "hessian")


def test_input_fn_and_a_dict_batch():
    model, _, (x, y) = _case("cross_entropy", seed=6)
    batch = {"x": x, "y": y}

    def loglik(z, b):
        return -torch.nn.functional.cross_entropy(z, b["y"], reduction="sum")

    ours = diag_ggn.build_for_module(model, loglik, input_fn=lambda b: b["x"])
    ref = diag_ggn.build(lambda p, b: (functional_call(model, p, (b["x"],)), _NO_AUX), loglik)
    state, output = ours.update(ours.init(_params(model)), batch)
    _assert_trees_close(state.prec_diag, ref.update(ref.init(_params(model)), batch)[0].prec_diag)
    torch.testing.assert_close(output, model(x).detach())
    with pytest.raises(ValueError, match="mismatched batch"):
        ours.update(state, {"x": x, "y": y[:2]})
