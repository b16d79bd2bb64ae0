r"""``as_optimizer``: any engine transform — sampler or optimizer — as a ``torch.optim.Optimizer``.

The face reads the gradients torch left in ``p.grad`` and advances the parameters in place through
the engine's ``step(state, grads, inplace=True)``, so everything that works on ``.grad`` keeps working:
AMP's ``GradScaler`` (it unscales before calling ``step``), gradient clipping, DDP's reduced
gradients, gradient accumulation, Lightning's and Hugging Face's training loops.

**Sign and scale.** torch minimises a loss; the engine ascends the per-datum log posterior ℓ
(posteriors' convention). The face passes ∇ℓ = −``p.grad``, i.e. it reads the loss as

.. math::
    \mathrm{loss}(θ) = -ℓ(θ) = -\frac1N \Big(\sum_{i=1}^N \log p(y_i \mid θ) + \log p(θ)\Big)
    \quad\text{(the mean negative log likelihood plus the prior's share)},

and runs :math:`dz = -[D+Q]\nabla H\,dt + TΓ\,dt + \sqrt{2TD}\,dW` with :math:`H = \mathrm{loss} +` kinetic
terms. Its stationary law is :math:`\propto \exp(-\mathrm{loss}/T)`: **T = 1/N samples the Bayesian
posterior**, T = 0 is the preset's optimizer (``bayesflow.optim.adam.build`` at T = 0 *is*
``torch.optim.Adam``, step for step). A loss summed over the data set takes ``num_data=N`` (the engine
divides the gradient by N), with the same T = 1/N.

**Param groups** carry ``lr``, ``temperature`` and every preset option (``momentum``, ``alpha``,
``betas``, ...); each group is one engine transform with its own state and noise key. Changes to a
group's options are picked up at the next ``step`` (``torch.optim.lr_scheduler`` writes
``group["lr"]``; write ``group["temperature"]`` to schedule T): when only the engine's step size h
and temperature change (SG-MCMC samplers, SGD and RMSprop without momentum) the transform is kept
and two live values are updated; presets whose operators depend on lr (SGD with momentum, Adam,
AdamW, RMSprop with momentum: h = √lr·…) rebuild their transform, keeping the state. There the
momenta are rescaled so that the velocity per unit of lr, :math:`h M^{-1} m / \mathrm{lr}` — torch's
momentum buffer at T = 0 — is unchanged: a scheduled face equals the scheduled torch.optim
optimizer (for the samplers h = lr and nothing is rescaled).

**lr = 0** (``CosineAnnealingLR(eta_min=0)`` at its end, a linear warm-up from 0 at its first step, as
Hugging Face's ``get_linear_schedule_with_warmup``) is the limit lr → 0⁺ of the step in the
coordinates the face stores. The presets refuse lr = 0 themselves (h = √lr and the friction
(1 − μ)/√lr have no value there); the face takes it as follows.

* At T = 0, for the presets whose momenta are torch's buffer (m = −c·buf, c = lr·s/h = √lr·…: SGD
  with momentum, Adam, AdamW, RMSprop with momentum) and for those without momenta, the step tends to
  (SGD's buffer and Adam's second moment, for instance)

  .. math::
      θ_{t+1} = θ_t, \qquad \mathrm{buf}_{t+1} = μ\,\mathrm{buf}_t + (1 - τ)\,g_t, \qquad
      v_{t+1} = β_2 v_t + (1 - β_2)\, g_t^2, \qquad t \to t + 1,

  torch's lr = 0 step: every statistic of torch.optim (momentum buffer, Adam's moments and step
  count, RMSprop's averages) is independent of lr, and AdamW's decay (1 − lr·λ)θ is the identity.
  The face runs the engine step at a proxy lr (the group's last non-zero lr, 1 if it had none; the
  statistics do not depend on it) and puts θ back, so that the following steps with lr > 0 are
  torch's, step for step.
* At T > 0 (samplers), and for momenta that are not rescaled with lr (h ∝ lr: SGHMC, SGNHT, ... at
  any T), h = 0 is the frozen SDE, dz = 0 over no time: the step is skipped. Parameters, momenta,
  statistics, the step counter and with it the noise index stay as they are, so that afterwards the
  run equals the run without its lr = 0 steps. (At T > 0 the torch-buffer presets have no limit:
  their noise in buffer coordinates, √(2(1 − μ)T/lr)·ξ, diverges.)

A negative, NaN or infinite lr is refused (ValueError naming it).

**Params with ``grad`` None** are skipped as torch skips them: they do not move, their momenta and
preconditioner statistics stay as they are (no friction, no noise, no decay), and their state is
created the first time they get a gradient. The group's step counter (the noise index, Adam's bias
corrections) counts the group's steps, where torch counts each parameter's own: a parameter that
has a gradient at every step, or never, is treated exactly as by torch.

**Checkpoints.** ``state_dict()`` is torch's: per-parameter ``momenta`` and preconditioner
statistics under ``state``, and per group an ``"engine"`` entry with the step count, the noise key
(``rng``), the thermostat and the last log posterior. Noise is a function of (key, step) alone, so
``load_state_dict`` → ``step`` continues the trajectory bitwise, random stream included. As with
torch.optim, ``state_dict()`` holds references to the live tensors: save it (``torch.save``) or
deep-copy it before stepping on.

**One gradient per step.** Integrators that need ∇ℓ at a second point of the step (BAOAB and OBABO
also need it at the end: first same as last) are refused at construction; use ``sgmcmc.sghmc``,
``sgmcmc.baoa`` or drive those transforms with ``update(state, batch)`` and a ``log_posterior``.

Example (SGHMC sampling a Bayesian linear regression inside an ordinary torch loop):
    >>> import torch, bayesflow
    >>> from bayesflow.integrations import as_optimizer
    >>> generator = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 3, generator=generator)
    >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(64, 1, generator=generator)
    >>> model = torch.nn.Linear(3, 1)
    >>> optimizer = as_optimizer(bayesflow.sgmcmc.sghmc.build, model.parameters(), lr=0.05, alpha=1.0,
    ...                          temperature=1 / 64, seed=0)       # T = 1/N: the posterior
    >>> for _ in range(300):
    ...     optimizer.zero_grad()
    ...     loss = 0.5 * ((model(x) - y) ** 2).mean() / 0.1**2   # −ℓ per datum (flat prior)
    ...     loss.backward()
    ...     optimizer.step()
    >>> torch.allclose(model.weight, torch.tensor([[1.0, -2.0, 0.5]]), atol=0.1)
    True
"""

