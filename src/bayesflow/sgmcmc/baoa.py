r"""BAOA: Leimkuhler–Matthews' one-gradient splitting of underdamped Langevin (posteriors' ``baoa``).

The SDE is SGHMC's (:mod:`bayesflow.sgmcmc.sghmc`): z = (θ, m), :math:`H = -ℓ(θ) + |m|^2/(2σ^2)`,
**mass M = σ²**, **D = diag(0, α)**, **Q = [[0, −I], [I, 0]]**, N = 1, temperature T. The integrator
is the splitting word **"BAOA"** with step h = ``lr``: a full kick B, half a drift A, an exact
Ornstein–Uhlenbeck step O over h, and the second half drift,

.. math::
    m &\leftarrow m + h\,\hat\nabla ℓ(θ), \qquad θ \leftarrow θ + \tfrac h2 σ^{-2} m, \\
    m &\leftarrow e^{-α h/σ^2} m + σ\sqrt{T(1 - e^{-2αh/σ^2})}\;ξ, \qquad θ \leftarrow θ + \tfrac h2 σ^{-2} m,

exactly posteriors' BAOA update. BAOA is BAOAB with the end-of-step kick moved to the start of the
next step, so its θ-trajectory is BAOAB's (Leimkuhler & Matthews, 2015, p. 271): on a Gaussian the
stationary θ-variance is exact for every stable h (ENGINE.md §3: Var θ = 1 on N(0, 1)). One gradient
per step, evaluated at the step's starting θ (so ``transform.step(state, grads)`` works too).

**T = 0 limit:** m ← e^{−αh/σ²}(m + h∇ℓ), θ moves by h σ⁻² times the average of the two momenta: a
heavy-ball optimizer with momentum e^{−αh/σ²} and a trapezoidal position update.

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import baoa
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = baoa.build(log_posterior, lr=0.1, alpha=1.0, temperature=1.0)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
"""

from __future__ import annotations

from bayesflow.engine import SDEConfig, SDEState, Splitting, preset
from bayesflow.sgmcmc._common import (
    build_with_defaults,
    cached_transform,
    learning_rate,
    make_config,
    module_init,
    temperature_value,
    underdamped,
)
from bayesflow.types import LogPosterior, Schedule, TensorTree, Transform

__all__ = ["BAOAState", "build", "config", "init", "update"]

BAOAState = SDEState
"""posteriors' name for this sampler's state: an :class:`~bayesflow.engine.SDEState`."""


@preset
def config(lr: float | Schedule, alpha: float = 0.01, sigma: float = 1.0, temperature: float | Schedule = 1.0,
           **options) -> SDEConfig:
    """The engine configuration of BAOA (see the module docstring for the SDE and the word).

    Args:
        lr: step size h (a float or a schedule).
        alpha: friction α ≥ 0 (the O step decays the momenta by e^{−αh/σ²}).
        sigma: standard deviation σ of the momenta's law (mass σ²).
        temperature: T (1/num_data samples the posterior).
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``,
            ``momenta_init``).
    """
    return make_config(options, step_size=learning_rate(lr), **underdamped(alpha, sigma),
                       temperature=temperature_value(temperature),
                       integrator=Splitting("BAOA"))


def build(log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.01, sigma: float = 1.0,
          temperature: float | Schedule = 1.0, momenta: TensorTree | float | None = None, **kwargs) -> Transform:
    """BAOA transform: ``engine.build(log_posterior, config(lr, alpha, sigma, temperature))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, alpha, sigma, temperature, **kwargs: as :func:`config`.
        momenta: default initial momenta (a tree, a number, or None for N(0, T·σ²)).

    Returns:
        A transform whose state is an :class:`~bayesflow.engine.SDEState` (``params``, ``momenta``,
        ``log_posterior``, ``step``).
    """
    return build_with_defaults(log_posterior, config(lr, alpha, sigma, temperature, **kwargs), momenta)


def init(params: TensorTree, momenta: TensorTree | float | None = None, seed=None) -> SDEState:
    """posteriors' module-level ``baoa.init(params, momenta)``: momenta zero unless given; ``seed``: the
    noise key's seed, drawn from torch's global generator when None.

    Example:
        >>> import torch
        >>> from bayesflow.sgmcmc import baoa
        >>> log_posterior = lambda p, batch: (-0.5 * (p**2).sum(), None)
        >>> state = baoa.init(torch.zeros(3), seed=0)
        >>> state, aux = baoa.update(state, None, log_posterior, lr=1e-2, alpha=1.0)
        >>> int(state.step)
        1
    """
    return module_init(build, params, seed, momenta=momenta)


def update(state: SDEState, batch, log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.01,
           sigma: float = 1.0, temperature: float | Schedule = 1.0, inplace: bool = False):
    """posteriors' module-level ``baoa.update``: ``build(log_posterior, lr, alpha, sigma,
    temperature).update(state, batch, inplace)`` (the transform is kept for the next such call)."""
    return cached_transform(build, log_posterior, lr=lr, alpha=alpha, sigma=sigma,
                            temperature=temperature).update(state, batch, inplace=inplace)
