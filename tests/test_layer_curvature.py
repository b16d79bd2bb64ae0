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
from bayesflow.utils.layer_curvature import hessian_root, layer_diagonal, output_hessian, signed_hessian_root

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


def test_trimmed_hessian_root_leaves_out_only_the_shared_null_directions():
    torch.manual_seed(3)
    p = torch.softmax(torch.randn(6, 5, dtype=torch.float64), -1)
    softmax = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)   # null vector 1 for every row
    root = hessian_root(softmax, trim=True)
    assert root.shape == (6, 5, 4)
    torch.testing.assert_close(root @ root.mT, softmax, atol=1e-12, rtol=0)
    # a datum without the null direction keeps every column: nothing is left out that is not zero
    mixed = torch.cat([softmax, torch.eye(5, dtype=torch.float64).unsqueeze(0)])
    assert hessian_root(mixed, trim=True).shape == (7, 5, 5)
    # rank 3 for every datum (two null directions): two columns go
    u = torch.randn(4, 5, 3, dtype=torch.float64)
    low = u @ u.mT
    trimmed = hessian_root(low, trim=True)
    assert trimmed.shape == (4, 5, 3)
    torch.testing.assert_close(trimmed @ trimmed.mT, low, atol=1e-10, rtol=0)
    assert hessian_root(softmax).shape == (6, 5, 5)   # untrimmed by default


def test_trimmed_signed_root_is_exact_for_indefinite_hessians():
    torch.manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(4, 3, 3, dtype=torch.float64))
    hess = q @ torch.diag_embed(torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64).expand(4, 3)) @ q.mT
    root, sign = signed_hessian_root(hess, trim=True)
    assert root.shape == (4, 3, 2) and sign.shape == (4, 2)
    torch.testing.assert_close((root * sign.unsqueeze(-2)) @ root.mT, hess, atol=1e-12, rtol=0)
    # the zero sits at another eigenvalue rank for another datum: no rank is zero for all, none goes
    other = q[:1] @ torch.diag(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)) @ q[:1].mT
    mixed = torch.cat([hess, other])
    assert signed_hessian_root(mixed, trim=True)[0].shape == (5, 3, 3)
    assert signed_hessian_root(hess)[0].shape == (4, 3, 3)


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
        with pytest.raises(ValueError, match=r"no torch\.nn\.Linear or torch\.nn\.Conv2d layer"):
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


# ------------------------------------------------------------------------------------------------
# Conv2d layers: the patch route against the same torch.func routes


class SmallCNN(torch.nn.Module):
    """Conv2d (stride 2, padding 1) + ReLU + Conv2d (non-square kernel, dilation, "same" circular padding)
    + ReLU + Flatten + Linear; ``heads=2`` stacks two Linear heads as TwoHeads does (indefinite H_ℓ)."""

    def __init__(self, bias=True, outputs=4, heads=1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias)
        self.conv2 = torch.nn.Conv2d(3, 2, (2, 3), padding="same", dilation=(1, 2), padding_mode="circular",
                                     bias=bias)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(2 * 3 * 3, outputs, bias=bias) for _ in range(heads))

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1)
        out = [head(h) for head in self.heads]
        return out[0] if len(out) == 1 else torch.stack(out, dim=1)


def _cnn_case(name, seed=0, n=6):
    torch.manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, dtype=DTYPE)
    if name == "cross_entropy":
        return SmallCNN().to(DTYPE), _cross_entropy, (x, torch.randint(0, 4, (n,)))
    if name == "gaussian_no_bias":
        return SmallCNN(bias=False, outputs=2).to(DTYPE), _gaussian, (x, torch.randn(n, 2, dtype=DTYPE))
    return SmallCNN(outputs=1, heads=2).to(DTYPE), _squeezed_heteroscedastic, (x, torch.randn(n, dtype=DTYPE))


def _squeezed_heteroscedastic(z, batch):   # z (n, 2, 1): mean and log variance heads
    return _heteroscedastic(z.squeeze(-1), batch)


@pytest.mark.parametrize("case", CASES)
def test_conv_diagonals_equal_the_torch_func_routes(case):
    model, loglik, batch = _cnn_case(case)
    params = _params(model)
    fisher = diag_fisher.build_for_module(model, loglik, init_prec_diag=0.5)
    ref_fisher = diag_fisher.build(_log_posterior(model, loglik), init_prec_diag=0.5)
    ggn_ = diag_ggn.build_for_module(model, loglik)
    ref_ggn = diag_ggn.build(_forward(model), loglik)
    states = [t.init(_params(model)) for t in (fisher, ref_fisher, ggn_, ref_ggn)]
    for part in _split(batch):
        states = [t.update(s, part, inplace=k == 0)[0] for k, (t, s) in
                  enumerate(zip((fisher, ref_fisher, ggn_, ref_ggn), states))]
    _assert_trees_close(states[0].prec_diag, states[1].prec_diag)
    _assert_trees_close(states[2].prec_diag, states[3].prec_diag)
    assert states[0].prec_diag["conv1.weight"].shape == params["conv1.weight"].shape == (3, 2, 3, 3)
    # the weight is shared over positions: squares per position (positions taken as data, the Linear
    # formula on the patches) would be another diagonal, and the tolerance tells them apart
    result = layer_diagonal(model, params, batch, loglik, with_gradient=True)
    patches = torch.nn.functional.unfold(batch[0], 3, padding=1, stride=2)   # conv1's (n, 18, 9)
    s = torch.nn.functional.conv2d(batch[0], params["conv1.weight"], params.get("conv1.bias"), 2, 1)
    s = s.detach().requires_grad_(True)
    rest = {k: v for k, v in params.items() if not k.startswith("conv1.")}

    def from_conv1(s_):   # the model from conv1's output on
        h = torch.relu(functional_call(model.conv2, {k[6:]: v for k, v in rest.items() if k.startswith("conv2.")},
                                       (torch.relu(s_),))).flatten(1)
        heads = [functional_call(head, {k.split(".", 2)[2]: v for k, v in rest.items()
                                        if k.startswith(f"heads.{i}.")}, (h,)) for i, head in enumerate(model.heads)]
        return heads[0] if len(heads) == 1 else torch.stack(heads, dim=1)

    (g,) = torch.autograd.grad(loglik(from_conv1(s), batch), s)
    g = g.flatten(2)   # (n, 3, 9)
    per_position = torch.einsum("nol,ndl->od", g.square(), patches.square()).reshape(3, 2, 3, 3)
    per_sample = torch.einsum("nol,ndl->nod", g, patches).square().sum(0).reshape(3, 2, 3, 3)
    torch.testing.assert_close(result.diagonal["conv1.weight"], per_sample, **TOL)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(result.diagonal["conv1.weight"], per_position, **TOL)


