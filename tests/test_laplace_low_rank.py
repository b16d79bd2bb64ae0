"""Low-rank Laplace N(μ, (U diag(s) Uᵀ + λI)⁻¹) against the dense GGN and its eigendecomposition (float64).

A small tanh MLP (d = 26) with a Gaussian likelihood: each output adds one rank-one term to the GGN, so
N samples of 2 outputs give rank 2N < d. References come from the dense GGN of
:mod:`bayesflow.laplace.dense_ggn` and ``torch.linalg.eigh``:

- rank ≥ the true rank: U diag(s) Uᵀ + λI is the dense GGN + λI (streaming or matrix-free) to round-off;
- truncated, one update (or a sketch of width ≥ the rank): the best rank-k approximation (Eckart–Young);
- truncated over T batches: 0 ⪯ G − B and ‖G − B‖₂ ≤ T σ_{k+1}(G) (the module's bound);
- draws: the sample covariance against the exact (UsUᵀ + λI)⁻¹ within Monte-Carlo error, with a
  wrong covariance shown to fail the same check.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from bayesflow.laplace import dense_ggn, low_rank
from bayesflow.tree import flatten, ravel, unraveller
from bayesflow.utils import ggnvp

SIGMA, LAMBDA = 0.5, 0.3
IN, HIDDEN, OUT = 3, 4, 2
D = IN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT  # 26


def _setup(n: int, classes: bool = False):
    generator = torch.Generator().manual_seed(0)
    out = 3 if classes else OUT
    params = {"w1": torch.randn(HIDDEN, IN, generator=generator, dtype=torch.float64),
              "b1": torch.randn(HIDDEN, generator=generator, dtype=torch.float64),
              "w2": torch.randn(out, HIDDEN, generator=generator, dtype=torch.float64),
              "b2": torch.randn(out, generator=generator, dtype=torch.float64)}
    x = torch.randn(n, IN, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=generator) if classes else torch.randn(n, out, generator=generator,
                                                                                   dtype=torch.float64)
    return params, x, y


def forward(params, batch):
    return torch.tanh(batch[0] @ params["w1"].T + params["b1"]) @ params["w2"].T + params["b2"], torch.tensor([])


def gaussian(z, batch):
    return torch.distributions.Normal(z, SIGMA).log_prob(batch[1]).sum()


def softmax(z, batch):
    return torch.distributions.Categorical(logits=z).log_prob(batch[1]).sum()


def _batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _dense(params, batches, loglik):
    state = dense_ggn.init(params)
    for batch in batches:
        state, _ = dense_ggn.update(state, batch, forward, loglik)
    return state.prec


def _streamed(params, batches, loglik, rank):
    transform = low_rank.build(forward, loglik, rank=rank, prior_prec=LAMBDA)
    state = transform.init(params)
    for batch in batches:
        state, _ = transform.update(state, batch)
    return state


def _low_rank_matrix(state):
    return (state.eigvecs * state.eigvals) @ state.eigvecs.T


def _tolerance(matrix):
    return dict(rtol=0, atol=1e-11 * float(torch.linalg.matrix_norm(matrix, 2)))


def _true_rank(matrix):
    values = torch.linalg.eigvalsh(matrix)
    return int((values > 1e-10 * values.max()).sum())


@pytest.mark.parametrize(("classes", "n", "rank"), [(False, 6, 12), (False, 6, 15), (True, 5, 10)])
def test_rank_at_least_the_true_rank_gives_the_exact_precision(classes, n, rank):
    params, x, y = _setup(n, classes)
    loglik = softmax if classes else gaussian
    batches = _batches(x, y, 2)
    ggn = _dense(params, batches, loglik)
    # Gaussian: one rank-one term per output; softmax: a Hessian of rank classes - 1 per sample
    assert _true_rank(ggn) == 2 * n <= rank
    state = _streamed(params, batches, loglik, rank)
    assert state.eigvecs.shape == (sum(leaf.numel() for leaf in params.values()), rank)
    torch.testing.assert_close(state.eigvecs.T @ state.eigvecs, torch.eye(rank, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    eye = torch.eye(len(ggn), dtype=torch.float64)
    torch.testing.assert_close(_low_rank_matrix(state) + LAMBDA * eye, ggn + LAMBDA * eye, **_tolerance(ggn))
    assert int(state.step) == len(batches)
    assert bool((state.eigvals[:-1] >= state.eigvals[1:]).all())


def test_truncation_after_one_update_is_the_best_rank_k_approximation():
    params, x, y = _setup(6)
    ggn = _dense(params, [(x, y)], gaussian)
    values, vectors = torch.linalg.eigh(ggn)
    values, vectors = values.flip(0), vectors.flip(1)
    k = 5
    assert values[k - 1] - values[k] > 1e-3 * values[0]  # a gap: the top-k subspace is well defined
    state = _streamed(params, [(x, y)], gaussian, k)
    best = (vectors[:, :k] * values[:k]) @ vectors[:, :k].T
    torch.testing.assert_close(state.eigvals, values[:k], **_tolerance(ggn))
    torch.testing.assert_close(_low_rank_matrix(state), best, **_tolerance(ggn))
    torch.testing.assert_close(state.eigvecs @ state.eigvecs.T, vectors[:, :k] @ vectors[:, :k].T,
                               rtol=0, atol=1e-9)
    error = float(torch.linalg.matrix_norm(ggn - _low_rank_matrix(state), 2))
    assert math.isclose(error, float(values[k]), rel_tol=1e-9)  # Eckart–Young: the error is σ_{k+1}
    assert error > 1e-3 * float(values[0])  # truncation does lose something: the comparison can fail


def test_streamed_truncation_obeys_its_bound():
    params, x, y = _setup(9)
    batches = _batches(x, y, 3)
    ggn = _dense(params, batches, gaussian)
    k = 5
    state = _streamed(params, batches, gaussian, k)
    residual = ggn - _low_rank_matrix(state)
    sigma = torch.linalg.eigvalsh(ggn).flip(0)
    assert float(torch.linalg.eigvalsh(residual)[0]) > -1e-10 * float(sigma[0])  # only ever discards
    assert float(torch.linalg.matrix_norm(residual, 2)) <= len(batches) * float(sigma[k]) * (1 + 1e-9)


def _output(params, batch):
    return forward(params, batch)[0]


def _negative_log_likelihood(z, batch):
    return -gaussian(z, batch)


def _flat_ggnvp(params, batches):
    leaves, spec = flatten(params)
    unravel = unraveller(leaves, spec)

    def matvec(v):
        total = torch.zeros_like(v)
        for batch in batches:
            model = partial(_output, batch=batch)
            loss = partial(_negative_log_likelihood, batch=batch)
            total += ravel(flatten(ggnvp(model, loss, (params,), (unravel(v),))[1])[0])
        return total

    return matvec


@pytest.mark.parametrize(("rank", "oversample", "power_iters"), [(12, 0, 0), (5, 7, 0), (5, 9, 1)])
def test_matrix_free_is_exact_when_the_sketch_spans_the_range(rank, oversample, power_iters):
    params, x, y = _setup(6)
    batches = _batches(x, y, 3)
    ggn = _dense(params, batches, gaussian)  # rank 12 ≤ rank + oversample
    values, vectors = torch.linalg.eigh(ggn)
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    state = low_rank.from_matvec(params, _flat_ggnvp(params, batches), rank, LAMBDA, oversample=oversample,
                                 power_iters=power_iters, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(state.eigvals, values, **_tolerance(ggn))
    torch.testing.assert_close(_low_rank_matrix(state), (vectors * values) @ vectors.T, **_tolerance(ggn))
    assert int(state.step) == 1


def test_a_sketch_narrower_than_the_rank_is_not_exact():  # so the exactness above is a property, not luck
    params, x, y = _setup(6)
    batches = _batches(x, y, 3)
    ggn = _dense(params, batches, gaussian)
    state = low_rank.from_matvec(params, _flat_ggnvp(params, batches), 5, LAMBDA, oversample=0, power_iters=0,
                                 generator=torch.Generator().manual_seed(3))
    values = torch.linalg.eigvalsh(ggn).flip(0)[:5]
    assert float((state.eigvals - values).abs().max()) > 1e-6 * float(values[0])


def _explicit_state():
    """d = 6, k = 2: U a random orthonormal pair, s = (8, 1.5), λ = 0.5; μ a tree of two leaves."""
    generator = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=generator, dtype=torch.float64)).Q
    params = {"a": torch.tensor([1.0, -2.0], dtype=torch.float64),
              "b": torch.arange(4.0, dtype=torch.float64).reshape(2, 2)}
    state = low_rank.LowRankLaplaceState(params, basis, torch.tensor([8.0, 1.5], dtype=torch.float64),
                                         torch.tensor(0.5, dtype=torch.float64))
    prec = (basis * state.eigvals) @ basis.T + 0.5 * torch.eye(6, dtype=torch.float64)
    return state, prec


def _max_z(draws: torch.Tensor, mean: torch.Tensor, prec: torch.Tensor) -> float:
    """The largest standardised error of the whitened sample covariance (known mean).

    If the draws are N(μ, P⁻¹), w = P^{1/2}(x - μ) is N(0, I): each entry of Ŝ = Σ_n w wᵀ / n is
    ≈ N(δ_ij, (1 + δ_ij) / n) (Var[w_i w_j] = 1, Var[w_i²] = 2). Whitening weighs every direction
    alike, so an error in a small-variance direction (large s) shows as plainly as one in λ."""
    n = draws.shape[0]
    values, vectors = torch.linalg.eigh(prec)
    whitened = (draws - mean) @ (vectors * values.sqrt()) @ vectors.T
    eye = torch.eye(len(prec), dtype=prec.dtype)
    return float(((whitened.T @ whitened / n - eye).abs() / ((1 + eye) / n).sqrt()).max())


def test_sample_covariance_matches_the_exact_covariance():
    state, prec = _explicit_state()
    n = 20000
    draws = low_rank.sample(state, (n,), generator=torch.Generator().manual_seed(0))
    assert draws["a"].shape == (n, 2) and draws["b"].shape == (n, 2, 2)
    flat = torch.cat([draws["a"], draws["b"].reshape(n, 4)], dim=1)
    mean = ravel(flatten(state.params)[0])
    # 21 distinct entries: P(max |Z| > 5) ≈ 21 · 5.7e-7 for the right covariance (the seed is fixed)
    assert _max_z(flat, mean, prec) < 5
    assert float(((flat.mean(0) - mean).abs() / (torch.linalg.inv(prec).diagonal() / n).sqrt()).max()) < 5
    # wrong covariances fail the same check: a 20% error in λ, or in the s direction, misstates a whitened
    # variance by ≥ 15%, ≥ 15 standard errors (√(2/n) = 1%)
    basis, s = state.eigvecs, state.eigvals
    eye = torch.eye(6, dtype=torch.float64)
    for wrong in ((basis * s) @ basis.T + 0.6 * eye, (basis * 1.2 * s) @ basis.T + 0.5 * eye):
        assert _max_z(flat, mean, wrong) > 10


def test_log_det_and_products_are_exact():
    state, prec = _explicit_state()
    assert math.isclose(float(low_rank.log_det(state)), float(torch.logdet(prec)), rel_tol=1e-13)
    other = prec + 0.7 * torch.eye(6, dtype=torch.float64)  # the same curvature under λ = 1.2
    assert math.isclose(float(low_rank.log_det(state, 1.2)), float(torch.logdet(other)), rel_tol=1e-13)
    v = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(low_rank.prec_vp(state, v), v @ prec, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(low_rank.cov_vp(state, v), torch.linalg.solve(prec, v.T).T, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(low_rank.cov_vp(state, low_rank.prec_vp(state, v[0])), v[0], rtol=1e-12, atol=1e-13)


def test_inplace_and_out_of_place_updates_agree():
    params, x, y = _setup(4)
    transform = low_rank.build(forward, gaussian, rank=4, prior_prec=LAMBDA)
    fresh, reused = transform.init(params), transform.init(params)
    eigvecs = reused.eigvecs
    for batch in _batches(x, y, 2):
        fresh, _ = transform.update(fresh, batch)
        reused, aux = transform.update(reused, batch, inplace=True)
    assert reused.eigvecs is eigvecs and int(reused.step) == 2 and aux.numel() == 0
    torch.testing.assert_close(_low_rank_matrix(reused), _low_rank_matrix(fresh), rtol=0, atol=1e-12)
    stacked = torch.stack([fresh, reused])  # a record: states stack leaf by leaf
    assert stacked.eigvecs.shape == (2, D, 4)


def test_bad_arguments_raise_clear_errors():
    params = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="rank must be a positive int"):
        low_rank.init(params, rank=0)
    with pytest.raises(ValueError, match=r"rank must be at most the number of parameters \(3\)"):
        low_rank.build(forward, gaussian, rank=4).init(params)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="prior_prec must be a finite positive number"):
            low_rank.init(params, rank=1, prior_prec=bad)
    state = low_rank.init(params, rank=2)
    with pytest.raises(ValueError, match=r"factor must be an \(m, 3\) tensor"):
        low_rank.add_factor(state, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"prec_vp takes flat \(\.\.\., 3\) vectors"):
        low_rank.prec_vp(state, torch.ones(2))
    with pytest.raises(ValueError, match=r"matvec must map a \(3,\) vector to a \(3,\) vector"):
        low_rank.from_matvec(params, lambda v: v[:2], rank=1)
    with pytest.raises(ValueError, match="oversample must be a non-negative int"):
        low_rank.from_matvec(params, lambda v: v, rank=1, oversample=-1)
    with pytest.raises(ValueError, match="eigvals must be finite and non-negative"):
        low_rank.sample(state._replace(eigvals=torch.tensor([1.0, -1.0])))
    with pytest.raises(TypeError, match="forward must be a function"):
        low_rank.build(None, gaussian, rank=1)
