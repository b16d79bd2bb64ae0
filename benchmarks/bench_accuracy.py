"""Accuracy side by side with posteriors: stationary variance of the same samplers at equal step size.

Target N(0, 1) (so the exact Var θ is 1), 20 000 independent chains as one tensor, friction α = 1,
temperature 1. posteriors' SGHMC moves θ with the old momenta (explicit Euler); bayesflow's moves it
with the new ones (semi-implicit, symplectic). The reference values are ENGINE.md §3's discrete
Lyapunov numbers. The code for the two libraries is the same but for the import: posteriors' API.

Rows: the estimate of Var θ = E θ² after burn-in (the mean over chains and over every 10th step) and
its Monte-Carlo standard error. Curves (the harness's accuracy-vs-gradients plot): the error
|mean over chains of θ_t² − 1| after t steps (one gradient evaluation each) from θ_0 = 0, at log-spaced
t — relaxation first, then the scheme's bias |Var_h − 1| (dotted), above the Monte-Carlo floor
√(2 / chains) of one step's estimate. Without posteriors installed (the ``bench`` extra) its columns are
``None``.

Run: ``python benchmarks/bench_accuracy.py [--quick] [--out DIR]`` (writes ``accuracy.json``, or
``accuracy_quick.json``: 1 000 chains, 300 steps).
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import torch

from common import machine_info, quiet_import, write_payload

EXACT = {("sghmc", 0.1): 1.0026, ("sghmc", 0.5): 1.0909, ("sgld", 0.1): 1.0526, ("sgld", 0.5): 1.3333,
         ("baoa", 0.1): 1.0, ("baoa", 0.5): 1.0}
"""Var θ of each discretisation's stationary law on N(0, 1) at step h (bayesflow's schemes, ENGINE.md §3)."""
THIN = 10


def _settings(quick: bool) -> dict:
    if quick:
        return {"chains": 1_000, "steps": 300, "burn_in": 50}
    return {"chains": 20_000, "steps": 3_000, "burn_in": 500}


def log_posterior(params, batch):
    return -0.5 * (params**2).sum(), torch.tensor([])  # posteriors needs a tensor aux


def stationary_variance(library, name: str, lr: float, chains: int, steps: int, burn_in: int,
                        seed: int = 0) -> tuple[float, float, list[int], list[float]]:
    """``(Var θ estimate, its standard error, gradients, errors)`` of one sampler's chains: the estimate
    after burn-in, and |mean over chains of θ_t² − 1| after ``gradients[i]`` steps."""
    module = getattr(library.sgmcmc, name)
    kwargs = {"alpha": 1.0} if name != "sgld" else {}
    transform = module.build(log_posterior, lr=lr, temperature=1.0, **kwargs)
    torch.manual_seed(seed)
    state = transform.init(torch.zeros(chains))
    checkpoints = set(torch.logspace(0, math.log10(steps), 40).round().long().tolist())
    second_moments, gradients, errors = [], [], []
    for step in range(steps):
        state, _ = transform.update(state, None, inplace=True)
        if step >= burn_in and step % THIN == 0:
            second_moments.append(state.params.pow(2).mean().item())
        if step + 1 in checkpoints:
            gradients.append(step + 1)
            errors.append(abs(state.params.pow(2).mean().item() - 1.0))
    values = torch.tensor(second_moments, dtype=torch.float64)
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item(), gradients, errors


def _library(name: str):
    try:
        with quiet_import():
            library = importlib.import_module(name)
            importlib.import_module(f"{name}.sgmcmc")
    except ImportError:
        return None
    return library


def run(quick: bool = False, out_dir: Path | None = None, verbose: bool = True) -> list[dict]:
    """Both libraries' samplers on N(0, 1); writes ``accuracy[_quick].json`` and returns its rows."""
    torch.set_num_threads(1)
    cfg = _settings(quick)
    libraries = {"bayesflow": _library("bayesflow"), "posteriors": _library("posteriors")}
    rows, curves = [], []
    for (name, lr), reference in EXACT.items():
        row = {"sampler": name, "lr": lr, "bayesflow_exact": reference}
        for label, library in libraries.items():
            if library is None:
                row.update({label: None, f"{label}_se": None, f"bias_{label}": None})
                continue
            value, se, gradients, errors = stationary_variance(library, name, lr, **cfg)
            row.update({label: value, f"{label}_se": se, f"bias_{label}": value - 1.0})
            curves.append({"label": f"{label} {name} h={lr}", "library": label, "panel": name, "lr": lr,
                           "gradients": gradients, "value": errors,
                           "reference": abs(reference - 1.0) if label == "bayesflow" and reference != 1.0 else None})
        rows.append(row)
        if verbose:
            theirs = ("posteriors —" if row["posteriors"] is None
                      else f"posteriors {row['posteriors']:.4f}±{row['posteriors_se']:.4f}")
            print(f"{name:6s} h={lr:<4} Var θ: bayesflow {row['bayesflow']:.4f}±{row['bayesflow_se']:.4f} "
                  f"(exact {reference:.4f})  {theirs}   target 1", file=sys.stderr)
    payload = {"benchmark": "accuracy", "machine": machine_info(), "quick": quick, "target": "N(0,1)",
               "chains": cfg["chains"], "steps": cfg["steps"], "burn_in": cfg["burn_in"], "thin": THIN,
               "rows": rows, "curves": curves, "curves_ylabel": "|mean over chains of θ² − 1| after t steps",
               "curves_yscale": "log", "curves_floor": math.sqrt(2.0 / cfg["chains"])}
    path = write_payload("accuracy_quick" if quick else "accuracy", payload, out_dir)
    if verbose:
        print(f"wrote {path}", file=sys.stderr)
    return rows


def main(argv=None) -> list[dict]:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 000 chains, 300 steps (smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    return run(args.quick, args.out)


if __name__ == "__main__":
    main()