@pytest.mark.parametrize("case", ["cross_entropy", "two_heads"])
def test_conv_ekf_equals_the_jacobian_route(case):
    model, loglik, batch = _cnn_case(case, seed=2)
    kwargs = {"lr": 2.0, "transition_sd": 0.1, "init_sds": 0.5}
    ours = ekf_diag_fisher.build_for_module(model, loglik, **kwargs)
    ref = ekf_diag_fisher.build(_log_posterior(model, loglik), **kwargs)
    state, ref_state = ours.init(_params(model)), ref.init(_params(model))
    for part in _split(batch):
        state, _ = ours.update(state, part)
        ref_state, _ = ref.update(ref_state, part)
    _assert_trees_close(state.params, ref_state.params)
    _assert_trees_close(state.sd_diag, ref_state.sd_diag)


def test_conv_diagonal_chunks_and_patches(monkeypatch):
    """Any chunking of the data gives the same diagonal; the patches reproduce each padding as Conv2d pads."""
    from bayesflow.utils import conv_curvature

    model, loglik, batch = _cnn_case("cross_entropy", seed=3)
    whole = layer_diagonal(model, _params(model), batch, loglik, "ggn").diagonal
    monkeypatch.setattr(conv_curvature, "_CHUNK_ELEMENTS", 100)   # one datum at a time
    _assert_trees_close(layer_diagonal(model, _params(model), batch, loglik, "ggn").diagonal, whole)
    torch.manual_seed(4)
    x = torch.randn(2, 3, 7, 6, dtype=DTYPE)
    settings = [{"padding": 0}, {"padding": (2, 1), "stride": (2, 3)}, {"padding": "same", "dilation": 2},
                {"padding": "valid", "stride": 2}, {"padding": 1, "padding_mode": "reflect"},
                {"padding": (1, 2), "padding_mode": "replicate", "dilation": (2, 1)},
                {"padding": "same", "padding_mode": "circular"}]
    for kernel in [(3, 3), (2, 4)]:
        for setting in settings:
            layer = torch.nn.Conv2d(3, 4, kernel, bias=False, **setting).to(DTYPE)
            patches = conv_curvature.conv_patches(layer, x)
            out = layer(x)
            torch.testing.assert_close((layer.weight.reshape(4, -1) @ patches).reshape(out.shape), out, **TOL)


def test_conv_errors_and_uncovered_layers():
    torch.manual_seed(5)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    grouped = grouped.to(DTYPE)
    batch = (torch.randn(3, 2, 4, 4, dtype=DTYPE), torch.randint(0, 2, (3,)))
    transform = diag_ggn.build_for_module(grouped, _cross_entropy)
    with pytest.raises(ValueError, match=r"the Conv2d layer '0' has groups=2; .* groups=1 only"):
        transform.init(_params(grouped))
    # left out of params, the grouped convolution is held at its value; the Linear head is covered
    head = {k: v for k, v in _params(grouped).items() if k.startswith("2.")}
    state, _ = transform.update(transform.init(head), batch)
    ref_state, _ = diag_ggn.build(_forward(grouped), _cross_entropy).update(diag_ggn.init(head), batch)
    _assert_trees_close(state.prec_diag, ref_state.prec_diag)
    conv1d = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2)).to(DTYPE)
    with pytest.raises(ValueError, match=r"params\['0.weight'\] is not the weight or bias of a torch.nn.Linear or "
                                         r"torch.nn.Conv2d layer"):
        diag_fisher.build_for_module(conv1d, _cross_entropy).init(_params(conv1d))
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 1, 3), torch.nn.Flatten(0), torch.nn.Linear(4, 2)).to(DTYPE)
    with pytest.raises(ValueError, match=r"Conv2d layer '0' got an input of shape \(2, 4, 4\); .*"
                                         r"\(batch, channels, height, width\)"):   # unbatched
        diag_fisher.build_for_module(conv, _cross_entropy).update(
            diag_fisher.init(_params(conv)), (torch.randn(2, 4, 4, dtype=DTYPE), torch.zeros(1, dtype=torch.long)))
