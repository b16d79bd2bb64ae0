"""Preset speed and memory (issue 3): optimizers vs torch.optim, samplers vs hand-written foreach loops.

Every measurement uses 10 parameter leaves (a dict of equal 1-D tensors) and one torch thread.

* Optimizers (``bayesflow.optim.*``, T = 0): ``transform.step(state, grads, inplace=True)`` vs the
  matching ``torch.optim`` optimizer's ``step()`` with ``foreach=True`` (Adam / AdamW also against
  ``fused=True``, for reference): target ≤ 1.1× at 1e6 and 1e7 parameters.
* Samplers (``bayesflow.sgmcmc.*``): ``step(state, grads, inplace=True)`` vs a hand-written foreach
  step with the same arithmetic (flat ``randn`` buffer, in-place foreach kernels); splitting words
  that need a second gradient per step (BAOAB, OBABO) time ``update`` with a linear log posterior
  against autograd + the hand-written word: target ≤ 1.15× at 1e6 and 1e7.
* Memory, with a linear log posterior (whose autograd gradient is exactly one parameter-sized
  tensor), as a multiple of the parameter bytes: everything the method keeps alive after building,
  initialising and one warm-up ``update`` (state beyond the parameters, the engine's buffers) plus
  the peak of what a further ``update`` allocates (the gradient and every temporary) — the extra
  memory of a running sampler or optimizer. The warm-up peak (initial momenta draws, lazy state) is
  reported beside it. Targets: SGLD ≤ 2×, SGHMC ≤ 3×, Adam-type ≤ 4×. torch.optim (``zero_grad``,
  ``backward``, ``step``) and posteriors 0.1.3 (``update``) are measured the same way.

Run: ``python benchmarks/bench_presets.py [--quick]``.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch

from common import (
    Row,
    cli,
    compare,
    fmt_size,
    fmt_time,
    peak_extra_bytes,
    quiet_import,
    row_ratio,
    storage_bytes,
    write_json,
)

LEAVES = 10
H = 1e-6
TEMPERATURE = 1.0
ALPHA = 0.01  # friction of the momentum samplers
_AUX = torch.tensor([])


def make_params(n: int, seed: int = 0, leaves: int = LEAVES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = n // leaves
    return {f"w{i}": torch.randn(size, generator=g) for i in range(leaves)}


def clone(tree):
    return {k: v.clone() for k, v in tree.items()}


def gaussian_lp(params, batch):
    return -0.5 * sum((v * v).sum() for v in params.values()), _AUX


def linear_lp(params, batch):
    """ℓ(θ) = Σ_leaves <θ_i, w_i>: its autograd gradient is exactly one parameter-sized tensor (w)."""
    return sum(torch.dot(v, w) for v, w in zip(params.values(), batch)), _AUX


def available(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# ----- flat noise buffer shared by the hand-written samplers ----------------------------------
class FlatNoise:
    """One randn buffer with per-leaf views: what a careful hand-written sampler does."""

    def __init__(self, like):
        sizes = [p.numel() for p in like]
        self.buf = torch.empty(sum(sizes), dtype=like[0].dtype)
        self.views = [v.view(p.shape) for v, p in zip(self.buf.split(sizes), like)]

    def __call__(self):
        torch.randn(self.buf.shape, out=self.buf)
        return self.views


# ----- hand-written sampler steps (given gradients g = ∇ℓ) ------------------------------------
def hand_sgld(params, grads, h=H, temperature=TEMPERATURE, schedule=None):
    pl, gl = list(params.values()), list(grads.values())
    noise = FlatNoise(pl)
    t = [0]

    def step():
        hh = h * schedule(t[0]) if schedule else h
        t[0] += 1
        torch._foreach_add_(pl, gl, alpha=hh)
        torch._foreach_add_(pl, noise(), alpha=math.sqrt(2 * hh * temperature))

    return step


def hand_sghmc(params, grads, h=H, alpha=ALPHA, temperature=TEMPERATURE, schedule=None):
    """Semi-implicit SGHMC: m ← (1 - hα) m + h g + sqrt(2αhT) ξ; θ ← θ + h m."""
    pl, gl = list(params.values()), list(grads.values())
    ml = [torch.zeros_like(p) for p in pl]
    noise = FlatNoise(pl)
    t = [0]

    def step():
        hh = h * schedule(t[0]) if schedule else h
        t[0] += 1
        torch._foreach_mul_(ml, 1.0 - hh * alpha)
        torch._foreach_add_(ml, gl, alpha=hh)
        torch._foreach_add_(ml, noise(), alpha=math.sqrt(2 * alpha * hh * temperature))
        torch._foreach_add_(pl, ml, alpha=hh)

    return step


def hand_psgld(params, grads, h=H, rho=0.99, eps=1e-8, temperature=TEMPERATURE):
    """v ← ρv + (1-ρ)g²; d = sqrt(v) + ε; θ ← θ + h g/d + sqrt(2hT) ξ/sqrt(d)."""
    pl, gl = list(params.values()), list(grads.values())
    vl = [torch.zeros_like(p) for p in pl]
    noise = FlatNoise(pl)
    scale = math.sqrt(2 * h * temperature)

    def step():
        torch._foreach_mul_(vl, rho)
        torch._foreach_addcmul_(vl, gl, gl, value=1 - rho)
        denom = torch._foreach_sqrt(vl)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(pl, gl, denom, value=h)
        torch._foreach_sqrt_(denom)
        torch._foreach_addcdiv_(pl, noise(), denom, value=scale)

    return step


def hand_sgnht(params, grads, h=H, alpha=ALPHA, temperature=TEMPERATURE):
    """Semi-implicit SGNHT: m ← (1 - hξ) m + h g + sqrt(2αhT) ζ; θ ← θ + h m; ξ ← ξ + h(|m|²/d - T)."""
    pl, gl = list(params.values()), list(grads.values())
    ml = [torch.zeros_like(p) for p in pl]
    xi = torch.tensor(alpha)
    d = sum(p.numel() for p in pl)
    noise = FlatNoise(pl)
    scale = math.sqrt(2 * alpha * h * temperature)

    def step():
        torch._foreach_mul_(ml, 1.0 - h * xi)
        torch._foreach_add_(ml, gl, alpha=h)
        torch._foreach_add_(ml, noise(), alpha=scale)
        torch._foreach_add_(pl, ml, alpha=h)
        sq = torch.stack(torch._foreach_norm(ml)).square().sum()
        xi.add_(h * (sq / d - temperature))

    return step


def hand_baoa(params, grads, h=H, alpha=ALPHA, temperature=TEMPERATURE):
    """posteriors' BAOA: m += h g; θ += h/2 m; m ← c m + z ξ; θ += h/2 m."""
    pl, gl = list(params.values()), list(grads.values())
    ml = [torch.zeros_like(p) for p in pl]
    noise = FlatNoise(pl)
    c = math.exp(-alpha * h)
    z = math.sqrt(temperature * (1 - c * c))

    def step():
        torch._foreach_add_(ml, gl, alpha=h)
        torch._foreach_add_(pl, ml, alpha=h / 2)
        torch._foreach_mul_(ml, c)
        torch._foreach_add_(ml, noise(), alpha=z)
        torch._foreach_add_(pl, ml, alpha=h / 2)

    return step


