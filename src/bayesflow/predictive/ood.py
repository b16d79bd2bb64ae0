r"""How well an uncertainty score separates out-of-distribution inputs: AUROC, AUPR and FPR@95.

A score :math:`s` (TU, AU, EU, ...) is meant to be higher on OOD inputs. With :math:`n_0`
in-distribution scores :math:`a_i` and :math:`n_1` OOD scores :math:`b_j`:

* **AUROC** — the Mann–Whitney statistic, ties counting one half:
  :math:`\frac{1}{n_0 n_1}\sum_{i,j} \big(1[b_j > a_i] + \tfrac12 1[b_j = a_i]\big)`, the probability
  that a random OOD input scores above a random in-distribution one (0.5: no separation). It is the
  same with in-distribution as the positive class and :math:`-s` as the score.
* **AUPR** — average precision :math:`\sum_n (R_n - R_{n-1}) P_n` over the distinct thresholds
  (scikit-learn's ``average_precision_score``: a step function, no interpolation), OOD as the
  positive class ("AUPR-Out"); ``positive="in"`` gives AUPR-In (in-distribution positive, score :math:`-s`).
* **FPR@95** — the fraction of OOD inputs still accepted as in-distribution (:math:`s \le t`) at the
  threshold t that first accepts 95% of the in-distribution ones:
  :math:`\min\{\mathrm{FPR}(t) : \mathrm{TPR}(t) \ge 0.95\}` with in-distribution as the positive
  class (Hendrycks & Gimpel 2017; OpenOOD's ``fpr_recall``). Lower is better.

All three come from one stable sort of the pooled scores and cumulative counts per group of tied
values (exact: integer counts, float64 ratios). They are written here rather than imported from
scikit-learn or torchmetrics — neither is a dependency of bayesflow, they work on tensors on any
device, in float64, and match ``sklearn.metrics`` to rounding (``tests/test_predictive.py``
compares them when scikit-learn is installed).

Example:
    >>> import torch
    >>> from bayesflow.predictive import aupr, auroc, fpr_at_tpr
    >>> in_scores, ood_scores = torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8])
    >>> auroc(in_scores, ood_scores), round(aupr(in_scores, ood_scores), 6), fpr_at_tpr(in_scores, ood_scores)
    (0.75, 0.833333, 0.5)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

__all__ = ["aupr", "auroc", "fpr_at_tpr", "ood_detection"]

_UNCERTAINTIES = ("total", "aleatoric", "epistemic")


class _Ranking(NamedTuple):
    """Per group of tied scores, ascending: how many in-distribution / OOD scores are <= the group's value."""

    in_le: torch.Tensor
    ood_le: torch.Tensor
    num_in: int
    num_ood: int


