r"""BAOAB: the Leimkuhler–Matthews splitting of underdamped Langevin dynamics.

The SDE is SGHMC's (:mod:`bayesflow.sgmcmc.sghmc`): z = (θ, m), :math:`H = -ℓ(θ) + |m|^2/(2σ^2)`,
**mass M = σ²**, **D = diag(0, α)**, **Q = [[0, −I], [I, 0]]**, N = 1, temperature T. The integrator
is the palindromic splitting word **"BAOAB"** (weak order 2) with step h = ``lr``:

.. math::
    m &\leftarrow m + \tfrac h2 \hat\nabla ℓ(θ), \quad θ \leftarrow θ + \tfrac h2 σ^{-2} m, \quad
    m \leftarrow e^{-αh/σ^2} m + σ\sqrt{T(1 - e^{-2αh/σ^2})}\;ξ, \\
    θ &\leftarrow θ + \tfrac h2 σ^{-2} m, \quad m \leftarrow m + \tfrac h2 \hat\nabla ℓ(θ).

The closing kick's gradient is cached in the state and reused as the next step's opening kick (first
same as last), so a step costs one gradient, taken at the step's *final* θ: use ``update(state,
batch)`` (``step(state, grads)`` cannot supply it). On a Gaussian target BAOAB's stationary θ-variance
is exact for every stable h; the momenta's is 1 − h²/4 on N(0, 1) (ENGINE.md §3). With mini-batches
the cached gradient comes from the previous batch.

**T = 0 limit:** a deterministic damped velocity-Verlet with momentum decay e^{−αh/σ²} per step.

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import baoab
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = baoab.build(log_posterior, lr=0.1, alpha=1.0, temperature=1.0)
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
    """The engine configuration of BAOAB (see the module docstring for the SDE and the word).

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
                       integrator=Splitting("BAOAB"))


def build(log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.01, sigma: float = 1.0,
          temperature: float | Schedule = 1.0, momenta: TensorTree | float | None = None, **kwargs) -> Transform:
    """BAOAB transform: ``engine.build(log_posterior, config(lr, alpha, sigma, temperature))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, alpha, sigma, temperature, **kwargs: as :func:`config`.
        momenta: default initial momenta (a tree, a number, or None for N(0, T·σ²)).

    Returns:
        A transform whose state is an :class:`~bayesflow.engine.SDEState`; its ``gradient`` field
        carries the cached closing-kick gradient.
    """
    return build_with_defaults(log_posterior, config(lr, alpha, sigma, temperature, **kwargs), momenta)
