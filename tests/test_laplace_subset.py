"""Subset (last-layer) Laplace: blocks of the full curvatures, the closed-form last-layer posterior, selections.

A small tanh MLP in float64, z = tanh(x W₁ᵀ + b₁) W₂ᵀ + b₂ with a Gaussian likelihood. Restricting a
method to the leaves S gives, for every curvature (Fisher, GGN, Hessian and their diagonals), the S×S block
of the full one: the fixed leaves enter as constants, so the derivatives with respect to S are the same
numbers, and only round-off separates the two. With the body fixed, the model is linear-Gaussian in the
head: the posterior of the head is N(m, P⁻¹) in closed form (built by hand below, no autograd), and the
last-layer Laplace at m must equal it.
"""

from __future__ import annotations

import pytest
import torch

from bayesflow.laplace import dense_fisher, dense_ggn, dense_hessian, diag_fisher, diag_ggn, kfac, low_rank, subset

SIGMA, ALPHA = 0.5, 2.0
IN, HIDDEN, OUT, N = 3, 4, 2, 12
ROUNDOFF = dict(rtol=1e-11, atol=1e-11)


def _params(generator: torch.Generator) -> dict[str, torch.Tensor]:
    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    # registration order, as dict(model.named_parameters()); optree's order sorts the keys
    return {"body.weight": draw(HIDDEN, IN), "body.bias": draw(HIDDEN), "head.weight": draw(OUT, HIDDEN),
            "head.bias": draw(OUT)}


GENERATOR = torch.Generator().manual_seed(0)
PARAMS = _params(GENERATOR)
X = torch.randn(N, IN, generator=GENERATOR, dtype=torch.float64)
Y = torch.randn(N, OUT, generator=GENERATOR, dtype=torch.float64)
BATCHES = [(X[:5], Y[:5]), (X[5:], Y[5:])]


def features(params, x):
    return torch.tanh(x @ params["body.weight"].T + params["body.bias"])


def forward(params, batch):
    return features(params, batch[0]) @ params["head.weight"].T + params["head.bias"], torch.tensor([])


def outer_log_likelihood(z, batch):
    return torch.distributions.Normal(z, SIGMA).log_prob(batch[1]).sum()


def log_posterior(params, batch):  # a Gaussian prior N(0, 1/ALPHA) on every parameter
    prior = sum(-0.5 * ALPHA * (leaf**2).sum() for leaf in params.values())
    return outer_log_likelihood(forward(params, batch)[0], batch) + prior, torch.tensor([])


def _index(params, select) -> torch.Tensor:
    """The positions of the selected leaves' entries in the full ravelled vector (optree order)."""
    chosen = set(subset.names({k: v for k, v in subset.take(params, select).items() if v.numel()}))
    offset, index = 0, []
    for name in subset.names(params):
        size = params[name].numel()
        if name in chosen:
            index += range(offset, offset + size)
        offset += size
    return torch.tensor(index)


def _accumulate(transform, params):
    state = transform.init(params)
    for batch in BATCHES:
        state, _ = transform.update(state, batch)
    return state


METHODS = {
    "dense_ggn": (dense_ggn.build, dict(forward=forward, outer_log_likelihood=outer_log_likelihood, init_prec=0.7)),
    "diag_ggn": (diag_ggn.build, dict(forward=forward, outer_log_likelihood=outer_log_likelihood,
                                      init_prec_diag=0.7)),
    "dense_fisher": (dense_fisher.build, dict(log_posterior=log_posterior, init_prec=0.7)),
    "diag_fisher": (diag_fisher.build, dict(log_posterior=log_posterior, init_prec_diag=0.7)),
    "dense_hessian": (dense_hessian.build, dict(log_posterior=log_posterior, init_prec=0.7)),
}
SELECTIONS = {"head": ["head.*"], "scattered": ["body.weight", "head.bias"],
              "vectors": lambda name, leaf: leaf.ndim == 1}


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("method", list(METHODS))
def test_subset_curvature_is_the_block_of_the_full_one(method, selection):
    build, kwargs = METHODS[method]
    select = SELECTIONS[selection]
    full = _accumulate(build(**kwargs), PARAMS)
    part = _accumulate(subset.build(build, PARAMS, select, **kwargs), PARAMS)
    index = _index(PARAMS, select)
    if method.startswith("dense"):
        assert part.prec.shape == (len(index), len(index))
        torch.testing.assert_close(part.prec, full.prec[index][:, index], **ROUNDOFF)
    else:
        chosen = subset.take(PARAMS, select)
        for name, leaf in part.prec_diag.items():
            if chosen[name].numel():
                torch.testing.assert_close(leaf, full.prec_diag[name], **ROUNDOFF)
            else:
                assert leaf.numel() == 0  # nothing is kept for a fixed leaf
    assert int(part.step) == len(BATCHES)
    for name, leaf in part.params.items():  # the state's params: the selected leaves themselves
        assert leaf is PARAMS[name] if leaf.numel() else leaf.shape == (0,)


