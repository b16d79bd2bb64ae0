r"""Mini-batch gradient-noise correction for SGLD, SGHMC and BAOAB: a per-direction :math:`\hat B` (per-sample).

``config(sgld.config(...))`` or ``config(sghmc.config(...))`` returns the same engine configuration
with the kicked row's diffusion replaced by :class:`~bayesflow.engine.noise_correction.NoiseCorrected`:

* SGLD (Euler–Maruyama, D on θ): :math:`θ \mathrel{+}= hD\nabla ℓ_B + \sqrt{2ThD - h^2 D\hat V D}\,ξ`,
* SGHMC (semi-implicit Euler, friction α, coupling c): :math:`m \mathrel{+}= hc\nabla ℓ_B - hαM^{-1}m
  + \sqrt{2Thα - h^2c^2\hat V}\,ξ`, then θ with the new m,

* BAOAB (Scalar friction and mass): the exact O step's noise :math:`Tσ^2(1 - c^2)` less
  :math:`((1 + c)/2)^2 h^2c^2\hat V` (:mod:`bayesflow.engine.noise_correction`: exact to leading
  order in ωh — BAOAB's kick noise reaches θ before its O step); with a learned mass
  (``baoab.config(..., mass=LearnedMass(...), burn_in_lr=...)``) the kick is :math:`hS\nabla ℓ_B` and
  :math:`\hat V` becomes :math:`S\hat VS`, F made at each O step from that step's S and h, and the
  share of it taken off the exact one for the whitened frequency k√T/σ,

with :math:`\hat V` the covariance of the batch-mean gradient estimated from the batch's own per-sample
gradients (``structure="low_rank"``: all b − 1 directions exactly; ``"diagonal"``: per coordinate).
The gradient noise plus the injected noise then has the full-batch covariance 2ThD: the chain samples
what the full-batch chain samples (up to the integrator's own O(h) bias), instead of a law inflated
by the gradient noise. This is Chen et al. (2014)'s :math:`\hat B` done per direction; posteriors'
scalar ``beta`` cannot follow the noise's directions. Where the gradient noise alone exceeds 2ThD in
a direction the injection is clipped to 0 there and :func:`noise_report` says so.

:func:`build` installs the gradient source (``torch.func.vmap(torch.func.grad(log_posterior))`` over
the batch, :mod:`bayesflow.engine.per_sample`): the log posterior must be per datum (mean over the
batch + log prior / N) and ``torch.func`` transformable; one step costs one per-sample gradient pass.

Example (Bayesian linear regression, N = 1000 data, batches of 32, T = 1/N):
    >>> import torch
    >>> from bayesflow.sgmcmc import noise_corrected, sgld
    >>> _ = torch.manual_seed(0)
    >>> X, y = torch.randn(1000, 2), torch.randn(1000)
    >>> def log_posterior(theta, batch):
    ...     x, t = batch
    ...     return -0.5 * ((t - x @ theta) ** 2).mean() - 0.5 * (theta**2).sum() / 1000, None
    >>> config = noise_corrected.config(sgld.config(lr=0.02, temperature=1e-3))
    >>> transform = noise_corrected.build(log_posterior, config)
    >>> state = transform.init(torch.zeros(2), seed=0)
    >>> for _ in range(5):
    ...     index = torch.randint(1000, (32,))
    ...     state, aux = transform.update(state, (X[index], y[index]))
    >>> noise_corrected.noise_report(state).clipped_steps   # steps where the noise exceeded 2ThD
    tensor(0)
"""

from __future__ import annotations

import functools
from dataclasses import replace
from numbers import Real

from bayesflow.engine import Block, Diagonal, EulerMaruyama, Scalar, SDEConfig, SemiImplicitEuler, Splitting
from bayesflow.engine import build as engine_build
from bayesflow.engine.learned_operators import BurnInStep, LearnedRoot
from bayesflow.engine.noise_correction import GradientNoise, NoiseCorrected, NoiseReport
from bayesflow.engine.per_sample import per_sample_log_posterior
from bayesflow.types import LogPosterior, Transform

