"""A function that ignores the params it is given is refused, not turned into a zero curvature or step.

The classic mistake is ``model(x)`` in place of ``torch.func.functional_call(model, params, (x,))``: the
value is computed from the module's own parameters, every gradient with respect to ``params`` is zero,
and Laplace would add a zero precision, the EKF would not move, an optimizer would only decay. Inside the
``torch.func`` transforms these methods use, ``requires_grad`` of the value says whether it depends on
the differentiated params; a value that does depend on them with an exactly zero gradient (a prior at its
mode) is still accepted.
"""

from __future__ import annotations

import pytest
import torch

import bayesflow
from bayesflow import ekf, laplace

torch.manual_seed(0)
MODEL = torch.nn.Linear(3, 1).double()  # its own parameters require grad: the value still has a graph
X = torch.randn(6, 3, dtype=torch.float64)
Y = torch.randn(6, dtype=torch.float64)
BATCH = (X, Y)
PARAMS = {name: p.detach().clone() for name, p in MODEL.named_parameters()}
IGNORED = "does not depend on the params it was given"


def ignoring_sum(params, batch):
    x, y = batch
    return -0.5 * ((MODEL(x).squeeze(-1) - y) ** 2).sum(), torch.tensor([])


def ignoring_vector(params, batch):
    x, y = batch
    return -0.5 * (MODEL(x).squeeze(-1) - y) ** 2, torch.tensor([])


def using_vector(params, batch):
    x, y = batch
    out = torch.func.functional_call(MODEL, params, (x,)).squeeze(-1)
    return -0.5 * (out - y) ** 2, torch.tensor([])


def ignoring_forward(params, batch):
    return MODEL(batch[0]), torch.tensor([])


def using_forward(params, batch):
    return torch.func.functional_call(MODEL, params, (batch[0],)), torch.tensor([])


def outer(z, batch):
    return -0.5 * ((z.squeeze(-1) - batch[1]) ** 2).sum()


def outer_ignoring_z(z, batch):
    return -0.5 * (batch[1] ** 2).sum() + torch.zeros((), dtype=batch[1].dtype)


LAPLACE = {
    "diag_fisher": lambda: (laplace.diag_fisher.init(PARAMS), lambda s: laplace.diag_fisher.update(
        s, BATCH, ignoring_sum, inplace=True)),
    "diag_fisher per_sample": lambda: (laplace.diag_fisher.init(PARAMS), lambda s: laplace.diag_fisher.update(
        s, BATCH, ignoring_vector, per_sample=True, inplace=True)),
    "dense_fisher": lambda: (laplace.dense_fisher.init(PARAMS), lambda s: laplace.dense_fisher.update(
        s, BATCH, ignoring_sum, inplace=True)),
    "dense_fisher per_sample": lambda: (laplace.dense_fisher.init(PARAMS), lambda s: laplace.dense_fisher.update(
        s, BATCH, ignoring_vector, per_sample=True, inplace=True)),
    "dense_hessian": lambda: (laplace.dense_hessian.init(PARAMS), lambda s: laplace.dense_hessian.update(
        s, BATCH, ignoring_sum, inplace=True)),
    "diag_ggn": lambda: (laplace.diag_ggn.init(PARAMS), lambda s: laplace.diag_ggn.update(
        s, BATCH, ignoring_forward, outer, inplace=True)),
    "dense_ggn": lambda: (laplace.dense_ggn.init(PARAMS), lambda s: laplace.dense_ggn.update(
        s, BATCH, ignoring_forward, outer, inplace=True)),
}


