r"""Local data for the seed-result notebooks and tests: generated "languages" and permuted tasks.

Nothing is downloaded. Two kinds of data, each a pure function of its seed:

* **Languages** for a causal language model: a first-order Markov chain over ``V`` symbols whose
  transition rows are ``softmax(sharpness · z)``, :math:`z \sim N(0, I)`: a large ``sharpness``
  gives a "grammar" in which each symbol is followed by a few likely successors. Two seeds give two
  languages over the same vocabulary with similar entropy rates: the in-distribution text (A) and
  the out-of-distribution text (B) of the OOD experiment, or the "books" of a continual run.
* **Permuted tasks** for continual learning (the permuted-MNIST protocol on synthetic inputs): an
  input :math:`x = P_k [z; 0]` puts a Gaussian signal :math:`z \in R^s` into ``dim`` coordinates
  (the rest are 0, like MNIST's empty border) and permutes them with task k's permutation
  :math:`P_k` (task 0: the identity); the label is the same linear teacher :math:`\arg\max_c (z^\top W)_c`
  in every task. A network can solve all tasks at once (their inputs occupy different coordinates),
  but training on task k alone overwrites what tasks < k needed: the setting in which SGD forgets.

Example:
    >>> from seed_data import markov_language, sample_text, permuted_tasks
    >>> language = markov_language(vocab_size=8, seed=0)
    >>> language.shape, language.dtype
    (torch.Size([8, 8]), torch.float64)
    >>> sample_text(language, num_sequences=3, length=5, seed=0).shape
    torch.Size([3, 5])
    >>> tasks = permuted_tasks(num_tasks=2, num_data=10, seed=0)
    >>> [(tuple(x.shape), tuple(y.shape)) for x, y in tasks]
    [((10, 100), (10,)), ((10, 100), (10,))]
"""

from __future__ import annotations

import math

import torch

