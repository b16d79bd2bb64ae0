r"""Scores of probabilistic classifiers: NLL, accuracy, expected calibration error and the Brier score.

Each takes a predictive distribution over ``C`` classes, shaped ``(..., C)`` (any leading data
dimensions: ``(N, C)`` for a classifier, ``(B, T, V)`` for a language model's tokens, flattened
together), and integer labels shaped ``(...)``, and returns a Python float averaged over the data:

.. math::
    \mathrm{NLL} = -\frac1N\sum_i \log p(y_i|x_i), \qquad
    \mathrm{acc} = \frac1N\sum_i 1[\arg\max_c p(c|x_i) = y_i], \qquad
    \mathrm{Brier} = \frac1N\sum_i\sum_c \big(p(c|x_i) - 1[c = y_i]\big)^2,

and the ECE of :func:`expected_calibration_error`. Select tokens with a boolean mask before scoring
(``log_probs[mask]``, ``labels[mask]``). This module is the one implementation of these scores:
:func:`bayesflow.ensemble.sweep` computes its rows' log-likelihood, accuracy and ECE with it, and it
scores :mod:`bayesflow.predictive`'s outputs directly (``negative_log_likelihood(u.log_predictive, y)``).

Probabilities are checked at the boundary: non-negative, each row summing to one within
``1e-6`` (float64) or ``max(1e-3, 2·eps)`` (float32 and narrower; a float32 softmax over a large
vocabulary sums to one only to about ``1e-5``); log-probabilities are checked through their
``logsumexp``. Scores are computed in float64.

Example:
    >>> import torch
    >>> from bayesflow.metrics import accuracy, brier_score, negative_log_likelihood
    >>> probs, labels = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]]), torch.tensor([0, 1, 1])
    >>> round(negative_log_likelihood(probs.log(), labels), 6), accuracy(probs, labels)  # (2 log(4/3) + log 2) / 3
    (0.422837, 0.6666666666666666)
    >>> brier_score(probs, labels)  # (2 · 0.25² + 2 · 0.5² + 2 · 0.25²) / 3
    0.25
"""

from __future__ import annotations

import torch

__all__ = ["accuracy", "brier_score", "expected_calibration_error", "negative_log_likelihood"]


