r"""Issue 15's new configurations as mixing-benchmark entries, registered only where the library has them.

* ``bayesflow/<preset>+cv`` — the preset on control-variate gradients
  (:mod:`bayesflow.sgmcmc.control_variate`) around a mode found by the engine at T = 0. Cost counted
  honestly: 2 batch gradients a step (at θ and at θ̂), and the setup — burn-in/2 mini-batch Adam
  steps (lr 3·10⁻³), up to 20 full-batch Adam steps (lr 3·10⁻⁴) and one full-data gradient at θ̂,
  i.e. 1 000 + 21·N/B batch-gradient equivalents at the full budget, at most 85 % of the burn-in —
  paid from the burn-in. Mini-batch targets only (a full-batch gradient has no noise to reduce);
  the step grid is the full-batch one (u from 1.6 down), the gradient noise being far smaller.
* ``bayesflow/baoab+dense-mass`` — BAOAB with a dense mass learned during burn-in
  (:mod:`bayesflow.engine.learned_mass`), frozen after it. The grid is in whitened units (the
  whitened per-datum curvature is T, so h = u/√T, α = f·√T); until the last window the step is the
  identity-mass step 0.25/√λ_max (``burn_in_lr``). The step is one value per run (``burn_in_lr``
  needs a float ``lr``): 8 chains per run, whose moments are pooled for the mass (``pool=True``).
  Full-batch targets.
* ``bayesflow/baoab+grad-mass`` — the same with the gradient-informed estimate (``gradients=True``:
  Σ̂ = T·gm(C_θ, C_∇H), exact on a Gaussian from any n > d draws). Full-batch targets.
* ``bayesflow/baoab+cv+grad-mass`` — both: BAOAB on control-variate gradients with a dense
  gradient-informed mass learned in the burn-in the mode search leaves (two windows).
* ``bayesflow/baoab+cv+grad-mass+nc`` — all three: control variates, the gradient-informed dense
  mass and BAOAB's O-step noise correction through the learned root (V̂ → S V̂ S). Its step grid is
  the whitened one where the coarser grids put their best at an edge (u from 2.0 to 0.5 × f ∈ {1, 4,
  16}; on 1.6 … 0.016 × {1, 4, 16} the best was u = 0.637, f = 1, and on 1.2 … 0.3 × {0.25, 1, 4}
  u = 1.2, f = 4).
* ``bayesflow/baoab+cvtable+grad-mass+nc`` — the same with the mode's per-datum gradients stored
  (:mod:`bayesflow.sgmcmc.control_variate_table`): one batch gradient a step; the table costs one
  pass over the data at θ̂, counted as the full gradient was.
* ``bayesflow/<sgld|sghmc|baoab>+cv+nc`` — control variates and the per-direction gradient-noise
  correction (:mod:`bayesflow.sgmcmc.noise_corrected`, low rank, per-sample gradients of ℓ_cv by
  ``vmap``): the injected noise is 2ThD − h²V̂ (BAOAB: its O step's, less ((1 + c)/2)² h²V̂). Counted
  at 2 gradients a step, as the control variate alone.

Each is one :class:`~mixing_configs.Configuration` in :data:`~mixing_configs.CONFIGURATIONS`.

Example:
    >>> from mixing_extensions import register
    >>> registry = {}
    >>> names = register(registry)
    >>> all(name in registry for name in names)
    True
"""

from __future__ import annotations

import importlib
import math

import torch

__all__ = ["MODE_SETUP", "mode_steps", "register"]

MODE_SETUP = {"batch_lr": 3e-3, "full_steps": 20, "full_lr": 3e-4, "share": 0.85}