def _numbers(state):
    return [t.clone() for t in torch.utils._pytree.tree_leaves(tuple(state)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("method", sorted(LAPLACE))
def test_laplace_refuses_a_function_that_ignores_its_params_and_writes_nothing(method):
    state, update = LAPLACE[method]()
    before = _numbers(state)
    with pytest.raises(ValueError, match=IGNORED):
        update(state)
    assert all(torch.equal(a, b) for a, b in zip(before, _numbers(state)))


@pytest.mark.parametrize("transform", [laplace.diag_ggn, laplace.dense_ggn])
def test_ggn_refuses_an_outer_log_likelihood_that_ignores_the_output(transform):
    with pytest.raises(ValueError, match=r"outer_log_likelihood's value .* does not depend"):
        transform.update(transform.init(PARAMS), BATCH, using_forward, outer_ignoring_z)


def test_low_rank_laplace_refuses_a_forward_that_ignores_its_params():
    transform = laplace.low_rank.build(ignoring_forward, outer, rank=2)
    with pytest.raises(ValueError, match="forward's output does not depend"):
        transform.update(transform.init(PARAMS), BATCH)


@pytest.mark.parametrize("method", ["diag_fisher", "dense_fisher"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_ekf_refuses_a_log_likelihood_that_ignores_its_params(method, per_sample):
    module = getattr(ekf, method)
    state = module.init(PARAMS)
    before = _numbers(state)
    with pytest.raises(ValueError, match="log_likelihood's value does not depend"):
        module.update(state, BATCH, ignoring_vector if per_sample else ignoring_sum, lr=0.5,
                      per_sample=per_sample, inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(before, _numbers(state)))


def test_torchopt_refuses_a_loss_that_ignores_its_params():
    torchopt = pytest.importorskip("torchopt")
    transform = bayesflow.torchopt.build(lambda p, b: (-ignoring_sum(p, b)[0], None), torchopt.sgd(0.1))
    state = transform.init({k: v.clone() for k, v in PARAMS.items()})
    before = _numbers(state.params.values())
    with pytest.raises(ValueError, match="loss_fn's loss does not depend"):
        transform.update(state, BATCH, inplace=True)
    assert all(torch.equal(a, b) for a, b in zip(before, _numbers(state.params.values())))


def test_a_value_that_depends_on_the_params_with_a_zero_gradient_is_accepted():
    """A prior at its mode: the gradient is exactly zero but the value depends on the params."""
    def prior(params, batch):
        return -0.5 * sum((leaf ** 2).sum() for leaf in params.values()), torch.tensor([])

    zeros = {k: torch.zeros_like(v) for k, v in PARAMS.items()}
    state, _ = laplace.diag_fisher.update(laplace.diag_fisher.init(zeros), BATCH, prior)
    assert all(bool((p == 0).all()) for p in state.prec_diag.values())
    state, _ = ekf.diag_fisher.update(ekf.diag_fisher.init(zeros), BATCH, prior, lr=0.5)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in state.params.values())


def test_the_same_functions_written_with_functional_call_are_accepted():
    state, _ = laplace.diag_fisher.update(laplace.diag_fisher.init(PARAMS), BATCH, using_vector, per_sample=True)
    assert all(bool((p > 0).all()) for p in state.prec_diag.values())
    state, _ = laplace.diag_ggn.update(laplace.diag_ggn.init(PARAMS), BATCH, using_forward, outer)
    assert all(bool((p > 0).all()) for p in state.prec_diag.values())


@pytest.mark.parametrize("method", ["laplace.kfac", "laplace.module_diag", "ekf.module_diag"])
def test_module_curvatures_refuse_an_empty_batch(method):
    """A batch of 0 rows raised an IndexError deep inside the curvature route."""
    empty = (torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    extra = {"lr": 0.5} if method.startswith("ekf") else {}
    module = {"laplace.kfac": laplace.kfac, "laplace.module_diag": laplace.module_diag,
              "ekf.module_diag": ekf.module_diag}[method]
    state = module.init(PARAMS, MODEL)
    with pytest.raises(ValueError, match="the batch has no rows"):
        module.update(state, empty, MODEL, outer, **extra)
    module.update(state, BATCH, MODEL, outer, **extra)  # a batch with rows is taken
