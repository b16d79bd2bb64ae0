"""KFAC Laplace (bayesflow.laplace.kfac): exact against the dense GGN / empirical Fisher where the
Kronecker factorisation is exact, batch accumulation against one pass, sampling against the Kronecker
covariance, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from bayesflow.laplace import kfac
from bayesflow.tree import flatten
from bayesflow.utils import ggn

DTYPE = torch.float64


def _cross_entropy(logits, batch):
    return -torch.nn.functional.cross_entropy(logits, batch[1], reduction="sum")


def _gaussian(sigma):
    return lambda z, batch: -0.5 * ((z - batch[1]) ** 2).sum() / sigma**2


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(DTYPE)


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _exact_ggn(model, params, batch, loglik):
    return ggn(lambda p: functional_call(model, p, (batch[0],)), lambda z: -loglik(z, batch))(params)


def _layer_mask(params):
    """True where row and column belong to the same Linear layer (the ravelled, sorted-name layout)."""
    leaves, _ = flatten(params)
    owner = []
    for key, leaf in zip(sorted(params), leaves):
        owner += [key.rsplit(".", 1)[0] if "." in key else ""] * leaf.numel()
    return torch.tensor([[a == b for b in owner] for a in owner])


def _fit(model, batch, loglik, fisher_type="ggn", prior=0.0):
    transform = kfac.build(model, loglik, prior_prec=prior, fisher_type=fisher_type)
    state, _ = transform.update(transform.init(_params(model)), batch)
    return state


def test_one_datum_single_linear_softmax_is_the_exact_ggn():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 4).to(DTYPE)
    x, y = torch.randn(1, 3, dtype=DTYPE), torch.tensor([2])
    state = _fit(model, (x, y), _cross_entropy, prior=0.5)
    exact = _exact_ggn(model, _params(model), (x, y), _cross_entropy) + 0.5 * torch.eye(16, dtype=DTYPE)
    torch.testing.assert_close(kfac.precision_dense(state), exact, rtol=1e-13, atol=1e-14)
    # with several data the softmax Kronecker product is not exact: the test can tell
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.tensor([0, 1, 2, 3, 0])
    state = _fit(model, (x, y), _cross_entropy)
    exact = _exact_ggn(model, _params(model), (x, y), _cross_entropy)
    assert (kfac.precision_dense(state) - exact).abs().max() > 1e-3


def test_one_datum_mlp_layer_blocks_are_the_exact_ggn_blocks():
    model = _mlp()
    x, y = torch.randn(1, 3, dtype=DTYPE), torch.tensor([1])
    params = _params(model)
    precision = kfac.precision_dense(_fit(model, (x, y), _cross_entropy))
    mask = _layer_mask(params)
    exact = _exact_ggn(model, params, (x, y), _cross_entropy)
    torch.testing.assert_close(precision, torch.where(mask, exact, 0.0), rtol=1e-12, atol=1e-14)
    assert exact[~mask].abs().max() > 1e-3   # the cross-layer blocks KFAC drops are not zero


@pytest.mark.parametrize("outputs", [1, 2])
def test_linear_gaussian_regression_is_exact_in_total(outputs):
    torch.manual_seed(2)
    model = torch.nn.Linear(3, outputs).to(DTYPE)
    x, y = torch.randn(7, 3, dtype=DTYPE), torch.randn(7, outputs, dtype=DTYPE)
    loglik = _gaussian(0.7)
    state = _fit(model, (x, y), loglik, prior=2.0)
    exact = _exact_ggn(model, _params(model), (x, y), loglik) + 2.0 * torch.eye(4 * outputs, dtype=DTYPE)
    torch.testing.assert_close(kfac.precision_dense(state), exact, rtol=1e-13, atol=1e-13)
    assert int(state.num_data) == 7


class _Squeezed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 1).to(DTYPE)

    def forward(self, x):
        return self.fc(x).squeeze(-1)


def test_scalar_regression_with_a_vector_output_under_no_grad():
    torch.manual_seed(7)
    model = _Squeezed()
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, dtype=DTYPE)
    loglik = _gaussian(0.5)
    with torch.no_grad():
        state = _fit(model, (x, y), loglik, prior=1.0)
    exact = _exact_ggn(model, _params(model), (x, y), loglik) + torch.eye(4, dtype=DTYPE)
    assert list(state.A) == ["fc"]
    torch.testing.assert_close(kfac.precision_dense(state), exact, rtol=1e-13, atol=1e-13)


def test_one_datum_empirical_is_the_exact_empirical_fisher():
    model = _mlp(3)
    x, y = torch.randn(1, 3, dtype=DTYPE), torch.tensor([0])
    params = _params(model)
    precision = kfac.precision_dense(_fit(model, (x, y), _cross_entropy, fisher_type="empirical"))
    grad = torch.func.grad(lambda p: -_cross_entropy(functional_call(model, p, (x,)), (x, y)))(params)
    g = torch.cat([leaf.reshape(-1) for leaf in flatten(grad)[0]])
    torch.testing.assert_close(precision, torch.where(_layer_mask(params), torch.outer(g, g), 0.0),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fisher_type", ["ggn", "empirical"])   # "mc" draws new numbers per batch
@pytest.mark.parametrize("inplace", [False, True])
def test_batches_accumulate_to_the_full_data_pass(fisher_type, inplace):
    model = _mlp(4)
    x, y = torch.randn(10, 3, dtype=DTYPE), torch.randint(0, 3, (10,))
    transform = kfac.build(model, _cross_entropy, prior_prec=1.0, fisher_type=fisher_type)
    full, _ = transform.update(transform.init(_params(model)), (x, y))
    state = transform.init(_params(model))
    for rows in (slice(0, 3), slice(3, 6), slice(6, 10)):
        state, _ = transform.update(state, (x[rows], y[rows]), inplace=inplace)
    assert int(state.num_data) == 10 and int(state.step) == 3
    for name in full.A:
        torch.testing.assert_close(state.A[name], full.A[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.G[name], full.G[name], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kfac.precision_dense(state), kfac.precision_dense(full), rtol=1e-12, atol=1e-13)
    # the factors are means: A's bias corner is 1, and the precision scales with num_data
    assert float(full.A["0"][-1, -1]) == pytest.approx(1.0)
    eye = torch.eye(31, dtype=DTYPE)   # 4·3 + 4 and 3·4 + 3 parameters
    doubled = kfac.precision_dense(full.replace(num_data=full.num_data * 2)) - eye
    torch.testing.assert_close(doubled, 2 * (kfac.precision_dense(full) - eye))


@pytest.mark.parametrize("bias", [True, False])
def test_samples_have_the_kronecker_covariance(bias):
    torch.manual_seed(5)
    model = torch.nn.Linear(2, 2, bias=bias).to(DTYPE)
    x = torch.randn(6, 2, dtype=DTYPE) * torch.tensor([1.0, 3.0], dtype=DTYPE) + 0.5
    y = torch.randint(0, 2, (6,))
    state = _fit(model, (x, y), _cross_entropy, prior=0.3)
    cov = torch.linalg.inv(kfac.precision_dense(state))
    n = 40000
    draws = kfac.sample(state, (n,), generator=torch.Generator().manual_seed(0))
    assert draws["weight"].shape == (n, 2, 2) and (not bias or draws["bias"].shape == (n, 2))
    flat = torch.cat([leaf.reshape(n, -1) for leaf in flatten(draws)[0]], dim=1)
    mean = torch.cat([leaf.reshape(-1) for leaf in flatten(state.params)[0]])
    centred = flat - mean
    assert ((centred.mean(0)).abs() <= 5 * (cov.diagonal() / n).sqrt()).all()
    empirical = centred.T @ centred / n
    se = ((cov.diagonal().outer(cov.diagonal()) + cov**2) / n).sqrt()
    assert ((empirical - cov).abs() <= 5 * se).all(), (empirical - cov) / se
    # wrong covariances are far outside the error: num_data off by 1.5, or A and G swapped
    wrong = [state.replace(num_data=state.num_data * 3 // 2)] + ([] if bias else [state.replace(A=state.G, G=state.A)])
    for other in wrong:
        assert ((empirical - torch.linalg.inv(kfac.precision_dense(other))).abs() > 5 * se).any()


def test_sample_shapes_and_parameters_outside_linear_layers():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2, bias=False))
    state = _fit(model, (torch.randn(4, 2), torch.randint(0, 2, (4,))), _cross_entropy, prior=1.0)
    assert set(state.A) == {"0", "2"} and state.A["2"].shape == (3, 3)
    draws = kfac.sample(state, (5, 2))
    assert list(draws) == list(state.params)
    assert draws["2.weight"].shape == (5, 2, 2, 3) and draws["0.bias"].shape == (5, 2, 3)
    assert torch.equal(draws["1.weight"], state.params["1.weight"].expand(5, 2, 3))   # held at the MAP
    assert kfac.precision_dense(state).shape == (9 + 6, 9 + 6)
    assert kfac.sample(state)["0.weight"].shape == (3, 2)


def test_bad_inputs_raise_clear_errors():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"no torch\.nn\.Linear or torch\.nn\.Conv2d layer"):
        kfac.build(torch.nn.Sequential(torch.nn.Tanh()), _cross_entropy)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        kfac.build(lambda x: x, _cross_entropy)
    with pytest.raises(ValueError, match="fisher_type"):
        kfac.build(model, _cross_entropy, fisher_type="sampled")
    with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
        kfac.build(model, _cross_entropy, fisher_type="mc", mc_samples=0)
    with pytest.raises(ValueError, match="prior_prec"):
        kfac.build(model, _cross_entropy, prior_prec=-1.0)
    with pytest.raises(ValueError, match="has no 'bias'"):
        kfac.init({"weight": model.weight}, model)
    transform = kfac.build(model, _cross_entropy)
    state = transform.init(dict(model.named_parameters()))
    with pytest.raises(ValueError, match="mismatched batch"):
        transform.update(state, (torch.randn(4, 3), torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="scalar"):
        kfac.update(state, (torch.randn(4, 3), torch.zeros(4)), model, lambda z, b: -(z**2))
    with pytest.raises(ValueError, match=r"\(batch, features\)"):
        transform.update(state, (torch.randn(4, 5, 3), torch.zeros(4, dtype=torch.long)))
    shared = torch.nn.Linear(2, 2)
    twice = torch.nn.Sequential(shared, torch.nn.Tanh(), shared)
    with pytest.raises(ValueError, match="called 2 times"):
        kfac.build(twice, _cross_entropy).update(kfac.init(dict(twice.named_parameters()), twice),
                                                 (torch.randn(3, 2), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="not positive definite"):
        kfac.sample(state)
    with pytest.raises(ValueError, match="are not the model's Linear and Conv2d layers"):
        kfac.update(state, (torch.randn(2, 2), torch.zeros(2, dtype=torch.long)), twice, _cross_entropy)


def test_mc_is_an_unbiased_estimate_of_the_ggn_factor():
    """E[R ε εᵀ Rᵀ] = H: G of "mc" averages to G of "ggn" (A is the same); the error is Monte-Carlo's."""
    torch.manual_seed(3)
    model = _mlp(4)
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randint(0, 3, (6,))
    exact = _fit(model, (x, y), _cross_entropy, fisher_type="ggn")
    transform = kfac.build(model, _cross_entropy, fisher_type="mc", mc_samples=4)
    draws = [transform.update(transform.init(_params(model), seed=seed), (x, y))[0] for seed in range(400)]
    for name in exact.G:
        torch.testing.assert_close(draws[0].A[name], exact.A[name], rtol=1e-12, atol=1e-14)
        stack = torch.stack([d.G[name] for d in draws])
        error = (stack.mean(0) - exact.G[name]).abs()
        se = stack.std(0) / math.sqrt(len(draws))
        assert bool((error <= 5 * se + 1e-12).all())
        assert float((stack[0] - exact.G[name]).abs().max()) > 1e-3   # one draw is not the GGN


