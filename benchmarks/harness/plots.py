"""PNG plots from result files (matplotlib, Agg backend): speed vs size and accuracy vs gradients.

* ``speed_vs_size.png``: ratio ours / baseline against the problem size — the engine's rows, the
  optimizer and sampler presets and the compiled step against the parameter count, the ensembles
  against the chains K; a line
  per row label, the targets dotted, parity (1×) grey.
* ``accuracy_vs_gradients.png``: bench_accuracy's curves (the error of the chains' Var θ against the
  gradient evaluations per chain), a panel per sampler, bayesflow solid and posteriors dashed, each
  scheme's own bias dotted, the Monte-Carlo floor grey. (bench_mixing draws its own error-vs-gradients
  plot, ``mixing.png``.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parse_size(text: str) -> float | None:
    """The number in a size label: ``"1e6"`` -> 1e6, ``"1,000"`` -> 1000, ``"K=16"`` -> 16; None otherwise."""
    match = re.fullmatch(r"\s*(?:K\s*=\s*)?([0-9][0-9,]*(?:\.[0-9]+)?(?:e[0-9]+)?)\s*", str(text))
    return None if match is None else float(match.group(1).replace(",", ""))


_MEASURED = re.compile(r"\s*\(first step[^)]*\)")
"""Per-size measurements inside a row label (bench_compiled's compile time), left out of the line's label."""


def _series(rows: list[dict[str, Any]], keep) -> dict[str, list[tuple[float, float, float | None]]]:
    out: dict[str, list[tuple[float, float, float | None]]] = {}
    for r in rows:
        size = parse_size(r["size"])
        if r["unit"] != "s" or r["ratio"] is None or size is None or not keep(r["what"]):
            continue
        label = _MEASURED.sub("", r["what"]).replace("`", "")  # one line per row across sizes
        out.setdefault(label, []).append((size, r["ratio"], r["target"]))
    return {k: sorted(v) for k, v in out.items()}


def _panel(ax, series, title: str, xlabel: str) -> None:
    plt = _pyplot()
    colours = plt.get_cmap("tab20")
    for i, (label, points) in enumerate(series.items()):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=colours(i % 20),
                ls="--" if "reference" in label else "-", label=label)
    for target in sorted({p[2] for points in series.values() for p in points if p[2] is not None}):
        ax.axhline(target, color="k", ls=":", lw=0.8)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", title=title, xlabel=xlabel, ylabel="time ours / baseline")
    ax.title.set_fontsize(9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=5.5, loc="best")


def speed_vs_size(payloads: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """The ratio-vs-size figure from the engine, presets and ensemble payloads present; None if none is."""
    panels = []
    if "engine" in payloads:
        panels.append((_series(payloads["engine"]["rows"], lambda w: True), "engine: SGLD step / update, T = 0 SGD",
                       "parameters"))
    if "presets" in payloads:
        rows = payloads["presets"]["rows"]
        panels.append((_series(rows, lambda w: w.startswith("optim")), "optimizer presets (T = 0) vs torch.optim",
                       "parameters"))
        panels.append((_series(rows, lambda w: w.startswith("sgmcmc")), "sampler presets vs hand-written",
                       "parameters"))
    if "compiled" in payloads:
        panels.append((_series(payloads["compiled"]["rows"], lambda w: True), "compiled step (compile=True)",
                       "parameters"))
    if "ensemble" in payloads:
        panels.append((_series(payloads["ensemble"]["rows"], lambda w: True),
                       "ensembles: per-chain step vs hand-written bmm", "chains K"))
    panels = [p for p in panels if p[0]]
    if not panels:
        return None
    plt = _pyplot()
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.2 * rows), squeeze=False)
    for ax, (series, title, xlabel) in zip(axes.flat, panels):
        _panel(ax, series, title, xlabel)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def accuracy_vs_gradients(payload: dict[str, Any], path: Path) -> Path | None:
    """bench_accuracy's curves, a panel per sampler; None when the payload has no curves."""
    curves = payload.get("curves") or []
    if not curves:
        return None
    plt = _pyplot()
    panels = list(dict.fromkeys(c.get("panel", "") for c in curves))
    steps = sorted({c.get("lr") for c in curves if c.get("lr") is not None})
    colours = {lr: plt.get_cmap("tab10")(i) for i, lr in enumerate(steps)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for c in (c for c in curves if c.get("panel", "") == panel):
            colour = colours.get(c.get("lr"), "k")
            ax.plot(c["gradients"], c["value"], color=colour, lw=1.2,
                    ls="-" if c.get("library", "bayesflow") == "bayesflow" else "--", label=c["label"])
            if c.get("reference") is not None:
                ax.axhline(c["reference"], color=colour, ls=":", lw=0.8)
        if payload.get("curves_floor") is not None:
            ax.axhline(payload["curves_floor"], color="grey", lw=0.8, label="Monte-Carlo floor")
        ax.set(xscale="log", yscale=payload.get("curves_yscale", "linear"), title=panel,
               xlabel="gradient evaluations per chain")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(payload.get("curves_ylabel", "estimate"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def draw_all(payloads: dict[str, dict[str, Any]], directory: Path) -> list[Path]:
    """Every plot the payloads allow, written into ``directory``; the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [speed_vs_size(payloads, directory / "speed_vs_size.png")]
    if "accuracy" in payloads:
        written.append(accuracy_vs_gradients(payloads["accuracy"], directory / "accuracy_vs_gradients.png"))
    return [p for p in written if p is not None]
