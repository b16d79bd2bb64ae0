"""bayesflow.predictive and bayesflow.metrics: exact against hand-computed cases, streaming equal to
whole-tensor evaluation, stable at extreme logits, clear errors; the metrics against scikit-learn when it
is installed (not against torchmetrics: importing it imports transformers, ~10 s)."""

from __future__ import annotations

import gc
import importlib
import math
import weakref

import pytest
import torch

import bayesflow.ensemble
import bayesflow.metrics
from bayesflow.metrics import accuracy, brier_score, expected_calibration_error, negative_log_likelihood
from bayesflow.predictive import (
    ClassificationUncertainty,
    aupr,
    auroc,
    classification_uncertainty,
    decompose,
    fpr_at_tpr,
    ood_detection,
    predictive_sums,
    regression_uncertainty,
    sequence_uncertainty,
)

F64 = torch.float64


def entropy(*probs: float) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def assert_same(a: ClassificationUncertainty, b: ClassificationUncertainty, rtol=1e-13, atol=1e-14):
    for field in ("log_predictive", "total", "aleatoric", "epistemic"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=rtol, atol=atol)
    assert a.num_samples == b.num_samples


# ---------------------------------------------------------------- classification: exact cases


def test_two_samples_two_classes_match_the_hand_computation():
    logits = torch.tensor([[[0.8, 0.2]], [[0.4, 0.6]]], dtype=F64).log()  # K = 2, B = 1, C = 2
    u = classification_uncertainty(logits)
    total, aleatoric = entropy(0.6, 0.4), (entropy(0.8, 0.2) + entropy(0.4, 0.6)) / 2
    torch.testing.assert_close(u.log_predictive, torch.tensor([[0.6, 0.4]], dtype=F64).log(), rtol=0, atol=1e-15)
    assert u.total.item() == pytest.approx(total, abs=1e-15)
    assert u.aleatoric.item() == pytest.approx(aleatoric, abs=1e-15)
    assert u.epistemic.item() == pytest.approx(total - aleatoric, abs=1e-15)
    assert u.epistemic.item() == pytest.approx(0.0863046217355343, abs=1e-15)
    assert u.num_samples == 2