__all__ = ["build", "config", "noise_report"]

_SUPPORTED = ("SGLD-type (EulerMaruyama, a Scalar or Diagonal diffusion on params, no curl), SGHMC-type "
              "(SemiImplicitEuler, a Scalar or Diagonal friction on momenta, hamiltonian_curl with a Scalar "
              "coupling, no thermostat) or BAOAB-type (Splitting('BAOAB'), a Scalar friction, a Scalar mass, "
              "hamiltonian_curl with a Scalar coupling)")


def _constant(name, value):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"gradient-noise correction needs a constant float {name} (the correction depends on "
                         f"it), got {value!r}")
    return float(value)


def _kicked_row(base: SDEConfig):
    """``(row, operator, kick)`` of the row whose gradient kick and noise share a sub-step."""
    D, Q = base.diffusion_block.blocks, base.curl_block.blocks
    if type(base.integrator) is EulerMaruyama and set(D) == {("params", "params")} and not Q:
        return "params", D["params", "params"], "diffusion"
    splitting = type(base.integrator) is Splitting and base.integrator.word == "BAOAB"
    if (type(base.integrator) is SemiImplicitEuler or splitting) and set(D) == {("momenta", "momenta")} and set(
            Q) == {("params", "momenta"), ("momenta", "params")} and "xi" not in base.components:
        coupling = Q["momenta", "params"]
        if isinstance(coupling, Scalar) and Q["params", "momenta"] == Scalar(-coupling.value):
            if not splitting:
                return "momenta", D["momenta", "momenta"], coupling.value
            if isinstance(D["momenta", "momenta"], Scalar) and isinstance(base.mass, Scalar):
                return "momenta", D["momenta", "momenta"], coupling.value
        if splitting and isinstance(coupling, LearnedRoot) and Q["params", "momenta"] == LearnedRoot(
                coupling.mass, -coupling.scale) and isinstance(D["momenta", "momenta"], Scalar) and isinstance(
                base.mass, Scalar):  # BAOAB with a learned mass: the kick goes through c·S
            return "momenta", D["momenta", "momenta"], coupling
    raise ValueError(f"gradient-noise correction supports {_SUPPORTED}; got integrator {base.integrator!r}, "
                     f"diffusion {base.diffusion_block!r}, curl {base.curl_block!r}")


