r"""cSGLD: cyclical SGLD (Zhang, Li, Zhang, Chen & Wilson, 2020).

SGLD (:mod:`bayesflow.sgmcmc.sgld`: z = θ, H = −ℓ, **D = I**, **Q = 0**, N = 1, Euler–Maruyama)
with two schedules of the step count t over cycles of ``cycle_length`` = P steps, phase
r = (t mod P)/P:

.. math::
    h_t = \tfrac{h_0}{2}\big(\cos(\pi r) + 1\big), \qquad
    T_t = \begin{cases} 0 & r < β \ \text{(exploration: SGD with large steps finds a mode)} \\
                          T & r \ge β \ \text{(sampling: SGLD with shrinking steps)} \end{cases}

(``Cyclical(h₀, P)`` and ``Cyclical(T, P, exploration=β, anneal=False)``), so that

.. math::
    θ_{t+1} = θ_t + h_t\,\hat\nabla ℓ(θ_t) + \sqrt{2 T_t h_t}\;ξ_t.

Samples are collected in the sampling stage, usually near the end of each cycle where h_t is small
(small discretisation bias). On a Gaussian target the law of θ_t is known at every step: the
variance per direction follows :math:`s_{t+1} = (1 - h_tλ)^2 s_t + 2T_t h_t`.

**T = 0 limit:** SGD with a cosine-restart ("warm restarts") learning-rate schedule.

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import csgld
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = csgld.build(log_posterior, lr=0.1, cycle_length=100, exploration=0.25)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
"""

from __future__ import annotations

from bayesflow.engine import Cyclical, EulerMaruyama, Scalar, SDEConfig, preset
from bayesflow.sgmcmc._common import (
    build_with_defaults,
    fraction,
    learning_rate,
    make_config,
    positive,
    temperature_value,
)
from bayesflow.types import LogPosterior, Transform

__all__ = ["build", "config"]


@preset
def config(lr: float, cycle_length: int, exploration: float = 0.25, temperature: float = 1.0, *,
           weight_decay: float = 0.0, **options) -> SDEConfig:
    """The engine configuration of cSGLD (see the module docstring for the schedules).

    Args:
        lr: h₀, the step size at the start of each cycle.
        cycle_length: P, steps per cycle.
        exploration: β ∈ [0, 1], the fraction of each cycle run at T = 0.
        temperature: T of the sampling stage (1/num_data samples the posterior).
        weight_decay: λ of a Gaussian prior (λ/2)|θ|².
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``).
    """
    if isinstance(cycle_length, bool) or not isinstance(cycle_length, int) or cycle_length < 1:
        raise ValueError(f"cycle_length must be a positive integer number of steps, got {cycle_length!r}")
    exploration = fraction("exploration", exploration, closed=True)
    return make_config(options,
                       step_size=Cyclical(learning_rate(lr, schedule=False), cycle_length), diffusion=Scalar(1.0),
                       temperature=Cyclical(temperature_value(temperature, schedule=False, groups=False), cycle_length,
                                            exploration=exploration, floor=0.0, anneal=False),
                       integrator=EulerMaruyama(), weight_decay=positive("weight_decay", weight_decay,
                                                                         allow_zero=True))


def build(log_posterior: LogPosterior, lr: float, cycle_length: int, exploration: float = 0.25,
          temperature: float = 1.0, **kwargs) -> Transform:
    """cSGLD transform: ``engine.build(log_posterior, config(lr, cycle_length, exploration, temperature))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, cycle_length, exploration, temperature, **kwargs: as :func:`config`.

    Returns:
        A transform whose state is an :class:`~bayesflow.engine.SDEState`.
    """
    return build_with_defaults(log_posterior, config(lr, cycle_length, exploration, temperature, **kwargs))
