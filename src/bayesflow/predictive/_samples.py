"""Where posterior samples' outputs come from: one tensor with a leading sample axis, a function of the
sample index, or an iterable of per-sample outputs — read here as a stream of chunks ``(k, ...)``.

Every method ends in the same place: K-chain states and ensembles give a ``(K, ...)`` tensor in one
batched forward, SG-MCMC traces, VI/Laplace/SWAG draws give one sample at a time. A stream keeps at
most one chunk alive, so a ``(K, B, T, V)`` language-model output need never exist whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

Samples = torch.Tensor | Callable[[int], torch.Tensor] | Iterable[torch.Tensor]
"""A ``(K, ...)`` tensor, a function ``k -> (...)`` (with ``num_samples=K``) or an iterable of ``(...)`` tensors."""


def sample_chunks(samples: Samples, num_samples: int | None = None, chunk_size: int | None = None,
                  name: str = "samples") -> Iterator[torch.Tensor]:
    """Yield ``samples`` as chunks with a leading sample axis, checking that every sample has one shape.

    Args:
        samples: a ``(K, ...)`` tensor; a callable ``k -> (...)`` tensor of sample k (``num_samples``
            required); or an iterable (list, generator) of ``(...)`` tensors, one per sample.
        num_samples: K for a callable; for an iterable, the count it must yield (None: any).
        chunk_size: samples per chunk of a tensor (None: the whole tensor at once). Callables and
            iterables are read one sample at a time.
        name: what to call ``samples`` in error messages.

    Raises:
        TypeError: ``samples`` is none of the three, or yields something that is not a tensor.
        ValueError: K = 0, ``num_samples`` is missing or wrong, ``chunk_size < 1``, or the samples'
            shapes differ.
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                    or num_samples < 1):
        raise ValueError(f"num_samples must be a positive int (K >= 1), got {num_samples!r}")
    if isinstance(samples, torch.Tensor):
        yield from _tensor_chunks(samples, num_samples, chunk_size, name)
    elif callable(samples):
        if num_samples is None:
            raise ValueError(f"{name} is a function of the sample index: pass num_samples=K as well")
        shape = None
        for k in range(num_samples):
            sample = samples(k)
            shape = _check_sample(sample, k, shape, name)
            yield sample.unsqueeze(0)
            del sample  # before sample k + 1 is made: one sample alive at a time
    elif isinstance(samples, Iterable) and not isinstance(samples, (str, bytes, dict)):
        shape, count = None, 0
        for count, sample in enumerate(samples, start=1):
            shape = _check_sample(sample, count - 1, shape, name)
            yield sample.unsqueeze(0)
            del sample
        if count == 0:
            raise ValueError(f"{name} yielded no samples: K must be at least 1")
        if num_samples is not None and count != num_samples:
            raise ValueError(f"{name} yielded {count} samples, num_samples says {num_samples}")
    else:
        raise TypeError(f"{name} must be a (K, ...) tensor, a function of the sample index or an iterable of "
                        f"tensors, got {type(samples).__name__}")


def _tensor_chunks(samples: torch.Tensor, num_samples: int | None, chunk_size: int | None,
                   name: str) -> Iterator[torch.Tensor]:
    if samples.ndim < 2:
        raise ValueError(f"{name} must have a leading sample axis and a class (or output) axis, "
                         f"got shape {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise ValueError(f"{name} has no samples (shape {tuple(samples.shape)}): K must be at least 1")
    if num_samples is not None and samples.shape[0] != num_samples:
        raise ValueError(f"{name} has {samples.shape[0]} samples on its leading axis, num_samples says {num_samples}")
    yield from samples.split(chunk_size or samples.shape[0])


def _check_sample(sample, k: int, shape: torch.Size | None, name: str) -> torch.Size:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample {k} of {name} must be a tensor, got {type(sample).__name__}")
    if sample.ndim < 1:
        raise ValueError(f"sample {k} of {name} must have a class (or output) axis, got a scalar")
    if shape is not None and sample.shape != shape:
        raise ValueError(f"sample {k} of {name} has shape {tuple(sample.shape)}, sample 0 has {tuple(shape)}")
    return sample.shape


def check_finite(values: torch.Tensor, name: str, *, first_sample: int | torch.Tensor = 0,
                 allow_negative_inf: bool = False) -> None:
    """Refuse NaN and infinite entries of a chunk ``(k, ...)`` of samples, naming the first one's sample and index.

    When every entry is allowed this costs one elementwise comparison and one ``.all()`` (one host
    sync); the counts and the position are computed only for the error message. The test is
    ``isfinite`` (or ``values < inf`` with ``allow_negative_inf``): false for NaN, unlike ``values < 0``.

    Args:
        values: a chunk of samples, the sample axis first.
        name: what to call ``values`` in the message (``"logits"``, ``"means"``, ...).
        first_sample: the index of the chunk's first sample in the whole stream (a count tensor is
            read only for the message).
        allow_negative_inf: let ``-inf`` through (masked classes of logits).

    Raises:
        ValueError: ``values`` holds NaN, ``+inf`` or (unless allowed) ``-inf``.
    """
    allowed = values < math.inf if allow_negative_inf else torch.isfinite(values)
    if bool(allowed.all()):
        return
    refused, first_sample = ~allowed, int(first_sample)
    index = torch.nonzero(refused)[0].tolist()
    value = values[tuple(index)].item()
    counts = {"NaN": int(torch.isnan(values).sum()), "+inf": int((values == math.inf).sum())}
    if not allow_negative_inf:
        counts["-inf"] = int((values == -math.inf).sum())
    summary = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count)
    last = first_sample + values.shape[0] - 1
    rule = "finite or -inf (a masked class); NaN and +inf are not allowed" if allow_negative_inf else "finite"
    raise ValueError(f"{name} must be {rule}: sample {first_sample + index[0]} holds {value} at index "
                     f"{tuple(index[1:])} ({summary} among samples {first_sample}..{last})")