def test_the_block_differs_from_the_whole_so_the_comparison_can_fail():
    index = _index(PARAMS, "head")
    full = _accumulate(dense_ggn.build(forward, outer_log_likelihood), PARAMS).prec
    shifted = torch.roll(index, 1)  # a wrong block: the same leaves, permuted
    assert (full[index][:, index] - full[shifted][:, shifted]).abs().max() > 1e-2


def _last_layer_posterior(params):
    """The closed-form head posterior N(m, P⁻¹), columns [b₂ (OUT), W₂ row-major (OUT·HIDDEN)] (optree order)."""
    phi = features(params, X)  # (N, HIDDEN): fixed when the body is
    eye = torch.eye(OUT, dtype=torch.float64)
    design = torch.cat([eye.expand(N, OUT, OUT), torch.einsum("ko,nh->nkoh", eye, phi).reshape(N, OUT, -1)], 2)
    eye = torch.eye(design.shape[2], dtype=torch.float64)
    prec = ALPHA * eye + torch.einsum("nki,nkj->ij", design, design) / SIGMA**2
    mean = torch.linalg.solve(prec, torch.einsum("nki,nk->i", design, Y) / SIGMA**2)
    return mean, prec


def test_last_layer_laplace_is_the_closed_form_posterior_of_a_linear_gaussian_head():
    mean, prec = _last_layer_posterior(PARAMS)
    params = dict(PARAMS, **{"head.bias": mean[:OUT], "head.weight": mean[OUT:].reshape(OUT, HIDDEN)})  # the MAP
    head = subset.last_layer(params)
    assert head == ["head.weight", "head.bias"]

    def head_log_posterior(p, batch):  # the prior of the head alone: the body is not a random variable here
        prior = -0.5 * ALPHA * (p["head.weight"].square().sum() + p["head.bias"].square().sum())
        return outer_log_likelihood(forward(p, batch)[0], batch) + prior, torch.tensor([])

    # μ is the MAP of the head: the restricted gradient vanishes there
    gradient = torch.func.grad(lambda sub: subset.restrict(head_log_posterior, params, head)(sub, (X, Y))[0])(
        subset.take(params, head))
    assert max(float(g.abs().max()) for g in gradient.values() if g.numel()) < 1e-10

    ggn = _accumulate(subset.build(dense_ggn.build, params, head, forward, outer_log_likelihood, init_prec=ALPHA),
                      params)
    hessian = subset.build(dense_hessian.build, params, head, log_posterior=head_log_posterior)
    hessian, _ = hessian.update(hessian.init(params), (X, Y))
    torch.testing.assert_close(ggn.prec, prec, **ROUNDOFF)
    torch.testing.assert_close(hessian.prec, prec, **ROUNDOFF)

    # the low-rank Laplace at full rank on the same subset is the same Gaussian
    lr = _accumulate(subset.build(low_rank.build, params, head, forward=forward,
                                  outer_log_likelihood=outer_log_likelihood, rank=len(mean), prior_prec=ALPHA), params)
    eye = torch.eye(len(mean), dtype=torch.float64)
    torch.testing.assert_close(lr.eigvecs * lr.eigvals @ lr.eigvecs.T + ALPHA * eye, prec, **ROUNDOFF)

    for state in (ggn, lr):
        draws = subset.sample(state, params, (4000,), generator=torch.Generator().manual_seed(1))
        for name in ("body.weight", "body.bias"):  # fixed leaves: broadcast, exactly the values
            assert draws[name].shape == (4000, *params[name].shape)
            assert torch.equal(draws[name], params[name].expand_as(draws[name]))
        flat = torch.cat([draws["head.bias"], draws["head.weight"].reshape(4000, -1)], dim=1)
        standard_error = torch.linalg.inv(prec).diagonal().sqrt() / 4000**0.5
        assert ((flat.mean(0) - mean).abs() / standard_error).max() < 5  # 10 entries: P(|Z| > 5) ≈ 6e-6


def test_prefix_glob_and_list_select_the_same_leaves():
    def chosen(select):
        return [name for name, leaf in subset.take(PARAMS, select).items() if leaf.numel()]

    assert chosen("head") == chosen("head.*") == chosen(["head.weight", "head.bias"]) == ["head.weight", "head.bias"]
    assert chosen(lambda name, leaf: name.endswith("bias")) == ["body.bias", "head.bias"]
    sub = subset.take(PARAMS, "head")
    assert sub["body.weight"].shape == (0,) and sub["body.weight"].dtype == torch.float64
    full = subset.complete(sub, PARAMS)
    assert all(full[name] is PARAMS[name] for name in PARAMS)


