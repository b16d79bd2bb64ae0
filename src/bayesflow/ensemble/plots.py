"""Plot helpers (matplotlib is optional: ``pip install bayesflow[extras]``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["plot_sweep", "trace_plot"]


def _pyplot():
    try:
        # no backend is chosen here: matplotlib falls back to Agg without a display, and a notebook
        # keeps its inline backend (forcing Agg would silence every later figure of the notebook)
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plotting needs matplotlib: pip install 'bayesflow[extras]'") from error
    return plt


def plot_sweep(rows: Sequence[dict], metric: str = "log_likelihood", path: str | None = None,
               num_data: int | None = None):
    """The metric-vs-temperature curve of :func:`~bayesflow.ensemble.sweep.sweep` (cold-posterior plot).

    Args:
        rows: the sweep's result rows.
        metric: a key of the rows (``log_likelihood``, ``accuracy``, ``ece``).
        path: where to save the figure (PNG/PDF by extension); None returns the figure only.
        num_data: if given, the x axis shows N·T (1 is the Bayes posterior) instead of T.

    Example:
        >>> from bayesflow.ensemble import plot_sweep
        >>> rows = [{"temperature": t, "log_likelihood": ll} for t, ll in [(1e-4, -0.52), (1e-3, -0.41), (1e-2, -0.47)]]
        >>> figure = plot_sweep(rows, "log_likelihood", num_data=1000)  # path="cold_posterior.png" saves it
        >>> figure.axes[0].get_xlabel()
        'N·T'
    """
    if not rows or metric not in rows[0]:
        raise ValueError(f"rows must be non-empty sweep results with key {metric!r}")
    plt = _pyplot()
    scale = num_data or 1
    xs = [row["temperature"] * scale for row in rows]
    ys = [row[metric] for row in rows]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(xs, ys, marker="o")
    if all(x > 0 for x in xs) and max(xs) / min(xs) > 20:
        axis.set_xscale("log")
    axis.set_xlabel("N·T" if num_data else "temperature T")
    axis.set_ylabel(metric.replace("_", " "))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure


def trace_plot(samples: torch.Tensor, path: str | None = None, names: Sequence[str] | None = None):
    """Trace plots of (chains, draws, parameters) samples, one panel per parameter.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import trace_plot
        >>> figure = trace_plot(torch.randn(4, 200, 2), names=["mu", "log_sigma"])  # (chains, draws, parameters)
        >>> len(figure.axes)
        2
    """
    if samples.ndim != 3:
        raise ValueError(f"samples must be (chains, draws, parameters), got shape {tuple(samples.shape)}")
    plt = _pyplot()
    count = samples.shape[-1]
    figure, axes = plt.subplots(count, 1, figsize=(6, 1.8 * count), squeeze=False)
    for p in range(count):
        for chain in samples[:, :, p].detach().cpu():
            axes[p, 0].plot(chain.numpy(), linewidth=0.7)
        axes[p, 0].set_ylabel(names[p] if names else f"θ[{p}]")
    axes[-1, 0].set_xlabel("draw")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path)
    return figure