def mode_steps(burn_in: int, full: float) -> tuple[int, int]:
    """(mini-batch, full-batch) Adam steps of the mode search: half the burn-in, then full-batch steps
    (each ``full`` = N/B batch gradients) while the setup stays within 85 % of the burn-in."""
    batch_steps = burn_in // 2
    full_steps = int((MODE_SETUP["share"] * burn_in - batch_steps) // full) - 1
    return batch_steps, max(0, min(MODE_SETUP["full_steps"], full_steps))


def _either(target):
    """The target's log posterior for params ``(d,)`` (a mode) or ``(K, d)`` (chains)."""
    def log_posterior(params, batch):
        return target.single(params, batch) if params.ndim == 1 else target.log_posterior(params, batch)
    return log_posterior


def control_variate_preset(module: str, momentum: bool):
    """Factory: preset ``module`` on control-variate gradients around a mode found with Adam."""

    def factory(problem, step, friction):
        from bayesflow.ensemble import lift
        from mixing_configs import _Engine

        cv, setup = _mode_and_control_variate(problem)
        preset = importlib.import_module(f"bayesflow.sgmcmc.{module}")
        kwargs = {"alpha": float(friction)} if momentum else {}
        single = preset.build(cv, lr=float(step[0]), temperature=problem.temperature, check_finite="none", **kwargs)
        sampler = _Engine(lift(single, problem.chains, step_size=step, vectorize="batched"), problem.seeds)
        sampler.setup_gradients = setup
        return sampler

    return factory


def _mode_and_control_variate(problem):
    """(control-variate log posterior, setup cost in batch gradients): the mode search of ``MODE_SETUP``."""
    from bayesflow.sgmcmc.control_variate import control_variate, find_mode

    target = problem.target
    if target.batch_size is None:
        raise ValueError("control variates reduce mini-batch noise: this target is full batch")
    log_posterior = _either(target)
    generator = torch.Generator().manual_seed(problem.seeds[0] + 101)

    def batch_at(_step):
        return torch.randint(target.num_data, (target.batch_size,), generator=generator)

    full = target.num_data / target.batch_size
    batch_steps, full_steps = mode_steps(problem.burn_in, full)
    start = target.initial(1, problem.seeds[0] + 102)[0]
    mode = find_mode(log_posterior, start, batch_at, steps=batch_steps, lr=MODE_SETUP["batch_lr"])
    if full_steps:
        mode = find_mode(log_posterior, mode, [None], steps=full_steps, lr=MODE_SETUP["full_lr"])
    return control_variate(log_posterior, mode, None), batch_steps + (full_steps + 1) * full


def _mode_and_table(problem):
    """(control-variate table over index batches, setup cost): the mode search of ``MODE_SETUP``, then
    one pass of per-datum gradients at θ̂ (N/B batch-gradient equivalents, as the full gradient)."""
    from bayesflow.sgmcmc.control_variate_table import control_variate_table

    cv, setup = _mode_and_control_variate(problem)
    return control_variate_table(_either(problem.target), cv.mode, problem.target.num_data), setup


def noise_corrected_preset(module: str, momentum: bool):
    """Factory: preset ``module`` on control-variate gradients with the per-direction gradient-noise
    correction (:mod:`bayesflow.sgmcmc.noise_corrected`; per-sample gradients of ℓ_cv, one mini-batch
    per chain)."""

    def factory(problem, step, friction):
        from bayesflow.sgmcmc import noise_corrected
        from mixing_configs import _Engine

        cv, setup = _mode_and_control_variate(problem)
        preset = importlib.import_module(f"bayesflow.sgmcmc.{module}")
        kwargs = {"alpha": float(friction)} if momentum else {}
        base = preset.config(lr=float(step[0]), temperature=problem.temperature, check_finite="none", **kwargs)
        transform = noise_corrected.build(cv, noise_corrected.config(base), chains=problem.chains, chain_batches=True)
        sampler = _Engine(transform, problem.seeds)
        sampler.setup_gradients = setup
        return sampler

    return factory


def control_variate_mass_preset(module: str, windows: int = 2, corrected: bool = False, table: bool = False):
    """Factory: preset ``module`` on control-variate gradients with a dense gradient-informed mass
    learned in what the mode search leaves of the burn-in (2 gradients a step); ``corrected``: with
    the gradient-noise correction of BAOAB's O step through the learned root."""

    def factory(problem, step, friction):
        from bayesflow.engine.learned_mass import LearnedMass
        from bayesflow.ensemble import lift
        from mixing_configs import _Engine

        cv, setup = (_mode_and_table if table else _mode_and_control_variate)(problem)
        target = problem.target
        preset = importlib.import_module(f"bayesflow.sgmcmc.{module}")
        mass = LearnedMass("dense", burn_in=int(problem.burn_in - setup) // (1 if table else 2), windows=windows,
                           chains=problem.chains, pool=True, gradients=True)
        safe = 0.25 / math.sqrt(target.curvature[1])
        if corrected:
            from bayesflow.sgmcmc import noise_corrected

            config = preset.config(lr=float(step[0]), alpha=float(friction), temperature=problem.temperature,
                                   mass=mass, burn_in_lr=min(safe, float(step[0])), check_finite="none")
            transform = noise_corrected.build(cv, noise_corrected.config(config), chains=problem.chains,
                                              chain_batches=True)
            sampler = _Engine(transform, problem.seeds)
        else:
            transform = preset.build(cv, lr=float(step[0]), alpha=float(friction), temperature=problem.temperature,
                                     mass=mass, burn_in_lr=min(safe, float(step[0])), check_finite="none")
            sampler = _Engine(lift(transform, problem.chains, vectorize="batched"), problem.seeds)
        sampler.setup_gradients = setup
        return sampler

    return factory


def learned_mass_preset(module: str, kind: str, burn_in: int, gradients: bool = False):
    """Factory: preset ``module`` with ``LearnedMass(kind, burn_in, gradients=...)`` (one step value per run)."""

    def factory(problem, step, friction):
        from bayesflow.engine.learned_mass import LearnedMass
        from mixing_configs import _Engine

        target = problem.target
        preset = importlib.import_module(f"bayesflow.sgmcmc.{module}")
        safe = 0.25 / math.sqrt(target.curvature[1])
        mass = LearnedMass(kind, burn_in=burn_in, chains=problem.chains, pool=True, gradients=gradients)
        transform = preset.build(target.log_posterior, lr=float(step[0]), alpha=float(friction),
                                 temperature=problem.temperature, mass=mass, burn_in_lr=min(safe, float(step[0])),
                                 check_finite="none")
        from bayesflow.ensemble import lift

        return _Engine(lift(transform, problem.chains, vectorize="batched"), problem.seeds)

    return factory


def _full_batch(target) -> bool:
    return target.batch_size is None


def _mini_batch(target) -> bool:
    return target.batch_size is not None


def _whitened(target):
    return target.temperature, target.temperature


def register(registry: dict) -> list[str]:
    """Add the configurations whose modules import to ``registry``; return their names."""
    from mixing_configs import Configuration

    added = []
    try:
        importlib.import_module("bayesflow.sgmcmc.control_variate")
    except ImportError:
        pass
    else:
        for name, momentum in (("sgld", False), ("baoa", True), ("sgnht", True)):
            registry[f"bayesflow/{name}+cv"] = Configuration(
                "bayesflow", f"{name}+cv", control_variate_preset(name, momentum), order=2 if momentum else 1,
                momentum=momentum, grads_per_step=2, applies=_mini_batch,
                step_range=(1.6, 0.016))
            added.append(f"bayesflow/{name}+cv")
    try:
        importlib.import_module("bayesflow.engine.learned_mass")
        import inspect

        from bayesflow.sgmcmc import baoab
        if "mass" not in inspect.signature(baoab.config).parameters:
            raise ImportError("baoab has no mass= argument")
    except ImportError:
        pass
    else:
        for name, gradients in (("baoab+dense-mass", False), ("baoab+grad-mass", True)):
            registry[f"bayesflow/{name}"] = Configuration(
                "bayesflow", name, learned_mass_preset("baoab", "dense", burn_in=2000, gradients=gradients), order=2,
                momentum=True, per_chain_step=False, curvature=_whitened, applies=_full_batch)
            added.append(f"bayesflow/{name}")
        registry["bayesflow/baoab+cv+grad-mass"] = Configuration(
            "bayesflow", "baoab+cv+grad-mass", control_variate_mass_preset("baoab"), order=2, momentum=True,
            grads_per_step=2, per_chain_step=False, curvature=_whitened, applies=_mini_batch, step_range=(1.6, 0.016))
        added.append("bayesflow/baoab+cv+grad-mass")
        registry["bayesflow/baoab+cv+grad-mass+nc"] = Configuration(
            "bayesflow", "baoab+cv+grad-mass+nc", control_variate_mass_preset("baoab", corrected=True), order=2,
            momentum=True, grads_per_step=2, per_chain_step=False, curvature=_whitened, applies=_mini_batch,
            step_range=(2.0, 0.5), frictions=(1.0, 4.0, 16.0))
        added.append("bayesflow/baoab+cv+grad-mass+nc")
        registry["bayesflow/baoab+cvtable+grad-mass+nc"] = Configuration(
            "bayesflow", "baoab+cvtable+grad-mass+nc", control_variate_mass_preset("baoab", corrected=True, table=True),
            order=2, momentum=True, grads_per_step=1, per_chain_step=False, curvature=_whitened, applies=_mini_batch,
            step_range=(2.0, 0.5), frictions=(1.0, 4.0, 16.0))
        added.append("bayesflow/baoab+cvtable+grad-mass+nc")
    try:
        importlib.import_module("bayesflow.sgmcmc.noise_corrected")
    except ImportError:
        pass
    else:
        for name, momentum in (("sgld", False), ("sghmc", True), ("baoab", True)):
            registry[f"bayesflow/{name}+cv+nc"] = Configuration(
                "bayesflow", f"{name}+cv+nc", noise_corrected_preset(name, momentum), order=2 if momentum else 1,
                momentum=momentum, grads_per_step=2, per_chain_step=False, applies=_mini_batch,
                step_range=(1.6, 0.016))
            added.append(f"bayesflow/{name}+cv+nc")
    return added