def hand_adam_sghmc(params, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, temperature=1e-4):
    """Adam's foreach arithmetic plus noise sqrt(2T(1-β₁)) P^{1/2} ξ in the momentum."""
    pl, gl = list(params.values()), list(grads.values())
    ml = [torch.zeros_like(p) for p in pl]
    vl = [torch.zeros_like(p) for p in pl]
    noise = FlatNoise(pl)
    b1, b2 = betas
    k = math.sqrt(lr / (1 - b1))
    h = k * (1 - b1)
    scale = math.sqrt(2 * temperature * (1 - b1))
    t = [0]

    def step():
        t[0] += 1
        bc1, bc2 = 1 - b1 ** t[0], 1 - b2 ** t[0]
        torch._foreach_mul_(vl, b2)
        torch._foreach_addcmul_(vl, gl, gl, value=1 - b2)
        denom = torch._foreach_sqrt(vl)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(ml, b1)
        torch._foreach_add_(ml, gl, alpha=h)
        root = torch._foreach_sqrt(denom)
        torch._foreach_addcmul_(ml, noise(), root, value=scale)
        torch._foreach_addcdiv_(pl, ml, denom, value=h / bc1)

    return step


class HandSplitting:
    """Autograd gradient + a hand-written BAOAB or OBABO step (one gradient per step, reused)."""

    def __init__(self, params, data, word, h=H, alpha=ALPHA, temperature=TEMPERATURE):
        self.params, self.data, self.word = params, data, word
        self.pl = list(params.values())
        for p in self.pl:
            p.requires_grad_(True)
        self.ml = [torch.zeros_like(p) for p in self.pl]
        self.noise = FlatNoise(self.pl)
        self.h = h
        o_len = h / 2 if word == "OBABO" else h
        self.c = math.exp(-alpha * o_len)
        self.z = math.sqrt(temperature * (1 - self.c * self.c))
        self.g = None

    def grad(self):
        value, _ = linear_lp(self.params, self.data)
        return torch.autograd.grad(value, self.pl)

    def o(self):
        torch._foreach_mul_(self.ml, self.c)
        torch._foreach_add_(self.ml, self.noise(), alpha=self.z)

    def __call__(self):
        h = self.h
        if self.g is None:
            self.g = self.grad()
        with torch.no_grad():
            if self.word == "BAOAB":
                torch._foreach_add_(self.ml, self.g, alpha=h / 2)
                torch._foreach_add_(self.pl, self.ml, alpha=h / 2)
                self.o()
                torch._foreach_add_(self.pl, self.ml, alpha=h / 2)
        if self.word == "BAOAB":
            self.g = self.grad()
            with torch.no_grad():
                torch._foreach_add_(self.ml, self.g, alpha=h / 2)
            return
        with torch.no_grad():  # OBABO
            self.o()
            torch._foreach_add_(self.ml, self.g, alpha=h / 2)
            torch._foreach_add_(self.pl, self.ml, alpha=h)
        self.g = self.grad()
        with torch.no_grad():
            torch._foreach_add_(self.ml, self.g, alpha=h / 2)
            self.o()