def test_mc_draws_come_from_the_state():
    """The same state gives the same factors (a checkpoint resumes them); another seed or step differs."""
    model = _mlp(4)
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 3, (5,))
    transform = kfac.build(model, _cross_entropy, fisher_type="mc")
    state = transform.init(_params(model), seed=7)
    one, _ = transform.update(state, (x, y))
    two, _ = transform.update(state, (x, y))
    other, _ = transform.update(transform.init(_params(model), seed=8), (x, y))
    later, _ = transform.update(one, (x, y))
    assert torch.equal(one.G["0"], two.G["0"])
    assert not torch.equal(one.G["0"], other.G["0"])
    assert not torch.equal(later.G["0"] * 2 - one.G["0"], one.G["0"])   # step 1 drew new numbers
    with pytest.raises(ValueError, match="noise key"):
        transform.update(state._replace(rng=None), (x, y))


# ------------------------------------------------------------------------------------------------
# Conv2d layers (KFC, the "expand" approximation)


def _conv_and_linear(channels, image, kernel, bias, seed):
    """A Conv2d + Flatten + Tanh + Linear model with one output position (``L = 1``) and the same model
    with the convolution as a Linear layer on the flattened image (weights copied)."""
    torch.manual_seed(seed)
    conv = torch.nn.Sequential(torch.nn.Conv2d(channels, 4, kernel, bias=bias), torch.nn.Flatten(), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3)).to(DTYPE)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * image[0] * image[1], 4, bias=bias),
                                 torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(DTYPE)
    with torch.no_grad():
        linear[1].weight.copy_(conv[0].weight.reshape(4, -1))
        if bias:
            linear[1].bias.copy_(conv[0].bias)
        linear[3].load_state_dict(conv[3].state_dict())
    return conv, linear


