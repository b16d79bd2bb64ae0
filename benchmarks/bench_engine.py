"""Engine speed (issue 2): SGLD step, full update, T = 0 against torch.optim.SGD, posteriors for reference.

Every measurement uses 10 parameter leaves (a dict of equal 1-D tensors) and one torch thread.

* (a) ``transform.step(state, grads, inplace=True)`` for SGLD vs the fastest hand-written foreach
  SGLD step (``θ += h g + sqrt(2hT) ξ`` with one flat ``randn`` buffer or one ``randn`` per leaf):
  targets ≤ 1.5× at 1e4 and ≤ 1.15× at 1e7 parameters.
* (b) ``transform.update(state, batch, inplace=True)`` with a trivial log posterior (a standard
  Gaussian) vs plain autograd (``torch.autograd.grad``) + the hand-written step: ≤ 1.2× at 1e4.
* (c) the engine at T = 0 (SGD) vs ``torch.optim.SGD(foreach=True).step()``: ≤ 1.1× at 1e6, 1e7.
* (d) ``posteriors.sgmcmc.sgld`` update (inplace=True) at 1e4 and 1e7, for reference (its update
  computes the gradient itself, so it is compared with autograd + the hand-written step).

Targets apply to the default configuration. The engine is reported with its default
``check_finite="auto"`` (in ``step``: the log posterior value only, if given — the caller computed
the gradient; in ``update``: the value and every gradient leaf, one read pass over the gradient),
with ``"full"`` (every gradient leaf in ``step`` too) and with ``"none"``, for reference.

Run: ``python benchmarks/bench_engine.py [--quick]``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch

from common import Row, cli, compare, fastest, fmt_size, fmt_time, quiet_import, row_ratio, write_json

LEAVES = 10
HAVE_POSTERIORS = importlib.util.find_spec("posteriors") is not None
H = 1e-6  # step size: small, so params barely drift over thousands of timed calls
TEMPERATURE = 1.0


def make_params(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = n // LEAVES
    return {f"w{i}": torch.randn(size, generator=g) for i in range(LEAVES)}


def clone(tree: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tree.items()}


_AUX = torch.tensor([])  # posteriors insists that aux is a tensor tree


def log_posterior(params, batch):
    """A standard Gaussian: trivial, with a real (dense) gradient -θ."""
    return -0.5 * sum((v * v).sum() for v in params.values()), _AUX


# ----- hand-written baselines -----------------------------------------------------------------
def hand_sgld_flat(params: dict, grads: dict, h: float = H, temperature: float = TEMPERATURE):
    """θ += h g, then one flat randn buffer (views per leaf) added with sqrt(2hT)."""
    pl, gl = list(params.values()), list(grads.values())
    sizes = [p.numel() for p in pl]
    buf = torch.empty(sum(sizes), dtype=pl[0].dtype)
    views = [v.view(p.shape) for v, p in zip(buf.split(sizes), pl)]
    scale = math.sqrt(2 * h * temperature)

    def step():
        torch._foreach_add_(pl, gl, alpha=h)
        torch.randn(buf.shape, out=buf)
        torch._foreach_add_(pl, views, alpha=scale)

    return step


def hand_sgld_perleaf(params: dict, grads: dict, h: float = H, temperature: float = TEMPERATURE):
    """θ += h g, then one randn_like per leaf."""
    pl, gl = list(params.values()), list(grads.values())
    scale = math.sqrt(2 * h * temperature)

    def step():
        torch._foreach_add_(pl, gl, alpha=h)
        torch._foreach_add_(pl, [torch.randn_like(p) for p in pl], alpha=scale)

    return step


def hand_update(params: dict, variant: str, h: float = H, temperature: float = TEMPERATURE):
    """Plain autograd gradient + the hand-written flat step.

    ``persistent``: the leaves require grad once (standard PyTorch); ``detach``: fresh leaves every
    call, like a functional library.
    """
    pl = list(params.values())
    sizes = [p.numel() for p in pl]
    buf = torch.empty(sum(sizes), dtype=pl[0].dtype)
    views = [v.view(p.shape) for v, p in zip(buf.split(sizes), pl)]
    scale = math.sqrt(2 * h * temperature)
    if variant == "persistent":
        for p in pl:
            p.requires_grad_(True)

        def update():
            value, _ = log_posterior(params, None)
            grads = torch.autograd.grad(value, pl)
            with torch.no_grad():
                torch._foreach_add_(pl, grads, alpha=h)
                torch.randn(buf.shape, out=buf)
                torch._foreach_add_(pl, views, alpha=scale)
            return value
    else:
        def update():
            leaves = [p.detach().requires_grad_(True) for p in pl]
            value, _ = log_posterior(dict(zip(params, leaves)), None)
            grads = torch.autograd.grad(value, leaves)
            torch._foreach_add_(pl, grads, alpha=h)
            torch.randn(buf.shape, out=buf)
            torch._foreach_add_(pl, views, alpha=scale)
            return value.detach()

    return update


# ----- engine contenders ----------------------------------------------------------------------
def engine_transform(check: str, temperature: float = TEMPERATURE, h: float = H):
    from bayesflow.engine import SDEConfig, build

    return build(log_posterior, SDEConfig(step_size=h, temperature=temperature, check_finite=check))


def engine_step(params: dict, grads: dict, check: str, temperature: float = TEMPERATURE, h: float = H):
    transform = engine_transform(check, temperature, h)
    box = [transform.init(params, seed=0)]

    def step():
        box[0] = transform.step(box[0], grads, inplace=True)

    return step


def engine_update(params: dict, check: str):
    transform = engine_transform(check)
    box = [transform.init(params, seed=0)]

    def update():
        box[0], _ = transform.update(box[0], None, inplace=True)

    return update


def posteriors_sgld_update(params: dict):
    with quiet_import():
        import posteriors

    transform = posteriors.sgmcmc.sgld.build(log_posterior, lr=H, temperature=TEMPERATURE)
    box = [transform.init(params)]

    def update():
        box[0], _ = transform.update(box[0], None, inplace=True)

    return update


def torch_sgd(params: dict, grads: dict, lr: float = H):
    pl = list(params.values())
    for p, g in zip(pl, grads.values()):
        p.grad = g.neg()  # loss = -ℓ: torch descends ∇loss = -∇ℓ
    optimizer = torch.optim.SGD(pl, lr=lr, foreach=True)
    return optimizer.step


# ----- the benchmark --------------------------------------------------------------------------
def _settings(quick: bool) -> dict:
    if quick:
        return {"step": [10**3], "update": [10**3], "sgd": [10**3], "posteriors": [], "repeats": 3,
                "block_s": 0.002}
    return {"step": [10**4, 10**7], "update": [10**4], "sgd": [10**6, 10**7], "posteriors": [10**7],
            "repeats": 21, "block_s": 0.05}


STEP_TARGETS = {10**4: 1.5, 10**7: 1.15}
UPDATE_TARGETS = {10**4: 1.2}
SGD_TARGETS = {10**6: 1.1, 10**7: 1.1}
CHECKS = ("auto", "full", "none")  # "auto" is the default: "value" in step, "full" in update
CHECK_LABEL = {"auto": "default check_finite='auto'", "full": "check_finite='full'", "none": "check_finite='none'"}


def run(quick: bool = False, out_dir: Path | None = None, verbose: bool = True) -> list[Row]:
    cfg = _settings(quick)
    kw = {"repeats": cfg["repeats"], "block_s": cfg["block_s"]}
    rows: list[Row] = []
    raw: dict = {}

    def log(*args):
        if verbose:
            print(*args, flush=True)

    def add(what, n, res, name, base, target, base_label=None):
        ratio, note = row_ratio(res, name, base)
        target = None if quick else target
        rows.append(Row(what, fmt_size(n), res["times"][name]["median_s"], res["times"][base]["median_s"], ratio,
                        target, baseline_name=base_label or base, note=note))
        log(f"{what} n={fmt_size(n)}: {fmt_time(res['times'][name]['median_s'])} vs {base} "
            f"{fmt_time(res['times'][base]['median_s'])} -> {ratio:.3f}x {note}")

    # (a) SGLD step given gradients
    for n in cfg["step"]:
        base = make_params(n)
        grads = {k: torch.randn_like(v) for k, v in make_params(n, seed=1).items()}
        contenders = {f"engine step ({c})": engine_step(clone(base), grads, c) for c in CHECKS}
        contenders["hand flat"] = hand_sgld_flat(clone(base), grads)
        contenders["hand per-leaf"] = hand_sgld_perleaf(clone(base), grads)
        res = compare(contenders, **kw)
        raw[f"step/{n}"] = res
        hand = fastest(res, ["hand flat", "hand per-leaf"])
        for c in CHECKS:
            add(f"SGLD `step(state, grads)`, {CHECK_LABEL[c]}", n, res, f"engine step ({c})", hand,
                STEP_TARGETS.get(n) if c == "auto" else None, f"hand-written foreach SGLD ({hand.split()[1]})")
        del contenders, res

    # (b) full update with a trivial log posterior; (d) posteriors' SGLD update
    for n in cfg["update"] + cfg["posteriors"]:
        base = make_params(n)
        contenders = {} if n not in cfg["update"] else {
            f"engine update ({c})": engine_update(clone(base), c) for c in ("auto", "none")}
        if n in cfg["posteriors"]:
            contenders["engine update (auto)"] = engine_update(clone(base), "auto")
        contenders["autograd + hand (persistent leaves)"] = hand_update(clone(base), "persistent")
        contenders["autograd + hand (detach per call)"] = hand_update(clone(base), "detach")
        if HAVE_POSTERIORS:
            contenders["posteriors sgld update"] = posteriors_sgld_update(clone(base))
        # the update rows compare the sums of many small costs: twice the rounds for a tighter ratio
        res = compare(contenders, **{**kw, "repeats": 2 * kw["repeats"] - 1})
        raw[f"update/{n}"] = res
        hand = fastest(res, ["autograd + hand (persistent leaves)", "autograd + hand (detach per call)"])
        label = "autograd + hand-written step"
        for c in ("auto", "none"):
            if f"engine update ({c})" in contenders:
                add(f"SGLD `update(state, batch)` (Gaussian ℓ), {CHECK_LABEL[c]}", n, res, f"engine update ({c})",
                    hand, UPDATE_TARGETS.get(n) if c == "auto" else None, label)
        if HAVE_POSTERIORS:
            add("posteriors 0.1.3 SGLD `update` (reference)", n, res, "posteriors sgld update", hand, None, label)
        del contenders, res

    # (c) T = 0 against torch.optim.SGD(foreach=True)
    for n in cfg["sgd"]:
        base = make_params(n)
        grads = {k: torch.randn_like(v) for k, v in make_params(n, seed=1).items()}
        contenders = {f"engine T=0 ({c})": engine_step(clone(base), grads, c, temperature=0.0) for c in CHECKS}
        contenders["torch SGD foreach"] = torch_sgd(clone(base), grads)
        res = compare(contenders, **kw)
        raw[f"sgd/{n}"] = res
        for c in CHECKS:
            add(f"T=0 `step` (SGD), {CHECK_LABEL[c]}", n, res, f"engine T=0 ({c})", "torch SGD foreach",
                SGD_TARGETS.get(n) if c == "auto" else None, "torch.optim.SGD(foreach=True)")
        del contenders, res

    path = write_json("engine" if not quick else "engine_quick", rows, raw, directory=out_dir,
                      leaves=LEAVES, quick=quick)
    log(f"wrote {path}")
    return rows


def main(argv=None):
    cli(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