def cyclical(cycle_length, exploration=0.25):
    def schedule(t):
        return 0.5 * (math.cos(math.pi * ((t % cycle_length) / cycle_length)) + 1.0)
    return schedule


# ----- presets under test ---------------------------------------------------------------------
# (label, module, build kwargs, torch optimizer factory, fused factory or None)
def _optimizers():
    return [
        ("sgd", "bayesflow.optim.sgd", {"lr": 1e-3},
         lambda pl: torch.optim.SGD(pl, lr=1e-3, foreach=True), None),
        ("sgd momentum=0.9", "bayesflow.optim.sgd", {"lr": 1e-3, "momentum": 0.9},
         lambda pl: torch.optim.SGD(pl, lr=1e-3, momentum=0.9, foreach=True), None),
        ("sgd nesterov", "bayesflow.optim.sgd", {"lr": 1e-3, "momentum": 0.9, "nesterov": True},
         lambda pl: torch.optim.SGD(pl, lr=1e-3, momentum=0.9, nesterov=True, foreach=True), None),
        ("rmsprop", "bayesflow.optim.rmsprop", {"lr": 1e-3},
         lambda pl: torch.optim.RMSprop(pl, lr=1e-3, foreach=True), None),
        ("rmsprop centered momentum=0.9", "bayesflow.optim.rmsprop", {"lr": 1e-3, "momentum": 0.9, "centered": True},
         lambda pl: torch.optim.RMSprop(pl, lr=1e-3, momentum=0.9, centered=True, foreach=True), None),
        ("adam", "bayesflow.optim.adam", {"lr": 1e-3},
         lambda pl: torch.optim.Adam(pl, lr=1e-3, foreach=True),
         lambda pl: torch.optim.Adam(pl, lr=1e-3, fused=True)),
        ("adamw", "bayesflow.optim.adamw", {"lr": 1e-3},
         lambda pl: torch.optim.AdamW(pl, lr=1e-3, foreach=True),
         lambda pl: torch.optim.AdamW(pl, lr=1e-3, fused=True)),
    ]


# (label, module, build kwargs, hand-written factory(params, grads))
def _samplers():
    return [
        ("sgld", "bayesflow.sgmcmc.sgld", {"lr": H, "temperature": TEMPERATURE}, hand_sgld),
        ("sghmc", "bayesflow.sgmcmc.sghmc", {"lr": H, "alpha": ALPHA, "temperature": TEMPERATURE}, hand_sghmc),
        ("psgld", "bayesflow.sgmcmc.psgld", {"lr": H, "temperature": TEMPERATURE}, hand_psgld),
        ("sgnht", "bayesflow.sgmcmc.sgnht", {"lr": H, "alpha": ALPHA, "temperature": TEMPERATURE}, hand_sgnht),
        ("baoa", "bayesflow.sgmcmc.baoa", {"lr": H, "alpha": ALPHA, "temperature": TEMPERATURE}, hand_baoa),
        ("adam_sghmc", "bayesflow.sgmcmc.adam_sghmc", {"lr": 1e-3, "temperature": 1e-4}, hand_adam_sghmc),
        ("csgld", "bayesflow.sgmcmc.csgld", {"lr": H, "cycle_length": 100, "temperature": TEMPERATURE},
         lambda p, g: hand_sgld(p, g, schedule=cyclical(100))),
        ("csghmc", "bayesflow.sgmcmc.csghmc", {"lr": H, "cycle_length": 100, "alpha": ALPHA,
                                               "temperature": TEMPERATURE},
         lambda p, g: hand_sghmc(p, g, schedule=cyclical(100))),
    ]


