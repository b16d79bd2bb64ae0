"""The mixing benchmark's markdown tables and plot (error vs gradient evaluations), from its JSON payload.

Example:
    >>> from mixing_report import fmt
    >>> fmt(0.01234), fmt(None), fmt(float("inf"))
    ('0.0123', '—', 'diverged')
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["fmt", "markdown", "plot"]


def fmt(value, digits: int = 3) -> str:
    """A metric with ``digits`` significant digits; '—' for None, 'diverged' for a non-finite value."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return "diverged"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _best_of(configs: dict, library: str, key: str = "w2"):
    """(value, name, configuration) of the library's best configuration by pooled ``"w2"`` or ``"w2_chain"``."""
    field = "best" if key == "w2" else "best_per_chain"
    rows = [(c[field][key], name, c) for name, c in configs.items() if c["library"] == library and c.get(field)]
    return min(rows, key=lambda r: r[0]) if rows else None


def _setting(best: dict) -> str:
    text = f"u={best['u']:.3g}, h={best['step']:.3g}"
    if best["friction"] is not None:
        text += f", α={best['friction']:.3g} (f={best['friction_factor']:g})"
    return text


def _cell(best) -> str:
    return "—" if best is None else f"{fmt(best[0])} ({best[2]['name']})"


def markdown(payload: dict) -> str:
    """A summary table (as issue 15's) and one table per target with every configuration's best setting.

    Two scales of the same metric: **pooled** (the Gaussian fit of all chains' samples) and **per chain**
    (the mean over chains of each chain's own fit, 18 000 samples: the scale of issue 15's numbers, whose
    iid floors it reproduces); goals are judged per chain. "MC part" is the error a chain with the
    measured ESS would show from Monte-Carlo noise alone, ≈ pooled floor / √(ESS per sample).
    """
    p = payload["protocol"]
    lines = [f"Mixing benchmark (issue 15){' — QUICK smoke run, sizes too small to judge' if payload['quick'] else ''}:"
             f" {p['chains']} chains × {p['budget']:,} gradient evaluations ({p['burn_in']:,} burn-in), best of "
             f"{p['steps']} log-spaced steps × {len(p['frictions'])} frictions (momentum methods); "
             "W2(Gaussian fit of the samples, exact posterior)/√tr Σ, pooled over chains and per chain (the mean "
             "of each chain's own; the scale of issue 15's table, goals judged on it). Measured "
             f"{payload['machine']['date']}, torch {payload['machine']['torch']}"
             + (f", posteriors {payload['machine']['posteriors']}" if "posteriors" in payload["machine"] else "")
             + (f", bayesflow {payload['bayesflow']['commit'][:10]}" if payload.get("bayesflow", {}).get("commit")
                else "") + ".", ""]
    lines += [f"Note: {note}" for note in payload.get("skipped", [])]
    lines += [f"Re-measured {u['date']} (bayesflow {str(u.get('commit') or '?')[:10]}, same protocol and seeds, "
              f"`--update`): {', '.join(u['configurations'])} on {', '.join(u['targets'])}."
              + (f" ({u['note']})" if u.get("note") else "") for u in payload.get("updates", [])]
    lines += ["| target | bayesflow best, per chain | posteriors best, per chain | iid floor, per chain | goal | met | "
              "pooled: bayesflow / posteriors / floor | issue: bayesflow / posteriors / floor |",
              "| --- | --- | --- | ---: | ---: | :---: | --- | --- |"]
    for name, t in payload["targets"].items():
        configs, floor, issue = t["configurations"], t["floor"], t["issue"]
        ours = _best_of(configs, "bayesflow", "w2_chain")
        met = "—" if ours is None else ("✅" if ours[0] <= t["goal"] else "❌")
        pooled = " / ".join([_cell(_best_of(configs, "bayesflow")), _cell(_best_of(configs, "posteriors")),
                             fmt(floor["w2"])])
        lines.append(f"| ({name}) {t['title']} | {_cell(ours)} | {_cell(_best_of(configs, 'posteriors', 'w2_chain'))} "
                     f"| {fmt(floor['w2_chain'])} | ≤ {t['goal']:g} | {met} | {pooled} | {issue['bayesflow_best']:g} / "
                     f"{issue['posteriors_best']:g} / {issue['iid_floor']:g} |")
    for name, t in payload["targets"].items():
        floor = t["floor"]
        lines += ["", f"**({name}) {t['title']}** — reference: {t['reference']}; iid floor pooled {fmt(floor['w2'])} "
                  f"(± {fmt(floor['w2_sd'], 2)}), per chain {fmt(floor['w2_chain'])}; goal ≤ {t['goal']:g} per chain",
                  "", "| configuration | per chain (best) | its setting | pooled (best) | its setting | MC part | "
                  "ESS/grad | mean bias | trace bias | note |",
                  "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        ranked = sorted(t["configurations"].items(), key=lambda kv: kv[1]["best_per_chain"]["w2_chain"]
                        if kv[1].get("best_per_chain") else math.inf)
        for config, c in ranked:
            b, bc = c["best"], c.get("best_per_chain")
            if b is None:
                lines.append(f"| {config} | diverged | | | | | | | | every setting diverged |")
                continue
            extra = [f"{c['grads_per_step']} gradients/step"] if c["grads_per_step"] > 1 else []
            if b.get("setup_gradients"):
                extra.append(f"setup {b['setup_gradients']:.0f} gradients (from the burn-in)")
            note = "; ".join(c["notes"] + extra)
            mc = floor["w2"] / math.sqrt(b["ess_per_gradient"] * c["grads_per_step"]) if b["ess_per_gradient"] > 0 \
                else math.inf
            lines.append(f"| {config} | {fmt(bc['w2_chain'])} | {_setting(bc)} | {fmt(b['w2'])} | {_setting(b)} | "
                         f"{fmt(mc, 2)} | {fmt(b['ess_per_gradient'], 2)} | {fmt(b['mean_bias'], 2)} | "
                         f"{b['trace_bias']:+.3f} | {note} |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> Path | None:
    """Error (pooled W2/√tr Σ) of each configuration's pooled-best setting vs gradient evaluations, one panel
    per target, with the iid floor; None (nothing written) without matplotlib. (The goals are on the
    per-chain scale, so they are not drawn here.)"""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return None
    targets = payload["targets"]
    presets = sorted({c["name"] for t in targets.values() for c in t["configurations"].values()})
    colours = {name: plt.get_cmap("tab20" if len(presets) > 10 else "tab10")(i % 20) for i, name in enumerate(presets)}
    columns = 2 if len(targets) > 2 else len(targets)
    rows = math.ceil(len(targets) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
    handles = {}
    for ax, (name, t) in zip(axes.flat, targets.items()):
        floor = t["floor"]["curve"]
        handles["iid floor"], = ax.plot([int(k) for k in floor], list(floor.values()), "k-", lw=2.5)
        for config, c in t["configurations"].items():
            if c["best"] is None or not c["best"].get("curve"):
                continue
            curve = c["best"]["curve"]
            handles[config], = ax.plot([int(k) for k in curve], list(curve.values()), color=colours[c["name"]],
                                       ls="-" if c["library"] == "bayesflow" else "--",
                                       marker="o" if c["library"] == "bayesflow" else "x", ms=3)
        ax.set(xscale="log", yscale="log", title=f"({name}) {t['title']}", xlabel="gradient evaluations per chain",
               ylabel="W2 / √tr Σ (pooled)")
        ticks = [int(k) for k in floor]
        ax.set_xticks(ticks[::2] + ticks[-1:])
        ax.set_xticklabels([f"{k:,}" for k in ticks[::2] + ticks[-1:]], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.title.set_fontsize(9)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)), fontsize=7)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(handles) / 6), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