from __future__ import annotations

import numbers

import torch

from bayesflow.engine import SDEState
from bayesflow.engine.noise import SEEDS, mix
from bayesflow.integrations._group_engine import (
    ENGINE,
    HOLD,
    RESERVED,
    SKIP,
    _assemble,
    _builder_defaults,
    _check_params,
    _GroupEngine,
    _log_posterior_value,
    _placed,
    _store,
)

__all__ = ["EngineOptimizer", "as_optimizer"]

class EngineOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that steps an engine transform per param group (see the module docstring).

    Build it with :func:`as_optimizer`. ``param_groups[i]`` holds ``lr``, ``temperature`` and the preset's
    options (read at every ``step``) and, once stepped, its ``"engine"`` state; ``state[p]`` holds p's
    ``momenta`` and preconditioner statistics.
    """

    def __init__(self, builder, params, lr, temperature=None, *, seed: int | None = None, **preset_kwargs):
        if not callable(builder):
            raise TypeError(f"builder must be a preset's build function (e.g. bayesflow.sgmcmc.sghmc.build), "
                            f"got {type(builder).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")

        self._builder, self._seed, self._slots = builder, seed, []
        defaults = {**_builder_defaults(builder), **preset_kwargs, "lr": lr}
        if temperature is not None:
            defaults["temperature"] = temperature
        super().__init__(params, defaults)

    # ----- groups ----------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, then the group's transform is built (its options checked)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict with 'params', got {type(param_group).__name__}")
        index = len(self.param_groups)
        if self._seed is not None and self._seed + index not in SEEDS:
            raise ValueError(f"seed {self._seed} gives param group {index} the seed {self._seed + index}, outside "
                             "[-2**63, 2**64), the range of torch.manual_seed")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_params(group["params"], index)
            slot = _GroupEngine(self._builder, tuple(name for name in group if name not in RESERVED))
            slot.configure(group, index)
        except BaseException:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
        self._slots.append(slot)

    # ----- the step --------------------------------------------------------------------------------
    def step(self, closure=None):
        """One engine step per param group with ∇ℓ = -``p.grad`` (torch's contract: ``closure``
        re-evaluates the loss, which is returned; with a closure the state records -loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            # every group's options are checked before any group moves: a bad value in group 1 leaves group 0
            # as it was (configure is cached, so the step's own call below costs nothing more)
            for index, (group, slot) in enumerate(zip(self.param_groups, self._slots)):
                slot.configure(group, index)
            for index, (group, slot) in enumerate(zip(self.param_groups, self._slots)):
                self._step_group(index, group, slot, loss)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict``; the groups' transforms are then configured from the loaded groups
        (their options and their engine state, e.g. the last non-zero lr an lr = 0 step runs at)."""
        super().load_state_dict(state_dict)
        for index, (group, slot) in enumerate(zip(self.param_groups, self._slots)):
            slot.values = None
            slot.configure(group, index)

    def _step_group(self, index: int, group: dict, slot: _GroupEngine, loss) -> None:
        active = [p for p in group["params"] if p.grad is not None]
        if not active:
            return
        slot.configure(group, index)
        if slot.zero_lr is SKIP:
            return  # lr = 0 of a sampler: h = 0, nothing moves, no step is counted (module docstring)
        states = self.state
        fresh = [p for p in active if p not in states]  # (a defaultdict: `in` does not create entries)
        if fresh:
            self._initialize(index, group, slot, fresh)
        engine = _placed(group[ENGINE], active[0])
        if slot.last_lr is not None:
            engine["last_lr"] = slot.last_lr  # the proxy of a later lr = 0 step, checkpointed with the group
        momenta = "momenta" in slot.components
        if ("momenta" in engine["components"]) != momenta:
            raise ValueError(f"param group {index}: its options changed the extended state from "
                             f"{engine['components']} to {slot.components} mid-run (e.g. momentum set "
                             "to 0); keep the state's components or build a new optimizer")
        if momenta:
            self._rescale_momenta(group, slot, engine)
        per = [states[p] for p in active]
        template = slot.preconditioner_template(active[0])
        state = SDEState(
            params=active, momenta=[s["momenta"] for s in per] if momenta else None, xi=engine["xi"],
            log_posterior=engine["log_posterior"], step=engine["step"],
            preconditioner=_assemble(template, per, engine), gradient=(), rng=engine["rng"],
            rejected=engine["rejected"])
        grads = list(torch._foreach_neg([p.grad for p in active]))  # the engine ascends ∇ℓ = -∇loss
        value = None if loss is None else _log_posterior_value(loss, active[0])
        held = torch._foreach_mul(active, 1.0) if slot.zero_lr is HOLD else None  # (a copy, -0.0 kept)
        new = slot.engine.step(state, grads, inplace=True, log_posterior=value)
        if held is not None:  # lr = 0 at T = 0: the step at the proxy lr advanced torch's statistics; θ stays
            torch._foreach_copy_(active, held)
        if momenta and new.momenta is not state.momenta:
            for s, m in zip(per, new.momenta):
                s["momenta"] = m
        _store(template, new.preconditioner, per, engine)
        for name in ("xi", "log_posterior", "step", "rejected"):
            engine[name] = getattr(new, name)

    def _initialize(self, index: int, group: dict, slot: _GroupEngine, params: list) -> None:
        """State for parameters stepped for the first time (the whole group's on its first step)."""
        engine = group.get(ENGINE)
        if engine is None:
            seed = None if self._seed is None else self._seed + index
        else:  # parameters that get their first gradient later: a fresh, reproducible momenta draw
            seed = mix((int(engine["rng"]) ^ (int(engine["step"]) << 20)) & ((1 << 64) - 1)) >> 2
        state = slot.transform.init(list(params), seed=seed)
        per = [self.state[p] for p in params]
        if state.momenta is not None:
            for s, m in zip(per, state.momenta):
                s["momenta"] = m
        shared: dict = {}
        _store(slot.preconditioner_template(params[0]), state.preconditioner, per, shared)
        if engine is None:
            rejected = state.rejected if state.rejected is not None else torch.zeros_like(state.step)
            group[ENGINE] = {"step": state.step, "rng": state.rng, "rejected": rejected,
                             "log_posterior": state.log_posterior, "xi": state.xi,
                             "components": slot.components, "momentum_scale": slot.momentum_scale,
                             **shared}

    def _rescale_momenta(self, group: dict, slot: _GroupEngine, engine: dict) -> None:
        """Keep h·M⁻¹m/lr (torch's momentum buffer) when lr, and with it h, changed (see the module docstring)."""
        scale, saved = slot.momentum_scale, engine.get("momentum_scale")
        if scale is None or saved is None or scale == saved:
            if saved is None:
                engine["momentum_scale"] = scale
            return
        momenta = [s["momenta"] for s in map(self.state.get, group["params"]) if s and "momenta" in s]
        torch._foreach_mul_(momenta, scale / saved)
        engine["momentum_scale"] = scale

    # ----- bookkeeping -----------------------------------------------------------------------------
    def __getstate__(self):
        state = super().__getstate__()
        state.update(_builder=self._builder, _seed=self._seed, _names=[slot.names for slot in self._slots])
        return state

    def __setstate__(self, state):
        names = state.pop("_names", None)
        super().__setstate__(state)
        if names is not None:  # unpickled or deep-copied: the transforms are rebuilt from the groups
            self._slots = [_GroupEngine(self._builder, tuple(n)) for n in names]
            for index, (group, slot) in enumerate(zip(self.param_groups, self._slots)):
                slot.configure(group, index)

    def __repr__(self):
        name = getattr(self._builder, "__module__", "") + "." + getattr(self._builder, "__name__", "")
        lines = [f"{type(self).__name__}({name})"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {key}: {group[key]}" for key in sorted(group) if key not in ("params", ENGINE)]
        return "\n".join(lines)


def as_optimizer(builder, params, lr, temperature=None, *, seed: int | None = None,
                 **preset_kwargs) -> EngineOptimizer:
    r"""A ``torch.optim.Optimizer`` that advances ``params`` with the engine transform ``builder`` makes.

    One step of param group g is the preset's engine step with the caller's gradient,

    .. math::
        z_{t+1} = \Phi_{h_g, T_g}(z_t;\ \nabla ℓ = -\texttt{p.grad}), \qquad
        \mathrm{loss} = -ℓ \ \text{(per datum)},

    so T = 1/num_data samples the posterior and T = 0 is the preset's optimizer (equal to its
    torch.optim namesake step for step). See :mod:`bayesflow.integrations.optimizer` for the
    conventions: schedulers (lr = 0 included), skipped parameters, checkpoints.

    Args:
        builder: a preset's ``build(log_posterior, lr, ..., temperature=...)``: ``bayesflow.sgmcmc.X.build``
            (sgld, sghmc, psgld, sgnht, baoa, adam_sghmc, csgld, csghmc, sglrw) or
            ``bayesflow.optim.X.build`` (sgd, rmsprop, adam, adamw).
        params: an iterable of tensors or of param-group dicts (torch's convention); each group may set
            its own ``lr``, ``temperature`` and preset options. A group's tensors share one dtype and device.
        lr: the preset's ``lr`` (its learning rate; the engine's h is a function of it), ≥ 0. At 0 the
            parameters stay: at T = 0 torch's statistics advance as torch.optim's do, a sampler's step
            is skipped (see :mod:`bayesflow.integrations.optimizer`).
        temperature: T; None takes the preset's default (1.0 for samplers: give 1/num_data to sample the
            posterior of a per-datum loss; 0.0 for the optimizers).
        seed: the noise key of group i is derived from ``seed + i``; None draws it from torch's global
            generator (under DDP give the same seed on every rank, or seed torch identically).
        **preset_kwargs: the preset's other options (``momentum``, ``alpha``, ``betas``, ``weight_decay``,
            ``num_data``, ``check_finite``, ...), defaults of every group.

    Returns:
        An :class:`EngineOptimizer` (``step(closure=None)``, ``zero_grad``, ``param_groups``,
        ``state_dict``/``load_state_dict``, ``add_param_group``).

    Raises:
        TypeError: ``builder`` is not a preset builder; an unknown option; non-tensor or non-floating
            parameters.
        ValueError: an invalid option value (negative, NaN or infinite lr, ...), an integrator that needs two gradients
            per step (BAOAB, OBABO), per-chain values, a group mixing dtypes or devices.

    Example (at T = 0 the face is torch.optim.SGD with momentum, step for step):
        >>> import copy, torch, bayesflow
        >>> from bayesflow.integrations import as_optimizer
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> ours = torch.nn.Linear(4, 2).double()
        >>> theirs = copy.deepcopy(ours)
        >>> x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
        >>> face = as_optimizer(bayesflow.optim.sgd.build, ours.parameters(), lr=0.1, momentum=0.9)
        >>> reference = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
        >>> scheduler = torch.optim.lr_scheduler.StepLR(face, step_size=5, gamma=0.5)
        >>> reference_scheduler = torch.optim.lr_scheduler.StepLR(reference, step_size=5, gamma=0.5)
        >>> for _ in range(20):
        ...     for model, optimizer in ((ours, face), (theirs, reference)):
        ...         optimizer.zero_grad()
        ...         torch.nn.functional.mse_loss(model(x), y).backward()
        ...         optimizer.step()
        ...     scheduler.step(); reference_scheduler.step()
        >>> torch.allclose(ours.weight, theirs.weight, rtol=1e-12, atol=0)
        True
    """
    return EngineOptimizer(builder, params, lr, temperature, seed=seed, **preset_kwargs)