def auroc(in_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    r"""Area under the ROC curve of detecting OOD inputs by a high score (Mann–Whitney, ties ½).

    Args:
        in_scores: scores of in-distribution inputs (any shape; flattened).
        ood_scores: scores of OOD inputs (any shape; flattened).

    Returns:
        :math:`P(b > a) + \tfrac12 P(b = a)`, in ``[0, 1]``.

    Raises:
        TypeError: a score set is not a real tensor.
        ValueError: a score set is empty or holds NaN.

    Example:
        >>> import torch
        >>> from bayesflow.predictive import auroc
        >>> auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0]))  # (½ + ½ + 1 + 1) / 4
        0.75
    """
    return _auroc(_rank(in_scores, ood_scores))


def aupr(in_scores: torch.Tensor, ood_scores: torch.Tensor, positive: str = "ood") -> float:
    r"""Area under the precision–recall curve (average precision) of detecting OOD inputs by a high score.

    Args:
        in_scores: scores of in-distribution inputs (any shape; flattened).
        ood_scores: scores of OOD inputs (any shape; flattened).
        positive: ``"ood"`` (AUPR-Out: OOD inputs are the positives, ranked by s) or ``"in"``
            (AUPR-In: in-distribution inputs are the positives, ranked by -s).

    Returns:
        :math:`\sum_n (R_n - R_{n-1}) P_n` over decreasing thresholds, in ``(0, 1]``.

    Raises:
        TypeError: a score set is not a real tensor.
        ValueError: a score set is empty or holds NaN, or ``positive`` is neither ``"ood"`` nor ``"in"``.

    Example:
        >>> import torch
        >>> from bayesflow.predictive import aupr
        >>> a, b = torch.tensor([0.1, 0.4]), torch.tensor([0.35, 0.8])
        >>> round(aupr(a, b), 6), round(aupr(a, b, positive="in"), 6)  # ½ · 1 + ½ · ⅔;  ½ · 1 + ½ · ⅔
        (0.833333, 0.833333)
    """
    if positive not in ("ood", "in"):
        raise ValueError(f"positive must be 'ood' or 'in', got {positive!r}")
    if positive == "ood":
        return _average_precision(_rank(in_scores, ood_scores))
    return _average_precision(_rank(-_scores(ood_scores, "ood_scores"), -_scores(in_scores, "in_scores")))


def fpr_at_tpr(in_scores: torch.Tensor, ood_scores: torch.Tensor, tpr: float = 0.95) -> float:
    r"""FPR@TPR: the fraction of OOD inputs accepted when a threshold accepts ``tpr`` of the in-distribution ones.

    Inputs with :math:`s \le t` are accepted as in-distribution; the threshold t runs over the
    observed scores, and the result is :math:`\min\{\#\{b_j \le t\}/n_1 : \#\{a_i \le t\}/n_0 \ge \mathrm{tpr}\}`
    (exactly ``fpr[argmax(tpr_curve >= tpr)]`` of scikit-learn's ``roc_curve`` with in-distribution
    positive, score -s, ``drop_intermediate=False``).

    Args:
        in_scores: scores of in-distribution inputs (any shape; flattened).
        ood_scores: scores of OOD inputs (any shape; flattened).
        tpr: the fraction of in-distribution inputs to accept, in ``(0, 1]`` (0.95: FPR@95).

    Returns:
        The false-positive rate in ``[0, 1]`` (lower is better).

    Raises:
        TypeError: a score set is not a real tensor.
        ValueError: a score set is empty or holds NaN, or ``tpr`` is outside ``(0, 1]``.

    Example:
        >>> import torch
        >>> from bayesflow.predictive import fpr_at_tpr
        >>> in_scores = torch.arange(20.0)                   # t = 18 accepts 19 / 20 = 95% of them
        >>> fpr_at_tpr(in_scores, torch.tensor([5.0, 18.0, 18.5, 30.0]))  # accepts 5 and 18: 2 / 4
        0.5
    """
    if not isinstance(tpr, (int, float)) or isinstance(tpr, bool) or not 0 < tpr <= 1:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")
    return _fpr_at_tpr(_rank(in_scores, ood_scores), tpr)


def ood_detection(in_distribution, out_of_distribution, scores: Sequence[str] | None = None) -> dict[str, dict]:
    r"""AUROC, AUPR (OOD positive) and FPR@95 of each uncertainty score, in-distribution vs OOD.

    The one-liner of the "epistemic uncertainty separates OOD inputs" experiment: decompose the
    predictive on both data sets and compare every score.

    Args:
        in_distribution: the uncertainties on in-distribution inputs: a
            :class:`~bayesflow.predictive.ClassificationUncertainty`,
            :class:`~bayesflow.predictive.SequenceUncertainty` or
            :class:`~bayesflow.predictive.RegressionUncertainty` (any shape: every entry is one input), or a
            mapping from score names to tensors.
        out_of_distribution: the same on OOD inputs.
        scores: the score names to evaluate (default: ``("total", "aleatoric", "epistemic")`` for records,
            every key for mappings).

    Returns:
        ``{score: {"auroc": float, "aupr": float, "fpr95": float}}``.

    Raises:
        TypeError: the inputs are neither records nor mappings.
        ValueError: a score is missing from either input (and the errors of :func:`auroc`).

    Example:
        >>> import torch
        >>> from bayesflow.predictive import classification_uncertainty, ood_detection
        >>> g = torch.Generator().manual_seed(0)
        >>> agree = torch.randn(1, 100, 3, generator=g) * 3 + torch.randn(8, 100, 3, generator=g) * 0.1
        >>> disagree = torch.randn(8, 100, 3, generator=g) * 3       # samples disagree off-distribution
        >>> result = ood_detection(classification_uncertainty(agree), classification_uncertainty(disagree))
        >>> sorted(result), sorted(result["epistemic"])
        (['aleatoric', 'epistemic', 'total'], ['aupr', 'auroc', 'fpr95'])
        >>> result["epistemic"]["auroc"] > 0.95
        True
    """
    in_named, ood_named = _named(in_distribution, "in_distribution"), _named(out_of_distribution, "out_of_distribution")
    if scores is None:
        scores = _UNCERTAINTIES if not isinstance(in_distribution, Mapping) else tuple(in_named)
    results = {}
    for name in scores:
        if name not in in_named or name not in ood_named:
            raise ValueError(f"score {name!r} is missing: in_distribution has {sorted(in_named)}, "
                             f"out_of_distribution has {sorted(ood_named)}")
        ranking = _rank(in_named[name], ood_named[name])
        results[name] = {"auroc": _auroc(ranking), "aupr": _average_precision(ranking),
                         "fpr95": _fpr_at_tpr(ranking, 0.95)}
    return results


def _named(value, name: str) -> dict:
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "_asdict"):
        return {key: field for key, field in value._asdict().items() if isinstance(field, torch.Tensor)}
    raise TypeError(f"{name} must be an uncertainty record (e.g. from classification_uncertainty) or a mapping "
                    f"from score names to tensors, got {type(value).__name__}")


