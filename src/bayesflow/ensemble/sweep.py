r"""Temperature sweeps in one batched run: the cold-posterior curve without a Python loop over T.

All temperatures (and replicas per temperature) are chains of one K-chain state. After burn-in,
every ``thin`` steps the chains' predictions on held-out data are averaged into each temperature's
posterior predictive :math:`\bar p(y|x) = \frac1S\sum_s p(y|x,θ_s)` — in log space,
:math:`\log \bar p = \operatorname{logsumexp}_s \operatorname{log\_softmax}(\ell_s) - \log S`, so a
confident mistake keeps its large, finite log-likelihood in float32 too — and scored with
:mod:`bayesflow.metrics`, the one implementation of these scores:

* log-likelihood :math:`\frac1n\sum_i \log \bar p(y_i|x_i)`, minus
  :func:`~bayesflow.metrics.negative_log_likelihood` of :math:`\log \bar p`;
* accuracy of :math:`\arg\max_y \bar p(y|x)`, :func:`~bayesflow.metrics.accuracy` of :math:`\log \bar p`;
* expected calibration error (ECE, 15 equal-width confidence bins:
  :func:`bayesflow.metrics.expected_calibration_error` of :math:`\bar p`).

With ``common_random_numbers`` replica j of every temperature shares one starting point and one noise
stream, so the differences between temperatures are not swamped by Monte-Carlo noise (two equal
temperatures give identical rows). The transform's temperature is replaced through its preset's
recipe (:func:`~bayesflow.ensemble.lift`): cSGLD keeps its exploration stage, ``beta`` its correction.

Example (a linear 3-class model ``w`` of shape (2, 3) on toy data):
    >>> import torch
    >>> from bayesflow.ensemble import plot_sweep, sweep
    >>> from bayesflow.sgmcmc import sghmc
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = torch.randn(64, 2, generator=g), torch.randint(0, 3, (64,), generator=g)
    >>> train_batches, (x_val, y_val), params = [(x[:32], y[:32])], (x[32:], y[32:]), torch.zeros(2, 3)
    >>> def model_logits(w, inputs):
    ...     return inputs @ w
    >>> def log_posterior(w, batch):
    ...     return -torch.nn.functional.cross_entropy(model_logits(w, batch[0]), batch[1]), None
    >>> rows = sweep(sghmc.build(log_posterior, lr=1e-2), temperatures=[0.0, 1e-3, 1e-2],
    ...              params=params, train=train_batches, steps=200, predict=model_logits,
    ...              validation=[(x_val, y_val)], progress=False)
    >>> [row["temperature"] for row in rows]
    [0.0, 0.001, 0.01]
    >>> figure = plot_sweep(rows, "log_likelihood")  # path="cold_posterior.png" saves it
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from bayesflow.ensemble.chains import lift, replicate
from bayesflow.metrics import accuracy, expected_calibration_error, negative_log_likelihood
from bayesflow.tree import tree_map
from bayesflow.types import TensorTree, Transform

__all__ = ["sweep"]


def sweep(transform: Transform, temperatures: Sequence[float], params: TensorTree, train: Iterable,
          steps: int, predict: Callable, validation: Iterable, *, chains_per_temperature: int = 1,
          common_random_numbers: bool = True, burn_in: int | None = None, thin: int = 10,
          perturbation: float | Callable | None = None, seed: int = 0, progress: bool = True) -> list[dict]:
    """Run every temperature as chains of one batched run and score their posterior predictives.

    Args:
        transform: an engine transform (sampler preset); its temperature is replaced per chain, through
            the preset's own rules (see :func:`~bayesflow.ensemble.lift`).
        temperatures: the temperatures to compare (per-datum convention: 1/num_data is Bayes).
        params: initial parameters of one chain (replicated, optionally perturbed).
        train: a re-iterable of training batches (a DataLoader, a list), iterated afresh every epoch
            (a DataLoader reshuffles) until ``steps`` updates are done.
        steps: number of updates.
        predict: ``predict(params, inputs) -> logits`` for one chain (vmapped over chains).
        validation: iterable of ``(inputs, labels)`` held-out batches, at least one.
        chains_per_temperature: replicas per temperature.
        common_random_numbers: replica j of every temperature starts from the same point and uses the
            same noise seed.
        burn_in: steps before collecting (default: half of ``steps``).
        thin: collect every ``thin`` steps after burn-in.
        perturbation: passed to :func:`~bayesflow.ensemble.chains.replicate` for initial points.
        seed: base seed.
        progress: show a tqdm progress bar when tqdm is installed.

    Returns:
        One dict per temperature: ``temperature``, ``log_likelihood``, ``accuracy``, ``ece``,
        ``num_samples`` (collected samples per chain), ``chains``, ``log_predictive``, the log posterior
        predictive on the concatenated validation inputs (n, classes), and ``predictive``, its ``exp``.
        The scores are those of :mod:`bayesflow.metrics` on these tensors: ``log_likelihood`` is
        ``-negative_log_likelihood(log_predictive, labels)``, ``accuracy`` is
        ``accuracy(log_predictive, labels)`` and ``ece`` is ``expected_calibration_error(predictive, labels)``.
        The predictive is accumulated in the logits' dtype (float32 for narrower ones).

    Raises:
        TypeError: ``validation`` is not an iterable of ``(inputs, labels)`` pairs (checked before the run).
        ValueError: no temperature, ``steps``, ``thin`` or ``chains_per_temperature`` below 1, ``burn_in``
            outside ``[0, steps)``, ``validation`` without batches (checked before the run), ``train``
            without batches, ``predict`` returning NaN or ``+inf``
            logits (naming the step and the temperatures), and the errors of the metrics (labels).

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import sweep
        >>> from bayesflow.sgmcmc import sgld
        >>> x, y = torch.randn(32, 2), torch.randint(0, 3, (32,))  # toy 3-class data; w is a (2, 3) linear model
        >>> log_posterior = lambda w, batch: (-torch.nn.functional.cross_entropy(batch[0] @ w, batch[1]), None)
        >>> rows = sweep(sgld.build(log_posterior, lr=1e-2), [0.0, 1 / 32], torch.zeros(2, 3), train=[(x, y)],
        ...              steps=20, predict=lambda w, inputs: inputs @ w, validation=[(x, y)], progress=False)
        >>> [row["temperature"] for row in rows], rows[0]["predictive"].shape
        ([0.0, 0.03125], torch.Size([32, 3]))
    """
    temperatures = [float(t) for t in temperatures]
    if not temperatures:
        raise ValueError("sweep needs at least one temperature")
    for name, value in (("steps", steps), ("thin", thin), ("chains_per_temperature", chains_per_temperature)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    burn_in = steps // 2 if burn_in is None else burn_in
    if not isinstance(burn_in, int) or isinstance(burn_in, bool) or not 0 <= burn_in < steps:
        raise ValueError(f"burn_in must be an int in [0, steps) = [0, {steps}), got {burn_in!r}")
    validation = _validation_batches(validation)  # before any step: a bad set would fail only after the run
    replicas = chains_per_temperature
    num_chains = len(temperatures) * replicas
    per_chain_t = torch.tensor([t for t in temperatures for _ in range(replicas)], dtype=torch.float64)
    seeds = [seed + (j if common_random_numbers else i * replicas + j)
             for i in range(len(temperatures)) for j in range(replicas)]
    ensemble = lift(transform, num_chains, temperature=per_chain_t)
    if common_random_numbers:  # replica j's start, shared by every temperature
        start = tree_map(lambda leaf: leaf.repeat(len(temperatures), *([1] * (leaf.ndim - 1))),
                         replicate(params, replicas, perturbation=perturbation, seed=seed))
    else:
        start = replicate(params, num_chains, perturbation=perturbation, seed=seed)
    state = ensemble.init(start, seed=seeds)
    batched_predict = torch.func.vmap(predict, in_dims=(0, None))
    log_sums = [None] * len(validation)  # per batch, (K, n, classes): logsumexp over the collected samples
    collected = 0
    batches = _epochs(train)
    for step in _progress(range(steps), progress):
        state, _ = ensemble.update(state, next(batches), inplace=True)
        if step >= burn_in and (step - burn_in) % thin == 0:
            collected += 1
            with torch.no_grad():
                for b, (inputs, _) in enumerate(validation):
                    logits = batched_predict(state.params, inputs)  # (K, n, classes)
                    _check_logits(logits, step, per_chain_t)
                    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
                    log_sums[b] = log_probs if log_sums[b] is None else torch.logaddexp(log_sums[b], log_probs)
    labels = torch.cat([labels for _, labels in validation])
    rows = []
    for i, temperature in enumerate(temperatures):
        chains = slice(i * replicas, (i + 1) * replicas)
        log_predictive = torch.cat([torch.logsumexp(s[chains], dim=0) for s in log_sums]) \
            - math.log(replicas * collected)
        probs = log_predictive.exp()
        rows.append({
            "temperature": temperature,
            "log_likelihood": -negative_log_likelihood(log_predictive, labels),
            "accuracy": accuracy(log_predictive, labels),
            "ece": expected_calibration_error(probs, labels),
            "num_samples": collected,
            "chains": replicas,
            "log_predictive": log_predictive,
            "predictive": probs,
        })
    return rows


def _validation_batches(validation: Iterable) -> list:
    """``validation`` as a list of ``(inputs, labels)`` pairs, refusing an empty set and non-pairs.

    An empty set has no predictive to score (``torch.cat`` of no labels fails after the whole run), and
    a bare ``(inputs, labels)`` tuple in place of a list of them would be read as two batches.
    """
    if isinstance(validation, torch.Tensor) or not isinstance(validation, Iterable):
        raise TypeError(f"validation must be an iterable of (inputs, labels) batches, got "
                        f"{type(validation).__name__}")
    batches = list(validation)
    if not batches:
        raise ValueError("validation has no batches: give at least one (inputs, labels) pair, e.g. "
                         "validation=[(x_val, y_val)]")
    for b, batch in enumerate(batches):
        if not (isinstance(batch, tuple | list) and len(batch) == 2):
            got = f"a {type(batch).__name__} of length {len(batch)}" if isinstance(batch, tuple | list) \
                else type(batch).__name__
            raise TypeError(f"validation batch {b} must be an (inputs, labels) pair, got {got} (a single "
                            "batch goes in a list: validation=[(x_val, y_val)])")
    return batches


def _check_logits(logits: torch.Tensor, step: int, per_chain_t: torch.Tensor) -> None:
    """Refuse NaN and +inf logits (``-inf`` masks a class), naming the step and the chains' temperatures."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim < 3:
        got = (f"a {logits.dtype} tensor of shape {tuple(logits.shape[1:])}" if isinstance(logits, torch.Tensor)
               else type(logits).__name__)
        raise ValueError(f"predict must return one chain's floating logits of shape (n, classes), got {got}")
    allowed = logits < math.inf  # False for NaN and +inf
    if bool(allowed.all()):
        return
    bad = (~allowed).flatten(1).any(1).nonzero().flatten().tolist()
    raise ValueError(f"predict returned NaN or +inf logits at step {step} for chains {bad} (temperatures "
                     f"{sorted({per_chain_t[k].item() for k in bad})}): the validation predictions overflowed "
                     "— lower the step size or the temperature, or compute the logits in a wider dtype")


def _epochs(train: Iterable):
    """The batches of ``train``, iterated afresh every epoch (itertools.cycle would replay — and hold in
    memory — the first epoch)."""
    while True:
        empty = True
        for batch in train:
            empty = False
            yield batch
        if empty:
            raise ValueError("train yielded no batches: give a re-iterable of batches (a DataLoader or a list; "
                             "a one-shot iterator is exhausted after its first epoch)")


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc="sweep", leave=False)
