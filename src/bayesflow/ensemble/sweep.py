r"""Temperature sweeps in one batched run: the cold-posterior curve without a Python loop over T.

All temperatures (and replicas per temperature) are chains of one K-chain state. After burn-in,
every ``thin`` steps the chains' predictions on held-out data are averaged into each temperature's
posterior predictive :math:`\bar p(y|x) = \frac1S\sum_s p(y|x,θ_s)`, from which the runner reports

* log-likelihood :math:`\frac1n\sum_i \log \bar p(y_i|x_i)`,
* accuracy of :math:`\arg\max_y \bar p(y|x)`,
* expected calibration error (ECE, 15 equal-width confidence bins:
  :func:`bayesflow.metrics.expected_calibration_error`).

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

from collections.abc import Callable, Iterable, Sequence

import torch

from bayesflow.ensemble.chains import lift, replicate
from bayesflow.metrics import expected_calibration_error
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
        validation: iterable of ``(inputs, labels)`` held-out batches.
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
        ``num_samples`` (collected samples per chain), ``chains`` and ``predictive``, the posterior
        predictive probabilities on the concatenated validation inputs (n, classes).

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
    if steps < 1 or thin < 1 or chains_per_temperature < 1:
        raise ValueError("steps, thin and chains_per_temperature must be positive")
    burn_in = steps // 2 if burn_in is None else burn_in
    if not 0 <= burn_in < steps:
        raise ValueError(f"burn_in must be in [0, steps), got {burn_in}")
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
    validation = list(validation)
    batched_predict = torch.func.vmap(predict, in_dims=(0, None))
    sums = [None] * len(validation)
    collected = 0
    batches = _epochs(train)
    for step in _progress(range(steps), progress):
        state, _ = ensemble.update(state, next(batches), inplace=True)
        if step >= burn_in and (step - burn_in) % thin == 0:
            collected += 1
            with torch.no_grad():
                for b, (inputs, _) in enumerate(validation):
                    probs = batched_predict(state.params, inputs).softmax(-1)  # (K, n, classes)
                    sums[b] = probs if sums[b] is None else sums[b] + probs
    rows = []
    for i, temperature in enumerate(temperatures):
        chains = slice(i * replicas, (i + 1) * replicas)
        predictive = [s[chains].mean(0) / collected for s in sums]
        labels = torch.cat([labels for _, labels in validation])
        probs = torch.cat(predictive)
        picked = probs.gather(-1, labels.view(-1, 1)).squeeze(-1)
        rows.append({
            "temperature": temperature,
            "log_likelihood": picked.clamp_min(1e-300).log().mean().item(),
            "accuracy": (probs.argmax(-1) == labels).double().mean().item(),
            "ece": expected_calibration_error(probs, labels),
            "num_samples": collected,
            "chains": replicas,
            "predictive": probs,
        })
    return rows


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
