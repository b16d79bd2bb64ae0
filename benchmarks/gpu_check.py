"""GPU check: every preset on CUDA tensors, exactness against torch.optim there, and step timings.

Not part of CI (which has no GPU); run it on a CUDA machine:

    PYTHONPATH=src python benchmarks/gpu_check.py [--out DIR]

Checks (each prints one line and lands in ``gpu_check.json``):

* every sampler and optimizer preset runs in place and functionally with dict parameters on the GPU;
  params, momenta, preconditioner statistics and the log posterior stay on the device and finite;
* the engine's direct autograd-engine call equals ``torch.autograd.grad``; in-place steps (which keep
  their requires-grad aliases) equal functional ones bitwise; a swapped ``.data`` is seen;
* the same seed reproduces a trajectory bitwise, a checkpoint resumes it bitwise;
* T = 0 presets equal ``torch.optim`` (foreach) on the GPU: float64 to 1e-12 relative;
* SGLD with 4096 chains in one state on N(0, 1): the stationary variance of Euler–Maruyama,
  1 / (1 - h/2), within 5 Monte-Carlo standard errors;
* a deep ensemble of an MLP through ``vectorize="vmap"`` and ``"batched"`` on the GPU;
* timings (CUDA-synchronised medians) of the SGLD step and of Adam at 1e7 parameters against
  hand-written foreach loops and ``torch.optim``;
* the compiled step (``compile=True``: Triton on the GPU) equals the eager step for Adam, SGLD and
  BAOAB, and its Adam step against torch's ``fused=True`` (target ≤ 1.1×).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import bayesflow
from bayesflow.tree import flatten

DEVICE = os.environ.get("BAYESFLOW_CHECK_DEVICE", "cuda")  # "cpu" rehearses the script without a GPU
RESULTS: dict = {}


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def report(name: str, ok: bool, detail: str = "") -> None:
    RESULTS[name] = {"ok": bool(ok), "detail": detail}
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def gaussian(params, batch):
    return -0.5 * sum((v * v).sum() for v in params.values()), None


def make_params(n: int = 1000, dtype=torch.float32, leaves: int = 4):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return {f"w{i}": torch.randn(n // leaves, dtype=dtype, device=DEVICE, generator=g) for i in range(leaves)}


PRESETS = [
    ("sgmcmc.sgld", {"lr": 1e-2, "temperature": 0.1}),
    ("sgmcmc.sghmc", {"lr": 1e-2, "temperature": 0.1}),
    ("sgmcmc.sgnht", {"lr": 1e-2, "temperature": 0.1}),
    ("sgmcmc.baoa", {"lr": 1e-2, "temperature": 0.1}),
    ("sgmcmc.baoab", {"lr": 1e-2, "temperature": 0.1}),
    ("sgmcmc.obabo", {"lr": 1e-2, "temperature": 0.1}),
    ("sgmcmc.psgld", {"lr": 1e-3, "temperature": 0.1}),
    ("sgmcmc.adam_sghmc", {"lr": 1e-3, "temperature": 0.1}),
    ("sgmcmc.csgld", {"lr": 1e-2, "cycle_length": 10, "temperature": 0.1}),
    ("sgmcmc.csghmc", {"lr": 1e-2, "cycle_length": 10, "temperature": 0.1}),
    ("optim.sgd", {"lr": 1e-2, "momentum": 0.9}),
    ("optim.rmsprop", {"lr": 1e-3, "centered": True}),
    ("optim.adam", {"lr": 1e-3}),
    ("optim.adamw", {"lr": 1e-3}),
]


def tensors_of(state):
    return [t for t in flatten(bayesflow.state_dict(state))[0] if isinstance(t, torch.Tensor)]


def check_presets() -> None:
    for name, kwargs in PRESETS:
        try:
            module = importlib.import_module(f"bayesflow.{name}")
            transform = module.build(gaussian, **kwargs)
            state = transform.init(make_params(), seed=0)
            for inplace in (True, False, True):
                for _ in range(5):
                    state, _ = transform.update(state, None, inplace=inplace)
            off = [t.device.type for t in (*state.params.values(), state.log_posterior) if t.device.type != DEVICE]
            finite = all(torch.isfinite(t).all() for t in state.params.values())
            report(f"preset {name} on {DEVICE}", not off and finite, f"off-device={off} finite={finite}")
        except Exception as error:  # report and go on: one line per preset
            report(f"preset {name} on {DEVICE}", False, f"{type(error).__name__}: {error}")


def check_module_parameters() -> None:
    """The README quick start on the GPU: nn.Parameters of a module move in place."""
    from bayesflow.sgmcmc import sghmc

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).to(DEVICE)
    x, y = torch.randn(32, 8, device=DEVICE), torch.randint(0, 2, (32,), device=DEVICE)

    def log_posterior(params, batch):
        logits = torch.func.functional_call(model, params, (x,))
        return -torch.nn.functional.cross_entropy(logits, y), None

    transform = sghmc.build(log_posterior, lr=1e-2, temperature=1e-3)
    state = transform.init(dict(model.named_parameters()), seed=0)
    before = model[0].weight.detach().clone()
    for _ in range(5):
        state, _ = transform.update(state, None, inplace=True)
    report("module parameters updated in place", state.params["0.weight"] is model[0].weight
           and not torch.equal(before, model[0].weight.detach()))


def check_gradient_paths() -> None:
    """The direct autograd-engine call equals torch.autograd.grad; in-place steps (kept aliases)
    equal functional ones (fresh aliases) bitwise; a swapped ``.data`` is seen by the next step."""
    from bayesflow.engine import SDEConfig, build
    from bayesflow.engine.gradients import gradient

    leaves = [t.clone().requires_grad_(True) for t in make_params(dtype=torch.float64).values()]

    def objective():
        return sum((t.sin() * t).sum() for t in leaves)

    same = all(torch.equal(a, b) for a, b in zip(gradient(objective(), leaves),
                                                   torch.autograd.grad(objective(), leaves)))
    report("direct autograd-engine gradient == torch.autograd.grad", same)
    transform = build(gaussian, SDEConfig(step_size=1e-2, temperature=0.1))
    runs = []
    for inplace in (True, False):
        state = transform.init(make_params(), seed=5)
        for _ in range(8):
            state, _ = transform.update(state, None, inplace=inplace)
        runs.append(state.params)
    report("in place (kept aliases) == functional, bitwise", all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]))
    descent = build(gaussian, SDEConfig(step_size=0.5, temperature=0.0))  # θ ← θ - 0.5 θ
    params = make_params()
    state, _ = descent.update(descent.init(params), None, inplace=True)
    params["w0"].data = torch.full_like(params["w0"], 2.0)
    state, _ = descent.update(state, None, inplace=True)
    report("a swapped .data is seen by the next step", bool((state.params["w0"] == 1.0).all()))


def check_reproducibility() -> None:
    from bayesflow.sgmcmc import sghmc

    def run(transform, state, steps):
        for _ in range(steps):
            state, _ = transform.update(state, None, inplace=True)
        return state

    transform = sghmc.build(gaussian, lr=1e-2, temperature=0.1)
    a = run(transform, transform.init(make_params(), seed=3), 10)
    b = run(transform, transform.init(make_params(), seed=3), 10)
    same = all(torch.equal(x, y) for x, y in zip(tensors_of(a), tensors_of(b)))
    report("same seed reproduces bitwise", same)
    state = run(transform, transform.init(make_params(), seed=3), 4)
    buffer = io.BytesIO()
    torch.save(bayesflow.state_dict(state), buffer)
    reference = run(transform, state, 6)
    buffer.seek(0)
    fresh = sghmc.build(gaussian, lr=1e-2, temperature=0.1)
    loaded = bayesflow.load_state_dict(fresh.init(make_params(), seed=9), torch.load(buffer, weights_only=True))
    resumed = run(fresh, loaded, 6)
    same = all(torch.equal(x, y) for x, y in zip(tensors_of(reference), tensors_of(resumed)))
    report("checkpoint resumes bitwise", same)


def check_optim_equivalence() -> None:
    from bayesflow.optim import adam, adamw, rmsprop, sgd

    cases = [(sgd, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9, "nesterov": True}),
             (rmsprop, torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5, "centered": True}),
             (adam, torch.optim.Adam, {"lr": 1e-3, "amsgrad": True}),
             (adamw, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1})]
    target = make_params(40000, dtype=torch.float64)

    def loss(params):
        return sum(((params[k] - 2 * target[k]) ** 2).mean() + 0.1 * (params[k] ** 4).mean() for k in target)

    for module, cls, hyper in cases:
        transform = module.build(lambda p, b: (-loss(p), None), **hyper)
        state = transform.init({k: torch.zeros_like(v) for k, v in target.items()})
        theirs = {k: torch.zeros_like(v).requires_grad_(True) for k, v in target.items()}
        optimizer = cls(list(theirs.values()), foreach=True, **hyper)
        error = 0.0
        for _ in range(20):
            state, _ = transform.update(state, None, inplace=True)
            optimizer.zero_grad()
            loss(theirs).backward()
            optimizer.step()
            scale = max(v.abs().max().item() for v in theirs.values())
            error = max(error, max((state.params[k] - theirs[k]).abs().max().item() for k in target) / scale)
        report(f"T=0 {module.__name__.split('.')[-1]} == torch.optim (float64)", error < 1e-12,
               f"max relative error {error:.2e}")


def check_stationary_variance() -> None:
    from bayesflow.ensemble import lift
    from bayesflow.sgmcmc import sgld

    h, dimension, burn, steps = 0.1, 1 << 16, 200, 2000

    def log_posterior(params, batch):
        return -0.5 * (params["x"] ** 2).sum(), None

    # d independent coordinates of N(0, 1) in one chain: x' = (1 - h) x + sqrt(2h) ξ, an AR(1)
    transform = sgld.build(log_posterior, lr=h, temperature=1.0)
    state = transform.init({"x": torch.zeros(dimension, device=DEVICE, dtype=torch.float64)}, seed=0)
    second = torch.zeros((), device=DEVICE, dtype=torch.float64)
    for step in range(burn + steps):
        state, _ = transform.update(state, None, inplace=True)
        if step >= burn:
            second += (state.params["x"] ** 2).mean()
    estimate = (second / steps).item()
    exact = 1.0 / (1.0 - h / 2.0)
    rho = 1.0 - h  # x² of a Gaussian AR(1) has autocorrelation ρ^(2k); Var[x²] = 2σ⁴
    effective = dimension * steps * (1.0 - rho**2) / (1.0 + rho**2)
    standard_error = math.sqrt(2.0) * exact / math.sqrt(effective)
    report("SGLD on N(0, I): Var = 1/(1 - h/2)", abs(estimate - exact) < 5 * standard_error,
           f"estimate {estimate:.5f} exact {exact:.5f} ± {standard_error:.5f}")

    misplaced = lift(sgld.build(log_posterior, lr=h, temperature=1.0), 8, temperature=torch.ones(8))
    try:
        misplaced.init({"x": torch.zeros(8, 4, device=DEVICE, dtype=torch.float64)})
        raised = DEVICE == "cpu"  # on the CPU there is no other device to misplace it on
    except ValueError as error:
        raised = "move it with .to(" in str(error)
    report("a per-chain temperature on another device is rejected at init", raised)

    chains = lift(sgld.build(log_posterior, lr=h, temperature=1.0), 8,
                  temperature=torch.linspace(0.5, 2.0, 8, dtype=torch.float64, device=DEVICE))
    state = chains.init({"x": torch.zeros(8, 1024, device=DEVICE, dtype=torch.float64)}, seed=0)
    for _ in range(300):
        state, _ = chains.update(state, None, inplace=True)
    variances = state.params["x"].var(dim=1)
    ratio = (variances[-1] / variances[0]).item()  # temperature 2.0 vs 0.5: about 4
    report("8 chains with per-chain temperature", state.params["x"].device.type == DEVICE and 3.0 < ratio < 5.3,
           f"variance ratio of the hottest to the coldest chain {ratio:.2f} (theory 4)")


def check_ensemble() -> None:
    import torch.nn.functional as F

    from bayesflow.ensemble import deep_ensemble
    from bayesflow.optim import sgd

    k, g = 16, torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(64, 20, device=DEVICE, generator=g)
    y = torch.randint(0, 5, (64,), device=DEVICE, generator=g)
    params = {"w": torch.randn(k, 20, 5, device=DEVICE, generator=g) * 0.1, "b": torch.zeros(k, 5, device=DEVICE)}

    def single(p, batch):
        return -F.cross_entropy(batch[0] @ p["w"] + p["b"], batch[1]), None

    def batched(p, batch):
        logits = torch.baddbmm(p["b"].unsqueeze(1), batch[0].expand(k, -1, -1), p["w"])
        return -F.cross_entropy(logits.reshape(-1, 5), batch[1].repeat(k), reduction="none").view(k, -1).mean(1), None

    results = []
    for vectorize, lp in (("vmap", single), ("batched", batched)):
        transform = deep_ensemble(sgd.build(lp, lr=0.5), k, vectorize=vectorize)
        state = transform.init({n: v.clone() for n, v in params.items()})
        for _ in range(50):
            state, _ = transform.update(state, (x, y), inplace=True)
        results.append(state.params["w"])
    close = torch.allclose(results[0], results[1], rtol=1e-4, atol=1e-5)
    difference = (results[0] - results[1]).abs().max().item()
    report("deep ensemble vmap == batched", close, f"max diff {difference:.2e}")


def timed(fn, repeats: int = 30, inner: int = 10) -> float:
    for _ in range(5):
        fn()
    synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def check_timings() -> None:
    from bayesflow.engine import SDEConfig, build
    from bayesflow.optim import adam

    n, h, temperature = (10**7 if DEVICE == "cuda" else 10**5), 1e-4, 1e-3
    params = make_params(n, leaves=10)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    timings = {}
    for check in ("auto", "none"):
        transform = build(gaussian, SDEConfig(step_size=h, temperature=temperature, check_finite=check))
        box = [transform.init({k: v.clone() for k, v in params.items()}, seed=0)]

        def step(transform=transform, box=box):
            box[0] = transform.step(box[0], grads, inplace=True)

        def update(transform=transform, box=box):
            box[0], _ = transform.update(box[0], None, inplace=True)

        timings[f"engine step ({check})"] = timed(step)
        timings[f"engine update ({check})"] = timed(update)
    pl, gl = [v.clone() for v in params.values()], list(grads.values())
    buffer = torch.empty(n, device=DEVICE)
    views = list(buffer.view(10, -1).unbind(0))
    scale = math.sqrt(2 * h * temperature)

    def hand():
        torch._foreach_add_(pl, gl, alpha=h)
        torch.randn(buffer.shape, out=buffer, device=DEVICE)
        torch._foreach_add_(pl, views, alpha=scale)

    timings["hand SGLD step"] = timed(hand)

    def hand_update():
        leaves = [p.detach().requires_grad_(True) for p in pl]
        value, _ = gaussian(dict(zip(params, leaves)), None)
        torch._foreach_add_(pl, list(torch.autograd.grad(value, leaves)), alpha=h)
        torch.randn(buffer.shape, out=buffer, device=DEVICE)
        torch._foreach_add_(pl, views, alpha=scale)

    timings["hand SGLD update (autograd + step)"] = timed(hand_update)
    transform = adam.build(gaussian, lr=1e-3)
    box = [transform.init({k: v.clone() for k, v in params.items()})]

    def ours_adam():
        box[0] = transform.step(box[0], grads, inplace=True)

    timings["engine adam step"] = timed(ours_adam)
    for label, flags in (("torch Adam foreach", {"foreach": True}), ("torch Adam fused", {"fused": True})):
        theirs = [v.clone().requires_grad_(True) for v in params.values()]
        for p, g in zip(theirs, gl):
            p.grad = g
        optimizer = torch.optim.Adam(theirs, lr=1e-3, **flags)
        timings[label] = timed(optimizer.step)
    for label, value in timings.items():
        print(f"  {label}: {value * 1e3:.3f} ms", flush=True)
    RESULTS["timings_ms"] = {k: v * 1e3 for k, v in timings.items()}
    ratio = timings["engine step (auto)"] / timings["hand SGLD step"]
    report(f"SGLD step at {n:.0e} vs hand foreach", ratio <= 1.15, f"ratio {ratio:.3f}")
    ratio = timings["engine update (auto)"] / timings["hand SGLD update (autograd + step)"]
    report(f"SGLD update at {n:.0e} vs autograd + hand step (reference)", True, f"ratio {ratio:.3f}")
    ratio = timings["engine adam step"] / timings["torch Adam foreach"]
    report(f"Adam step at {n:.0e} vs torch foreach", ratio <= 1.1, f"ratio {ratio:.3f}")


def check_compiled() -> None:
    """Issue 13 on the device: compile=True equals the eager step (Adam, SGLD: the same noise, BAOAB:
    the gradient after moving, through the plan), and its step time against torch's fused Adam and
    the eager step; the small-model case (1e4) with mode "reduce-overhead" (CUDA graphs) noted."""
    from bayesflow.optim import adam
    from bayesflow.sgmcmc import baoab, sgld

    for name, module, hyper in (("adam", adam, dict(lr=1e-3)), ("sgld", sgld, dict(lr=1e-3, temperature=1e-3)),
                                ("baoab", baoab, dict(lr=1e-3, temperature=1e-3))):
        params = make_params(10_000, leaves=4)
        eager, fused = module.build(gaussian, **hyper), module.build(gaussian, **hyper, compile=True)
        a, b = eager.init({k: v.clone() for k, v in params.items()}, seed=0), fused.init(
            {k: v.clone() for k, v in params.items()}, seed=0)
        for _ in range(10):
            a, _ = eager.update(a, None, inplace=True)
            b, _ = fused.update(b, None, inplace=True)
        error = max(float((a.params[k] - b.params[k]).abs().max()) for k in params)
        report(f"compiled {name} equals eager on {DEVICE}", error < 1e-5, f"max abs diff {error:.2e}")
    n = 10**7 if DEVICE == "cuda" else 10**5
    params = make_params(n, leaves=10)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    timings = {}
    for label, mode in (("engine adam step", False), ("engine adam step compile=True", True)):
        transform = adam.build(gaussian, lr=1e-3, compile=mode)
        box = [transform.init({k: v.clone() for k, v in params.items()})]
        start = time.perf_counter()
        box[0] = transform.step(box[0], grads, inplace=True)
        synchronize()
        timings[f"{label} (first step s)"] = time.perf_counter() - start

        def step(transform=transform, box=box):
            box[0] = transform.step(box[0], grads, inplace=True)

        timings[label] = timed(step)
    timings["torch Adam fused"] = _torch_fused_adam(params, grads)
    RESULTS["compiled_timings"] = timings
    for label, value in timings.items():
        print(f"  {label}: {value * 1e3:.3f} ms", flush=True)
    ratio = timings["engine adam step compile=True"] / timings["torch Adam fused"]
    report(f"compiled Adam step at {n:.0e} vs torch fused", ratio <= 1.1, f"ratio {ratio:.3f}")
    check_reduce_overhead()


def _torch_fused_adam(params: dict, grads: dict) -> float:
    """Step time of torch's ``Adam(fused=True)`` on copies of ``params`` with ``grads`` set."""
    theirs = [v.clone().requires_grad_(True) for v in params.values()]
    for p, g in zip(theirs, grads.values()):
        p.grad = g
    return timed(torch.optim.Adam(theirs, lr=1e-3, fused=True).step)


