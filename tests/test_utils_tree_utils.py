"""posteriors-compatible helpers: ``bayesflow.utils.cumulative_mean_and_cov`` and ``bayesflow.tree_utils``.

The running moments are checked against a literal port of posteriors' Welford loop in float64 (round-off
tolerances only); the tree helpers against posteriors' documented semantics, in-place ones by object identity.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from bayesflow import tree_utils as tu
from bayesflow.tree import tree_leaves, tree_map
from bayesflow.utils import cumulative_mean_and_cov

F64 = torch.float64


def welford(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """posteriors' loop: m_k = m_{k-1}(k-1)/k + x_k/k, C_k = C_{k-1}(k-2)/(k-1) + δδᵀ/k, C_1 = I."""
    n, d = xs.shape
    means, covs = torch.zeros(n, d, dtype=xs.dtype), torch.zeros(n, d, d, dtype=xs.dtype)
    means[0], covs[0] = xs[0], torch.eye(d, dtype=xs.dtype)
    for i in range(1, n):
        k = i + 1
        means[i] = means[i - 1] * (k - 1) / k + xs[i] / k
        delta = xs[i] - means[i - 1]
        covs[i] = covs[i - 1] * (k - 2) / (k - 1) + torch.outer(delta, delta) / k
    return means, covs


# --------------------------------------------------------------------------- cumulative_mean_and_cov