def test_identical_samples_have_zero_epistemic_uncertainty():
    one = torch.randn(6, 9, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    u = classification_uncertainty(one.expand(5, 6, 9))
    assert u.epistemic.abs().max().item() <= 1e-14
    torch.testing.assert_close(u.log_predictive, one.log_softmax(-1), rtol=0, atol=1e-14)
    torch.testing.assert_close(u.total, u.aleatoric, rtol=0, atol=1e-14)


@pytest.mark.parametrize("classes", [2, 5])
def test_uniform_versus_confident_mixture_has_the_known_mutual_information(classes):
    # one uniform sample and three sure of class 0 (other logits -inf: masked entries are allowed)
    confident = torch.full((classes,), -math.inf, dtype=F64)
    confident[0] = 0.0
    logits = torch.stack([torch.zeros(classes, dtype=F64), confident, confident, confident])
    u = classification_uncertainty(logits)
    rest = 1 / (4 * classes)
    total = entropy(0.75 + rest, *[rest] * (classes - 1))
    assert u.total.item() == pytest.approx(total, abs=1e-15)
    assert u.aleatoric.item() == pytest.approx(math.log(classes) / 4, abs=1e-15)
    assert u.epistemic.item() == pytest.approx(total - math.log(classes) / 4, abs=1e-15)


def test_one_uniform_and_one_confident_sample_by_hand():
    # p̄ = (3/4, 1/4): TU = H(3/4), AU = ½ log 2, so EU = -¾ log ¾
    u = classification_uncertainty(torch.tensor([[0.0, 0.0], [0.0, -math.inf]], dtype=F64))
    assert u.total.item() == pytest.approx(0.5623351446188083, abs=1e-15)
    assert u.aleatoric.item() == pytest.approx(math.log(2) / 2, abs=1e-15)
    assert u.epistemic.item() == pytest.approx(-0.75 * math.log(0.75), abs=1e-15)


def test_confident_samples_that_disagree_have_only_epistemic_uncertainty():
    classes = 4
    logits = torch.eye(classes, dtype=torch.float32) * 2e4 - 1e4  # K = C samples, each sure of another class
    u = classification_uncertainty(logits)
    assert u.aleatoric.item() == 0.0
    assert u.epistemic.item() == pytest.approx(math.log(classes), abs=1e-6)
    assert u.total.item() == pytest.approx(math.log(classes), abs=1e-6)


def test_epistemic_equals_the_mean_kl_divergence_to_the_predictive():
    logits = torch.randn(6, 10, 7, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    u = classification_uncertainty(logits)
    log_p = logits.log_softmax(-1)
    log_mean = log_p.exp().mean(0).log()
    mean_kl = (log_p.exp() * (log_p - log_mean)).sum(-1).mean(0)  # E_k KL(p_k || p̄), the other form of I(y; θ)
    torch.testing.assert_close(u.epistemic, mean_kl, rtol=1e-12, atol=1e-14)
    assert (u.epistemic <= min(math.log(6), math.log(7)) + 1e-12).all()
    # a wrong decomposition (e.g. AU from the mean's entropy) would not match
    assert not torch.allclose(u.aleatoric, u.total)


# ---------------------------------------------------------------- streaming, chunks and memory


def test_every_way_of_giving_samples_agrees_to_float64_precision():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 3, 4, 6, generator=g, dtype=F64) * 4   # (K, B, T, V)
    whole = classification_uncertainty(logits)
    for chunk_size in (1, 2, 3, 7, 100):
        assert_same(classification_uncertainty(logits, chunk_size=chunk_size), whole)
    assert_same(classification_uncertainty(lambda k: logits[k], num_samples=7), whole)
    assert_same(classification_uncertainty(list(logits)), whole)
    assert_same(classification_uncertainty(sample for sample in logits), whole)
    assert_same(classification_uncertainty(logits.float(), dtype=F64), whole, rtol=1e-5, atol=1e-6)
    # the functional (init, update) pair, not in place, chunk by chunk
    sums = predictive_sums()
    state = sums.init(logits[0])
    for chunk in logits.split(3):
        state, _ = sums.update(state, chunk)
    assert int(state.count) == 7
    assert_same(decompose(state), whole)
    # chunking over data: per-batch results concatenate field by field
    batched = torch.cat([classification_uncertainty(logits[:, :2]), classification_uncertainty(logits[:, 2:])])
    assert_same(batched, whole)


def test_update_without_inplace_leaves_the_state_unchanged():
    sums = predictive_sums()
    logits = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    state = sums.init(logits[0])
    before = [t.clone() for t in state]
    sums.update(state, logits)
    for old, new in zip(before, state):
        assert torch.equal(old, new)


def test_a_function_source_keeps_one_sample_alive_at_a_time():
    made = []

    def logits_fn(k):
        alive = [ref for ref in made[:-1] if ref() is not None]  # all but the sample made last must be gone
        assert not alive, f"sample {k}: {len(alive)} earlier samples are still referenced"
        out = torch.randn(4, 5, generator=torch.Generator().manual_seed(k))
        made.append(weakref.ref(out))
        return out

    gc.collect()
    u = classification_uncertainty(logits_fn, num_samples=6)
    assert u.num_samples == 6 and len(made) == 6


def test_extreme_logits_are_stable():
    logits = torch.tensor([[[1e4, -1e4]], [[-1e4, 1e4]]])  # float32: two sure samples that disagree
    u = classification_uncertainty(logits)
    assert u.log_predictive.exp()[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-7)
    assert u.aleatoric.item() == 0.0 and u.epistemic.item() == pytest.approx(math.log(2), abs=1e-6)
    # adding 1e4 to every logit changes nothing (float64: the shift is exact enough)
    random = torch.randn(5, 8, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert_same(classification_uncertainty(random + 1e4), classification_uncertainty(random), rtol=1e-10, atol=1e-11)
    spread = classification_uncertainty(random * 1e4)
    assert all(torch.isfinite(t).all() for t in (spread.log_predictive, spread.total, spread.epistemic))


def test_narrow_logits_accumulate_in_float32():
    logits = torch.randn(3, 2, 50, generator=torch.Generator().manual_seed(5))
    u = classification_uncertainty(logits.bfloat16())
    assert u.total.dtype == torch.float32
    reference = classification_uncertainty(logits.bfloat16().double())
    torch.testing.assert_close(u.total, reference.total.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("samples", "kwargs", "error", "match"), [
    (torch.zeros(0, 3, 2), {}, ValueError, "K must be at least 1"),
    ([], {}, ValueError, "no samples"),
    (lambda k: torch.zeros(3), {}, ValueError, "num_samples"),
    (torch.zeros(3), {}, ValueError, "sample axis and a class"),
    ([torch.zeros(3, 2), torch.zeros(3, 4)], {}, ValueError, r"sample 1 .* shape \(3, 4\)"),
    ([torch.zeros(2), "logits"], {}, TypeError, "sample 1 .* must be a tensor"),
    (torch.zeros(2, 3, dtype=torch.int64), {}, ValueError, "floating point"),
    ({"a": torch.zeros(2)}, {}, TypeError, "must be a"),
    (torch.zeros(2, 3), {"num_samples": 3}, ValueError, "num_samples says 3"),
    ([torch.zeros(3)], {"num_samples": 2}, ValueError, "yielded 1 samples"),
    (torch.zeros(2, 3), {"chunk_size": 0}, ValueError, "chunk_size"),
    (lambda k: torch.zeros(3), {"num_samples": 0}, ValueError, "num_samples must be a positive int"),
    (torch.zeros(2, 3), {"dtype": torch.int32}, ValueError, "dtype"),
    (torch.zeros(3, 4, 0), {}, ValueError, r"at least one class on their last axis, got shape \(3, 4, 0\)"),
])
def test_bad_samples_raise_clear_errors(samples, kwargs, error, match):
    with pytest.raises(error, match=match):
        classification_uncertainty(samples, **kwargs)


@pytest.mark.parametrize(("bad", "kind"), [(math.nan, "NaN"), (math.inf, r"\+inf")])
def test_nan_and_positive_infinite_logits_are_refused_naming_the_sample(bad, kind):
    logits = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(14))
    logits[3, 1, 2] = bad
    message = rf"sample 3 holds {'nan' if kind == 'NaN' else 'inf'} at index \(1, 2\) \(1 {kind} among samples"
    for source, kwargs in ((logits, {}), (logits, {"chunk_size": 2}), (list(logits), {}),
                           (lambda k: logits[k], {"num_samples": 5})):
        with pytest.raises(ValueError, match=message):  # the stream's own sample index, whatever the chunking
            classification_uncertainty(source, **kwargs)
    # the streaming pair refuses the chunk before writing: the in-place state is left as it was
    sums = predictive_sums()
    state, _ = sums.update(sums.init(logits[0]), logits[:2], inplace=True)
    before = [t.clone() for t in state]
    with pytest.raises(ValueError, match=r"sample 3 holds .* \(1 .* among samples 2..4\)"):
        sums.update(state, logits[2:], inplace=True)
    for old, new in zip(before, state):
        assert torch.equal(old, new)


def test_negative_infinite_logits_mask_classes_and_stay_finite():
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(4, 6, 3, generator=g)                      # float32: K = 4, B = 6, C = 3
    masked = torch.cat([logits, torch.full((4, 6, 1), -math.inf)], -1)  # a fourth class masked in every sample
    u, reference = classification_uncertainty(masked), classification_uncertainty(logits)
    for field in ("total", "aleatoric", "epistemic"):
        assert torch.isfinite(getattr(u, field)).all()
        torch.testing.assert_close(getattr(u, field), getattr(reference, field), rtol=0, atol=0)
    assert (u.log_predictive[..., 3] == -math.inf).all()
    torch.testing.assert_close(u.log_predictive[..., :3], reference.log_predictive, rtol=0, atol=0)
    some = logits.clone()
    some[1, :, 0] = -math.inf                                        # masked in one sample only
    partly = classification_uncertainty(some)
    assert all(torch.isfinite(t).all() for t in (partly.log_predictive, partly.total, partly.epistemic))
    assert (partly.log_predictive.exp().sum(-1) - 1).abs().max().item() < 1e-6


def test_streaming_pair_checks_its_inputs():
    sums = predictive_sums()
    state = sums.init(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(k, 3, 4\)"):
        sums.update(state, torch.zeros(3, 4))  # no sample axis
    with pytest.raises(ValueError, match="K = 0"):
        decompose(state)
    with pytest.raises(ValueError, match="one sample's logits"):
        sums.init(torch.zeros((), dtype=torch.int64))


# ---------------------------------------------------------------- language-model tokens and sequences


def test_per_token_scores_equal_per_datum_scores_of_the_flattened_tokens():
    logits = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(6), dtype=F64)
    tokens = classification_uncertainty(logits)
    flat = classification_uncertainty(logits.reshape(3, 10, 7))
    torch.testing.assert_close(tokens.epistemic.reshape(-1), flat.epistemic, rtol=0, atol=1e-15)
    assert tokens.total.shape == (2, 5) and tokens.log_predictive.shape == (2, 5, 7)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_scores_reduce_the_unmasked_tokens(reduction):
    logits = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(7), dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    logits[:, 1, 2:] = -math.inf  # padding rows of -inf logits: NaN per token, ignored under the mask
    tokens = classification_uncertainty(logits)
    assert torch.isnan(tokens.total[1, 2:]).all()
    sequences = sequence_uncertainty(tokens, mask, reduction=reduction)
    assert sequences.num_tokens.tolist() == [5, 2]
    for field in ("total", "aleatoric", "epistemic"):
        per_token = getattr(tokens, field)
        expected = [per_token[0].sum(), per_token[1, :2].sum()]
        if reduction == "mean":
            expected = [expected[0] / 5, expected[1] / 2]
        torch.testing.assert_close(getattr(sequences, field), torch.stack(expected), rtol=0, atol=1e-14)
    torch.testing.assert_close(sequences.total, sequences.aleatoric + sequences.epistemic, rtol=0, atol=1e-14)
    # a boolean mask and no mask (on the unpadded sequence) agree with the integer mask
    torch.testing.assert_close(sequence_uncertainty(tokens, mask.bool(), reduction).total, sequences.total)
    unmasked = sequence_uncertainty(classification_uncertainty(logits[:, :1]), reduction=reduction)
    torch.testing.assert_close(unmasked.total, sequences.total[:1])


def test_sequence_reduction_rejects_bad_masks():
    tokens = classification_uncertainty(torch.zeros(2, 2, 3, 4))
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
        sequence_uncertainty(tokens, torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="boolean or integer"):
        sequence_uncertainty(tokens, torch.ones(2, 3))
    with pytest.raises(ValueError, match="0 and 1"):
        sequence_uncertainty(tokens, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match=r"sequence \[1\] has no unmasked token"):
        sequence_uncertainty(tokens, torch.tensor([[1, 0, 0], [0, 0, 0]]), reduction="mean")
    assert sequence_uncertainty(tokens, torch.tensor([[1, 0, 0], [0, 0, 0]])).total[1].item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        sequence_uncertainty(tokens, reduction="max")
    with pytest.raises(ValueError, match="per datum"):
        sequence_uncertainty(classification_uncertainty(torch.zeros(2, 4)))
    with pytest.raises(TypeError, match="ClassificationUncertainty"):
        sequence_uncertainty({"total": torch.zeros(2, 3)})


# ---------------------------------------------------------------- Gaussian regression


def test_law_of_total_variance_by_hand():
    u = regression_uncertainty(torch.tensor([[[1.0]], [[3.0]]]), torch.tensor([[[0.5]], [[1.5]]]))
    assert (u.mean.item(), u.aleatoric.item(), u.epistemic.item(), u.total.item()) == (2.0, 1.0, 1.0, 2.0)
    assert u.num_samples == 2


def test_regression_total_is_the_mixture_variance_and_every_source_agrees():
    g = torch.Generator().manual_seed(8)
    means = torch.randn(9, 4, 3, generator=g, dtype=F64) * 5 + 100  # a large offset: cancellation-prone
    variances = torch.rand(9, 4, 3, generator=g, dtype=F64)
    whole = regression_uncertainty(means, variances)
    second_moment = (variances + means.square()).mean(0)
    torch.testing.assert_close(whole.total, second_moment - means.mean(0).square(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(whole.epistemic, means.var(0, unbiased=False), rtol=1e-13, atol=1e-13)
    sources = [regression_uncertainty(means, variances, chunk_size=c) for c in (1, 2, 4)]
    sources += [regression_uncertainty(lambda k: (means[k], variances[k]), num_samples=9),
                regression_uncertainty(list(zip(means, variances)))]
    for u in sources:
        for field in ("mean", "total", "aleatoric", "epistemic"):
            torch.testing.assert_close(getattr(u, field), getattr(whole, field), rtol=1e-13, atol=1e-13)
    shared = regression_uncertainty(means, 0.25)
    torch.testing.assert_close(shared.aleatoric, torch.full((4, 3), 0.25, dtype=F64))
    assert regression_uncertainty(means).aleatoric.abs().max().item() == 0.0


@pytest.mark.parametrize(("args", "kwargs", "error", "match"), [
    ((torch.zeros(0, 3),), {}, ValueError, "K >= 1"),
    ((torch.zeros(2, 3), -torch.ones(2, 3)), {}, ValueError, "non-negative"),
    ((torch.zeros(2, 3), torch.ones(4)), {}, ValueError, "do not broadcast"),
    ((lambda k: (torch.zeros(3), torch.ones(3)), torch.ones(3)), {"num_samples": 2}, ValueError, "pairs"),
    ((lambda k: (torch.zeros(3), torch.ones(3)),), {}, ValueError, "num_samples"),
    (([torch.zeros(3)],), {}, TypeError, r"\(mean, variance\) pair"),
    (([(torch.zeros(3), torch.ones(2))],), {}, ValueError, "variance shape"),
    (([],), {}, ValueError, "no samples"),
    ((torch.zeros(2, 3), "noise"), {}, TypeError, "variances"),
    ((torch.zeros(2, 3),), {"num_samples": 3}, ValueError, "num_samples says 3"),
])
def test_bad_regression_inputs_raise_clear_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        regression_uncertainty(*args, **kwargs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_variances_are_refused(bad):
    # (var < 0).any() is False for NaN: a NaN variance used to pass and give a NaN aleatoric part
    variances = torch.ones(4, 3, 2, dtype=F64)
    variances[2, 0, 1] = bad
    means = torch.zeros(4, 3, 2, dtype=F64)
    for kwargs in ({}, {"chunk_size": 3}):
        with pytest.raises(ValueError, match=r"variances must be finite: sample 2 holds .* at index \(0, 1\)"):
            regression_uncertainty(means, variances, **kwargs)
    with pytest.raises(ValueError, match=r"variances must be finite: sample 2 holds"):
        regression_uncertainty(list(zip(means, variances)))
    with pytest.raises(ValueError, match=r"a finite non-negative number \(a shared noise variance\), got"):
        regression_uncertainty(means, bad)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_means_are_refused(bad):
    means = torch.zeros(3, 5, dtype=F64)
    means[1, 4] = bad
    with pytest.raises(ValueError, match=r"means must be finite: sample 1 holds .* at index \(4,\) \(1 "):
        regression_uncertainty(means, 0.5)
    with pytest.raises(ValueError, match=r"means must be finite: sample 1 holds"):
        regression_uncertainty(lambda k: (means[k], torch.ones(5, dtype=F64)), num_samples=3)


def test_integer_means_of_a_stream_are_refused():
    with pytest.raises(ValueError, match=r"sample 0's mean must be a floating tensor, got torch.int64"):
        regression_uncertainty([(torch.zeros(3, dtype=torch.int64), torch.ones(3))])


# ---------------------------------------------------------------- metrics


def test_ece_is_shared_by_sweep_and_re_exported_by_ensemble():
    assert bayesflow.ensemble.expected_calibration_error is bayesflow.metrics.expected_calibration_error
    sweep_module = importlib.import_module("bayesflow.ensemble.sweep")  # bayesflow.ensemble.sweep is the function
    assert sweep_module.expected_calibration_error is bayesflow.metrics.expected_calibration_error


def test_metrics_match_hand_computed_values():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55]], dtype=F64)
    labels = torch.tensor([0, 1, 1])
    # bin 14 holds two 0.95s (1 right): |1 - 1.9|; bin 8 holds 0.55 (right): |1 - 0.55|
    assert expected_calibration_error(probs, labels) == pytest.approx((0.9 + 0.45) / 3, abs=1e-15)
    assert expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(2 - 2.45) / 3, abs=1e-15)
    assert accuracy(probs, labels) == pytest.approx(2 / 3, abs=1e-15)
    nll = -(math.log(0.95) + math.log(0.05) + math.log(0.55)) / 3
    assert negative_log_likelihood(probs.log(), labels) == pytest.approx(nll, abs=1e-15)
    brier = (2 * 0.05**2 + 2 * 0.95**2 + 2 * 0.45**2) / 3
    assert brier_score(probs, labels) == pytest.approx(brier, abs=1e-15)
    # leading data dimensions are flattened (language-model tokens)
    assert brier_score(probs.reshape(1, 3, 2), labels.reshape(1, 3)) == pytest.approx(brier, abs=1e-15)
    # a confident mistake keeps its true NLL through log-space predictive probabilities
    u = classification_uncertainty(torch.tensor([[[0.0, -2000.0]]], dtype=F64))
    assert negative_log_likelihood(u.log_predictive, torch.tensor([1])) == pytest.approx(2000.0)