SPLITTING = [("baoab", "bayesflow.sgmcmc.baoab", "BAOAB"), ("obabo", "bayesflow.sgmcmc.obabo", "OBABO")]


def ours_step(module, kwargs, params, grads):
    transform = module.build(gaussian_lp, **kwargs)
    box = [transform.init(params, seed=0)]

    def step():
        box[0] = transform.step(box[0], grads, inplace=True)

    return step


def ours_update(module, kwargs, params, data):
    transform = module.build(linear_lp, **kwargs)
    box = [transform.init(params, seed=0)]

    def update():
        box[0], _ = transform.update(box[0], data, inplace=True)

    return update


def torch_step(factory, params, grads):
    pl = list(params.values())
    for p, g in zip(pl, grads.values()):
        p.grad = g.neg()  # loss = -ℓ
    return factory(pl).step


# ----- memory ---------------------------------------------------------------------------------
def steady_memory(first: callable, more: callable) -> dict:
    """Memory of a running method, from two profiled phases.

    ``first()`` builds, initialises and takes the first step (lazy state, buffers); ``more()`` takes
    3 more steps. ``steady = net(first) + peak(more)``: everything the method keeps alive after
    warming up plus the largest transient of a step (gradient included). ``first_peak`` is the
    peak of the warm-up phase (initial momenta draws, lazy allocations).
    """
    a = peak_extra_bytes(first)
    b = peak_extra_bytes(more)
    return {"steady": a["net"] + b["peak"], "first_peak": a["peak"], "kept_after_first": a["net"],
            "step_peak": b["peak"]}


def _memory_ours(module, kwargs, n, leaves=LEAVES):
    params, data = make_params(n, leaves=leaves), list(make_params(n, seed=2, leaves=leaves).values())
    box = {}

    def first():
        box["transform"] = transform = module.build(linear_lp, **kwargs)
        box["state"], _ = transform.update(transform.init(params, seed=0), data, inplace=True)

    def more():
        for _ in range(3):
            box["state"], _ = box["transform"].update(box["state"], data, inplace=True)

    mem = steady_memory(first, more)
    mem["state_extra"] = storage_bytes(box["state"], exclude=params)
    return mem, storage_bytes(params)


def _memory_torch(factory, n):
    params, data = make_params(n), list(make_params(n, seed=2).values())
    pl = list(params.values())
    for p in pl:
        p.requires_grad_(True)
    box = {}

    def train_step():
        optimizer = box["optimizer"]
        optimizer.zero_grad(set_to_none=True)
        (-linear_lp(params, data)[0]).backward()
        optimizer.step()

    def first():
        box["optimizer"] = factory(pl)
        train_step()

    def more():
        for _ in range(3):
            train_step()

    return steady_memory(first, more), storage_bytes(params)


def _memory_posteriors(name, kwargs, n, leaves=LEAVES):
    with quiet_import():
        import posteriors
    module = getattr(posteriors.sgmcmc, name)
    params, data = make_params(n, leaves=leaves), list(make_params(n, seed=2, leaves=leaves).values())
    box = {}

    def first():
        box["transform"] = transform = module.build(linear_lp, **kwargs)
        box["state"], _ = transform.update(transform.init(params), data, inplace=True)

    def more():
        for _ in range(3):
            box["state"], _ = box["transform"].update(box["state"], data, inplace=True)

    return steady_memory(first, more), storage_bytes(params)


