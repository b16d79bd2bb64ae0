"""A refused step is not a step of the dynamics, and it writes only the state it was given.

* Step-dependent arithmetic (Adam's bias corrections, SGD's undampened first step, schedules) counts
  the accepted steps, ``step - rejected``: a run with a refused batch equals torch's run that skipped
  the batch. Only the noise index (``state.step``) moves on, so a retry draws new numbers.
* A functional update hands the next state a ``rejected`` count of its own, so an in-place refusal of a
  later state never changes an earlier one.
* Tracing a compiled plan does not draw from torch's global generator.
"""

from __future__ import annotations

import pytest
import torch

from bayesflow.optim import adam, adamw, sgd
from bayesflow.sgmcmc import sgld

F64 = torch.float64
TARGET = torch.tensor([1.0, -2.0, 0.5], dtype=F64)


def log_posterior(p, batch):
    """ℓ = -½‖p - batch‖² (batch a tensor), or NaN for the batch "nan"."""
    if isinstance(batch, str):
        return -0.5 * (p * p).sum() * torch.tensor(float("nan"), dtype=p.dtype), None
    return -0.5 * ((p - batch) ** 2).sum(), None


def batches(n: int) -> list:
    generator = torch.Generator().manual_seed(0)
    return [TARGET + torch.randn(3, dtype=F64, generator=generator) for _ in range(n)]


def torch_run(optimizer_class, options, data) -> torch.Tensor:
    p = torch.zeros(3, dtype=F64, requires_grad=True)
    optimizer = optimizer_class([p], **options)
    for batch in data:
        optimizer.zero_grad()
        (0.5 * ((p - batch) ** 2).sum()).backward()
        optimizer.step()
    return p.detach()


CASES = [
    (adam, torch.optim.Adam, {"lr": 0.1}),
    (adamw, torch.optim.AdamW, {"lr": 0.1, "weight_decay": 0.1}),
    (sgd, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}),
]


@pytest.mark.parametrize("compile", [False, "replay"], ids=["eager", "replay"])
@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
@pytest.mark.parametrize("preset, reference, options", CASES, ids=["adam", "adamw", "sgd-dampened"])
def test_a_refused_batch_is_skipped_as_torch_skips_it(preset, reference, options, inplace, compile):
    """Refused at the first step (SGD's undampened start) and in the middle (Adam's bias correction)."""
    data = batches(6)
    transform = preset.build(log_posterior, on_nonfinite="reject", compile=compile, **options)
    state = transform.init(torch.zeros(3, dtype=F64))
    for i, batch in enumerate(data):
        if i in (0, 3):
            state, _ = transform.update(state, "nan", inplace=inplace)
        state, _ = transform.update(state, batch, inplace=inplace)
    assert int(state.step) == 8 and int(state.rejected) == 2
    expected = torch_run(reference, options, data)
    torch.testing.assert_close(state.params, expected, rtol=1e-12, atol=1e-12)
    # the check can fail: counting the refused steps moves Adam's bias correction off torch's
    assert not torch.allclose(torch_run(reference, options, data[:3] + data[2:3] + data[3:]), expected)


def test_a_retried_step_reads_the_schedule_value_of_that_step():
    seen = []

    def schedule(step):
        seen.append(step)
        return 0.1

    transform = sgld.build(log_posterior, lr=schedule, temperature=0.0, on_nonfinite="reject")
    state = transform.init(torch.zeros(3, dtype=F64), seed=0)
    state, _ = transform.update(state, TARGET)
    state, _ = transform.update(state, "nan")
    state, _ = transform.update(state, TARGET)
    assert seen == [0, 1, 1] and int(state.step) == 3 and int(state.rejected) == 1


def test_a_retry_draws_new_noise():
    transform = sgld.build(log_posterior, lr=0.1, temperature=1.0, on_nonfinite="reject")
    state = transform.init(torch.zeros(3, dtype=F64), seed=0)
    accepted, _ = transform.update(state, TARGET)
    refused, _ = transform.update(state, "nan")
    retried, _ = transform.update(refused, TARGET)
    assert torch.equal(refused.params, state.params)
    assert not torch.equal(retried.params, accepted.params)


def test_an_in_place_refusal_does_not_count_in_earlier_states():
    transform = sgld.build(log_posterior, lr=0.1, temperature=0.0, on_nonfinite="reject")
    first = transform.init(torch.zeros(3, dtype=F64), seed=0)
    second, _ = transform.update(first, TARGET)
    third, _ = transform.update(second, TARGET)
    refused, _ = transform.update(third, "nan", inplace=True)
    assert int(refused.rejected) == 1
    assert [int(s.rejected) for s in (first, second)] == [0, 0]
    # and an earlier state still continues as it would have
    again, _ = transform.update(second, TARGET)
    assert torch.equal(again.params, third.params)


@pytest.mark.parametrize("mode", ["replay", True], ids=["replay", "compiled"])
def test_tracing_a_plan_leaves_torchs_global_generator_alone(mode):
    transform = sgld.build(log_posterior, lr=0.1, temperature=1.0, compile=mode)
    state = transform.init(torch.zeros(3, dtype=F64), seed=0)
    before = torch.get_rng_state()
    state, _ = transform.update(state, TARGET)  # traces (and compiles) the plan
    state, _ = transform.update(state, TARGET)
    assert torch.equal(torch.get_rng_state(), before)
