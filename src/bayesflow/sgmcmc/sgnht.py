r"""SGNHT: the stochastic gradient Nosé–Hoover thermostat (Ding et al., 2014).

SGHMC whose friction ξ is itself a state variable that adapts until the kinetic temperature
:math:`|m|^2/(dσ^2)` equals T, absorbing unknown gradient noise. On z = (θ, m, ξ) with d scalar
parameters and

.. math::
    H = -ℓ(θ) + \tfrac{1}{2σ^2}|m|^2 + \tfrac{d}{2σ^2} (ξ - A)^2,

the engine is configured with **mass M = σ²**, thermostat inertia Q = σ² (``thermostat_mass``),
**D = diag(0, A·I, 0)** and the state-dependent curl

.. math::
    Q = \begin{pmatrix} 0 & -I & 0 \\ I & 0 & m/d \\ 0 & -m^\top/d & 0 \end{pmatrix}

(``ThermostatCoupling``), N = 1, temperature T, so that

.. math::
    dθ = σ^{-2} m\,dt, \quad
    dm = \big(\nabla ℓ - ξ σ^{-2}\, m\big)\,dt + \sqrt{2AT}\,dW, \quad
    dξ = \big(|m|^2/(dσ^2) - T\big)\,dt.

The thermostat's "−T" is not written by hand: it is T·Γ_ξ with :math:`Γ_ξ = \sum_j \partial_{m_j}
(-m_j/d) = -1`, the divergence of Q that the engine computes. The integrator is **semi-implicit
Euler** with h = ``lr``: momenta first, then θ with the new momenta, then ξ with the new momenta.
The SDE's stationary law is :math:`\propto \exp(-H/T)`; its ξ-marginal is N(A, Tσ²/d) without
gradient noise and shifts upwards to cancel gradient noise. The inertia Q = σ² makes the dynamics
independent of the units of m (the friction rate ξ/σ² fluctuates by sqrt(T/(dσ²)) whatever σ is;
with Q = 1 it would fluctuate by sqrt(T/d), strong for small d).

**The thermostat targets the discretisation's kinetic temperature.** At finite h the Euler friction
step :math:`m' = (1 - hξ/σ^2)\,m + h∇ℓ + \sqrt{2AhT}\,ζ` does not leave :math:`|m'|^2/(dσ^2)` at T:
on a Gaussian direction of curvature ω² (ξ frozen) the stationary law of the step has

.. math::
    \operatorname{Var} m'/σ^2 = \frac{T A/ξ}{1 - hξ/(2σ^2) - h^2ω^2/(4σ^2)}, \qquad
    ω^2 \operatorname{Var} θ = \Big(1 - \frac{hξ}{2σ^2}\Big)\,\operatorname{Var} m'/σ^2 .

A thermostat driving :math:`|m'|^2/(dσ^2)` to T therefore samples θ at :math:`T(1 - hξ/(2σ^2))`
(measured: −6 % trace at the best setting on a 100-D Gaussian of condition 100, −17 % and −33 % at
larger steps). Here the ξ-row's Γ carries the step: :math:`Γ_ξ = -1/\max(1 - hξ/(2σ^2), 1/2)`
(``ThermostatCoupling(-1, step_size=lr, mass=σ²)``), so that

.. math:: ξ' = ξ + h\Big(\frac{|m'|^2}{dσ^2} - \frac{T}{1 - hξ/(2σ^2)}\Big),

whose fixed point gives :math:`ω^2 \operatorname{Var} θ = T` exactly on an isotropic Gaussian at any
stable step — with or without additive gradient noise, which only moves ξ — and the right average
:math:`\sum_i ω_i^2 \operatorname{Var} θ_i = dT` on any Gaussian. What remains is the scheme's own
spread between directions of different curvature, O(h²ω²) (as for SGHMC's semi-implicit step): on
the 100-D Gaussian of condition 100 at h = 0.05, A = 1 the exact trace error is −1.1 % (−3.7 % with
the target T), at A = 5 −1.3 % (−16 %). ξ then settles near A (flat directions: exactly A), not
above it. The floor 1/2 of the denominator (hξ/σ² = 1, where the friction step would flip the
momenta) keeps the thermostat's pull bounded. At T = 0 the correction vanishes with Γ.

Relation to posteriors (``alpha`` = A): the same SDE (friction ξ/σ², ξ' = ξ + h(|m|²/(dσ²) − T));
posteriors moves every component from the old state (explicit Euler) and targets T itself. Its ``beta``
lowers the injected variance to lr·T·(2A − lr·β·T); here that is the friction A' = A − lr·β·T/2 in both D and
the thermostat target, so the injected noise matches posteriors while the thermostat still targets the
kinetic temperature of T (with gradient noise of variance βT² per unit h², ξ settles near A again).

**T = 0 limit:** no noise and Γ vanishes (the corrected target too): ξ grows with the kinetic energy,
a deterministic Nosé–Hoover-damped heavy ball (an optimizer whose friction adapts to |m|²).

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import sgnht
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = sgnht.build(log_posterior, lr=0.05, alpha=1.0, temperature=1.0)
    >>> state = transform.init(torch.zeros(100), seed=0)
    >>> state, aux = transform.update(state, batch=None)
    >>> float(state.xi) != 1.0
    True
"""