MEMORY = [
    # (label, module, kwargs, target, reference kind, reference spec)
    ("sgld", "bayesflow.sgmcmc.sgld", {"lr": H}, 2.0, "posteriors", ("sgld", {"lr": H})),
    ("sghmc", "bayesflow.sgmcmc.sghmc", {"lr": H}, 3.0, "posteriors", ("sghmc", {"lr": H})),
    ("sgnht", "bayesflow.sgmcmc.sgnht", {"lr": H}, None, "posteriors", ("sgnht", {"lr": H})),
    ("baoa", "bayesflow.sgmcmc.baoa", {"lr": H}, None, "posteriors", ("baoa", {"lr": H})),
    ("psgld", "bayesflow.sgmcmc.psgld", {"lr": H}, None, "torch", lambda pl: torch.optim.RMSprop(pl, foreach=True)),
    ("sgd momentum=0.9", "bayesflow.optim.sgd", {"lr": 1e-3, "momentum": 0.9}, None, "torch",
     lambda pl: torch.optim.SGD(pl, lr=1e-3, momentum=0.9, foreach=True)),
    ("rmsprop", "bayesflow.optim.rmsprop", {"lr": 1e-3}, None, "torch",
     lambda pl: torch.optim.RMSprop(pl, lr=1e-3, foreach=True)),
    ("adam", "bayesflow.optim.adam", {"lr": 1e-3}, 4.0, "torch", lambda pl: torch.optim.Adam(pl, foreach=True)),
    ("adamw", "bayesflow.optim.adamw", {"lr": 1e-3}, 4.0, "torch", lambda pl: torch.optim.AdamW(pl, foreach=True)),
    ("adam_sghmc", "bayesflow.sgmcmc.adam_sghmc", {"lr": 1e-3, "temperature": 1e-4}, 4.0, "torch",
     lambda pl: torch.optim.Adam(pl, foreach=True)),
]


# ----- the benchmark --------------------------------------------------------------------------
def _settings(quick: bool) -> dict:
    if quick:
        return {"sizes": [10**3], "memory": 10**4, "repeats": 3, "block_s": 0.002}
    return {"sizes": [10**6, 10**7], "memory": 10**6, "repeats": 11, "block_s": 0.05}


OPT_TARGET = 1.1
SAMPLER_TARGET = 1.15


