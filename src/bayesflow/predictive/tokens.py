r"""Sequence-level uncertainty of a language model from its per-token decomposition.

:func:`~bayesflow.predictive.classification_uncertainty` of ``(K, B, T, V)`` logits gives TU, AU and
EU of every next-token distribution, ``(B, T)``. A sequence's score sums (or averages) them over its
real tokens, those with ``mask = 1``:

.. math::
    U_{\text{sum}}(x) = \sum_t m_t\, U_t(x), \qquad U_{\text{mean}}(x) = \frac{\sum_t m_t\, U_t(x)}{\sum_t m_t},

for :math:`U \in \{TU, AU, EU\}`, so TU = AU + EU holds per sequence too. These are the token-level
scores of Malinin & Gales (2021): each :math:`U_t` conditions on the observed prefix (teacher
forcing), so :math:`EU_{\text{sum}}` is a sum of per-token mutual informations, not the mutual
information between a whole sampled sequence and θ (which needs sequences drawn from the model).
``"sum"`` grows with length (what a likelihood does); ``"mean"`` compares sequences of different
lengths. For a causal LM the logits at position t predict token t + 1: shift the attention mask the
way the loss is shifted (``mask[:, 1:]`` against ``logits[:, :-1]``).

Example:
    >>> import torch
    >>> from bayesflow.predictive import classification_uncertainty, sequence_uncertainty
    >>> logits = torch.randn(4, 2, 5, 11, generator=torch.Generator().manual_seed(0))  # (K, B, T, V)
    >>> mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])                     # sequence 1 is padded
    >>> per_sequence = sequence_uncertainty(classification_uncertainty(logits), mask, reduction="mean")
    >>> per_sequence.epistemic.shape, per_sequence.num_tokens
    (torch.Size([2]), tensor([5, 3]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bayesflow.predictive.classification import ClassificationUncertainty
from bayesflow.records import record

__all__ = ["SequenceUncertainty", "sequence_uncertainty"]

_REDUCTIONS = ("sum", "mean")


@record
class SequenceUncertainty(NamedTuple):
    r"""TU, AU and EU per sequence (reduced over tokens), and how many tokens each sequence has.

    Attributes:
        total: ``(...)`` the reduced TU.
        aleatoric: ``(...)`` the reduced AU.
        epistemic: ``(...)`` the reduced EU.
        num_tokens: ``(...)`` int64, :math:`\sum_t m_t`.

    Example:
        >>> import torch
        >>> from bayesflow.predictive import classification_uncertainty, sequence_uncertainty
        >>> u = sequence_uncertainty(classification_uncertainty(torch.zeros(2, 3, 4, 5)))  # uniform over 5
        >>> u.total  # 4 tokens · log 5
        tensor([6.4378, 6.4378, 6.4378])
    """

    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor
    num_tokens: torch.Tensor


def sequence_uncertainty(tokens: ClassificationUncertainty, mask: torch.Tensor | None = None,
                         reduction: str = "sum") -> SequenceUncertainty:
    r"""Reduce per-token TU / AU / EU ``(..., T)`` over the token axis with an attention mask.

    Args:
        tokens: the per-token decomposition, e.g. ``classification_uncertainty(logits)`` of
            ``(K, B, T, V)`` logits (its fields ``(B, T)``; the last axis is the token axis).
        mask: ``(..., T)``, 1 (or True) for the tokens to count, 0 for padding; None counts every token.
            Values at masked positions are ignored, even NaN (padding rows of ``-inf`` logits).
        reduction: ``"sum"`` over tokens or ``"mean"`` over the unmasked ones.

    Returns:
        A :class:`SequenceUncertainty` of shape ``(...)``.

    Raises:
        TypeError: ``tokens`` is not a :class:`~bayesflow.predictive.ClassificationUncertainty`, or the
            mask is not a boolean or integer tensor.
        ValueError: an unknown reduction, a per-datum (not per-token) decomposition, a mask whose shape
            differs from the tokens' or with values other than 0 and 1, or — for ``"mean"`` — a
            sequence without any unmasked token.

    Example:
        >>> import torch
        >>> from bayesflow.predictive import classification_uncertainty, sequence_uncertainty
        >>> logits = torch.zeros(2, 1, 3, 4)                 # K = 2 uniform samples, 1 sequence of 3 tokens, V = 4
        >>> u = sequence_uncertainty(classification_uncertainty(logits), torch.tensor([[1, 1, 0]]))
        >>> round(u.total.item(), 6), u.num_tokens            # 2 · log 4
        (2.772589, tensor([2]))
    """
    if not isinstance(tokens, ClassificationUncertainty):
        raise TypeError(f"tokens must be a ClassificationUncertainty (from classification_uncertainty), "
                        f"got {type(tokens).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    shape = tokens.total.shape
    if len(shape) < 1:
        raise ValueError("tokens is per datum (its scores are scalars): sequence_uncertainty needs per-token "
                         "scores with a token axis last, e.g. from (K, B, T, V) logits")
    if mask is None:
        keep = torch.ones(shape, dtype=torch.bool, device=tokens.total.device)
    else:
        keep = _check_mask(mask, shape)

    def reduce(values: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, values, 0.0).sum(-1)

    num_tokens = keep.sum(-1)
    total, aleatoric, epistemic = reduce(tokens.total), reduce(tokens.aleatoric), reduce(tokens.epistemic)
    if reduction == "mean":
        if (num_tokens == 0).any():
            empty = torch.nonzero(num_tokens == 0)[0].tolist()
            raise ValueError(f"sequence {empty} has no unmasked token: its mean is undefined (use reduction='sum' "
                             "or drop empty sequences)")
        count = num_tokens.to(total.dtype)
        total, aleatoric, epistemic = total / count, aleatoric / count, epistemic / count
    return SequenceUncertainty(total, aleatoric, epistemic, num_tokens)


def _check_mask(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask must be a boolean or integer (0/1) tensor, got "
                        f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the per-token scores have {tuple(shape)}")
    if mask.dtype != torch.bool:
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("mask must hold 0 and 1 only (an attention mask), got other values")
        mask = mask.bool()
    return mask
