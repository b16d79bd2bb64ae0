r"""The posterior predictive of a classifier (or a language model's next token) from posterior samples,
and its split into aleatoric and epistemic uncertainty.

Given the logits of K posterior samples :math:`θ_1..θ_K` (chains, ensemble members, SG-MCMC trace
points, VI/Laplace/SWAG draws), per datum (or per token),

.. math::
    \log \bar p(y|x) = \operatorname{logsumexp}_k \log p(y|x, θ_k) - \log K, \qquad
    p(y|x, θ_k) = \operatorname{softmax}(\ell_k)_y,

.. math::
    \underbrace{H[\bar p(y|x)]}_{\text{total } TU}
    = \underbrace{\frac1K\sum_k H[p(y|x,θ_k)]}_{\text{aleatoric } AU}
    + \underbrace{I(y; θ \mid x)}_{\text{epistemic } EU},

with :math:`H[p] = -\sum_y p_y \log p_y` in nats. EU is the mutual information between the label
and the parameters (the BALD score, Houlsby et al. 2011): it is zero when all samples agree and at
most :math:`\log K` and :math:`\log C`. Everything is in log space: the mean over samples is a
running ``logaddexp`` of ``log_softmax`` outputs, and :math:`p \log p` is taken as 0 where
:math:`p = 0` (logits of ``-inf`` — masked vocabulary entries — are allowed; ``+inf`` and NaN
are refused with a ValueError naming the sample).

One pass over the samples: :func:`predictive_sums` is an ``(init, update)`` pair accumulating
:math:`\operatorname{logsumexp}_k \log p_k` and :math:`\sum_k H[p_k]` (memory: one ``(..., C)`` and one
``(...)`` tensor, whatever K), :func:`decompose` turns the sums into the decomposition, and
:func:`classification_uncertainty` does both for a tensor, a function of the sample index or an
iterable of samples. Chunk over data by calling it per batch and ``torch.cat``-ing the results (the
result is a :func:`~bayesflow.records.record`).

Example (two samples that disagree: EU = TU - AU):
    >>> import torch
    >>> from bayesflow.predictive import classification_uncertainty
    >>> logits = torch.tensor([[[0.8, 0.2]], [[0.4, 0.6]]], dtype=torch.float64).log()  # (K=2, B=1, C=2)
    >>> u = classification_uncertainty(logits)
    >>> u.log_predictive.exp()                                   # the mean of the samples' probabilities
    tensor([[0.6000, 0.4000]], dtype=torch.float64)
    >>> [round(v.item(), 4) for v in (u.total, u.aleatoric, u.epistemic)]  # H(0.6); (H(0.8) + H(0.4)) / 2; TU - AU
    [0.673, 0.5867, 0.0863]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from bayesflow.predictive._samples import Samples, check_finite, sample_chunks
from bayesflow.records import record
from bayesflow.types import Transform

__all__ = ["ClassificationUncertainty", "PredictiveSums", "classification_uncertainty", "decompose",
           "predictive_sums"]


@record
class ClassificationUncertainty(NamedTuple):
    r"""The posterior predictive and its uncertainty decomposition, per datum (or per token).

    Attributes:
        log_predictive: ``(..., C)`` :math:`\log \bar p(y|x)`, the log of the mean of the samples'
            softmax probabilities.
        total: ``(...)`` TU :math:`= H[\bar p(y|x)]`.
        aleatoric: ``(...)`` AU :math:`= \frac1K\sum_k H[p(y|x,θ_k)]`, the expected entropy.
        epistemic: ``(...)`` EU :math:`= TU - AU = I(y;θ|x)`, clamped at 0: mathematically
            non-negative (Jensen), it is a difference of two rounded sums and can come out as
            :math:`-\varepsilon\,TU`; the clamp removes those.
        num_samples: K.

    Example:
        >>> import torch
        >>> from bayesflow.predictive import classification_uncertainty
        >>> u = classification_uncertainty(torch.zeros(3, 5, 4))  # K=3 identical uniform samples, 5 data, 4 classes
        >>> u.total.shape, u.epistemic.abs().max().item(), u.num_samples
        (torch.Size([5]), 0.0, 3)
        >>> torch.cat([u, u]).total.shape  # records concatenate field by field: batch over data
        torch.Size([10])
    """

    log_predictive: torch.Tensor
    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor
    num_samples: int


@record
class PredictiveSums(NamedTuple):
    r"""State of :func:`predictive_sums`: what one pass over the samples keeps.

    Attributes:
        count: K so far (an int64 tensor on the CPU: updates read it without a device sync).
        log_sum_probs: ``(..., C)`` :math:`\operatorname{logsumexp}_k \log p(y|x,θ_k)` (``-inf`` before any sample).
        sum_entropy: ``(...)`` :math:`\sum_k H[p(y|x,θ_k)]`.

    Example:
        >>> import torch
        >>> from bayesflow.predictive import predictive_sums
        >>> sums = predictive_sums()
        >>> state = sums.init(torch.zeros(2, 3))      # one sample's logits: 2 data, 3 classes
        >>> state.count, state.log_sum_probs.shape, state.sum_entropy.shape
        (tensor(0), torch.Size([2, 3]), torch.Size([2]))
    """

    count: torch.Tensor
    log_sum_probs: torch.Tensor
    sum_entropy: torch.Tensor


def predictive_sums(dtype: torch.dtype | None = None) -> Transform:
    r"""One-pass accumulation of the posterior predictive and the mean entropy, as ``(init, update)``.

    ``update(state, logits)`` takes a chunk of k samples' logits ``(k, ..., C)`` and applies

    .. math::
        \log p_j = \operatorname{log\_softmax}(\ell_j), \quad
        L \leftarrow \operatorname{logaddexp}\big(L, \operatorname{logsumexp}_{j \le k} \log p_j\big), \quad
        S \leftarrow S + \sum_{j \le k} H[p_j], \quad n \leftarrow n + k,

    so that after all K samples :func:`decompose` gives :math:`\log\bar p = L - \log K`. The running
    state is the size of one sample's output; a chunk's temporaries are about 2.5 times the chunk
    (its log-softmax, the entropy terms and a mask), more for ``logsumexp`` over a chunk of k > 1.

    Args:
        dtype: the accumulation dtype. None: the logits' dtype, widened to float32 when narrower
            (bfloat16 / float16 entropies lose too much). Pass ``torch.float64`` for references.

    Returns:
        A :class:`~bayesflow.types.Transform`: ``init(logits) -> PredictiveSums`` from one sample's
        logits ``(..., C)`` (shape, dtype and device; count 0), and
        ``update(state, logits, inplace=False) -> (state, None)`` for a chunk ``(k, ..., C)``;
        ``inplace=True`` writes into the state's tensors.

    Raises:
        ValueError: (update) the chunk's trailing shape differs from ``init``'s, it has no sample axis,
            or it holds NaN or ``+inf`` (``-inf`` is a masked class and allowed). The message names the
            first such sample (counting from the first update) and its index. The check is one
            ``.all()`` per chunk, the one host sync of an update; the state is left as it was.

    Example (samples arriving one at a time, e.g. from a sampler's loop):
        >>> import torch
        >>> from bayesflow.predictive import decompose, predictive_sums
        >>> sums = predictive_sums(dtype=torch.float64)
        >>> draws = [torch.tensor([[10.0, -10.0]]), torch.tensor([[-10.0, 10.0]])]  # two confident, opposite
        >>> state = sums.init(draws[0])
        >>> for logits in draws:
        ...     state, _ = sums.update(state, logits.unsqueeze(0), inplace=True)
        >>> round(decompose(state).epistemic.item(), 6)  # ≈ log 2: all uncertainty is epistemic
        0.693147
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")

    def init(logits: torch.Tensor) -> PredictiveSums:
        if not isinstance(logits, torch.Tensor) or logits.ndim < 1 or not logits.is_floating_point():
            raise ValueError(f"init takes one sample's logits, a floating tensor of shape (..., classes), "
                             f"got {_describe(logits)}")
        accumulate = _accumulation_dtype(logits.dtype, dtype)
        return PredictiveSums(
            count=torch.zeros((), dtype=torch.int64),
            log_sum_probs=torch.full(logits.shape, -math.inf, dtype=accumulate, device=logits.device),
            sum_entropy=torch.zeros(logits.shape[:-1], dtype=accumulate, device=logits.device),
        )

    def update(state: PredictiveSums, logits: torch.Tensor, inplace: bool = False) -> tuple[PredictiveSums, None]:
        if not isinstance(logits, torch.Tensor) or logits.shape[1:] != state.log_sum_probs.shape:
            expected = ", ".join(map(str, state.log_sum_probs.shape))
            raise ValueError(f"update takes a chunk of logits of shape (k, {expected}) (the shape given to init, "
                             f"after a sample axis), got {_describe(logits)}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        check_finite(logits, "logits", first_sample=state.count, allow_negative_inf=True)  # before any write
        log_probs = torch.log_softmax(logits.detach().to(state.log_sum_probs.dtype), dim=-1)
        entropy = _entropy(log_probs).sum(0)
        chunk = log_probs[0] if logits.shape[0] == 1 else torch.logsumexp(log_probs, dim=0)
        if inplace:
            torch.logaddexp(state.log_sum_probs, chunk, out=state.log_sum_probs)
            state.sum_entropy.add_(entropy)
            state.count.add_(logits.shape[0])
            return state, None
        return PredictiveSums(state.count + logits.shape[0], torch.logaddexp(state.log_sum_probs, chunk),
                              state.sum_entropy + entropy), None

    return Transform(init=init, update=update, config={"dtype": dtype})


def decompose(sums: PredictiveSums) -> ClassificationUncertainty:
    r"""TU, AU and EU from the sums of :func:`predictive_sums`.

    .. math::
        \log\bar p = L - \log K, \quad TU = -\sum_y \bar p_y \log \bar p_y, \quad AU = S / K, \quad
        EU = \max(TU - AU, 0).

    Args:
        sums: a :class:`PredictiveSums` with at least one sample.

    Returns:
        A :class:`ClassificationUncertainty`.

    Raises:
        ValueError: no sample was accumulated (K = 0).

    Example:
        >>> import torch
        >>> from bayesflow.predictive import decompose, predictive_sums
        >>> sums = predictive_sums()
        >>> state, _ = sums.update(sums.init(torch.zeros(4)), torch.zeros(2, 4))  # two uniform samples, C = 4
        >>> u = decompose(state)
        >>> round(u.total.item(), 6), round(u.aleatoric.item(), 6), u.epistemic.item()  # log 4, log 4, 0
        (1.386294, 1.386294, 0.0)
    """
    count = int(sums.count)
    if count < 1:
        raise ValueError("no samples were accumulated (K = 0): call update with at least one sample first")
    log_predictive = sums.log_sum_probs - math.log(count)
    total = _entropy(log_predictive)
    aleatoric = sums.sum_entropy / count
    return ClassificationUncertainty(log_predictive, total, aleatoric, (total - aleatoric).clamp_min(0.0), count)


def classification_uncertainty(samples: Samples, *, num_samples: int | None = None, chunk_size: int | None = None,
                               dtype: torch.dtype | None = None) -> ClassificationUncertainty:
    r"""The posterior predictive :math:`\bar p(y|x)` and TU = AU + EU from K samples' logits, in one pass.

    Works for any output shape whose last axis is the classes: ``(K, B, C)`` for a classifier,
    ``(K, B, T, V)`` for a language model's next-token distributions (per token; reduce to sequences
    with :func:`~bayesflow.predictive.sequence_uncertainty`).

    Logits of ``-inf`` mask classes: such a class has probability 0 in that sample (:math:`0 \log 0 = 0`)
    and the results stay finite; a class masked in every sample gets a ``log_predictive`` of ``-inf``
    and leaves TU, AU and EU as they are without it. A row of ``-inf`` in every class (a padding token)
    has no distribution: its ``log_predictive``, TU, AU and EU are NaN, which
    :func:`~bayesflow.predictive.sequence_uncertainty` ignores under the mask. NaN and ``+inf`` logits
    are refused.

    Args:
        samples: the logits of the samples (any unnormalised log-probabilities: ``log_softmax`` is
            applied; for probabilities pass ``probs.log()``), as one of
            * a tensor ``(K, ..., C)`` (K-chain states, ensembles: one batched forward);
            * a function ``k -> (..., C)`` returning sample k's logits, with ``num_samples=K``
              (e.g. ``lambda k: model(draws[k], x)``): called once per k, never two samples alive;
            * an iterable of ``(..., C)`` tensors, one per sample (a generator over a trace, a list).
        num_samples: K, required for a function; a check for the others.
        chunk_size: for a tensor, samples per chunk: bounds the temporaries to a few chunk-sized
            tensors (None: all K at once).
        dtype: the accumulation dtype (see :func:`predictive_sums`).

    Returns:
        A :class:`ClassificationUncertainty`; its tensors are ``(...)`` (``log_predictive``: ``(..., C)``),
        detached (no autograd graph is kept across samples).

    Raises:
        TypeError: ``samples`` is not a tensor, function or iterable of tensors.
        ValueError: K = 0, no ``num_samples`` for a function (or the wrong one), samples of different
            shapes, a tensor without a sample and a class axis, an empty class axis, non-floating logits,
            or logits holding NaN or ``+inf`` (named by sample and index; ``-inf`` is allowed, see below).

    Example (a Bayesian last layer: 20 Gaussian draws of a (2, 3) weight, logits computed per draw):
        >>> import torch
        >>> from bayesflow.predictive import classification_uncertainty
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(8, 2, generator=g)
        >>> draws = torch.randn(20, 2, 3, generator=g)                   # e.g. from laplace / vi sample
        >>> u = classification_uncertainty(lambda k: x @ draws[k], num_samples=20)
        >>> stacked = classification_uncertainty(torch.einsum("bi,kic->kbc", x, draws), chunk_size=7)
        >>> u.epistemic.shape, torch.allclose(u.epistemic, stacked.epistemic, atol=1e-6)
        (torch.Size([8]), True)
        >>> bool((u.total >= u.aleatoric).all()), bool((u.epistemic <= torch.log(torch.tensor(3.0))).all())
        (True, True)
    """
    sums = predictive_sums(dtype)
    state = None
    for chunk in sample_chunks(samples, num_samples, chunk_size, name="samples"):
        if not chunk.is_floating_point():
            raise ValueError(f"logits must be floating point, got {chunk.dtype}")
        if chunk.ndim >= 2 and chunk.shape[-1] == 0:  # a distribution over no class: empty log_predictive
            raise ValueError(f"logits must have at least one class on their last axis, got shape "
                             f"{tuple(chunk.shape)}")
        if state is None:
            state = sums.init(chunk[0])
        state, _ = sums.update(state, chunk, inplace=True)
    return decompose(state)


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """:math:`-\\sum_y p_y \\log p_y` over the last axis, from log-probabilities; :math:`0 \\log 0 = 0`."""
    terms = log_probs.exp().mul_(log_probs)                       # in place: one temporary, plus a mask
    return -terms.masked_fill_(log_probs == -math.inf, 0.0).sum(-1)  # 0 · (-inf) := 0; NaN stays NaN


def _accumulation_dtype(logits_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    return logits_dtype if torch.finfo(logits_dtype).bits >= 32 else torch.float32


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