def config(base: SDEConfig, structure: str = "low_rank", data_size: int | None = None) -> SDEConfig:
    """``base`` (an SGLD- or SGHMC-type configuration) with the gradient-noise corrected diffusion.

    Args:
        base: e.g. ``sgld.config(lr, temperature=1/N)``, ``sghmc.config(lr, alpha, temperature=1/N)`` or
            ``baoab.config(lr, alpha, temperature=1/N)``
            with constant lr and temperature and ``beta = 0`` (the correction replaces posteriors' beta).
        structure: ``"low_rank"`` (exact in the b − 1 directions of the batch's gradients; O(d b²) per
            step) or ``"diagonal"`` (per coordinate; O(d b)).
        data_size: n when batches are drawn without replacement from n data (V̂ gets the factor 1 − b/n);
            None for batches drawn with replacement.

    Returns:
        An :class:`~bayesflow.engine.SDEConfig`; its ``recipe`` corrects the preset's own recipe, so an
        overridden temperature or step size is corrected for too.
    """
    if not isinstance(base, SDEConfig):
        raise TypeError(f"base must be an SDEConfig (e.g. sgld.config(...)), got {type(base).__name__}")
    if any(isinstance(op, NoiseCorrected) for op in base.diffusion_block.blocks.values()):
        raise ValueError("this configuration is already noise-corrected")
    beta = getattr(base.recipe, "keywords", {}).get("beta", 0.0)
    if beta:
        raise ValueError(f"the base configuration has posteriors' beta={beta}: its scalar noise estimate and the "
                         "per-direction correction would both lower the injected noise; use beta=0")
    if base.compile is not False:
        raise ValueError("gradient-noise correction runs eagerly (compile=False): the per-sample statistics reach "
                         "the noise operator outside the traced step")
    if base.step_scales:
        raise ValueError("gradient-noise correction needs one constant step size (no step_scales)")
    step_size = base.step_size
    if isinstance(step_size, BurnInStep) and type(base.integrator) is Splitting:
        step_size = step_size.after  # BAOAB's O step corrects at each step's own h (the learned mass's burn-in)
    h = _constant("step size (lr)", step_size)
    T = _constant("temperature", base.temperature)
    N = _constant("num_data", base.num_data)
    row, op, kick = _kicked_row(base)
    if not isinstance(op, (Scalar, Diagonal)):
        raise ValueError(f"gradient-noise correction needs a constant Scalar or Diagonal diffusion, got {op!r}")
    o_step = {}
    if type(base.integrator) is Splitting:  # BAOAB: the correction goes into its exact O step
        o_step = {"friction": op.value, "mass": base.mass.value}  # α > 0: a zero friction has no D block
        if isinstance(kick, LearnedRoot):  # S from the learned mass at each step; its scale c as the kick
            o_step["kick_root"], kick = kick, kick.scale
    noise = GradientNoise(h, T, kick=kick, num_data=N, structure=structure, data_size=data_size, **o_step)
    recipe = None
    if base.recipe is not None:
        recipe = functools.partial(_recorrected, base.recipe, structure, data_size)
    return replace(base, diffusion=Block({(row, row): NoiseCorrected(op, noise)}), recipe=recipe)


def _recorrected(recipe, structure, data_size, **overrides) -> SDEConfig:
    return config(recipe(**overrides), structure, data_size)


def build(log_posterior: LogPosterior, config: SDEConfig, *, chains: int | None = None,
          chain_batches: bool = False) -> Transform:
    """The engine transform of a noise-corrected configuration, with the per-sample gradient source.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value the mean over the batch
            + log prior / N; ``torch.func`` transformable. The aux returned by ``update`` is the
            per-datum aux stacked along the batch.
        config: from :func:`config`.
        chains: K chains in one batched state (each leaf leads with K); the log posterior stays a
            single-chain function (mapped with ``torch.func.vmap``).
        chain_batches: with chains, each batch tensor leads with (K, b): chain k uses mini-batch k
            (independent gradient noise per chain).

    Returns:
        A transform ``(init, update)``; ``step(state, grads)`` raises (it has no per-sample gradients).
    """
    if not isinstance(config, SDEConfig):
        raise TypeError(f"config must be an SDEConfig from noise_corrected.config, got {type(config).__name__}")
    corrected = [(key, op) for key, op in config.diffusion_block.blocks.items() if isinstance(op, NoiseCorrected)]
    if len(corrected) != 1:
        raise ValueError("build takes a configuration from noise_corrected.config(base_config)")
    (key, op), = corrected
    noise = op.noise.bind(chains, chain_batches)
    bound = replace(config, diffusion=Block({**config.diffusion_block.blocks, key: NoiseCorrected(op.base, noise)}))
    wrapped = per_sample_log_posterior(log_posterior, noise.receive, chains, chain_batches)
    return engine_build(wrapped, bound, chains=chains, vectorize="batched" if chains is not None else "vmap")


def noise_report(state) -> NoiseReport:
    """The :class:`~bayesflow.engine.noise_correction.NoiseReport` a noise-corrected state carries.

    ``clipped`` counts the directions where the last step's gradient noise exceeded 2ThD (their
    injected noise was set to 0), ``clipped_steps`` the steps with any, ``ratio`` the last step's
    largest gradient-noise / budget ratio.
    """
    for entry in getattr(state, "preconditioner", ()):
        if isinstance(entry, NoiseReport):
            return entry
    raise ValueError("this state carries no NoiseReport: it does not come from noise_corrected.build")
