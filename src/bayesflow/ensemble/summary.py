"""Summaries of R-hat and ESS for large models, and export to ArviZ.

Example:
    >>> import torch
    >>> from bayesflow.ensemble import format_summary, summary
    >>> table = summary({"w": torch.randn(4, 1000, 10, 3, generator=torch.Generator().manual_seed(0))})
    >>> print(format_summary(table))  # doctest: +ELLIPSIS
    leaf  size  rhat_max  rhat_q05  rhat_q50  ...
    w     30    1.00...
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import optree
import torch

from bayesflow.ensemble.diagnostics import ess, rhat
from bayesflow.tree import flatten
from bayesflow.types import TensorTree

__all__ = ["format_summary", "summary", "to_inference_data"]



def _quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear (type 7) quantiles of the non-NaN values, +inf kept (``torch.nanquantile`` makes inf - inf NaN)."""
    v = values[~values.isnan()].sort().values
    if not v.numel():
        return torch.full_like(q, math.nan)
    pos = q * (v.numel() - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    low, high = v[lo], v[hi]
    return torch.where(low == high, low, low + (pos - lo) * (high - low))


def _leaf_names(tree: TensorTree) -> list[str]:
    paths, _, _ = optree.tree_flatten_with_path(tree, none_is_leaf=False, namespace="bayesflow")
    return [".".join(str(p) for p in path) or "params" for path in paths]


def summary(
    samples: TensorTree,
    quantiles: Sequence[float] = (0.05, 0.5, 0.95),
    *,
    threshold: float = 1.01,
    chunk_size: int | None = None,
) -> dict[str, dict[str, float]]:
    r"""Per-leaf summary of R-hat and ESS for large models: quantiles over the leaf's parameters.

    For each leaf (parameter group) with parameters :math:`i = 1..P` it reports the quantiles
    :math:`q` (and the extremes) of :math:`\{\hat R_i\}` (``"rank"``), :math:`\{\mathrm{ESS}^{bulk}_i\}` and
    :math:`\{\mathrm{ESS}^{tail}_i\}`, and the fraction of parameters with :math:`\hat R_i > ` ``threshold``.
    NaN R-hats (constant parameters, non-finite draws) are left out of the quantiles and counted in
    ``"rhat_nan"``; they and the ``+inf`` ones (chains stuck at different values) count as flagged in
    ``"frac_rhat_above"`` (the fraction with :math:`\neg(\hat R_i \le` ``threshold``:math:`)`), and
    ``"rhat_max"`` is ``inf`` when any R-hat is.

    Args:
        samples: a tensor shaped ``(chains, draws, *param_shape)`` or a tree of them.
        quantiles: the levels to report, in [0, 1]; keys are ``rhat_q05``, ``ess_bulk_q50``, ...
        threshold: the R-hat level counted in ``"frac_rhat_above"`` (1.01 as Vehtari et al. advise).
        chunk_size: see :func:`rhat`.

    Returns:
        ``{leaf path: {"size", "rhat_max", "rhat_q.."..., "frac_rhat_above", "rhat_nan",
        "ess_bulk_min", "ess_bulk_q.."..., "ess_tail_min", "ess_tail_q.."...}}`` with float values
        (``pandas.DataFrame(summary(samples)).T`` makes it a table; :func:`format_summary` prints it).

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import format_summary, summary
        >>> samples = {"w": torch.randn(4, 500, 100, generator=torch.Generator().manual_seed(0))}
        >>> table = summary(samples)  # 4 chains of 500 draws of 100 parameters
        >>> table["w"]["size"], table["w"]["rhat_max"] < 1.01
        (100.0, True)
        >>> print(format_summary(table))  # doctest: +ELLIPSIS
        leaf  size  rhat_max  rhat_q05  rhat_q50  ...
        w     100   1.0058    0.9994    1.0006    ...
        >>> x = torch.randn(4, 200, 3, generator=torch.Generator().manual_seed(0))
        >>> x[:2, :, 0], x[2:, :, 0], x[..., 1] = 0.0, 1.0, 2.0  # parameter 0 stuck at 0 and 1; 1 constant
        >>> row = summary(x)["params"]
        >>> row["rhat_max"], row["frac_rhat_above"], row["rhat_nan"]
        (inf, 0.6666666666666666, 1.0)
    """
    levels = [float(q) for q in quantiles]
    if any(not 0 <= q <= 1 for q in levels):
        raise ValueError(f"quantiles must lie in [0, 1], got {tuple(quantiles)}")
    r_leaves, _ = flatten(rhat(samples, chunk_size=chunk_size))
    bulk, _ = flatten(ess(samples, "bulk", chunk_size=chunk_size))
    tail, _ = flatten(ess(samples, "tail", chunk_size=chunk_size))
    q = torch.tensor([*levels, 0.0, 1.0], dtype=torch.float64)
    out = {}
    for name, r, b, t in zip(_leaf_names(samples), r_leaves, bulk, tail):
        r, b, t = (v.reshape(-1).double() for v in (r, b, t))
        row: dict[str, float] = {"size": float(r.numel())}
        qr, qb, qt = (_quantiles(v, q) for v in (r, b, t))
        row["rhat_max"] = float(qr[-1])
        row.update({f"rhat_q{round(100 * lv):02d}": float(v) for lv, v in zip(levels, qr)})
        row["frac_rhat_above"] = float((~(r <= threshold)).double().mean()) if r.numel() else math.nan  # NaN too
        row["rhat_nan"] = float(r.isnan().sum())
        for key, qv in (("ess_bulk", qb), ("ess_tail", qt)):
            row[f"{key}_min"] = float(qv[-2])
            row.update({f"{key}_q{round(100 * lv):02d}": float(v) for lv, v in zip(levels, qv)})
        out[name] = row
    return out


def format_summary(table: dict[str, dict[str, float]]) -> str:
    """Render :func:`summary`'s output as a fixed-width text table, one row per leaf.

    R-hat columns get 4 decimals (1.01 vs 1.005 matters), ESS columns whole numbers.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import format_summary, summary
        >>> samples = {"w": torch.randn(4, 500, 100, generator=torch.Generator().manual_seed(0))}
        >>> print(format_summary(summary(samples)))  # doctest: +ELLIPSIS
        leaf  size  rhat_max  rhat_q05  rhat_q50  ...
        w     100   1.0058    0.9994    1.0006    ...
    """
    if not table:
        return ""
    columns = list(next(iter(table.values())))

    def cell(column: str, value: float) -> str:
        if math.isnan(value):
            return "nan"
        if column == "frac_rhat_above":
            return f"{value:.3f}"
        if column.startswith("rhat_") and column != "rhat_nan":
            return f"{value:.4f}"
        return f"{value:.0f}" if column.startswith("ess_") or column in ("size", "rhat_nan") else f"{value:.4g}"

    rows = [["leaf", *columns]] + [[name] + [cell(c, row[c]) for c in columns] for name, row in table.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(text.ljust(w) for text, w in zip(r, widths)).rstrip() for r in rows)


def to_inference_data(samples: TensorTree, *, sample_stats: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Export chains to ArviZ (``arviz.from_dict``) for its plots and diagnostics.

    Each leaf (shape ``(chains, draws, *param_shape)``) becomes a posterior variable named by its path in
    the tree (``"layer.weight"``; ``"params"`` for a bare tensor). With arviz < 1 the result is an
    ``InferenceData``; with arviz ≥ 1 it is the ``xarray.DataTree`` that ``arviz.from_dict`` returns there.

    Args:
        samples: a tensor shaped ``(chains, draws, *param_shape)`` or a tree of them.
        sample_stats: optional ``{name: (chains, draws) tensor}`` (e.g. the log posterior of every draw).
        **kwargs: passed on to ``arviz.from_dict`` (``coords``, ``dims``, ...).

    Raises:
        ImportError: arviz is not installed (``pip install arviz``).

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import to_inference_data
        >>> import arviz  # doctest: +SKIP
        >>> idata = to_inference_data({"w": torch.randn(4, 100, 3)})  # doctest: +SKIP
        >>> arviz.summary(idata)  # doctest: +SKIP
    """
    try:
        import arviz
    except ImportError as error:
        raise ImportError(
            "to_inference_data needs the optional dependency arviz; install it with `pip install arviz`"
        ) from error
    leaves, _ = flatten(samples)
    posterior = {name: torch.as_tensor(leaf).detach().cpu().numpy() for name, leaf in zip(_leaf_names(samples),
                                                                                           leaves)}
    stats = None if sample_stats is None else {k: torch.as_tensor(v).detach().cpu().numpy()
                                               for k, v in sample_stats.items()}
    if "posterior" in inspect.signature(arviz.from_dict).parameters:  # arviz < 1
        return arviz.from_dict(posterior=posterior, sample_stats=stats, **kwargs)
    groups = {"posterior": posterior} | ({} if stats is None else {"sample_stats": stats})
    return arviz.from_dict(groups, **kwargs)