from __future__ import annotations

import torch

from bayesflow.engine import Block, Scalar, SDEConfig, SDEState, SemiImplicitEuler, ThermostatCoupling, preset
from bayesflow.sgmcmc._common import (
    build_with_defaults,
    cached_transform,
    learning_rate,
    make_config,
    module_init,
    positive,
    temperature_value,
)
from bayesflow.types import LogPosterior, Schedule, TensorTree, Transform

__all__ = ["SGNHTState", "build", "config", "init", "update"]

SGNHTState = SDEState
"""posteriors' name for this sampler's state: an :class:`~bayesflow.engine.SDEState`."""


@preset
def config(lr: float | Schedule, alpha: float = 0.01, beta: float = 0.0, sigma: float = 1.0,
           temperature: float | Schedule = 1.0, **options) -> SDEConfig:
    """The engine configuration of SGNHT (see the module docstring for the SDE).

    Args:
        lr: step size h (a float or a schedule).
        alpha: A, the friction of the injected noise and the thermostat's target.
        beta: posteriors' gradient-noise estimate: friction and target become A − lr·β·T/2 (needs a
            constant lr and temperature), so the injected variance is lr·T·(2A − lr·β·T).
        sigma: standard deviation σ of the momenta's law (mass σ²).
        temperature: T (1/num_data samples the posterior).
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``,
            ``momenta_init``).
    """
    lr = learning_rate(lr)
    alpha = positive("alpha", alpha)
    sigma = positive("sigma", sigma)
    temperature = temperature_value(temperature, groups=False)
    beta = positive("beta", beta, allow_zero=True)
    friction = alpha
    if beta != 0.0:
        if callable(lr) or callable(temperature):
            raise ValueError("beta > 0 needs a constant lr and temperature")
        if isinstance(lr, torch.Tensor) or isinstance(temperature, torch.Tensor):
            raise ValueError("beta > 0 lowers SGNHT's friction by lr·beta·temperature/2, one value for all chains: "
                             "per-chain lr or temperature need beta = 0")
        friction = alpha - lr * beta * temperature / 2.0
        if friction < 0.0:
            raise ValueError(f"beta={beta} is too large: the injected noise variance lr·T·(2·alpha - lr·beta·T) "
                             f"would be negative for lr={lr}, alpha={alpha}, temperature={temperature}")
    diffusion = Block({("momenta", "momenta"): Scalar(friction)})
    curl = Block({("params", "momenta"): Scalar(-1.0), ("momenta", "params"): Scalar(1.0),
                  ("momenta", "xi"): ThermostatCoupling(+1),
                  ("xi", "momenta"): ThermostatCoupling(-1, step_size=lr, mass=sigma**2)})
    return make_config(options, step_size=lr, diffusion=diffusion, curl=curl, mass=Scalar(sigma**2),
                       thermostat_target=friction, thermostat_mass=sigma**2, temperature=temperature,
                       integrator=SemiImplicitEuler())


def build(log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.01, beta: float = 0.0,
          sigma: float = 1.0, temperature: float | Schedule = 1.0, momenta: TensorTree | float | None = None,
          xi: float | None = None, **kwargs) -> Transform:
    """SGNHT transform: ``engine.build(log_posterior, config(lr, alpha, beta, sigma, temperature))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, alpha, beta, sigma, temperature, **kwargs: as :func:`config`.
        momenta: default initial momenta (a tree, a number, or None for N(0, T·σ²)).
        xi: initial thermostat (posteriors' default: ``alpha``).

    Returns:
        A transform whose state is an :class:`~bayesflow.engine.SDEState` with ``params``,
        ``momenta``, ``xi``, ``log_posterior`` and ``step``.
    """
    xi = float(alpha) if xi is None else xi
    return build_with_defaults(log_posterior, config(lr, alpha, beta, sigma, temperature, **kwargs), momenta, xi)


def init(params: TensorTree, momenta: TensorTree | float | None = None, xi: float = 0.01, seed=None) -> SDEState:
    """posteriors' module-level ``sgnht.init(params, momenta, xi)``: momenta zero unless given, thermostat
    ``xi``; ``seed``: the noise key's seed, drawn from torch's global generator when None.

    Example:
        >>> import torch
        >>> from bayesflow.sgmcmc import sgnht
        >>> log_posterior = lambda p, batch: (-0.5 * (p**2).sum(), None)
        >>> state = sgnht.init(torch.zeros(3), seed=0)
        >>> state, aux = sgnht.update(state, None, log_posterior, lr=1e-2)
        >>> float(state.xi) > 0
        True
    """
    return module_init(build, params, seed, momenta=momenta, xi=xi)


def update(state: SDEState, batch, log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.01,
           beta: float = 0.0, sigma: float = 1.0, temperature: float | Schedule = 1.0, inplace: bool = False):
    """posteriors' module-level ``sgnht.update``: ``build(log_posterior, lr, alpha, beta, sigma,
    temperature).update(state, batch, inplace)`` (the transform is kept for the next such call)."""
    return cached_transform(build, log_posterior, lr=lr, alpha=alpha, beta=beta, sigma=sigma,
                            temperature=temperature).update(state, batch, inplace=inplace)