def test_ece_bin_edges_and_the_confidence_of_one():
    probs = torch.tensor([[1.0, 0.0], [0.6, 0.4]], dtype=F64)  # 0.6 · 15 = 9: the lower edge of bin 9
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx((0 + 0.6) / 2, abs=1e-15)
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(0.3, abs=1e-15)


def test_metrics_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(9)
    probs = torch.randn(200, 4, generator=g, dtype=F64).mul(2).softmax(-1)
    labels = torch.randint(0, 4, (200,), generator=g)
    y, p = labels.numpy(), probs.numpy()
    assert negative_log_likelihood(probs.log(), labels) == pytest.approx(sklearn_metrics.log_loss(y, p), abs=1e-12)
    assert accuracy(probs, labels) == pytest.approx(sklearn_metrics.accuracy_score(y, p.argmax(-1)), abs=1e-15)
    try:
        reference = sklearn_metrics.brier_score_loss(y, p, labels=[0, 1, 2, 3])  # multi-class since 1.7
    except ValueError:
        pytest.skip("this scikit-learn has only the binary Brier score")
    assert brier_score(probs, labels) == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize(("metric", "values", "labels", "error", "match"), [
    (expected_calibration_error, torch.tensor([[0.5, 0.6]]), torch.tensor([0]), ValueError, "sum to one"),
    (brier_score, torch.tensor([[1.5, -0.5]]), torch.tensor([0]), ValueError, "non-negative"),
    (brier_score, torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]), ValueError, "NaN"),
    (negative_log_likelihood, torch.tensor([[0.5, 0.5]]), torch.tensor([0]), ValueError, "exp\\(log_probs\\)"),
    (accuracy, torch.zeros(3, 2), torch.tensor([0, 1]), ValueError, r"labels of shape \(3,\)"),
    (accuracy, torch.zeros(2, 2), torch.tensor([0.0, 1.0]), TypeError, "integer"),
    (accuracy, torch.zeros(2, 2), torch.tensor([0, 2]), ValueError, r"\[0, 2\)"),
    (accuracy, torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64), ValueError, "no data"),
    (accuracy, [[0.5, 0.5]], torch.tensor([0]), TypeError, "floating-point tensor"),
    (accuracy, torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), torch.tensor([1, 0]), ValueError,
     r"scores must not be NaN .*row 1"),
])
def test_bad_metric_inputs_raise_clear_errors(metric, values, labels, error, match):
    with pytest.raises(error, match=match):
        metric(values, labels)
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), bins=0)