@pytest.mark.parametrize(("n", "d"), [(1, 1), (1, 3), (2, 1), (2, 4), (3, 2), (57, 5)])
def test_cumulative_mean_and_cov_equals_the_welford_loop(n, d):
    xs = torch.randn(n, d, generator=torch.Generator().manual_seed(n * 10 + d), dtype=F64) * 3 + 1
    means, covs = cumulative_mean_and_cov(xs)
    ref_means, ref_covs = welford(xs)
    assert means.shape == (n, d) and covs.shape == (n, d, d) and means.dtype == covs.dtype == F64
    torch.testing.assert_close(means, ref_means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(covs, ref_covs, rtol=1e-12, atol=1e-12)
    assert torch.equal(covs[0], torch.eye(d, dtype=F64)) and torch.equal(means[0], xs[0])
    for k in range(2, n + 1):  # and the batch moments of the first k rows
        torch.testing.assert_close(covs[k - 1], torch.cov(xs[:k].T).reshape(d, d), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(means[k - 1], xs[:k].mean(0), rtol=1e-12, atol=1e-12)
    if n >= 2:  # two rows: C_2 = (x_2 - x_1)(x_2 - x_1)ᵀ / 2; the biased (1/k) covariance must not pass
        delta = xs[1] - xs[0]
        torch.testing.assert_close(covs[1], torch.outer(delta, delta) / 2, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(covs[1], torch.outer(delta, delta) / 4)


def test_cumulative_mean_and_cov_matches_posteriors_test():
    """posteriors' own test (tests/test_utils.py::test_cumulative_mean_and_cov), float32."""
    xs = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    cum_means, cum_covs = cumulative_mean_and_cov(xs)
    assert cum_means.shape == xs.shape and cum_covs.shape == (*xs.shape, xs.shape[1])
    for i in range(xs.shape[0]):
        assert torch.allclose(cum_means[i], xs[: i + 1].mean(0), atol=1e-7)
        if i > 0:
            assert torch.allclose(cum_covs[i], xs[: i + 1].T.cov(), atol=1e-7)


def test_cumulative_mean_and_cov_is_stable_and_keeps_the_dtype():
    """A 1e6 offset in float64 (raw second-moment sums would lose ~1e-4), and float32 in, float32 out at
    float32 round-off of the exact values (the sums run in float64)."""
    g = torch.Generator().manual_seed(1)
    xs = 1e6 + torch.randn(2000, 3, generator=g, dtype=F64)
    means, covs = cumulative_mean_and_cov(xs)
    ref_means, ref_covs = welford(xs)
    torch.testing.assert_close(covs, ref_covs, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(means, ref_means, rtol=1e-14, atol=0)
    x32 = (1e3 + torch.randn(5000, 2, generator=g)).float()
    means32, covs32 = cumulative_mean_and_cov(x32)
    assert means32.dtype == covs32.dtype == torch.float32 and means32.device == x32.device
    ref_means, ref_covs = welford(x32.double())
    torch.testing.assert_close(covs32.double(), ref_covs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(means32.double(), ref_means, rtol=1e-7, atol=0)
    ints = cumulative_mean_and_cov(torch.tensor([[0, 0], [2, 4], [4, 2]]))
    assert ints[0].dtype == torch.get_default_dtype()
    torch.testing.assert_close(ints[1][-1], torch.tensor([[4.0, 2.0], [2.0, 4.0]]))


def test_cumulative_mean_and_cov_at_scale_and_with_gradients():
    xs = torch.randn(100_000, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    means, covs = cumulative_mean_and_cov(xs)
    assert covs.shape == (100_000, 5, 5)
    for k in (2, 10, 12_345, 100_000):
        torch.testing.assert_close(covs[k - 1], xs[:k].T.cov(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(means[k - 1], xs[:k].mean(0), rtol=1e-10, atol=1e-12)
    x = torch.randn(20, 3, dtype=F64, requires_grad=True)  # differentiable, like posteriors' loop
    torch.autograd.gradcheck(lambda t: tuple(v[1:] for v in cumulative_mean_and_cov(t)), (x,))


def test_cumulative_mean_and_cov_errors():
    with pytest.raises(ValueError, match=r"shape \(n, d\).*got shape \(5,\)"):
        cumulative_mean_and_cov(torch.zeros(5))
    with pytest.raises(ValueError, match=r"n ≥ 1.*got shape \(0, 3\)"):
        cumulative_mean_and_cov(torch.zeros(0, 3))
    with pytest.raises(TypeError, match=r"torch\.Tensor.*list"):
        cumulative_mean_and_cov([[1.0, 2.0]])
    with pytest.raises(TypeError, match=r"real tensor.*complex"):
        cumulative_mean_and_cov(torch.zeros(3, 2, dtype=torch.complex64))


# --------------------------------------------------------------------------- tree_utils


class Pair(NamedTuple):
    left: torch.Tensor
    right: torch.Tensor


def params() -> dict:
    return {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": {"c": torch.tensor([3.0, 4.0], dtype=F64)},
            "d": Pair(torch.ones(2, 2), torch.zeros(3, requires_grad=True)), "e": None}


def test_tree_size_counts_elements_not_leaves():
    assert tu.tree_size(params()) == 2 + 2 + 4 + 3
    assert tu.tree_size({"a": 3.0, "b": torch.tensor([3.0, 4.0])}) == 3
    assert tu.tree_size(1) == 1 and tu.tree_size(1.2) == 1 and tu.tree_size({}) == 0
    assert isinstance(tu.tree_size(params()), int)


def test_extract_and_insert_are_inverse_and_pure():
    tree = params()
    snapshot = [leaf.clone() for leaf in tree_leaves(tree)]
    sub = tu.extract_requires_grad(tree)
    assert sub["a"] is tree["a"] and sub["d"].right is tree["d"].right and sub["e"] is None
    assert sub["b"]["c"].shape == (0,) and sub["b"]["c"].dtype == F64 and not sub["b"]["c"].requires_grad
    assert sub["d"].left.shape == (0,) and isinstance(sub["d"], Pair)
    back = tu.insert_requires_grad(tree, sub)
    assert all(x is y for x, y in zip(tree_leaves(back), tree_leaves(tree)))
    new = tu.tree_extract(tree, lambda x: x.numel() == 2)
    new = tree_map(lambda x: x + 10 if x.numel() else x, new)
    merged = tu.tree_insert(tree, new, lambda x: x.numel() == 2)
    assert torch.equal(merged["a"], torch.tensor([11.0, 12.0])) and torch.equal(tree["a"], torch.tensor([1.0, 2.0]))
    assert merged["d"].right is tree["d"].right and merged["d"].left is tree["d"].left
    everything = tu.tree_insert(tree, new)  # default f: every leaf from the sub-tree
    assert everything["d"].right.shape == (0,)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, tree_leaves(tree)))  # nothing modified


def test_in_place_inserts_keep_the_tensor_objects():
    tree = params()
    a, c, left = tree["a"], tree["b"]["c"], tree["d"].left
    sub = {"a": torch.tensor([5.0, 6.0, 7.0]), "b": {"c": torch.tensor([], dtype=F64)},
           "d": Pair(torch.full((2, 2), 9.0), torch.tensor([8.0])), "e": None}
    out = tu.insert_requires_grad_(tree, sub)
    assert out is tree and tree["a"] is a and a.requires_grad  # same object, flag kept, new (larger) data
    assert torch.equal(a.detach(), torch.tensor([5.0, 6.0, 7.0])) and a.data_ptr() == sub["a"].data_ptr()
    assert torch.equal(tree["d"].right.detach(), torch.tensor([8.0]))
    assert torch.equal(c, torch.tensor([3.0, 4.0], dtype=F64)) and torch.equal(left, torch.ones(2, 2))  # frozen
    tu.tree_insert_(tree, sub, lambda x: x.dtype == F64)
    assert tree["b"]["c"] is c and c.shape == (0,)
    tu.tree_insert_(tree, sub)
    assert tree["d"].left is left and torch.equal(left, torch.full((2, 2), 9.0))


def test_extract_requires_grad_and_func_inplace_and_not():
    tree = params()
    del tree["e"]  # torch.func.grad's own pytrees reject None

    def func(p, scale, *, shift):
        return scale * (p["a"] ** 2).sum() + (p["b"]["c"].sum() + p["d"].left.sum()) * shift + p["d"].right.sum()

    sub, g = tu.extract_requires_grad_and_func(tree, func)
    assert torch.equal(g(sub, 2.0, shift=1.0), func(tree, 2.0, shift=1.0))
    grads = torch.func.grad(g)(sub, 3.0, shift=1.0)
    torch.testing.assert_close(grads["a"], 6 * tree["a"].detach())
    assert grads["b"]["c"].shape == (0,) and torch.equal(grads["d"].right, torch.ones(3))
    moved = tree_map(lambda x: x.detach() + 1 if x.requires_grad else x, sub)
    assert g(moved, 1.0, shift=0.0).item() == pytest.approx(4 + 9 + 3) and torch.equal(tree["a"], torch.tensor(
        [1.0, 2.0]))  # not in place: the tree keeps its values
    _, g_ = tu.extract_requires_grad_and_func(tree, func, inplace=True)
    a = tree["a"]
    g_(moved, 1.0, shift=0.0)
    assert tree["a"] is a and torch.equal(a.detach(), torch.tensor([2.0, 3.0]))  # in place: written into it


def test_inplacify_tree_map_inplacify_and_flexi_tree_map():
    x = torch.tensor([1.0, 2.0])
    y = tu.inplacify(lambda t, k, *, m: (t + k) * m)(x, 1.0, m=2.0)
    assert y is x and torch.equal(x, torch.tensor([4.0, 6.0]))
    tu.inplacify(lambda t: t.sum())(x)
    assert x.shape == () and x.item() == 10.0  # any shape: .data is replaced
    tree, rest = params(), {"a": 1.0, "b": {"c": 2.0}, "d": Pair(3.0, 4.0), "e": None}
    leaves = tree_leaves(tree)
    out = tu.tree_map_inplacify_(lambda t, r: t.detach() + r, tree, rest)
    assert out is tree and all(x is y for x, y in zip(tree_leaves(tree), leaves)) and tree["e"] is None
    assert torch.equal(tree["d"].left, torch.full((2, 2), 4.0)) and tree["a"].requires_grad
    fresh = tu.flexi_tree_map(lambda t, r: t.detach() * r, tree, rest)
    assert fresh is not tree and fresh["b"]["c"] is not tree["b"]["c"]
    assert torch.equal(fresh["b"]["c"], torch.tensor([10.0, 12.0], dtype=F64))
    assert torch.equal(tree["b"]["c"], torch.tensor([5.0, 6.0], dtype=F64))  # untouched
    same = tu.flexi_tree_map(lambda t, r: t.detach() * r, tree, rest, inplace=True)
    assert same is tree and torch.equal(tree["b"]["c"], torch.tensor([10.0, 12.0], dtype=F64))
    whole = tu.flexi_tree_map(lambda p: Pair(p.right[:1], p.left), {"d": Pair(torch.ones(1), torch.zeros(2))},
                              is_leaf=lambda n: isinstance(n, Pair))
    assert torch.equal(whole["d"].left, torch.zeros(1)) and torch.equal(whole["d"].right, torch.ones(1))
    with_none = tu.flexi_tree_map(lambda t: t is None, {"n": None, "t": torch.ones(1)}, none_is_leaf=True)
    assert with_none == {"n": True, "t": False}
