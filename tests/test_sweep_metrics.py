"""bayesflow.ensemble.sweep scores with bayesflow.metrics, on a log-space posterior predictive.

* Its rows' log-likelihood, accuracy and ECE are exactly bayesflow.metrics' on the row's own
  predictive, and that predictive is logsumexp over chains and collected samples of log_softmax.
* A confident mistake in float32 (p(label) = e^-200, zero in float32) gives a large finite NLL equal to
  the float64 one, not -inf (the old clamp_min(1e-300) rounds to 0 in float32).
* Overflowed logits and bad counts are refused naming the value.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import bayesflow.metrics
from bayesflow.ensemble import replicate, sweep
from bayesflow.metrics import accuracy, expected_calibration_error, negative_log_likelihood
from bayesflow.sgmcmc import sgld

F64 = torch.float64

INPUTS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
LABELS = torch.tensor([1, 0, 1, 0])
# class 1's logit is -200 below class 0's on inputs 0 and 2: a confident mistake, p(label) = e^-200
WEIGHTS = torch.tensor([[0.0, -200.0], [0.0, 1.0]])


def still(w, batch):
    """A log posterior with zero gradient: at T = 0 the chains stay at their starting points."""
    return 0.0 * (w * w).sum(), None


def predict(w, inputs):
    return inputs.to(w.dtype) @ w


def run(dtype=torch.float32, temperatures=(0.0,), replicas=2, common_random_numbers=True, **kwargs):
    settings = dict(steps=6, burn_in=0, thin=2, perturbation=0.05, seed=3, progress=False)
    settings.update(kwargs)
    return sweep(sgld.build(still, lr=1e-2), list(temperatures), WEIGHTS.to(dtype), train=[(INPUTS, LABELS)],
                 predict=predict, validation=[(INPUTS[:2], LABELS[:2]), (INPUTS[2:], LABELS[2:])],
                 chains_per_temperature=replicas, common_random_numbers=common_random_numbers, **settings)


def test_sweep_imports_its_scores_from_bayesflow_metrics():
    module = importlib.import_module("bayesflow.ensemble.sweep")  # bayesflow.ensemble.sweep is the function
    assert module.negative_log_likelihood is bayesflow.metrics.negative_log_likelihood
    assert module.accuracy is bayesflow.metrics.accuracy
    assert module.expected_calibration_error is bayesflow.metrics.expected_calibration_error


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sweep_rows_are_exactly_the_metrics_of_their_predictive(dtype):
    rows = run(dtype, temperatures=(0.0, 0.0), common_random_numbers=False)
    for row in rows:
        log_predictive, predictive = row["log_predictive"], row["predictive"]
        assert log_predictive.shape == (4, 2) and log_predictive.dtype == dtype
        assert torch.equal(predictive, log_predictive.exp())
        assert row["log_likelihood"] == -negative_log_likelihood(log_predictive, LABELS)
        assert row["accuracy"] == accuracy(log_predictive, LABELS)
        assert row["ece"] == expected_calibration_error(predictive, LABELS)
        assert row["num_samples"] == 3 and row["chains"] == 2


def test_sweep_predictive_is_the_log_mean_over_chains_and_samples():
    # four chains (two temperatures of two replicas, independent starts) that never move: the predictive of
    # temperature i is the mean of its two chains' softmax, whatever the number of collected samples
    rows = run(F64, temperatures=(0.0, 0.0), common_random_numbers=False)
    starts = replicate(WEIGHTS.to(F64), 4, perturbation=0.05, seed=3)
    for i, row in enumerate(rows):
        log_probs = torch.stack([predict(w, INPUTS).log_softmax(-1) for w in starts[2 * i:2 * i + 2]])
        reference = torch.logsumexp(log_probs, 0) - math.log(2)
        torch.testing.assert_close(row["log_predictive"], reference, rtol=1e-13, atol=1e-13)
    assert not torch.equal(rows[0]["log_predictive"], rows[1]["log_predictive"])  # each row its own chains


def test_a_float32_confident_mistake_gives_the_finite_float64_nll():
    single = run(torch.float32)[0]
    reference = run(F64)[0]
    assert math.isfinite(single["log_likelihood"])
    assert single["log_likelihood"] < -90  # two of four labels at log p ≈ -200
    assert single["log_likelihood"] == pytest.approx(reference["log_likelihood"], rel=1e-6)
    # the label's predictive probability is zero in float32, its log is not
    assert single["predictive"][0, 1].item() == 0.0
    assert single["log_predictive"][0, 1].item() == pytest.approx(reference["log_predictive"][0, 1].item(), rel=1e-6)


def test_overflowed_logits_are_refused_naming_the_step_and_temperature():
    def overflowing(w, inputs):
        return predict(w, inputs) * math.inf  # +inf, -inf and NaN (0 · inf)

    with pytest.raises(ValueError, match=r"NaN or \+inf logits at step 2 for chains \[0, 1\] \(temperatures \[0.0\]\)"):
        sweep(sgld.build(still, lr=1e-2), [0.0], WEIGHTS, train=[(INPUTS, LABELS)], steps=4, predict=overflowing,
              validation=[(INPUTS, LABELS)], chains_per_temperature=2, progress=False)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"steps": 0}, "steps must be a positive int, got 0"),
    ({"thin": 0}, "thin must be a positive int, got 0"),
    ({"thin": 1.5}, "thin must be a positive int, got 1.5"),
    ({"replicas": 0}, "chains_per_temperature must be a positive int, got 0"),
    ({"burn_in": 2.5}, r"burn_in must be an int in \[0, steps\) = \[0, 6\), got 2.5"),
    ({"burn_in": 6}, r"burn_in must be an int .* got 6"),
])
def test_bad_counts_are_refused_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(**kwargs)


@pytest.mark.parametrize(("validation", "error", "match"), [
    ([], ValueError, "validation has no batches"),
    ((INPUTS, LABELS), TypeError, r"validation batch 0 must be an \(inputs, labels\) pair, got Tensor"),
    ([(INPUTS, LABELS, LABELS)], TypeError, "got a tuple of length 3"),
    (INPUTS, TypeError, "validation must be an iterable of \\(inputs, labels\\) batches, got Tensor"),
])
def test_a_bad_validation_set_is_refused_before_any_step(validation, error, match):
    calls = []

    def counting(w, batch):
        calls.append(1)
        return still(w, batch)

    with pytest.raises(error, match=match):
        sweep(sgld.build(counting, lr=1e-2), [0.0], WEIGHTS, train=[(INPUTS, LABELS)], steps=4, predict=predict,
              validation=validation, chains_per_temperature=2, progress=False)
    assert not calls  # refused before training, not after the whole run
