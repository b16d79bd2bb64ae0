"""Accuracy side by side with posteriors: stationary variance of the same samplers at equal step size.

Target N(0, 1) (so the exact Var θ is 1), 20 000 independent chains as one tensor, friction α = 1,
temperature 1. posteriors' SGHMC moves θ with the old momenta (explicit Euler); bayesflow's moves it
with the new ones (semi-implicit, symplectic). The reference values are ENGINE.md §3's discrete
Lyapunov numbers. The code for the two libraries is the same but for the import: posteriors' API.

Run: ``python benchmarks/bench_accuracy.py`` (writes benchmarks/results/accuracy.json).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
RESULTS = Path(__file__).resolve().parent / "results"
CHAINS, STEPS, BURN_IN = 20_000, 3_000, 500


def log_posterior(params, batch):
    return -0.5 * (params**2).sum(), torch.tensor([])  # posteriors needs a tensor aux


def stationary_variance(library, name: str, lr: float, seed: int = 0) -> tuple[float, float]:
    module = getattr(library.sgmcmc, name)
    kwargs = {"alpha": 1.0} if name != "sgld" else {}
    transform = module.build(log_posterior, lr=lr, temperature=1.0, **kwargs)
    torch.manual_seed(seed)
    state = transform.init(torch.zeros(CHAINS))
    second_moments = []
    for step in range(STEPS):
        state, _ = transform.update(state, None, inplace=True)
        if step >= BURN_IN and step % 10 == 0:
            second_moments.append(state.params.pow(2).mean().item())
    values = torch.tensor(second_moments, dtype=torch.float64)
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


def main() -> list[dict]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import posteriors

        import bayesflow
        import bayesflow.sgmcmc

    exact = {("sghmc", 0.1): 1.0026, ("sghmc", 0.5): 1.0909, ("sgld", 0.1): 1.0526, ("sgld", 0.5): 1.3333,
             ("baoa", 0.1): 1.0, ("baoa", 0.5): 1.0}
    rows = []
    for (name, lr), reference in exact.items():
        ours, ours_se = stationary_variance(bayesflow, name, lr)
        theirs, theirs_se = stationary_variance(posteriors, name, lr)
        rows.append({"sampler": name, "lr": lr, "bayesflow": ours, "bayesflow_se": ours_se,
                     "posteriors": theirs, "posteriors_se": theirs_se, "bayesflow_exact": reference,
                     "bias_bayesflow": ours - 1.0, "bias_posteriors": theirs - 1.0})
        print(f"{name:6s} h={lr:<4} Var θ: bayesflow {ours:.4f}±{ours_se:.4f} (exact {reference:.4f})  "
              f"posteriors {theirs:.4f}±{theirs_se:.4f}   target 1", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accuracy.json").write_text(json.dumps({"target": "N(0,1)", "chains": CHAINS, "rows": rows},
                                                      indent=1))
    return rows


if __name__ == "__main__":
    main()