def run(quick: bool = False, out_dir: Path | None = None, verbose: bool = True) -> list[Row]:
    cfg = _settings(quick)
    kw = {"repeats": cfg["repeats"], "block_s": cfg["block_s"]}
    rows: list[Row] = []
    raw: dict = {}
    missing: list[str] = []

    def log(*args):
        if verbose:
            print(*args, flush=True)

    def target(t):
        return None if quick else t

    for n in cfg["sizes"]:
        base = make_params(n)
        grads = {k: torch.randn_like(v) for k, v in make_params(n, seed=1).items()}
        data = list(make_params(n, seed=2).values())

        for label, modname, kwargs, foreach, fused in _optimizers():
            module = available(modname)
            if module is None:
                missing.append(modname)
                continue
            contenders = {"ours": ours_step(module, kwargs, clone(base), grads),
                          "torch foreach": torch_step(foreach, clone(base), grads)}
            if fused is not None:
                contenders["torch fused"] = torch_step(fused, clone(base), grads)
            res = compare(contenders, **kw)
            raw[f"optim/{label}/{n}"] = res
            ratio, note = row_ratio(res, "ours", "torch foreach")
            rows.append(Row(f"optim `{label}` step (T=0)", fmt_size(n), res["times"]["ours"]["median_s"],
                            res["times"]["torch foreach"]["median_s"], ratio, target(OPT_TARGET),
                            baseline_name="torch foreach", note=note))
            log(f"optim {label} n={fmt_size(n)}: {fmt_time(res['times']['ours']['median_s'])} vs "
                f"{fmt_time(res['times']['torch foreach']['median_s'])} -> {ratio:.3f}x {note}")
            if fused is not None:
                ratio, note = row_ratio(res, "ours", "torch fused")
                rows.append(Row(f"optim `{label}` step (T=0) vs fused (reference)", fmt_size(n),
                                res["times"]["ours"]["median_s"], res["times"]["torch fused"]["median_s"],
                                ratio, None, baseline_name="torch fused", note=note))
                log(f"optim {label} n={fmt_size(n)} vs fused -> {ratio:.3f}x")
            del contenders, res

        for label, modname, kwargs, hand in _samplers():
            module = available(modname)
            if module is None:
                missing.append(modname)
                continue
            contenders = {"ours": ours_step(module, kwargs, clone(base), grads),
                          "hand": hand(clone(base), grads)}
            res = compare(contenders, **kw)
            raw[f"sampler/{label}/{n}"] = res
            ratio, note = row_ratio(res, "ours", "hand")
            rows.append(Row(f"sgmcmc `{label}` step", fmt_size(n), res["times"]["ours"]["median_s"],
                            res["times"]["hand"]["median_s"], ratio, target(SAMPLER_TARGET),
                            baseline_name="hand foreach", note=note))
            log(f"sampler {label} n={fmt_size(n)}: {fmt_time(res['times']['ours']['median_s'])} vs "
                f"{fmt_time(res['times']['hand']['median_s'])} -> {ratio:.3f}x {note}")
            del contenders, res

        for label, modname, word in SPLITTING:
            module = available(modname)
            if module is None:
                missing.append(modname)
                continue
            kwargs = {"lr": H, "alpha": ALPHA, "temperature": TEMPERATURE}
            contenders = {"ours": ours_update(module, kwargs, clone(base), data),
                          "hand": HandSplitting(clone(base), data, word)}
            res = compare(contenders, **kw)
            raw[f"sampler/{label}/{n}"] = res
            ratio, note = row_ratio(res, "ours", "hand")
            rows.append(Row(f"sgmcmc `{label}` update (linear ℓ)", fmt_size(n), res["times"]["ours"]["median_s"],
                            res["times"]["hand"]["median_s"], ratio, target(SAMPLER_TARGET),
                            baseline_name="autograd + hand foreach", note=note))
            log(f"sampler {label} n={fmt_size(n)}: {ratio:.3f}x {note}")
            del contenders, res

    n = cfg["memory"]
    for label, modname, kwargs, goal, kind, ref in MEMORY:
        module = available(modname)
        if module is None:
            missing.append(modname)
            continue
        mem, param_bytes = _memory_ours(module, kwargs, n)
        ours = mem["steady"] / param_bytes
        note = (f"state beyond params {mem['state_extra'] / param_bytes:.2f}×, warm-up peak "
                f"{mem['first_peak'] / param_bytes:.2f}×")
        if kind == "posteriors" and available("posteriors") is None:
            ref_mem, ref_name, baseline = None, "", None
        else:
            if kind == "posteriors":
                ref_mem, ref_bytes = _memory_posteriors(ref[0], ref[1], n)
                ref_name = f"posteriors {ref[0]}"
            else:
                ref_mem, ref_bytes = _memory_torch(ref, n)
                ref_name = "torch.optim foreach"
            baseline = ref_mem["steady"] / ref_bytes
            note += f" (ref {ref_mem['first_peak'] / ref_bytes:.2f}×)"
        raw[f"memory/{label}"] = {"ours": mem, "param_bytes": param_bytes, "reference": ref_mem,
                                  "reference_name": ref_name}
        rows.append(Row(f"memory `{label}`: extra / params while stepping (incl. gradient)",
                        fmt_size(n), ours, baseline, None if baseline is None else ours / baseline, target(goal),
                        unit="x", baseline_name=ref_name, note=note))
        log(f"memory {label}: {ours:.2f}x ({note}) vs {ref_name} {baseline}")

    # posteriors' tree_map temporaries are per leaf: with one parameter tensor they are whole-model sized
    sghmc = available("bayesflow.sgmcmc.sghmc")
    if sghmc is not None and available("posteriors") is not None:
        mem, param_bytes = _memory_ours(sghmc, {"lr": H}, n, leaves=1)
        ref_mem, ref_bytes = _memory_posteriors("sghmc", {"lr": H}, n, leaves=1)
        ours, baseline = mem["steady"] / param_bytes, ref_mem["steady"] / ref_bytes
        raw["memory/sghmc one leaf"] = {"ours": mem, "param_bytes": param_bytes, "reference": ref_mem}
        rows.append(Row("memory `sghmc`, params = one tensor", fmt_size(n), ours, baseline, ours / baseline,
                        target(3.0), unit="x", baseline_name="posteriors sghmc",
                        note=f"warm-up peak {mem['first_peak'] / param_bytes:.2f}× "
                             f"(ref {ref_mem['first_peak'] / ref_bytes:.2f}×)"))
        log(f"memory sghmc one leaf: {ours:.2f}x vs posteriors {baseline:.2f}x")

    path = write_json("presets" if not quick else "presets_quick", rows, raw, directory=out_dir,
                      leaves=LEAVES, quick=quick, missing=sorted(set(missing)))
    log(f"wrote {path}" + (f" (missing presets: {sorted(set(missing))})" if missing else ""))
    return rows


def main(argv=None):
    cli(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