__all__ = ["markov_language", "permuted_tasks", "sample_text", "sequence_nll"]


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def markov_language(vocab_size: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    r"""The transition matrix of a random first-order Markov "language" over ``vocab_size`` symbols.

    Row :math:`i` is :math:`p(x_{t+1} = \cdot \mid x_t = i) = \mathrm{softmax}(\text{sharpness} \cdot z_i)`
    with :math:`z_i \sim N(0, I_V)` drawn from ``seed``.

    Args:
        vocab_size: V ≥ 2.
        seed: the language (different seeds: different languages over the same symbols).
        sharpness: the scale of the logits; larger is more predictable text (lower entropy rate).

    Returns:
        A ``(V, V)`` float64 matrix whose rows sum to one.

    Raises:
        TypeError: a seed that is not an int.
        ValueError: ``vocab_size < 2`` or a non-positive ``sharpness``.

    Example:
        >>> from seed_data import markov_language
        >>> markov_language(4, seed=1).sum(-1)
        tensor([1.0000, 1.0000, 1.0000, 1.0000], dtype=torch.float64)
    """
    if _positive_int("vocab_size", vocab_size) < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    if not isinstance(sharpness, (int, float)) or isinstance(sharpness, bool) or not sharpness > 0:
        raise ValueError(f"sharpness must be a positive number, got {sharpness!r}")
    scores = torch.randn(vocab_size, vocab_size, generator=_generator(seed), dtype=torch.float64)
    return torch.softmax(sharpness * scores, dim=-1)


def sample_text(transitions: torch.Tensor, num_sequences: int, length: int, seed: int) -> torch.Tensor:
    r"""Sequences of a Markov language: the first symbol uniform, then :math:`x_{t+1} \sim p(\cdot \mid x_t)`.

    Args:
        transitions: ``(V, V)`` transition matrix (rows sum to one), e.g. :func:`markov_language`.
        num_sequences: how many sequences.
        length: symbols per sequence.
        seed: the draw.

    Returns:
        A ``(num_sequences, length)`` int64 tensor of symbols in ``[0, V)``.

    Raises:
        ValueError: a non-square or non-stochastic ``transitions``, or a non-positive count.

    Example:
        >>> from seed_data import markov_language, sample_text
        >>> text = sample_text(markov_language(5, seed=0), num_sequences=2, length=4, seed=0)
        >>> text.dtype, int(text.max()) < 5
        (torch.int64, True)
    """
    _check_transitions(transitions)
    _positive_int("num_sequences", num_sequences)
    _positive_int("length", length)
    generator = _generator(seed)
    vocab_size = transitions.shape[0]
    text = torch.empty(num_sequences, length, dtype=torch.int64)
    text[:, 0] = torch.randint(0, vocab_size, (num_sequences,), generator=generator)
    for t in range(1, length):   # length steps of one vectorised draw each
        text[:, t] = torch.multinomial(transitions[text[:, t - 1]], 1, generator=generator).squeeze(1)
    return text


def sequence_nll(transitions: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    r"""The true language's per-token NLL of each sequence, :math:`-\frac{1}{T-1}\sum_t \log p(x_{t+1} \mid x_t)`.

    The Bayes-optimal next-token loss on that very text (the first symbol, uniform, not counted): the
    floor a model trained on the language approaches.

    Args:
        transitions: ``(V, V)`` transition matrix.
        text: ``(n, T)`` symbols, ``T ≥ 2``.

    Returns:
        ``(n,)`` float64 mean NLL in nats.

    Example:
        >>> from seed_data import sequence_nll
        >>> sequence_nll(torch.full((2, 2), 0.5, dtype=torch.float64), torch.tensor([[0, 1, 1]]))  # log 2
        tensor([0.6931], dtype=torch.float64)
    """
    _check_transitions(transitions)
    if not isinstance(text, torch.Tensor) or text.ndim != 2 or text.shape[1] < 2:
        raise ValueError(f"text must be an (n, T) tensor of symbols with T >= 2, got {text!r}")
    return -transitions[text[:, :-1], text[:, 1:]].log().mean(-1)


def permuted_tasks(num_tasks: int, num_data: int, seed: int, dim: int = 100, signal_dim: int = 10,
                   num_classes: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    r"""Permuted classification tasks: :math:`x = P_k [z; 0]`, :math:`y = \arg\max_c (z^\top W)_c`.

    :math:`z \sim N(0, I_s)` (``signal_dim`` = s), ``W`` a ``(s, num_classes)`` Gaussian teacher shared
    by the tasks, :math:`P_0 = I` and :math:`P_k` a random permutation of the ``dim`` coordinates.

    Args:
        num_tasks: how many tasks.
        num_data: data per task (fresh inputs for every task).
        seed: the teacher, the permutations and the inputs.
        dim: input size (≥ ``signal_dim``); the coordinates beyond the signal are 0.
        signal_dim: s, the informative coordinates.
        num_classes: C ≥ 2.

    Returns:
        ``[(x, y), ...]``, one pair per task: x ``(num_data, dim)`` float32, y ``(num_data,)`` int64.

    Raises:
        ValueError: non-positive sizes, ``dim < signal_dim`` or ``num_classes < 2``.

    Example:
        >>> from seed_data import permuted_tasks
        >>> (x0, _), (x1, _) = permuted_tasks(num_tasks=2, num_data=5, seed=0)
        >>> int((x0 != 0).any(0).sum()), int((x1 != 0).any(0).sum())   # 10 informative coordinates each
        (10, 10)
    """
    for name, value in (("num_tasks", num_tasks), ("num_data", num_data), ("dim", dim),
                        ("signal_dim", signal_dim), ("num_classes", num_classes)):
        _positive_int(name, value)
    if dim < signal_dim:
        raise ValueError(f"dim ({dim}) must be at least signal_dim ({signal_dim})")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    generator = _generator(seed)
    teacher = torch.randn(signal_dim, num_classes, generator=generator)
    tasks = []
    for k in range(num_tasks):
        order = torch.arange(dim) if k == 0 else torch.randperm(dim, generator=generator)
        z = torch.randn(num_data, signal_dim, generator=generator)
        x = torch.zeros(num_data, dim)
        x[:, order[:signal_dim]] = z    # coordinate order[i] carries signal i
        tasks.append((x, (z @ teacher).argmax(-1)))
    return tasks


def _check_transitions(transitions) -> None:
    if (not isinstance(transitions, torch.Tensor) or transitions.ndim != 2
            or transitions.shape[0] != transitions.shape[1] or not transitions.is_floating_point()):
        raise ValueError(f"transitions must be a square floating (V, V) matrix, got {transitions!r}")
    if bool((transitions < 0).any()) or not torch.allclose(transitions.sum(-1), transitions.new_ones(()),
                                                            atol=1e-6 * math.sqrt(transitions.shape[0])):
        raise ValueError("transitions must be non-negative with rows summing to one")