@pytest.mark.parametrize("fisher_type", ["ggn", "empirical"])
@pytest.mark.parametrize(("channels", "image", "bias"), [(2, (3, 2), True), (5, (1, 1), True), (2, (3, 2), False)])
def test_conv_with_one_position_is_the_linear_kfac(fisher_type, channels, image, bias):
    conv, linear = _conv_and_linear(channels, image, image, bias, seed=8)
    x, y = torch.randn(6, channels, *image, dtype=DTYPE), torch.randint(0, 3, (6,))
    ours, ref = (_fit(model, (x, y), _cross_entropy, fisher_type, prior=0.5) for model in (conv, linear))
    torch.testing.assert_close(ours.A["0"], ref.A["1"], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(ours.G["0"], ref.G["1"], rtol=1e-13, atol=1e-14)
    # the same layout (weight rows (C_out, C_in·kh·kw) row-major) and the same draws, reshaped to 4-D
    torch.testing.assert_close(kfac.precision_dense(ours), kfac.precision_dense(ref), rtol=1e-13, atol=1e-13)
    draws = kfac.sample(ours, (3,), generator=torch.Generator().manual_seed(1))
    ref_draws = kfac.sample(ref, (3,), generator=torch.Generator().manual_seed(1))
    assert draws["0.weight"].shape == (3, 4, channels, *image)
    torch.testing.assert_close(draws["0.weight"].reshape(3, 4, -1), ref_draws["1.weight"], rtol=1e-12, atol=1e-13)


def test_one_datum_single_conv_with_one_position_is_exact():
    """L = 1: one datum's ggn block of a softmax conv classifier is the exact GGN, its empirical block the
    exact empirical Fisher; with L > 1 the dropped cross-position terms show even for one datum."""
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, (3, 2)), torch.nn.Flatten()).to(DTYPE)
    x, y = torch.randn(1, 2, 3, 2, dtype=DTYPE), torch.tensor([1])
    params = _params(model)
    exact = _exact_ggn(model, params, (x, y), _cross_entropy) + 0.5 * torch.eye(52, dtype=DTYPE)
    torch.testing.assert_close(kfac.precision_dense(_fit(model, (x, y), _cross_entropy, prior=0.5)), exact,
                               rtol=1e-13, atol=1e-14)
    cnn, _ = _conv_and_linear(2, (3, 2), (3, 2), True, seed=10)
    grad = torch.func.grad(lambda p: -_cross_entropy(functional_call(cnn, p, (x,)), (x, y)))(_params(cnn))
    g = torch.cat([leaf.reshape(-1) for leaf in flatten(grad)[0]])
    precision = kfac.precision_dense(_fit(cnn, (x, y), _cross_entropy, fisher_type="empirical"))
    torch.testing.assert_close(precision, torch.where(_layer_mask(_params(cnn)), torch.outer(g, g), 0.0),
                               rtol=1e-12, atol=1e-14)
    wide = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 2), torch.nn.Flatten(), torch.nn.Linear(4 * 2, 3)).to(DTYPE)
    x = torch.randn(1, 2, 3, 2, dtype=DTYPE)   # L = 2 positions
    grad = torch.func.grad(lambda p: -_cross_entropy(functional_call(wide, p, (x,)), (x, y)))(_params(wide))
    g = torch.cat([grad["0.bias"], grad["0.weight"].reshape(-1)])
    conv_block = kfac.precision_dense(_fit(wide, (x, y), _cross_entropy, fisher_type="empirical"))[:36, :36]
    assert (conv_block - torch.outer(g, g)).abs().max() > 1e-3 * torch.outer(g, g).abs().max()