def test_float32_softmax_over_a_large_vocabulary_passes_the_normalisation_check():
    probs = torch.randn(4, 32000, generator=torch.Generator().manual_seed(11)).softmax(-1)
    assert 0 <= expected_calibration_error(probs, torch.zeros(4, dtype=torch.int64)) <= 1


# ---------------------------------------------------------------- OOD ranking metrics


def test_ranking_metrics_by_hand():
    a, b = torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8])
    assert auroc(a, b) == 0.75                                      # 3 of 4 pairs ranked right
    assert aupr(a, b) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3, abs=1e-15)
    assert fpr_at_tpr(a, b) == 0.5                                  # accepting 0.4 also accepts 0.35
    ties_in, ties_ood = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])
    assert auroc(ties_in, ties_ood) == 0.75                         # the two ties count ½
    assert aupr(ties_in, ties_ood) == pytest.approx(0.5 * 1 + 0.5 * 0.5, abs=1e-15)
    assert fpr_at_tpr(ties_in, ties_ood) == 0.5
    assert fpr_at_tpr(torch.arange(20.0), torch.tensor([5.0, 18.0, 18.5, 30.0])) == 0.5
    assert fpr_at_tpr(torch.arange(20.0), torch.tensor([5.0, 18.0, 18.5, 30.0]), tpr=0.9) == 0.25
    assert (auroc(a, b + 10), aupr(a, b + 10), fpr_at_tpr(a, b + 10)) == (1.0, 1.0, 0.0)
    assert (auroc(a + 10, b), fpr_at_tpr(a + 10, b)) == (0.0, 1.0)
    assert auroc(b, a) == 1 - auroc(a, b)


