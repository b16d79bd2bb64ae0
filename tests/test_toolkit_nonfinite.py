"""Non-finite numbers at the boundaries of the non-SDE methods.

* VI, Laplace, EKF, ``bayesflow.torchopt`` and ``bayesflow.optim.build`` (torch.optim) refuse initial
  parameters holding NaN or ±inf, naming the leaf (the engine's own
  init check), and take finite ones unchanged.
* A VI step whose log posterior or gradient is not finite at the draws raises a FloatingPointError
  naming the step and the leaf before anything is written (in place or not); the next finite step runs.
* A per-sample map (the Fisher's route) refuses a batch with no leading sample dimension."""

from __future__ import annotations

import math

import pytest
import torch
import torchopt

import bayesflow
from bayesflow import ekf, laplace, vi
from bayesflow.tree import tree_leaves
from bayesflow.utils import per_samplify


def log_posterior(params, batch):
    return -0.5 * sum((v**2).sum() for v in params.values()), None


MODEL = torch.nn.Linear(2, 1)

TREE_INITS = {
    "vi.diag": lambda p: vi.diag.build(log_posterior, torchopt.adam(1e-2)).init(p, seed=0),
    "vi.dense": lambda p: vi.dense.build(log_posterior, torchopt.adam(1e-2)).init(p, seed=0),
    "laplace.diag_fisher": lambda p: laplace.diag_fisher.build(log_posterior).init(p),
    "laplace.diag_ggn": lambda p: laplace.diag_ggn.init(p),
    "laplace.dense_fisher": lambda p: laplace.dense_fisher.build(log_posterior).init(p),
    "laplace.dense_ggn": lambda p: laplace.dense_ggn.init(p),
    "laplace.dense_hessian": lambda p: laplace.dense_hessian.build(log_posterior).init(p),
    "laplace.low_rank": lambda p: laplace.low_rank.init(p, rank=1),
    "ekf.diag_fisher": lambda p: ekf.diag_fisher.build(log_posterior, lr=0.1).init(p),
    "ekf.dense_fisher": lambda p: ekf.dense_fisher.build(log_posterior, lr=0.1).init(p),
    "torchopt": lambda p: bayesflow.torchopt.build(log_posterior, torchopt.adam(1e-2)).init(p),
    # torch.optim steps leaf tensors that require grad in place
    "optim (torch.optim)": lambda p: bayesflow.optim.build(log_posterior, torch.optim.Adam, lr=1e-2).init(
        {k: v.clone().requires_grad_() for k, v in p.items()}),
}

MODULE_INITS = {
    "laplace.kfac": lambda p: laplace.kfac.init(p, MODEL),
    "laplace.module_diag": lambda p: laplace.module_diag.init(p, MODEL),
    "ekf.module_diag": lambda p: ekf.module_diag.init(p, MODEL),
}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", list(TREE_INITS))
def test_non_finite_initial_params_are_refused_naming_the_leaf(name, bad):
    params = {"w": torch.tensor([0.5, bad]), "b": torch.ones(1)}
    with pytest.raises(ValueError, match=r"params leaf 'w' holds NaN or infinite values"):
        TREE_INITS[name](params)
    state = TREE_INITS[name]({"w": torch.tensor([0.5, 1.0]), "b": torch.ones(1)})  # finite: taken as given
    assert torch.equal(state.params["w"].detach(), torch.tensor([0.5, 1.0]))


@pytest.mark.parametrize("name", list(MODULE_INITS))
def test_non_finite_module_params_are_refused_naming_the_leaf(name):
    params = {"weight": torch.tensor([[0.5, math.nan]]), "bias": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"params leaf 'weight' holds NaN"):
        MODULE_INITS[name](params)
    state = MODULE_INITS[name]({"weight": torch.tensor([[0.5, 1.0]]), "bias": torch.zeros(1)})
    assert torch.equal(state.params["weight"], torch.tensor([[0.5, 1.0]]))


def test_per_sample_maps_need_a_batch_dimension():
    f = per_samplify(lambda params, batch: (params * batch["x"]).sum())
    torch.testing.assert_close(f(torch.tensor(2.0), {"x": torch.arange(3.0)}), torch.tensor([0.0, 2.0, 4.0]))
    with pytest.raises(TypeError, match=r"\(no tensors\)"):
        f(torch.tensor(2.0), None)
    with pytest.raises(ValueError, match=r"needs 1 leading dimension\(s\); got shapes \[\(\)\]"):
        f(torch.tensor(2.0), {"x": torch.tensor(1.0)})
    with pytest.raises(TypeError, match=r"leaves of type \['int'\]"):
        f(torch.tensor(2.0), {"x": torch.arange(3.0), "n": 3})
    with pytest.raises(ValueError, match=r"must share their leading size\(s\), got \[\(2,\), \(3,\)\]"):
        f(torch.tensor(2.0), {"x": torch.arange(3.0), "y": torch.arange(2.0)})
    # a Laplace fit of the Fisher maps its log posterior over the batch: the same message at its boundary
    transform = laplace.diag_fisher.build(lambda p, b: (-0.5 * ((p - b) ** 2).sum(), None))
    with pytest.raises(TypeError, match="the batch of a per-sample map must be a tensor"):
        transform.update(transform.init(torch.zeros(2)), None)


