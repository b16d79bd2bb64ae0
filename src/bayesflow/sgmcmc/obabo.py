r"""OBABO: the symmetric splitting of underdamped Langevin with half Ornstein–Uhlenbeck steps.

The SDE is SGHMC's (:mod:`bayesflow.sgmcmc.sghmc`): z = (θ, m), :math:`H = -ℓ(θ) + |m|^2/(2σ^2)`,
**mass M = σ²**, **D = diag(0, α)**, **Q = [[0, −I], [I, 0]]**, N = 1, temperature T. The integrator
is the palindromic word **"OBABO"** (weak order 2) with step h = ``lr``: half an exact OU step, a half
kick, a full drift, a half kick, half an OU step,

.. math::
    m &\leftarrow e^{-αh/(2σ^2)} m + σ\sqrt{T(1 - e^{-αh/σ^2})}\;ξ, \quad
    m \leftarrow m + \tfrac h2 \hat\nabla ℓ(θ), \quad θ \leftarrow θ + h σ^{-2} m, \\
    m &\leftarrow m + \tfrac h2 \hat\nabla ℓ(θ), \quad
    m \leftarrow e^{-αh/(2σ^2)} m + σ\sqrt{T(1 - e^{-αh/σ^2})}\;ξ'.

The closing kick's gradient is reused by the next step's opening kick (first same as last): one
gradient per step. OBABO keeps the momenta's law exact on a Gaussian, and on N(0, 1) its θ-variance
is 1/(1 − h²/4) (ENGINE.md §3) — the velocity-Verlet bias, which BAOAB avoids.

**T = 0 limit:** velocity Verlet with a momentum decay e^{−αh/(2σ²)} before and after each step.

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import obabo
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = obabo.build(log_posterior, lr=0.1, alpha=1.0, temperature=1.0)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
"""

from __future__ import annotations

from bayesflow.engine import SDEConfig, Splitting, preset
from bayesflow.sgmcmc._common import build_with_defaults, learning_rate, make_config, temperature_value, underdamped
from bayesflow.types import LogPosterior, Schedule, TensorTree, Transform

__all__ = ["build", "config"]


@preset
def config(lr: float | Schedule, alpha: float = 0.01, sigma: float = 1.0, temperature: float | Schedule = 1.0,
           **options) -> SDEConfig:
    """The engine configuration of OBABO (see the module docstring for the SDE and the word).

    Args:
        lr: step size h (a float or a schedule).
        alpha: friction α ≥ 0.
        sigma: standard deviation σ of the momenta's law (mass σ²).
        temperature: T (1/num_data samples the posterior).
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``,
            ``momenta_init``).
    """
    return make_config(options, step_size=learning_rate(lr), **underdamped(alpha, sigma),
                       temperature=temperature_value(temperature),
                       integrator=Splitting("OBABO"))


def build(log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.01, sigma: float = 1.0,
          temperature: float | Schedule = 1.0, momenta: TensorTree | float | None = None, **kwargs) -> Transform:
    """OBABO transform: ``engine.build(log_posterior, config(lr, alpha, sigma, temperature))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, alpha, sigma, temperature, **kwargs: as :func:`config`.
        momenta: default initial momenta (a tree, a number, or None for N(0, T·σ²)).

    Returns:
        A transform whose state is an :class:`~bayesflow.engine.SDEState`.
    """
    return build_with_defaults(log_posterior, config(lr, alpha, sigma, temperature, **kwargs), momenta)