def _scores(values, name: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"{name} must be a real tensor of scores, got "
                        f"{values.dtype if isinstance(values, torch.Tensor) else type(values).__name__}")
    values = values.detach().reshape(-1)
    if values.numel() == 0:
        raise ValueError(f"{name} is empty: AUROC, AUPR and FPR@95 need at least one score on each side")
    if values.is_floating_point() and torch.isnan(values).any():
        raise ValueError(f"{name} holds NaN: scores must be comparable (a NaN has no rank)")
    return values


def _rank(in_scores, ood_scores) -> _Ranking:
    in_scores, ood_scores = _scores(in_scores, "in_scores"), _scores(ood_scores, "ood_scores")
    dtype = torch.promote_types(torch.promote_types(in_scores.dtype, ood_scores.dtype), torch.float64)
    pooled = torch.cat([in_scores.to(dtype), ood_scores.to(in_scores.device, dtype)])
    is_ood = torch.zeros(pooled.shape, dtype=torch.int64, device=pooled.device)
    is_ood[in_scores.numel():] = 1
    pooled, order = torch.sort(pooled)
    _, counts = torch.unique_consecutive(pooled, return_counts=True)
    ends = counts.cumsum(0) - 1                         # the last position of every group of ties
    ood_le = is_ood[order].cumsum(0)[ends]
    return _Ranking(ends + 1 - ood_le, ood_le, in_scores.numel(), ood_scores.numel())


def _previous(counts: torch.Tensor) -> torch.Tensor:
    """The cumulative count of the group below each group (0 for the lowest)."""
    return torch.cat([counts.new_zeros(1), counts[:-1]])


def _auroc(r: _Ranking) -> float:
    in_below = _previous(r.in_le)
    in_tied, ood_tied = r.in_le - in_below, r.ood_le - _previous(r.ood_le)
    twice_u = (ood_tied * (2 * in_below + in_tied)).sum()          # 2 U, an exact integer
    return twice_u.item() / (2 * r.num_in * r.num_ood)


def _average_precision(r: _Ranking) -> float:
    true_pos = r.num_ood - _previous(r.ood_le)                     # OOD with score >= the group's value
    false_pos = r.num_in - _previous(r.in_le)
    precision = true_pos.double() / (true_pos + false_pos).double()
    recall = true_pos.double() / r.num_ood
    recall_step = recall - torch.cat([recall[1:], recall.new_zeros(1)])
    return (recall_step * precision).sum().item()


def _fpr_at_tpr(r: _Ranking, tpr: float) -> float:
    first = torch.nonzero(r.in_le.double() / r.num_in >= tpr)[0, 0]
    return r.ood_le[first].item() / r.num_ood