def negative_log_likelihood(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    r"""Mean negative log-likelihood :math:`-\frac1N\sum_i \log p(y_i|x_i)` of the labels.

    Takes log-probabilities (e.g. ``ClassificationUncertainty.log_predictive``, computed in log space)
    so that confident mistakes give their true, large NLL instead of ``-log(0)``.

    Args:
        log_probs: ``(..., C)`` log-probabilities; each row's ``logsumexp`` must be 0.
        labels: ``(...)`` integer labels in ``[0, C)``.

    Returns:
        The mean NLL in nats.

    Raises:
        TypeError: ``log_probs`` is not a floating tensor or ``labels`` not an integer tensor.
        ValueError: the shapes disagree, there is no datum, a label is out of range or a row of
            ``exp(log_probs)`` does not sum to one.

    Example:
        >>> import torch
        >>> from bayesflow.metrics import negative_log_likelihood
        >>> log_probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
        >>> round(negative_log_likelihood(log_probs, torch.tensor([0, 1])), 6)  # (log 2 + log 10) / 2
        1.497866
    """
    _check(log_probs, labels, "log_probs")
    _check_normalised(log_probs.detach().double().logsumexp(-1).exp(), log_probs.dtype, "exp(log_probs)")
    picked = log_probs.detach().double().gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return -picked.mean().item()


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    r"""Fraction of data whose most probable class is the label, :math:`\frac1N\sum_i 1[\arg\max_c s_{ic} = y_i]`.

    Args:
        scores: ``(..., C)`` probabilities, log-probabilities or logits (the argmax is the same);
            ties go to the lowest class index.
        labels: ``(...)`` integer labels in ``[0, C)``.

    Returns:
        The accuracy in ``[0, 1]``.

    Raises:
        TypeError: ``scores`` is not a floating tensor or ``labels`` not an integer tensor.
        ValueError: the shapes disagree, there is no datum, a label is out of range or a score is NaN.

    Example:
        >>> import torch
        >>> from bayesflow.metrics import accuracy
        >>> accuracy(torch.tensor([[2.0, -1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1]))
        0.6666666666666666
    """
    _check(scores, labels, "scores")
    nan_rows = scores.detach().isnan().reshape(-1, scores.shape[-1]).any(-1)
    if nan_rows.any():  # argmax would pick the NaN entry and score it as a prediction
        raise ValueError(f"scores must not be NaN (±inf is fine): row {int(nan_rows.nonzero()[0])} of the flattened "
                         f"data holds NaN ({int(nan_rows.sum())} of {nan_rows.numel()} rows)")
    return (scores.argmax(-1) == labels).double().mean().item()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    r"""ECE: :math:`\sum_b \frac{|B_b|}{N} |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|` over equal-width confidence bins.

    The confidence of datum i is :math:`c_i = \max_c p(c|x_i)`; bin b holds the data with
    :math:`c_i \in [b/M, (b+1)/M)` (the last bin also holds :math:`c_i = 1`), for ``M = bins`` bins
    (15, as Guo et al. 2017); :math:`\mathrm{acc}(B_b)` is the fraction of those predicted right and
    :math:`\mathrm{conf}(B_b)` their mean confidence. Empty bins contribute nothing. Bin edges are
    left-closed (``floor(c · M)``, in float64): a confidence exactly on an edge goes to the upper bin.

    Args:
        probs: ``(..., C)`` predictive probabilities (non-negative, rows summing to one).
        labels: ``(...)`` integer labels in ``[0, C)``.
        bins: the number of bins M (a positive int).

    Returns:
        The ECE in ``[0, 1]``.

    Raises:
        TypeError: ``probs`` is not a floating tensor or ``labels`` not an integer tensor.
        ValueError: the shapes disagree, there is no datum, a label is out of range, ``bins < 1``, or
            the rows are not probability vectors.

    Example:
        >>> import torch
        >>> from bayesflow.metrics import expected_calibration_error
        >>> probs = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]])
        >>> expected_calibration_error(probs, torch.tensor([0, 1, 1]))  # (|2 - 2 · 0.75| + |0 - 0.5|) / 3
        0.3333333333333333
    """
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    _check(probs, labels, "probs")
    _check_probs(probs)
    confidence, predicted = probs.detach().double().max(-1)
    confidence, correct = confidence.reshape(-1), (predicted == labels).double().reshape(-1)
    index = (confidence * bins).long().clamp(max=bins - 1)
    accurate = torch.bincount(index, weights=correct, minlength=bins)
    confident = torch.bincount(index, weights=confidence, minlength=bins)
    return ((accurate - confident).abs().sum() / confidence.numel()).item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    r"""Multi-class Brier score :math:`\frac1N\sum_i\sum_c (p(c|x_i) - 1[c = y_i])^2` (Brier 1950), in ``[0, 2]``.

    The sum runs over all C classes, as in Brier's definition and scikit-learn's multi-class
    ``brier_score_loss``; for two classes it is twice the binary score :math:`(p_1 - y)^2`.

    Args:
        probs: ``(..., C)`` predictive probabilities (non-negative, rows summing to one).
        labels: ``(...)`` integer labels in ``[0, C)``.

    Returns:
        The mean Brier score.

    Raises:
        TypeError: ``probs`` is not a floating tensor or ``labels`` not an integer tensor.
        ValueError: the shapes disagree, there is no datum, a label is out of range, or the rows are not
            probability vectors.

    Example:
        >>> import torch
        >>> from bayesflow.metrics import brier_score
        >>> brier_score(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([0, 0]))  # (0.25 + 0.25 + 0) / 2
        0.25
    """
    _check(probs, labels, "probs")
    _check_probs(probs)
    probs = probs.detach().double()
    squared = probs.square().sum(-1) - 2 * probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1) + 1
    return squared.mean().item()


def _check(values: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    """Types and shapes of ``(values (..., C), labels (...))``, and the labels' range."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape (..., classes), got {_describe(values)}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {_describe(labels)}")
    if values.ndim < 1 or labels.shape != values.shape[:-1]:
        raise ValueError(f"{name} of shape {tuple(values.shape)} needs labels of shape {tuple(values.shape[:-1])} "
                         f"(one per row), got {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError(f"no data to score: {name} has shape {tuple(values.shape)}")
    low, high = labels.min().item(), labels.max().item()
    if low < 0 or high >= values.shape[-1]:
        raise ValueError(f"labels must lie in [0, {values.shape[-1]}) for {values.shape[-1]} classes, "
                         f"got values in [{low}, {high}]")


def _check_probs(probs: torch.Tensor) -> None:
    if (probs < 0).any():
        raise ValueError(f"probs must be non-negative, got a minimum of {probs.min().item()!r} "
                         "(pass probabilities, not logits: softmax them first)")
    _check_normalised(probs.detach().double().sum(-1), probs.dtype, "probs")


def _check_normalised(row_sums: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Rows of a probability table sum to one within the input dtype's rounding (NaN fails too)."""
    tolerance = 1e-6 if dtype == torch.float64 else max(1e-3, 2 * torch.finfo(dtype).eps)
    error = (row_sums - 1).abs().nan_to_num(nan=float("inf")).max().item()
    if not error <= tolerance:
        raise ValueError(f"the rows of {name} must sum to one (within {tolerance:g}); the worst is off by {error:.3g}"
                         " (or NaN): pass a normalised distribution over the last axis")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__}"
