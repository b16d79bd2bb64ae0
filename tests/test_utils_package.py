"""bayesflow.utils, posteriors' full utils API: each function against an exact reference in float64.

Curvature products against dense matrices (torch.autograd.functional.hessian / jacobian and per-sample
gradient outer products), cg against torch.linalg.solve, the Gaussian against torch.distributions.Normal
(samples within 5 Monte Carlo standard errors), the triangular factors by round trips; then bad inputs
and the docstring examples of every public object (test_docstring_examples covers the modules only).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import math

import pytest
import torch
from optree.integrations.torch import tree_ravel
from torch.autograd.functional import hessian, jacobian

import bayesflow.utils as U
from bayesflow.utils import (
    CatchAuxError,
    L_from_flat,
    L_to_flat,
    cg,
    diag_ggn,
    diag_normal_log_prob,
    diag_normal_sample,
    empirical_fisher,
    fvp,
    ggn,
    ggnvp,
    hvp,
    is_scalar,
    linearized_forward_diag,
    model_to_function,
    per_samplify,
)

F64 = torch.float64
CLOSE = {"rtol": 1e-10, "atol": 1e-10}

POSTERIORS_SIGNATURES = {  # posteriors 0.1.3 utils: name -> parameter names
    "model_to_function": ["model"], "linearized_forward_diag": ["forward_func", "params", "batch", "sd_diag"],
    "hvp": ["f", "primals", "tangents", "has_aux"], "fvp": ["f", "primals", "tangents", "has_aux", "normalize"],
    "empirical_fisher": ["f", "argnums", "has_aux", "normalize"],
    "ggnvp": ["forward", "loss", "primals", "tangents", "forward_has_aux", "loss_has_aux", "normalize"],
    "ggn": ["forward", "loss", "argnums", "forward_has_aux", "loss_has_aux", "normalize"],
    "diag_ggn": ["forward", "loss", "argnums", "forward_has_aux", "loss_has_aux", "normalize"],
    "cg": ["A", "b", "x0", "maxiter", "damping", "tol", "atol", "M"],
    "diag_normal_log_prob": ["x", "mean", "sd_diag", "normalize"],
    "diag_normal_sample": ["mean", "sd_diag", "sample_shape"], "per_samplify": ["f"], "is_scalar": ["x"],
    "L_from_flat": ["L_flat"], "L_to_flat": ["L"], "cumulative_mean_and_cov": ["xs"],
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def test_the_api_has_posteriors_names_and_signatures():
    constants = {"CatchAuxError", "NO_AUX_ERROR_MSG", "NON_TENSOR_AUX_ERROR_MSG",
                 "linearized_forward_dense"}   # the last: beyond posteriors
    assert set(POSTERIORS_SIGNATURES) | constants == set(U.__all__)
    for name, parameters in POSTERIORS_SIGNATURES.items():
        assert list(inspect.signature(getattr(U, name)).parameters) == parameters, name
    assert inspect.signature(cg).parameters["maxiter"].kind is inspect.Parameter.KEYWORD_ONLY
    assert U.cumulative_mean_and_cov is importlib.import_module("bayesflow.utils.moments").cumulative_mean_and_cov


# --------------------------------------------------------------------------- functional


def test_catch_aux_error_rewords_torch_func_errors_and_passes_others():
    with pytest.raises(RuntimeError, match="Auxiliary output not found") as missing, CatchAuxError():
        torch.func.grad(lambda x: x**2, has_aux=True)(torch.tensor(1.0))
    assert U.NO_AUX_ERROR_MSG in str(missing.value.__cause__)
    with pytest.raises(RuntimeError, match="should be a TensorTree, got unsupported type <class 'str'>"), \
            torch.no_grad(), CatchAuxError():
        torch.func.jacrev(lambda x: (x**2, "aux"), has_aux=True)(torch.tensor(1.0))
    with pytest.raises(ZeroDivisionError), CatchAuxError():
        _ = 1 / 0
    with CatchAuxError():
        value, aux = torch.func.grad(lambda x: (x**2, {"a": x}), has_aux=True)(torch.tensor(3.0))
    assert value == 6.0 and aux["a"] == 3.0


def test_model_to_function_and_per_samplify_match_the_module_and_a_loop():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    f = model_to_function(model)
    params = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    x = rand(5, 3)
    before = {name: p.clone() for name, p in model.named_parameters()}
    expected = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(f(params, x), expected, **CLOSE)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())  # module untouched

    def mean_loss(p, batch):
        return ((f(p, batch["x"]) - batch["y"]) ** 2).mean()

    batch = {"x": x, "y": rand(5, 2, seed=1)}
    per_sample = per_samplify(mean_loss)
    loop = torch.stack([mean_loss(params, {"x": x[i : i + 1], "y": batch["y"][i : i + 1]}) for i in range(5)])
    torch.testing.assert_close(per_sample(params, batch), loop, **CLOSE)
    torch.testing.assert_close(per_sample(params, batch=batch), loop, **CLOSE)
    assert per_sample.__name__ == "mean_loss"


def test_is_scalar():
    assert all(map(is_scalar, [1, 2.5, True, torch.tensor(1.0), torch.ones(1), torch.ones(1, 1, 1)]))
    assert not any(map(is_scalar, [torch.ones(2), torch.ones(0), "1", [1.0], {"a": 1.0}, None]))


# --------------------------------------------------------------------------- curvature


def cubic(x):  # a non-quadratic scalar function with a dense Hessian
    return (torch.sin(x) * x**3).sum() + x[0] * x[1] * x[2]


def test_hvp_equals_the_dense_hessian_times_v():
    x, v = rand(4), rand(4, seed=1)
    gradient, product = hvp(cubic, (x,), (v,))
    torch.testing.assert_close(product, hessian(cubic, x) @ v, **CLOSE)
    torch.testing.assert_close(gradient, torch.func.grad(cubic)(x), **CLOSE)
    gradient, product, aux = hvp(lambda y: (cubic(y), y * 2), (x,), (v,), has_aux=True)
    torch.testing.assert_close(product, hessian(cubic, x) @ v, **CLOSE)
    torch.testing.assert_close(aux, 2 * x, **CLOSE)
    tree = {"a": x[:1], "b": x[1:].reshape(1, 3)}  # a tree of primals: the ravelled Hessian
    ravelled_v = {"a": v[:1], "b": v[1:].reshape(1, 3)}
    _, product = hvp(lambda t: cubic(torch.cat([t["a"], t["b"].reshape(-1)])), (tree,), (ravelled_v,))
    torch.testing.assert_close(tree_ravel(product)[0], hessian(cubic, x) @ v, **CLOSE)


def logistic_per_sample(params, x, y):  # log p(y_i | x_i, θ) of a logistic regression, one per row
    logits = x @ params["w"] + params["b"]
    return -torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")


def per_sample_fisher(params, x, y):
    """Σ_i g_i g_iᵀ with g_i = ∇ log p(y_i | x_i, θ) (ravelled), one autograd call per sample."""
    total = 0
    for i in range(x.shape[0]):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        value = logistic_per_sample(leaves, x[i : i + 1], y[i : i + 1]).sum()
        g = torch.autograd.grad(value, [leaves["b"], leaves["w"]])  # tree_ravel's (sorted-key) order
        g = torch.cat([t.reshape(-1) for t in g])
        total = total + torch.outer(g, g)
    return total


@pytest.mark.parametrize("normalize", [False, True])
def test_fvp_and_empirical_fisher_equal_the_sum_of_per_sample_outer_products(normalize):
    x, y = rand(7, 3), (rand(7, seed=1) > 0).to(F64)
    params = {"w": rand(3, seed=2), "b": rand((), seed=3)}
    expected = per_sample_fisher(params, x, y) / (7 if normalize else 1)
    fisher = empirical_fisher(logistic_per_sample, normalize=normalize)(params, x, y)
    torch.testing.assert_close(fisher, expected, **CLOSE)
    v = {"w": rand(3, seed=4), "b": rand((), seed=5)}
    output, product = fvp(lambda p: logistic_per_sample(p, x, y), (params,), (v,), normalize=normalize)
    torch.testing.assert_close(tree_ravel(product)[0], expected @ tree_ravel(v)[0], **CLOSE)
    torch.testing.assert_close(output, logistic_per_sample(params, x, y), **CLOSE)
    output, product, aux = fvp(lambda p: (logistic_per_sample(p, x, y), p["b"]), (params,), (v,), has_aux=True,
                               normalize=normalize)
    torch.testing.assert_close(tree_ravel(product)[0], expected @ tree_ravel(v)[0], **CLOSE)
    fisher, aux = empirical_fisher(lambda p: (logistic_per_sample(p, x, y), {"twice": 2 * p["b"]}), has_aux=True,
                                   normalize=normalize)(params)
    torch.testing.assert_close(fisher, expected, **CLOSE)
    torch.testing.assert_close(aux["twice"], 2 * params["b"], **CLOSE)


def test_empirical_fisher_with_several_argnums_ravels_them_in_order():
    x, y = rand(5, 2), rand(5, seed=1)

    def residuals(w, b):
        return y - x @ w - b

    fisher = empirical_fisher(residuals, argnums=(0, 1))(rand(2, seed=2), rand(1, seed=3))
    design = torch.cat([x, torch.ones(5, 1, dtype=F64)], dim=1)  # ∂r/∂(w, b) = -[x, 1]
    torch.testing.assert_close(fisher, design.T @ design, **CLOSE)


def mlp_forward(params, x):
    return torch.tanh(x @ params["w1"]) @ params["w2"] + params["b"]


def softmax_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")


def gauss_newton_by_hand(params, x, labels):
    """J^T H J from the dense Jacobian (torch.autograd.functional.jacobian) and loss Hessian."""
    flat, unravel = tree_ravel(params)
    z = mlp_forward(params, x)
    jac = jacobian(lambda theta: mlp_forward(unravel(theta), x), flat).reshape(z.numel(), -1)
    hess = hessian(lambda logits: softmax_loss(logits.reshape(z.shape), labels), z.reshape(-1))
    return jac.T @ hess @ jac, z


@pytest.mark.parametrize("normalize", [False, True])
def test_ggn_diag_ggn_and_ggnvp_equal_jt_h_j_by_hand(normalize):
    x, labels = rand(4, 3), torch.tensor([0, 2, 1, 2])
    params = {"w1": rand(3, 5, seed=1), "w2": rand(5, 3, seed=2), "b": rand(3, seed=3)}
    expected, z = gauss_newton_by_hand(params, x, labels)
    expected = expected / (4 if normalize else 1)

    def forward(p):
        return mlp_forward(p, x)

    def loss(logits):
        return softmax_loss(logits, labels)

    torch.testing.assert_close(ggn(forward, loss, normalize=normalize)(params), expected, **CLOSE)
    diagonal = diag_ggn(forward, loss, normalize=normalize)(params)
    torch.testing.assert_close(tree_ravel(diagonal)[0], torch.diagonal(expected), **CLOSE)
    assert {k: v.shape for k, v in diagonal.items()} == {k: v.shape for k, v in params.items()}
    v = {k: torch.randn_like(p) for k, p in params.items()}
    (z_out, loss_grad), product = ggnvp(forward, loss, (params,), (v,), normalize=normalize)
    torch.testing.assert_close(tree_ravel(product)[0], expected @ tree_ravel(v)[0], **CLOSE)
    torch.testing.assert_close(z_out, z, **CLOSE)
    torch.testing.assert_close(loss_grad, torch.func.grad(loss)(z), **CLOSE)


def test_gauss_newton_aux_outputs_come_forward_first_then_loss():
    x = rand(3, 2)
    params = {"w": rand(2, 2, seed=1)}

    def forward(p):
        return (x @ p["w"], p["w"].sum())

    def loss(z):
        return (0.5 * (z**2).sum(), z.sum())

    expected = torch.kron(x.T @ x, torch.eye(2, dtype=F64))  # J = x ⊗ I (row-major w), H = I
    matrix, forward_aux, loss_aux = ggn(forward, loss, forward_has_aux=True, loss_has_aux=True)(params)
    torch.testing.assert_close(matrix, expected, **CLOSE)
    torch.testing.assert_close(forward_aux, params["w"].sum(), **CLOSE)
    torch.testing.assert_close(loss_aux, (x @ params["w"]).sum(), **CLOSE)
    diagonal, loss_aux = diag_ggn(lambda p: forward(p)[0], loss, loss_has_aux=True)(params)
    torch.testing.assert_close(diagonal["w"].reshape(-1), torch.diagonal(expected), **CLOSE)
    v = {"w": rand(2, 2, seed=2)}
    result = ggnvp(forward, loss, (params,), (v,), forward_has_aux=True, loss_has_aux=True)
    assert len(result) == 4 and torch.equal(result[2], params["w"].sum())
    torch.testing.assert_close(result[1]["w"].reshape(-1), expected @ v["w"].reshape(-1), **CLOSE)


# --------------------------------------------------------------------------- linalg


def spd(n: int, seed: int) -> torch.Tensor:
    a = rand(n, n, seed=seed)
    return a @ a.T + 0.1 * torch.eye(n, dtype=F64)


def test_cg_solves_a_tree_system_like_torch_linalg_solve():
    A = spd(6, seed=0)
    b = {"a": rand(2, seed=1), "b": rand(2, 2, seed=2)}
    flat_b, unravel = tree_ravel(b)

    def matvec(tree):
        return unravel(A @ tree_ravel(tree)[0])

    for damping in (0.0, 0.5):
        x, info = cg(matvec, b, damping=damping, tol=1e-12, maxiter=100)
        expected = torch.linalg.solve(A + damping * torch.eye(6, dtype=F64), flat_b)
        torch.testing.assert_close(tree_ravel(x)[0], expected, rtol=1e-8, atol=1e-8)
        assert bool(info["converged"]) and isinstance(info["niter"], int) and info["niter"] <= 100
        residual = flat_b - (A + damping * torch.eye(6, dtype=F64)) @ tree_ravel(x)[0]
        torch.testing.assert_close(info["error"], residual @ residual, rtol=1e-3, atol=1e-20)
    jacobi = unravel(1 / torch.diagonal(A))  # a preconditioner: same solution
    x, info = cg(matvec, b, tol=1e-12, M=lambda r: {k: r[k] * jacobi[k] for k in r})
    torch.testing.assert_close(tree_ravel(x)[0], torch.linalg.solve(A, flat_b), rtol=1e-8, atol=1e-8)
    x, info = cg(matvec, b, x0=unravel(torch.linalg.solve(A, flat_b)), tol=1e-6)  # starts at the solution
    assert info["niter"] == 0 and bool(info["converged"])
    x, info = cg(matvec, b, maxiter=1)
    assert info["niter"] == 1 and not bool(info["converged"])
    import numpy as np  # posteriors accepts numpy integers for maxiter (an int from a config or an array)

    x_np, info_np = cg(matvec, b, maxiter=np.int64(1))
    assert info_np["niter"] == 1 and torch.equal(tree_ravel(x_np)[0], tree_ravel(x)[0])


def test_cg_on_a_hermitian_complex_system():
    A = torch.tensor([[2.0, 1j], [-1j, 3.0]], dtype=torch.complex128)
    b = torch.tensor([1.0 + 1j, -2.0], dtype=torch.complex128)
    x, info = cg(lambda v: A @ v, b, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-10)
    assert info["error"].dtype == F64


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_l_from_flat_and_l_to_flat_round_trip(n):
    flat = rand(n * (n + 1) // 2, seed=n)
    L = L_from_flat(flat)
    assert L.shape == (n, n) and L.dtype == F64 and torch.equal(L, torch.tril(L))
    assert torch.equal(L_to_flat(L), flat)
    lower = torch.tril(rand(n, n, seed=n + 10))
    assert torch.equal(L_from_flat(L_to_flat(lower)), lower)
    rows, cols = torch.tril_indices(n, n)
    assert torch.equal(L[rows, cols], flat)  # row by row
    gradient = torch.func.grad(lambda f: (L_from_flat(f) @ L_from_flat(f).T).trace())(flat)
    torch.testing.assert_close(gradient, 2 * flat, **CLOSE)  # trace(LLᵀ) = Σ L_ij²


# --------------------------------------------------------------------------- gaussian


@pytest.mark.parametrize("normalize", [True, False])
def test_diag_normal_log_prob_equals_torch_normal(normalize):
    x = {"a": rand(3), "b": rand(2, 2, seed=1)}
    mean = {"a": rand(3, seed=2), "b": rand(2, 2, seed=3)}
    sd = {"a": rand(3, seed=4).abs() + 0.1, "b": rand(2, 2, seed=5).abs() + 0.1}

    def reference(mu, s):
        total = 0
        for k in x:
            m = mu[k] if isinstance(mu, dict) else torch.full_like(x[k], mu)
            sk = s[k] if isinstance(s, dict) else torch.full_like(x[k], s)
            lp = torch.distributions.Normal(m, sk).log_prob(x[k])
            total = total + (lp if normalize else -0.5 * ((x[k] - m) / sk) ** 2).sum()
        return total

    for mu, s in [(mean, sd), (0.3, sd), (mean, 0.7), (0.3, 0.7)]:
        torch.testing.assert_close(diag_normal_log_prob(x, mu, s, normalize=normalize), reference(mu, s), **CLOSE)
    three = {"a": rand(3, seed=8)}  # a one-element tensor broadcasts like a number ...
    lp = torch.distributions.Normal(2.0, 0.5).log_prob(three["a"])
    expected = (lp if normalize else -0.5 * ((three["a"] - 2.0) / 0.5) ** 2).sum()
    torch.testing.assert_close(diag_normal_log_prob(three, torch.tensor([2.0], dtype=F64), torch.tensor([[0.5]]),
                                                    normalize=normalize), expected, **CLOSE)
    single = {"a": torch.tensor([0.5], dtype=F64)}  # ... and a one-leaf tree of one element is a tree
    lp = torch.distributions.Normal(torch.tensor(1.0, dtype=F64), 2.0).log_prob(torch.tensor(0.5, dtype=F64))
    torch.testing.assert_close(diag_normal_log_prob(single, {"a": torch.tensor([1.0], dtype=F64)},
                                                    {"a": torch.tensor([2.0], dtype=F64)}, normalize=normalize),
                               lp if normalize else -0.5 * (0.5 / 2.0) ** 2 * torch.ones((), dtype=F64), **CLOSE)
    batched = torch.vmap(diag_normal_log_prob, (0, None, None, None))(
        {"a": rand(4, 3, seed=6), "b": rand(4, 2, 2, seed=7)}, mean, sd, normalize)
    assert batched.shape == (4,)
    score = torch.func.grad(diag_normal_log_prob)(x, mean, sd, normalize)
    for k in x:
        torch.testing.assert_close(score[k], -(x[k] - mean[k]) / sd[k] ** 2, **CLOSE)


def test_diag_normal_sample_equals_torch_normal_and_has_the_moments():
    mean = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[3.0]])}
    sd = {"a": torch.tensor([0.1, 2.0]), "b": torch.tensor([[0.5]])}
    for s in (sd, 0.3):
        torch.manual_seed(7)
        draws = diag_normal_sample(mean, s, sample_shape=(3,))
        torch.manual_seed(7)
        for k in ("a", "b"):  # optree order: leaf "a" draws first
            expected = torch.distributions.Normal(mean[k], s[k] if isinstance(s, dict) else s).sample((3,))
            assert torch.equal(draws[k], expected)
    n = 200_000
    torch.manual_seed(0)
    mean64 = {k: v.to(F64) for k, v in mean.items()}
    draws = diag_normal_sample(mean64, sd, sample_shape=torch.Size([n]))
    for k in mean:
        assert draws[k].shape == (n, *mean[k].shape) and draws[k].dtype == F64
        assert ((draws[k].mean(0) - mean[k]).abs() < 5 * sd[k] / math.sqrt(n)).all()
        assert ((draws[k].std(0) - sd[k]).abs() < 5 * sd[k] / math.sqrt(2 * n)).all()
    assert diag_normal_sample(mean, 1.0)["a"].shape == (2,) and diag_normal_sample(mean, 1.0, 4)["b"].shape == (4, 1, 1)
    mu, s = torch.tensor([1.0], requires_grad=True), torch.tensor([2.0], requires_grad=True)
    torch.manual_seed(1)
    draw = diag_normal_sample(mu, s)
    draw.sum().backward()  # reparameterised: ∂θ/∂μ = 1, ∂θ/∂σ = ε
    assert mu.grad.item() == 1.0
    torch.testing.assert_close(s.grad, (draw.detach() - 1.0) / 2.0)


# --------------------------------------------------------------------------- linearized


def test_linearized_forward_diag_covariance_is_j_sigma_jt():
    x = rand(3, 2)
    params = {"w": rand(2, 2, seed=1), "b": rand(2, seed=2)}
    sd = {"w": rand(2, 2, seed=3).abs(), "b": rand(2, seed=4).abs()}

    def forward(p, batch):
        out = torch.sin(batch @ p["w"]) + p["b"]
        return out, {"hidden": out * 2}

    mean, chol, aux = linearized_forward_diag(forward, params, x, sd)
    torch.testing.assert_close(mean, forward(params, x)[0], **CLOSE)
    torch.testing.assert_close(aux["hidden"], 2 * mean, **CLOSE)
    flat, unravel = tree_ravel(params)
    variances = tree_ravel(sd)[0] ** 2
    for b in range(3):
        jac = jacobian(lambda theta, b=b: forward(unravel(theta), x[b : b + 1])[0][0], flat)  # (out, dθ)
        torch.testing.assert_close(chol[b] @ chol[b].T, jac @ torch.diag(variances) @ jac.T, **CLOSE)
        assert torch.equal(chol[b], torch.tril(chol[b]))


# --------------------------------------------------------------------------- bad inputs


def square(x):
    return (x**2).sum()


BAD_INPUTS = [
    (lambda: hvp(square, torch.ones(2), (torch.ones(2),)), TypeError, "primals as a tuple"),
    (lambda: fvp(square, (torch.ones(2),), (torch.ones(2), torch.ones(2))), ValueError, "one tangent per primal"),
    (lambda: fvp(square, (torch.ones(2),), (torch.ones(2),), normalize=True), ValueError, "has shape \\(\\)"),
    (lambda: ggn(square, square, argnums=1), ValueError, "argnums=1"),
    (lambda: diag_ggn(lambda p: {"z": p}, square)(torch.ones(2)), TypeError, "return a tensor"),
    (lambda: ggn(lambda p: p, lambda z: z * 2)(torch.ones(2)), ValueError, "to a scalar"),
    (lambda: ggn(square, square, normalize=True)(torch.ones(2)), ValueError, "0-dimensional"),
    (lambda: cg(lambda v: v, torch.ones(2), tol=-1.0), ValueError, "tol ≥ 0, got -1.0"),
    (lambda: cg(lambda v: v, torch.ones(2), maxiter=2.5), TypeError, "maxiter to be an int ≥ 0 or None, got 2.5"),
    (lambda: cg(lambda v: v[:1], torch.ones(2)), ValueError, "A\\(x\\) must have the structure and shapes of b"),
    (lambda: cg(lambda v: v, {"a": torch.ones(2)}, x0={"b": torch.ones(2)}), ValueError, "x0 must have"),
    (lambda: cg("A", torch.ones(2)), TypeError, "functions A and M, got str"),
    (lambda: L_from_flat(torch.ones(4)), ValueError, "n \\(n \\+ 1\\) / 2 entries, got shape \\(4,\\)"),
    (lambda: L_from_flat(torch.ones(2, 3)), ValueError, "got shape \\(2, 3\\)"),
    (lambda: L_from_flat([1.0]), TypeError, "got list"),
    (lambda: L_to_flat(torch.ones(2, 3)), ValueError, "square \\(n, n\\) matrix, got shape \\(2, 3\\)"),
    (lambda: diag_normal_log_prob({"a": torch.ones(2)}, {"b": torch.ones(2)}), ValueError, "mean to be a scalar"),
    (lambda: diag_normal_log_prob({}), ValueError, "at least one tensor"),
    (lambda: diag_normal_log_prob(torch.ones(2), 0.0, -1.0), ValueError, "sd_diag > 0 .* got -1.0"),
    (lambda: diag_normal_log_prob(torch.ones(2), 0.0, 0), ValueError, "sd_diag > 0 .* got 0"),
    (lambda: diag_normal_log_prob({"a": torch.ones(2)}, {"a": "0"}), TypeError, "leaf '0' \\(str\\)"),
    (lambda: diag_normal_sample({"a": torch.ones(2)}, {"a": "1"}), TypeError, "leaf '1' \\(str\\)"),
    (lambda: cg(lambda v: v, torch.ones(2), maxiter=True), TypeError, "maxiter to be an int ≥ 0 or None, got True"),
    (lambda: cg(lambda v: v, torch.ones(2), maxiter=-1), ValueError, "maxiter to be an int ≥ 0 or None, got -1"),
    (lambda: diag_normal_sample(torch.ones(2), [1.0, 2.0]), ValueError, "sd_diag to be a scalar"),
    (lambda: diag_normal_sample(torch.ones(2), 1.0, sample_shape="3"), TypeError, "sample_shape"),
    (lambda: model_to_function(lambda x: x), TypeError, "torch.nn.Module, got function"),
    (lambda: per_samplify(3), TypeError, "got int"),
    (lambda: linearized_forward_diag(lambda p, b: p * b, torch.ones(2), torch.ones(2), torch.ones(2)), TypeError,
     "return \\(forward_vals, aux\\), got Tensor"),
    (lambda: linearized_forward_diag(lambda p, b: (p * b, None), torch.ones(2), torch.ones(2), torch.ones(2)),
     ValueError, "2-dimensional tensor \\(batch, out\\), got shape \\(2,\\)"),
    (lambda: linearized_forward_diag(lambda p, b: (p[None] * b, None), torch.ones(2), torch.ones(1), torch.ones(3)),
     ValueError, "sd_diag with the structure and shapes of params"),
    (lambda: linearized_forward_diag(lambda p, b: (p[None] * b, None), torch.ones(2), torch.ones(1), torch.ones(2)),
     RuntimeError, "Auxiliary output should be a TensorTree"),
    (lambda: empirical_fisher(square, has_aux=True)(torch.ones(2)), RuntimeError, "should be a tuple"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_inputs_raise_naming_the_value(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- docstrings


MODULES = ["bayesflow.utils", *(f"bayesflow.utils.{name}" for name in
                                ("curvature", "functional", "gauss_newton", "gaussian", "linalg", "linearized",
                                 "moments"))]
OBJECTS = [(name, importlib.import_module(name)) for name in MODULES] + [
    (f"bayesflow.utils.{name}", getattr(U, name)) for name in U.__all__ if callable(getattr(U, name))]


@pytest.mark.parametrize(("name", "obj"), OBJECTS, ids=[name for name, _ in OBJECTS])
def test_every_public_docstring_has_a_running_example(name, obj):
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
    assert any(test.examples for test in tests), f"{name} has no Example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
    if not inspect.ismodule(obj):
        assert "Args:" in obj.__doc__ or obj is CatchAuxError, name