def _nan_when_asked(params, batch):
    value = -0.5 * (params["w"] ** 2).sum()
    if batch == "value":
        value = value * math.nan
    if batch == "gradient":  # a finite value, 0, whose gradient is 0/0
        value = value + torch.sqrt(params["w"] - params["w"]).sum()
    return value, None


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("n_samples", [1, 3])
@pytest.mark.parametrize("method", ["diag", "dense"])
def test_a_non_finite_vi_step_raises_before_writing(method, n_samples, inplace):
    module = getattr(vi, method)
    transform = module.build(_nan_when_asked, torchopt.adam(1e-1), n_samples=n_samples)
    state = transform.init({"w": torch.linspace(-1.0, 1.0, 4)}, seed=0)
    state, _ = transform.update(state, None, inplace=inplace)
    before = [t.clone() for t in (state.params["w"], state.nelbo, state.step)]
    for batch, message in (("value", "the log posterior's value is .* at step 1"),
                           ("gradient", "gradient of the log posterior is not finite at step 1 in leaf 'w'")):
        with pytest.raises(FloatingPointError, match=message):
            transform.update(state, batch, inplace=inplace)
        assert all(torch.equal(a, b) for a, b in zip((state.params["w"], state.nelbo, state.step), before))
    state, _ = transform.update(state, None, inplace=inplace)
    assert int(state.step) == 2 and torch.isfinite(state.params["w"]).all()


def test_flags_given_as_strings_are_refused_not_read_as_true():
    """``inplace="no"`` would be truthy and write the caller's state; ``per_sample="no"`` would change
    what the log posterior is asked to return."""
    def log_posterior(p, b):
        return (-0.5 * (b - p) ** 2).sum(), torch.tensor([])

    params, batch = torch.zeros(2), torch.ones(3, 2)
    with pytest.raises(TypeError, match="per_sample must be True or False, got 'no'"):
        laplace.diag_fisher.build(log_posterior, per_sample="no")
    with pytest.raises(TypeError, match="per_sample must be True or False"):
        laplace.dense_fisher.build(log_posterior, per_sample=1)
    cases = [(laplace.diag_fisher.update, laplace.diag_fisher.init(params), (log_posterior,)),
             (laplace.dense_fisher.update, laplace.dense_fisher.init(params), (log_posterior,)),
             (ekf.diag_fisher.update, ekf.diag_fisher.init(params), (log_posterior, 1.0)),
             (ekf.dense_fisher.update, ekf.dense_fisher.init(params), (log_posterior, 1.0)),
             (vi.diag.update, vi.diag.init(params, torchopt.adam()), (log_posterior, torchopt.adam()))]
    for update, state, args in cases:
        before = [t.clone() for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
        with pytest.raises(TypeError, match="inplace must be True or False, got 'no'"):
            update(state, batch, *args, inplace="no")
        after = [t for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
        for old, new in zip(before, after):  # (a fresh VI state's nelbo is NaN)
            torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)


def test_dense_vi_refuses_params_of_several_dtypes():
    params = {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"several dtypes \['torch.float32', 'torch.float64'\]"):
        vi.dense.init(params, torchopt.adam())


def test_every_sampler_refuses_a_negative_or_non_shape_sample_shape():
    from bayesflow import diag_normal_sample

    params = {"w": torch.zeros(3), "b": torch.zeros(())}
    samplers = [lambda shape: vi.diag.sample(vi.diag.init(params, torchopt.adam()), shape),
                lambda shape: vi.dense.sample(vi.dense.init(params, torchopt.adam()), shape),
                lambda shape: ekf.diag_fisher.sample(ekf.diag_fisher.init(params), shape),
                lambda shape: ekf.dense_fisher.sample(ekf.dense_fisher.init(params), shape),
                lambda shape: laplace.diag_fisher.sample(laplace.diag_fisher.init(params, 1.0), shape),
                lambda shape: diag_normal_sample(params, 1.0, sample_shape=shape)]
    for draw in samplers:
        with pytest.raises(ValueError, match=r"non-negative sizes, got \(2, -1\)"):
            draw((2, -1))
        with pytest.raises(TypeError, match=r"sample_shape must be a torch\.Size or a tuple of ints"):
            draw("many")
        assert draw(3)["w"].shape == (3, 3) and draw(())["b"].shape == ()


@pytest.mark.parametrize("log_sd", [-100.0, -200.0, 100.0])
def test_vi_diag_refuses_a_log_sd_whose_sigma_underflows_or_overflows(log_sd):
    """exp(s) below float32's smallest normal (or above its max) made the first step NaN silently."""
    transform = vi.diag.build(log_posterior, torchopt.adam(1e-2), init_log_sds=log_sd)
    with pytest.raises(ValueError, match=r"σ = exp\(s\) normal and finite in torch.float32"):
        transform.init({"w": torch.zeros(2)}, seed=0)
    with pytest.raises(ValueError, match="init_log_sds"):  # a tree of log sds is checked the same way
        vi.diag.init({"w": torch.zeros(2)}, torchopt.adam(1e-2), init_log_sds={"w": torch.tensor([0.0, log_sd])})
    if log_sd < 0:  # the same σ is a normal number in float64, and its steps are finite
        state, _ = transform.update(transform.init({"w": torch.zeros(2, dtype=torch.float64)}, seed=0), None)
        assert bool(torch.isfinite(state.params["w"]).all() and torch.isfinite(state.log_sd_diag["w"]).all())


def test_vi_diag_takes_a_small_but_normal_sigma():
    transform = vi.diag.build(log_posterior, torchopt.adam(1e-2), init_log_sds=-80.0)
    state, _ = transform.update(transform.init({"w": torch.zeros(2)}, seed=0), None)
    assert bool(torch.isfinite(state.params["w"]).all() and torch.isfinite(state.log_sd_diag["w"]).all())