def _cnn(seed=11):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(3, 2, (2, 3), dilation=(2, 1), padding=(1, 1), bias=False),
                               torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 3, 3)).to(DTYPE)


def _explicit_conv_factors(model, index, batch, fisher_type):
    """A and G of the Conv2d layer ``model[index]`` from the formula: unfold its input, per-datum
    Jacobians of the output in the layer output (torch.func), the clamped root of each H_ℓ."""
    x, y = batch
    layer = model[index]
    inputs = model[:index](x).detach()
    patches = torch.nn.functional.unfold(inputs, layer.kernel_size, dilation=layer.dilation,
                                         padding=layer.padding, stride=layer.stride)   # (n, D, L)
    if layer.bias is not None:
        patches = torch.cat([patches, torch.ones_like(patches[:, :1])], dim=1)
    n, _, positions = patches.shape
    A = torch.einsum("ndl,nel->de", patches, patches) / (n * positions)
    s = layer(inputs).detach()
    rest = model[index + 1:]
    if fisher_type == "empirical":
        g = torch.func.grad(lambda s_: _cross_entropy(rest(s_), batch))(s).flatten(2).unsqueeze(1)   # (n, 1, o, L)
    else:
        jac = torch.func.vmap(torch.func.jacrev(lambda s_n: rest(s_n[None])[0]))(s).flatten(3)   # (n, dz, o, L)
        hess = torch.func.vmap(torch.func.hessian(lambda z, t: -_cross_entropy(z[None], (None, t[None]))))(
            rest(s).detach(), y)
        values, vectors = torch.linalg.eigh(hess)
        root = vectors * values.clamp(min=0).sqrt().unsqueeze(-2)
        g = torch.einsum("njol,njc->ncol", jac, root)
    G = torch.einsum("ncol,ncpl->op", g, g) / n
    return A, G


