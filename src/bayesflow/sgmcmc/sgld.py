r"""SGLD: stochastic gradient Langevin dynamics (Welling & Teh, 2011) as an engine configuration.

The overdamped Langevin SDE on θ alone,

.. math::
    dθ = \nabla ℓ(θ)\,dt + \sqrt{2T}\,dW,

is the engine's equation with z = θ, H = −ℓ, **D = I**, **Q = 0**, N = 1 (posteriors' per-datum
ℓ), temperature T, and the Euler–Maruyama integrator with step h = ``lr``:

.. math::
    θ_{t+1} = θ_t + h\,\hat\nabla ℓ(θ_t) + \sqrt{2 κ T h}\;ξ_t, \qquad ξ_t \sim N(0, I),

where κ = 1 − hβT/2 is posteriors' gradient-noise correction (κ = 1 for the default β = 0): the
injected variance :math:`hT(2 - hβT)` leaves :math:`h^2βT^2` to the stochastic gradient.

Its stationary law (for small h and β = 0) is :math:`\propto \exp(ℓ(θ)/T)`: T = 1/num_data samples
the Bayesian posterior, smaller T a cold posterior. The Euler bias is known exactly for Gaussians:
on N(0, 1) the stationary variance is 1/(1 − h/2) (ENGINE.md §3).

**T = 0 limit:** :math:`θ_{t+1} = θ_t + h\nabla ℓ(θ_t)`, i.e. ``torch.optim.SGD(lr=lr)`` on the
loss −ℓ (with ``weight_decay`` its coupled weight decay), step for step.

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import sgld
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = sgld.build(log_posterior, lr=1e-2, temperature=1.0)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
"""

from __future__ import annotations

from bayesflow.engine import EulerMaruyama, Scalar, SDEConfig, SDEState, preset
from bayesflow.sgmcmc._common import (
    build_with_defaults,
    cached_transform,
    injected_temperature,
    learning_rate,
    make_config,
    module_init,
    positive,
    temperature_value,
)
from bayesflow.types import LogPosterior, Schedule, TensorTree, Transform

__all__ = ["SGLDState", "build", "config", "init", "update"]

SGLDState = SDEState
"""posteriors' name for this sampler's state: an :class:`~bayesflow.engine.SDEState`."""


@preset
def config(lr: float | Schedule, beta: float = 0.0, temperature: float | Schedule = 1.0, *,
           weight_decay: float = 0.0, **options) -> SDEConfig:
    """The engine configuration of SGLD (see the module docstring for the SDE).

    Args:
        lr: step size h, a float or a schedule ``step -> float``.
        beta: posteriors' gradient-noise estimate; the injected noise variance is lr·T·(2 − lr·β·T),
            i.e. the engine's noise at temperature (1 − lr·β·T/2)·T (needs a constant lr and T).
        temperature: T, a float or a schedule (1/num_data samples the posterior, 0 optimizes).
        weight_decay: λ of a Gaussian prior (λ/2)|θ|² added to −ℓ (torch's coupled weight decay).
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``).
    """
    lr = learning_rate(lr)
    temperature = temperature_value(temperature)
    return make_config(options, step_size=lr, diffusion=Scalar(1.0), curl=None,
                       temperature=injected_temperature(temperature, lr, beta, friction=1.0),
                       integrator=EulerMaruyama(), weight_decay=positive("weight_decay", weight_decay,
                                                                         allow_zero=True))


def build(log_posterior: LogPosterior, lr: float | Schedule, beta: float = 0.0,
          temperature: float | Schedule = 1.0, **kwargs) -> Transform:
    """SGLD transform: ``engine.build(log_posterior, config(lr, beta, temperature, ...))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, beta, temperature, **kwargs: as :func:`config`.

    Returns:
        A transform with ``init(params, seed=None)`` and ``update(state, batch, inplace=False)``;
        the state is an :class:`~bayesflow.engine.SDEState` (``params``, ``log_posterior``, ``step``).
    """
    return build_with_defaults(log_posterior, config(lr, beta, temperature, **kwargs))


def init(params: TensorTree, seed=None) -> SDEState:
    """posteriors' module-level ``sgld.init(params)``: the initial state (``seed``: the noise key's seed,
    drawn from torch's global generator when None).

    Example:
        >>> import torch
        >>> from bayesflow.sgmcmc import sgld
        >>> log_posterior = lambda p, batch: (-0.5 * (p**2).sum(), None)
        >>> state = sgld.init(torch.zeros(3), seed=0)
        >>> state, aux = sgld.update(state, None, log_posterior, lr=1e-2)   # = build(log_posterior, lr=1e-2).update
        >>> int(state.step)
        1
    """
    return module_init(build, params, seed)


def update(state: SDEState, batch, log_posterior: LogPosterior, lr: float | Schedule, beta: float = 0.0,
           temperature: float | Schedule = 1.0, inplace: bool = False):
    """posteriors' module-level ``sgld.update``: ``build(log_posterior, lr, beta, temperature).update(state,
    batch, inplace)`` (the transform is kept for the next call with the same arguments)."""
    return cached_transform(build, log_posterior, lr=lr, beta=beta, temperature=temperature).update(
        state, batch, inplace=inplace)
