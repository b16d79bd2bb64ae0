"""The compiled step (issue 13): every preset as one fused pass, side by side with the fastest torch.

10 equal 1-D parameter leaves, one torch thread, ratios of interleaved medians in one process:

* T = 0 presets with ``compile=True``: ``step(state, grads, inplace=True)`` vs torch's ``fused=True``
  optimizer (Adam, AdamW, SGD with momentum / Nesterov) — target ≤ 1.1× at 1e6 and 1e7; RMSprop vs a
  compiled hand-written RMSprop (torch has no fused RMSprop) — target ≤ 1.1×.
* Samplers with ``compile=True`` (sgld, sghmc, adam_sghmc: ``step`` with a given gradient; baoab: its
  ``update``, which needs a second gradient, with a linear log posterior, and with a quadratic one whose
  gradient is a tensor of its own as a model's is; that one also with ``check_finite="none"``, a
  reference: the floor checks nothing) vs the floor: the noise drawn by ``Tensor.normal_``
  plus one compiled pass of the same arithmetic — target ≤ 1.1× at 1e7.
* ``update`` of a trivial log posterior at 1e4 parameters (dispatch-bound): the replayed plan
  (``compile="replay"``) and the eager step vs plain autograd + a hand-written foreach SGD step —
  target ≤ 1.05×.
* Many leaves: Adam over 200 equal leaves (a deep model's layout) vs torch's ``fused=True`` at 1e7 —
  target ≤ 1.1×; its first step shows how trace + compile time grows with the number of leaves. Beside
  it (reference) the flat-buffer alternative: the gradients gathered by ``torch.cat`` into one buffer,
  then one compiled Adam pass over flat buffers — the gather is the pass per-leaf plans avoid.
* The first step's trace + compile time is reported in every compiled row.

Run: ``python benchmarks/bench_compiled.py [--quick]`` (writes benchmarks/results/compiled.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bayesflow.optim import adam, adamw, rmsprop, sgd
from bayesflow.sgmcmc import adam_sghmc, baoab, sghmc, sgld
from common import Row, cli, compare, fmt_size, fmt_time, row_ratio, write_json

LEAVES = 10
LR, TEMPERATURE, ALPHA = 1e-3, 1e-6, 0.1


MANY_LEAVES = 200


def make_params(n: int, seed: int = 0, leaves: int = LEAVES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(n // leaves, generator=g) for i in range(leaves)}


def linear_lp(params, batch):
    return sum(v.sum() for v in params.values()) * 1e-3, None


def quadratic_lp(params, batch):
    """-|θ|²/2 · 10⁻³: a gradient that is a tensor of its own, as a model's is (the linear ℓ's is a broadcast
    scalar, which the opaque gradient operator must copy and whose finite check reads a strided view)."""
    return -0.5e-3 * sum((v * v).sum() for v in params.values()), None


def _first_step(transform, params, grads=None):
    """A warm state and the seconds its first (tracing + compiling) step took."""
    state = transform.init(params, seed=0)
    start = time.perf_counter()
    state = transform.step(state, grads, inplace=True) if grads is not None else transform.update(
        state, None, inplace=True)[0]
    return state, time.perf_counter() - start


# ----- T = 0 presets vs torch fused ----------------------------------------------------------------
OPTIMIZERS = {
    "adam": (adam, dict(lr=LR), lambda p: torch.optim.Adam(p, lr=LR, fused=True)),
    "adamw": (adamw, dict(lr=LR, weight_decay=1e-2), lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=1e-2,
                                                                                 fused=True)),
    "sgd (momentum)": (sgd, dict(lr=LR, momentum=0.9), lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, fused=True)),
    "sgd (nesterov)": (sgd, dict(lr=LR, momentum=0.9, nesterov=True),
                       lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True, fused=True)),
}


def _rmsprop_reference(params, grads):
    """A hand-written RMSprop (torch's default arithmetic, alpha 0.99, eps 1e-8), compiled."""
    square = [torch.zeros_like(p) for p in params]

    @torch.compile(fullgraph=True)
    def step(params, grads, square):
        torch._foreach_mul_(square, 0.99)
        torch._foreach_addcmul_(square, grads, grads, value=0.01)
        root = torch._foreach_sqrt(square)
        torch._foreach_add_(root, 1e-8)
        torch._foreach_addcdiv_(params, grads, root, value=-LR)

    return lambda: step(params, grads, square)


def optimizer_rows(n: int, repeats: int, leaves: int = LEAVES, names=None) -> tuple[list[Row], dict]:
    rows, raw = [], {}
    grads = {k: 1e-3 * torch.randn_like(v) for k, v in make_params(n, 1, leaves).items()}
    cases = dict(OPTIMIZERS, rmsprop=(rmsprop, dict(lr=LR), None))
    cases = {k: v for k, v in cases.items() if names is None or k in names}
    suffix = "" if leaves == LEAVES else f", {leaves} leaves"
    for name, (module, hyper, reference) in cases.items():
        transform = module.build(linear_lp, **hyper, compile=True)
        state, first = _first_step(transform, make_params(n, 0, leaves), grads)
        params = [torch.nn.Parameter(v) for v in make_params(n, 0, leaves).values()]
        for p, g in zip(params, grads.values()):
            p.grad = g.clone()
        if reference is None:
            baseline, baseline_name = _rmsprop_reference([p.detach() for p in params], list(grads.values())), \
                "compiled hand-written"
        else:
            baseline, baseline_name = reference(params).step, "torch fused=True"
        holder = [state]

        def ours(transform=transform, holder=holder):
            holder[0] = transform.step(holder[0], grads, inplace=True)

        result = compare({"ours": ours, "baseline": baseline}, repeats=repeats, ratios={"r": ("ours", "baseline")})
        ratio, note = row_ratio(result, "ours", "baseline")
        rows.append(Row(f"{name}{suffix} compile=True (first step {first:.1f} s)", fmt_size(n),
                        result["times"]["ours"]["median_s"], result["times"]["baseline"]["median_s"], ratio,
                        1.1, baseline_name=baseline_name, note=note))
        raw[f"{name}{suffix}/{n}"] = {"times": result["times"], "ratios": result["ratios"], "first_step_s": first}
    return rows, raw


def flat_buffer_row(n: int, repeats: int, leaves: int) -> tuple[list[Row], dict]:
    """The flat-buffer alternative to per-leaf plans (reference): gradients arrive as separate tensors, so
    a flat plan first gathers them (``torch.cat``), then runs one compiled Adam pass over flat buffers."""
    grads = list(make_params(n, 1, leaves).values())
    flat = [torch.randn(n), torch.zeros(n), torch.zeros(n)]
    gathered = torch.empty(n)

    @torch.compile(fullgraph=True)
    def flat_adam(params, m, v, g):
        m.lerp_(g, 0.1)
        v.mul_(0.999).addcmul_(g, g, value=1e-3)
        params.addcdiv_(m, (v / 0.5).sqrt() + 1e-8, value=-LR / 0.5)

    def gather_and_step():
        torch.cat(grads, out=gathered)
        flat_adam(*flat, gathered)

    params = [torch.nn.Parameter(v) for v in make_params(n, 0, leaves).values()]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    fused = torch.optim.Adam(params, lr=LR, fused=True)
    result = compare({"flat": gather_and_step, "gather": lambda: torch.cat(grads, out=gathered),
                      "baseline": fused.step}, repeats=repeats)
    ratio, note = row_ratio(result, "flat", "baseline")
    gather = result["times"]["gather"]["median_s"]
    row = Row(f"adam, {leaves} leaves, flat buffers: gather ({fmt_time(gather)}) + one compiled flat pass",
              fmt_size(n), result["times"]["flat"]["median_s"], result["times"]["baseline"]["median_s"], ratio,
              None, baseline_name="torch fused=True", note="; ".join(x for x in (
                  note, "reference: why plans keep per-leaf loops") if x))
    return [row], {f"flat buffers, {leaves} leaves/{n}": {"times": result["times"]}}


# ----- samplers vs normal_ + one compiled pass -------------------------------------------------------
def _sgld_floor(params, grads):
    noise = [torch.empty_like(p) for p in params]
    scale = (2 * LR * TEMPERATURE) ** 0.5

    @torch.compile(fullgraph=True)
    def update(params, grads, noise):
        torch._foreach_add_(params, grads, alpha=LR)
        torch._foreach_add_(params, noise, alpha=scale)

    def step():
        for z in noise:
            z.normal_()
        update(params, grads, noise)

    return step


def _sghmc_floor(params, grads):
    momenta, noise = [torch.zeros_like(p) for p in params], [torch.empty_like(p) for p in params]
    scale = (2 * LR * ALPHA * TEMPERATURE) ** 0.5

    @torch.compile(fullgraph=True)
    def update(params, momenta, grads, noise):
        torch._foreach_mul_(momenta, 1 - LR * ALPHA)
        torch._foreach_add_(momenta, grads, alpha=LR)
        torch._foreach_add_(momenta, noise, alpha=scale)
        torch._foreach_add_(params, momenta, alpha=LR)

    def step():
        for z in noise:
            z.normal_()
        update(params, momenta, grads, noise)

    return step


def _baoab_floor(params, log_posterior=linear_lp):
    """autograd of the log posterior + normal_ + the two compiled passes around it."""
    momenta, noise = [torch.zeros_like(p) for p in params], [torch.empty_like(p) for p in params]
    decay = torch.exp(torch.tensor(-ALPHA * LR)).item()
    spread = (TEMPERATURE * (1 - decay**2)) ** 0.5

    @torch.compile(fullgraph=True)
    def first(params, momenta, grads, noise):
        torch._foreach_add_(momenta, grads, alpha=LR / 2)
        torch._foreach_add_(params, momenta, alpha=LR / 2)
        torch._foreach_mul_(momenta, decay)
        torch._foreach_add_(momenta, noise, alpha=spread)
        torch._foreach_add_(params, momenta, alpha=LR / 2)

    @torch.compile(fullgraph=True)
    def last(momenta, grads):
        torch._foreach_add_(momenta, grads, alpha=LR / 2)

    def gradient():
        leaves = [p.detach().requires_grad_(True) for p in params]
        value, _ = log_posterior(dict(enumerate(leaves)), None)
        return list(torch.autograd.grad(value, leaves))

    grads = [gradient()]

    def step():
        for z in noise:
            z.normal_()
        first(params, momenta, grads[0], noise)
        grads[0] = gradient()
        last(momenta, grads[0])

    return step


SAMPLERS = {
    "sgld": (sgld, dict(lr=LR, temperature=TEMPERATURE), _sgld_floor),
    "sghmc": (sghmc, dict(lr=LR, alpha=ALPHA, temperature=TEMPERATURE), _sghmc_floor),
    "adam_sghmc": (adam_sghmc, dict(lr=LR, temperature=TEMPERATURE), None),
    "baoab": (baoab, dict(lr=LR, alpha=ALPHA, temperature=TEMPERATURE), None),
    "baoab (quadratic ℓ)": (baoab, dict(lr=LR, alpha=ALPHA, temperature=TEMPERATURE), None),
    # reference: the same without the finite check of the gradient (one read of it), which the floor skips
    "baoab (quadratic ℓ), check_finite='none'": (baoab, dict(lr=LR, alpha=ALPHA, temperature=TEMPERATURE,
                                                            check_finite="none"), None),
}


def sampler_rows(n: int, repeats: int) -> tuple[list[Row], dict]:
    rows, raw = [], {}
    grads = {k: 1e-3 * torch.randn_like(v) for k, v in make_params(n, 1).items()}
    for name, (module, hyper, floor) in SAMPLERS.items():
        with_grads = not name.startswith("baoab")
        log_posterior = quadratic_lp if "quadratic" in name else linear_lp
        transform = module.build(log_posterior, **hyper, compile=True)
        state, first = _first_step(transform, make_params(n), grads if with_grads else None)
        eager = module.build(log_posterior, **hyper)
        eager_state, _ = _first_step(eager, make_params(n), grads if with_grads else None)
        holders = [state], [eager_state]

        def run(transform, holder, with_grads=with_grads):
            if with_grads:
                holder[0] = transform.step(holder[0], grads, inplace=True)
            else:
                holder[0] = transform.update(holder[0], None, inplace=True)[0]

        contenders = {"ours": lambda t=transform, h=holders[0]: run(t, h),
                      "eager": lambda t=eager, h=holders[1]: run(t, h)}
        params = list(make_params(n).values())
        if name.startswith("baoab"):
            contenders["floor"] = _baoab_floor(params, log_posterior)
        elif floor is not None:
            contenders["floor"] = floor(params, list(grads.values()))
        else:  # Adam-SGHMC's floor is its eager step's noise + fused Adam's pass: noted, eager shown
            contenders["floor"] = contenders["eager"]
        result = compare(contenders, repeats=repeats)
        ratio, note = row_ratio(result, "ours", "floor")
        baseline_name = ("normal_ + one compiled pass" if floor is not None or name.startswith("baoab")
                         else "our eager step")
        eager_ratio = result["times"]["eager"]["median_s"] / result["times"]["ours"]["median_s"]
        rows.append(Row(f"{name} compile=True (first step {first:.1f} s; {eager_ratio:.2f}× faster than eager)",
                        fmt_size(n), result["times"]["ours"]["median_s"], result["times"]["floor"]["median_s"],
                        ratio, 1.1 if baseline_name != "our eager step" and "check_finite" not in name else None,
                        baseline_name=baseline_name,
                        note=note))
        raw[f"{name}/{n}"] = {"times": result["times"], "first_step_s": first}
    return rows, raw


# ----- small models: dispatch-bound -------------------------------------------------------------------
def small_rows(n: int, repeats: int) -> tuple[list[Row], dict]:
    params = make_params(n)
    plain = {k: v.clone() for k, v in params.items()}

    def reference():
        leaves = [v.detach().requires_grad_(True) for v in plain.values()]
        value = sum(v.sum() for v in leaves) * 1e-3
        grads = torch.autograd.grad(value, leaves)
        with torch.no_grad():
            torch._foreach_add_(list(plain.values()), grads, alpha=LR)

    contenders = {"reference": reference}
    firsts = {}
    # the default checks every gradient entry for finiteness (one read and one host sync a step), which
    # the reference does not: the unchecked row shows the engine's own dispatch cost
    variants = {"compile=False": dict(compile=False), "compile='replay'": dict(compile="replay"),
                "compile=False, check_finite='none'": dict(compile=False, check_finite="none")}
    for label, options in variants.items():
        transform = sgd.build(linear_lp, lr=LR, **options)
        state, firsts[label] = _first_step(transform, {k: v.clone() for k, v in params.items()})
        holder = [state]

        def ours(transform=transform, holder=holder):
            holder[0] = transform.update(holder[0], None, inplace=True)[0]

        contenders[label] = ours
    result = compare(contenders, repeats=repeats)
    rows = []
    for label in variants:
        ratio, note = row_ratio(result, label, "reference")
        unchecked = "check_finite" in label
        rows.append(Row(f"sgd update, trivial log posterior, {label}", fmt_size(n),
                        result["times"][label]["median_s"], result["times"]["reference"]["median_s"],
                        ratio, None if unchecked else 1.05, baseline_name="autograd + hand-written foreach step",
                        note="; ".join(x for x in (note, "reference: no finite check, as the hand-written step"
                                                   if unchecked else "") if x)))
    return rows, {"small": result["times"], "first_step_s": firsts}


def run(quick: bool = False, out_dir: Path | None = None) -> list[Row]:
    torch.set_num_threads(1)
    repeats = 3 if quick else 15
    rows, raw = [], {}
    small, raw["small"] = small_rows(10_000 if not quick else 1_000, repeats)
    rows += small
    for n in ((10_000,) if quick else (1_000_000, 10_000_000)):
        found, found_raw = optimizer_rows(n, repeats)
        rows += found
        raw.update(found_raw)
    found, found_raw = optimizer_rows(10_000 if quick else 10_000_000, repeats, MANY_LEAVES, ("adam",))
    rows += found
    raw.update(found_raw)
    found, found_raw = flat_buffer_row(10_000 if quick else 10_000_000, repeats, MANY_LEAVES)
    rows += found
    raw.update(found_raw)
    for n in ((10_000,) if quick else (10_000_000,)):
        found, found_raw = sampler_rows(n, repeats)
        rows += found
        raw.update(found_raw)
    if quick:
        rows = [Row(r.what, r.size, r.ours, r.baseline, r.ratio, None, r.unit, r.baseline_name, r.note) for r in rows]
    write_json("compiled" if not quick else "compiled_quick", rows, raw, directory=out_dir, leaves=LEAVES,
               quick=quick)
    return rows


if __name__ == "__main__":
    cli(run, __doc__.splitlines()[0])