@pytest.mark.parametrize("fisher_type", ["ggn", "empirical"])
def test_conv_factors_equal_the_explicit_expand_formula(fisher_type):
    model = _cnn()
    x, y = torch.randn(5, 2, 6, 6, dtype=DTYPE), torch.randint(0, 3, (5,))
    state = _fit(model, (x, y), _cross_entropy, fisher_type)
    assert state.A["0"].shape == (19, 19) and state.A["2"].shape == (18, 18) and state.G["2"].shape == (2, 2)
    for index in (0, 2):
        A, G = _explicit_conv_factors(model, index, (x, y), fisher_type)
        torch.testing.assert_close(state.A[str(index)], A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.G[str(index)], G, rtol=1e-12, atol=1e-14)
    assert float(state.A["0"][-1, -1]) == pytest.approx(1.0)   # A averages over positions: the bias corner is 1


@pytest.mark.parametrize("inplace", [False, True])
def test_conv_batches_accumulate_to_the_full_data_pass(inplace):
    model = _cnn(12)
    x, y = torch.randn(7, 2, 6, 6, dtype=DTYPE), torch.randint(0, 3, (7,))
    transform = kfac.build(model, _cross_entropy, prior_prec=1.0)
    full, _ = transform.update(transform.init(_params(model)), (x, y))
    state = transform.init(_params(model))
    for rows in (slice(0, 3), slice(3, 7)):
        state, _ = transform.update(state, (x[rows], y[rows]), inplace=inplace)
    torch.testing.assert_close(kfac.precision_dense(state), kfac.precision_dense(full), rtol=1e-12, atol=1e-13)