@pytest.mark.parametrize(("size", "decimals"), [(7, None), (300, None), (300, 1), (2000, 0)])
def test_ranking_metrics_match_scikit_learn(size, decimals):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(size)
    a = torch.randn(size, generator=g, dtype=F64)
    b = torch.randn(size // 2 + 3, generator=g, dtype=F64) + 0.8
    if decimals is not None:  # many ties
        a, b = a.round(decimals=decimals), b.round(decimals=decimals)
    y = np.r_[np.zeros(a.numel()), np.ones(b.numel())]
    s = np.r_[a.numpy(), b.numpy()]
    assert auroc(a, b) == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-14)
    assert aupr(a, b) == pytest.approx(sklearn_metrics.average_precision_score(y, s), abs=1e-14)
    assert aupr(a, b, positive="in") == pytest.approx(sklearn_metrics.average_precision_score(1 - y, -s), abs=1e-14)
    fpr, tpr, _ = sklearn_metrics.roc_curve(1 - y, -s, drop_intermediate=False)
    for level in (0.95, 0.5, 1.0):
        assert fpr_at_tpr(a, b, tpr=level) == pytest.approx(fpr[np.argmax(tpr >= level)], abs=1e-15)


def test_ood_detection_scores_every_uncertainty():
    g = torch.Generator().manual_seed(13)
    agree = torch.randn(1, 60, 3, generator=g) * 3 + torch.randn(8, 60, 3, generator=g) * 0.1
    disagree = torch.randn(8, 40, 3, generator=g) * 3
    in_u, ood_u = classification_uncertainty(agree), classification_uncertainty(disagree)
    result = ood_detection(in_u, ood_u)
    assert set(result) == {"total", "aleatoric", "epistemic"}
    for name, row in result.items():
        a, b = getattr(in_u, name), getattr(ood_u, name)
        assert row == {"auroc": auroc(a, b), "aupr": aupr(a, b), "fpr95": fpr_at_tpr(a, b)}
    assert result["epistemic"]["auroc"] > 0.95  # samples that disagree are what EU measures
    named = ood_detection({"epistemic": in_u.epistemic}, {"epistemic": ood_u.epistemic})
    assert named == {"epistemic": result["epistemic"]}
    regression = ood_detection(regression_uncertainty(torch.zeros(2, 5)), regression_uncertainty(torch.ones(3, 5)),
                               scores=["epistemic"])
    assert regression["epistemic"]["auroc"] == 0.5  # zero spread on both sides: all ties
    with pytest.raises(ValueError, match="'mutual' is missing"):
        ood_detection(in_u, ood_u, scores=["mutual"])
    with pytest.raises(TypeError, match="uncertainty record"):
        ood_detection(in_u.epistemic, ood_u.epistemic)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: auroc(torch.zeros(0), torch.ones(2)), ValueError, "in_scores is empty"),
    (lambda: auroc(torch.zeros(2), torch.tensor([float("nan")])), ValueError, "NaN"),
    (lambda: auroc([0.1, 0.2], torch.ones(2)), TypeError, "real tensor"),
    (lambda: fpr_at_tpr(torch.zeros(2), torch.ones(2), tpr=0.0), ValueError, r"\(0, 1\]"),
    (lambda: aupr(torch.zeros(2), torch.ones(2), positive="both"), ValueError, "'ood' or 'in'"),
])
def test_bad_scores_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
