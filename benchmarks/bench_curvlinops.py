"""curvlinops-for-pytorch side by side with bayesflow's own curvature (the evaluation in docs/curvature.md).

curvlinops is not a dependency (see docs/curvature.md for why): ``python -m benchmarks`` runs this only where
it is importable and otherwise reports it skipped. Run with it on the path, e.g.
``pip install --target /tmp/clenv curvlinops-for-pytorch`` then
``PYTHONPATH=/tmp/clenv python benchmarks/bench_curvlinops.py [--quick] [--out DIR]``. Writes
``curvlinops.json`` (``curvlinops_quick.json`` with ``--quick``) in ``benchmarks/results`` or ``DIR``.

Rows (784-512-512-10 ReLU MLP, batch 128, one thread, ratios to a ``torch.optim.Adam`` training step in
the same process): KFAC factors of one batch (curvlinops ``KFACLinearOperator`` type-2 vs
``bayesflow.laplace.kfac`` "ggn"; the factors are compared for equality), one GGN-vector product
(curvlinops ``GGNLinearOperator`` vs ``bayesflow.utils.ggnvp``) and the GGN diagonal (curvlinops has no
exact diagonal, only Hutchinson's estimator; bayesflow's per-layer ``diag_ggn.build_for_module``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from common import machine_info, write_payload


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(quick: bool = False, out_dir: pathlib.Path | None = None, verbose: bool = True) -> dict:
    """Time both libraries' KFAC and GGN-vector product; writes ``curvlinops[_quick].json`` ({} without curvlinops)."""
    try:
        import curvlinops
    except ImportError:
        print("curvlinops is not installed: nothing to compare (see the module docstring)")
        return {}
    from bayesflow import utils
    from bayesflow.laplace import kfac

    torch.set_num_threads(1)
    torch.manual_seed(0)
    widths = (32, 16, 16, 4) if quick else (784, 512, 512, 10)
    batch_size, repeats = (16, 2) if quick else (128, 5)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    x = torch.randn(batch_size, widths[0])
    y = torch.randint(0, widths[-1], (batch_size,))
    params = [p for p in model.parameters()]
    loss_func = torch.nn.CrossEntropyLoss(reduction="sum")
    rows = {}

    adam = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)

    def train_step():
        adam.zero_grad()
        loss_func(model(x), y).backward()
        adam.step()

    base = timed(train_step, repeats)
    rows["adam_step_s"] = base

    def theirs_kfac():
        op = curvlinops.KFACLinearOperator(model, loss_func, params, [(x, y)], fisher_type="type-2",
                                           separate_weight_and_bias=False, check_deterministic=False)
        op.compute_kronecker_factors()
        return op

    loglik = lambda logits, batch: -torch.nn.functional.cross_entropy(logits, batch[1], reduction="sum")  # noqa: E731
    transform = kfac.build(model, loglik)
    named = {k: v.detach() for k, v in model.named_parameters()}

    def ours_kfac():
        return transform.update(transform.init(named), (x, y))[0]

    rows["kfac_curvlinops_s"] = timed(theirs_kfac, repeats)
    rows["kfac_ours_s"] = timed(ours_kfac, repeats)
    op, state = theirs_kfac(), ours_kfac()
    # curvlinops keeps sums (A over data, G times N for reduction="sum"); ours keeps means with num_data = N.
    worst = 0.0
    for name in state.A:   # compare each factor up to scale, and the scale of the Kronecker product
        theirs_a, theirs_g = op._input_covariances[name], op._gradient_covariances[name]
        ours_a, ours_g = state.A[name], state.G[name]
        for ours_f, theirs_f in ((ours_a, theirs_a), (ours_g, theirs_g)):
            ours_n, theirs_n = ours_f / ours_f.trace(), theirs_f / theirs_f.trace()
            worst = max(worst, float((ours_n - theirs_n).abs().max() / theirs_n.abs().max()))
        scale_ours = state.num_data * ours_a.trace() * ours_g.trace()
        scale_theirs = theirs_a.trace() * theirs_g.trace()
        worst = max(worst, float(abs(scale_ours / scale_theirs - 1)))
    rows["kfac_max_rel_difference"] = worst

    vector = [torch.randn_like(p) for p in params]
    ggn_op = curvlinops.GGNLinearOperator(model, loss_func, params, [(x, y)], check_deterministic=False)
    flat = torch.cat([v.flatten() for v in vector])
    rows["ggnvp_curvlinops_s"] = timed(lambda: ggn_op @ flat, repeats)

    keys = [k for k, _ in model.named_parameters()]
    forward = lambda p, batch: torch.func.functional_call(model, p, (batch[0],))  # noqa: E731
    tangent = dict(zip(keys, vector))
    rows["ggnvp_ours_s"] = timed(lambda: utils.ggnvp(lambda p: forward(p, (x, y)),
                                                     lambda z: loglik(z, (x, y)), (named,), (tangent,)), repeats)
    for key in ("kfac", "ggnvp"):
        rows[f"{key}_ratio_ours"] = rows[f"{key}_ours_s"] / base
        rows[f"{key}_ratio_curvlinops"] = rows[f"{key}_curvlinops_s"] / base
    rows["curvlinops_version"] = getattr(curvlinops, "__version__", "3.x")
    payload = {"benchmark": "curvlinops", "machine": machine_info(), "quick": quick, "model": list(widths),
               "batch": batch_size, **rows}
    path = write_payload("curvlinops_quick" if quick else "curvlinops", payload, out_dir)
    if verbose:
        print(json.dumps(rows, indent=2))
        print(f"wrote {path}")
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 32-16-16-4 MLP, batch 16 (smoke run)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    return run(args.quick, args.out)


if __name__ == "__main__":
    main()