def test_last_layer_follows_registration_order_not_sorted_names():
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(11)])  # "10.*" sorts before "2.*"
    assert subset.last_layer(model) == ["10.weight", "10.bias"]
    assert subset.last_layer(dict(model.named_parameters())) == ["10.weight", "10.bias"]
    nested = {"layers": [{"w": torch.zeros(1)}, {"w": torch.zeros(1), "b": torch.zeros(1)}], "scale": None}
    assert subset.last_layer(nested) == ["layers.1.w", "layers.1.b"]
    assert subset.last_layer({"w": torch.zeros(2), "b": torch.zeros(1)}) == ["b"]
    with pytest.raises(ValueError, match="has no parameters"):
        subset.last_layer(torch.nn.ReLU())


def test_inplace_updates_the_subset_state():
    transform = subset.build(dense_ggn.build, PARAMS, "head", forward, outer_log_likelihood)
    state = transform.init(PARAMS)
    prec = state.prec
    for batch in BATCHES:
        state, _ = transform.update(state, batch, inplace=True)
    assert state.prec is prec and int(state.step) == 2
    torch.testing.assert_close(state.prec, _accumulate(transform, PARAMS).prec, rtol=0, atol=0)


def test_bad_selections_raise_clear_errors():
    with pytest.raises(ValueError, match=r"select pattern 'haed\.\*' matches no parameter.*'body.bias'"):
        subset.take(PARAMS, "haed.*")
    with pytest.raises(ValueError, match=r"select name 'head.wieght' matches no parameter"):
        subset.build(dense_ggn.build, PARAMS, ["head.bias", "head.wieght"], forward, outer_log_likelihood)
    with pytest.raises(ValueError, match="chooses no parameter"):
        subset.take(PARAMS, [])
    with pytest.raises(ValueError, match="chooses no parameter"):
        subset.restrict(log_posterior, PARAMS, lambda name, leaf: False)
    with pytest.raises(TypeError, match="must return a bool"):
        subset.take(PARAMS, lambda name, leaf: leaf.ndim)
    with pytest.raises(TypeError, match="select must be a name or glob"):
        subset.take(PARAMS, 3)
    with pytest.raises(TypeError, match=r"'count', which is torch\.int64"):
        subset.take(dict(PARAMS, count=torch.tensor(3)), "count")
    with pytest.raises(TypeError, match="restricts a log_posterior or forward"):
        subset.build(kfac.build, PARAMS, "head", torch.nn.Linear(1, 1), outer_log_likelihood)
    with pytest.raises(TypeError, match="does not take these arguments"):
        subset.build(dense_ggn.build, PARAMS, "head", forward, outer_log_likelihood, learning_rate=0.1)
    with pytest.raises(TypeError, match="forward must be a function"):
        subset.build(dense_ggn.build, PARAMS, "head", forward=1.0, outer_log_likelihood=outer_log_likelihood)
    transform = subset.build(dense_ggn.build, PARAMS, "head", forward, outer_log_likelihood)
    with pytest.raises(ValueError, match="structure of build's params"):
        transform.init({"head.weight": PARAMS["head.weight"]})
    with pytest.raises(ValueError, match="structure of params"):
        subset.complete([torch.zeros(1)], PARAMS)
    with pytest.raises(TypeError, match="no sampler is known"):
        subset.sample(object(), PARAMS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_fixed_leaf_is_refused_at_build_and_restrict(bad):
    broken = dict(PARAMS, **{"body.bias": PARAMS["body.bias"].clone().index_fill_(0, torch.tensor([0]), bad)})
    with pytest.raises(ValueError, match=r"the fixed leaf 'body\.bias' of params holds NaN or infinite"):
        subset.build(dense_ggn.build, broken, "head", forward, outer_log_likelihood)
    with pytest.raises(ValueError, match=r"the fixed leaf 'body\.bias'"):
        subset.restrict(log_posterior, broken, "head")
    with pytest.raises(ValueError, match="the fixed leaf 'scale'"):
        subset.restrict(log_posterior, dict(PARAMS, scale=bad), "head")
    transform = subset.build(dense_ggn.build, broken, "body", forward, outer_log_likelihood)  # selected:
    with pytest.raises(ValueError, match=r"params leaf 'body\.bias' holds NaN or infinite"):  # init checks it
        transform.init(broken)