def test_conv_samples_have_the_kronecker_covariance():
    torch.manual_seed(13)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 2), torch.nn.Flatten()).to(DTYPE)   # 4 + 1 parameters
    x, y = torch.randn(6, 1, 3, 3, dtype=DTYPE) + 0.5, torch.randint(0, 4, (6,))
    state = _fit(model, (x, y), _cross_entropy, prior=0.3)
    cov = torch.linalg.inv(kfac.precision_dense(state))   # order: bias, weight (row-major)
    n = 40000
    draws = kfac.sample(state, (n,), generator=torch.Generator().manual_seed(0))
    assert draws["0.weight"].shape == (n, 1, 1, 2, 2) and draws["0.bias"].shape == (n, 1)
    centred = torch.cat([draws["0.bias"] - state.params["0.bias"],
                         (draws["0.weight"] - state.params["0.weight"]).reshape(n, -1)], dim=1)
    empirical = centred.T @ centred / n
    se = ((cov.diagonal().outer(cov.diagonal()) + cov**2) / n).sqrt()
    assert ((empirical - cov).abs() <= 5 * se).all(), (empirical - cov) / se
    transposed = torch.cat([draws["0.bias"] - state.params["0.bias"],   # a wrong reshape (kernel transposed)
                            (draws["0.weight"] - state.params["0.weight"]).mT.reshape(n, -1)], dim=1)
    assert ((transposed.T @ transposed / n - cov).abs() > 5 * se).any()


def test_conv_bad_inputs_raise_clear_errors():
    grouped = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"the Conv2d layer '0' has groups=2; KFAC covers Conv2d layers with groups=1"):
        kfac.build(grouped, _cross_entropy)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 1, 3), torch.nn.Flatten(0), torch.nn.Linear(1, 2))
    transform = kfac.build(model, _cross_entropy)
    state = transform.init(dict(model.named_parameters()))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        transform.update(state, (torch.randn(2, 3, 3), torch.zeros(1, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"params has no '0\.bias', a parameter of the Conv2d layer '0'"):
        kfac.init({k: v for k, v in model.named_parameters() if k != "0.bias"}, model)
    with pytest.raises(ValueError, match="the precision of the Conv2d layer '0' is not positive definite"):
        kfac.sample(state)