def check_reduce_overhead() -> None:
    """The small, launch-bound case (1e4 parameters, 4 leaves): compile=True with
    ``compile_options={"mode": "reduce-overhead"}`` (CUDA graphs) equals the eager step, and its step time
    beside the eager step, plain compile=True and torch's fused Adam (recorded; on the CPU the mode has
    no graphs to capture: the rehearsal checks the numbers only)."""
    from bayesflow.optim import adam

    params = make_params(10_000, leaves=4)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    variants = {"eager": dict(), "compile=True": dict(compile=True),
                "reduce-overhead": dict(compile=True, compile_options={"mode": "reduce-overhead"})}
    timings, finals = {}, {}
    for label, options in variants.items():
        transform = adam.build(gaussian, lr=1e-3, **options)
        box = [transform.init({k: v.clone() for k, v in params.items()})]
        for _ in range(3):   # compile, and CUDA-graph capture on the later calls
            box[0] = transform.step(box[0], grads, inplace=True)

        def step(transform=transform, box=box):
            box[0] = transform.step(box[0], grads, inplace=True)

        timings[f"engine adam step 1e4 {label}"] = timed(step)
        finals[label] = box[0].params
    timings["torch Adam fused 1e4"] = _torch_fused_adam(params, grads)
    RESULTS["reduce_overhead_timings"] = timings
    for label, value in timings.items():
        print(f"  {label}: {value * 1e6:.1f} µs", flush=True)
    # every variant took the same number of steps (timed() runs a fixed count per call of it)
    error = max(float((finals["reduce-overhead"][k] - finals["compile=True"][k]).abs().max()) for k in params)
    report("reduce-overhead equals compile=True", error < 1e-5, f"max abs diff {error:.2e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return
    RESULTS["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    RESULTS["torch"] = torch.__version__
    for check in (check_presets, check_module_parameters, check_gradient_paths, check_reproducibility,
                  check_optim_equivalence, check_stationary_variance, check_ensemble, check_timings, check_compiled):
        try:
            check()
        except Exception as error:
            report(check.__name__, False, f"{type(error).__name__}: {error}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2))
    failed = [k for k, v in RESULTS.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"{len(failed)} failed: {failed}" if failed else "all GPU checks passed")


if __name__ == "__main__":
    main()
