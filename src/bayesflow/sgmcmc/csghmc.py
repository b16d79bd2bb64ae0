r"""cSGHMC: cyclical SGHMC (Zhang, Li, Zhang, Chen & Wilson, 2020).

SGHMC (:mod:`bayesflow.sgmcmc.sghmc`: z = (θ, m), mass M = σ², **D = diag(0, α)**,
**Q = [[0, −I], [I, 0]]**, N = 1, semi-implicit Euler) with the cyclical schedules of
:mod:`bayesflow.sgmcmc.csgld` over cycles of P = ``cycle_length`` steps, phase r = (t mod P)/P:

.. math::
    h_t = \tfrac{h_0}{2}\big(\cos(\pi r) + 1\big), \qquad T_t = 0 \ (r < β), \quad T_t = T \ (r \ge β),

.. math::
    m_{t+1} &= m_t + h_t\,\hat\nabla ℓ(θ_t) - h_t α σ^{-2} m_t + \sqrt{2 h_t α T_t}\;ξ_t, \\
    θ_{t+1} &= θ_t + h_t σ^{-2} m_{t+1}.

The friction α is a rate of the SDE, so the per-step momentum decay 1 − h_tα/σ² follows the step
size. The exploration stage (T = 0) is the heavy-ball iteration above without noise (at a constant
h, SGD with momentum 1 − hα/σ² and learning rate h²/σ²; see :mod:`~bayesflow.sgmcmc.sghmc`); the
sampling stage is SGHMC.

**T = 0 limit:** that heavy-ball iteration under the cosine-restart step size.

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import csghmc
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = csghmc.build(log_posterior, lr=0.1, cycle_length=100, alpha=1.0)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
"""

from __future__ import annotations

from bayesflow.engine import Cyclical, SDEConfig, SemiImplicitEuler, preset
from bayesflow.sgmcmc._common import (
    build_with_defaults,
    fraction,
    learning_rate,
    make_config,
    positive,
    temperature_value,
    underdamped,
)
from bayesflow.types import LogPosterior, TensorTree, Transform

__all__ = ["build", "config"]


@preset
def config(lr: float, cycle_length: int, exploration: float = 0.25, alpha: float = 0.01, sigma: float = 1.0,
           temperature: float = 1.0, *, weight_decay: float = 0.0, **options) -> SDEConfig:
    """The engine configuration of cSGHMC (see the module docstring for the schedules).

    Args:
        lr: h₀, the step size at the start of each cycle.
        cycle_length: P, steps per cycle.
        exploration: β ∈ [0, 1], the fraction of each cycle run at T = 0.
        alpha: friction α ≥ 0.
        sigma: standard deviation σ of the momenta's law (mass σ²).
        temperature: T of the sampling stage (1/num_data samples the posterior).
        weight_decay: λ of a Gaussian prior (λ/2)|θ|².
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``,
            ``momenta_init``).
    """
    if isinstance(cycle_length, bool) or not isinstance(cycle_length, int) or cycle_length < 1:
        raise ValueError(f"cycle_length must be a positive integer number of steps, got {cycle_length!r}")
    exploration = fraction("exploration", exploration, closed=True)
    return make_config(options,
                       step_size=Cyclical(learning_rate(lr, schedule=False), cycle_length), **underdamped(alpha, sigma),
                       temperature=Cyclical(temperature_value(temperature, schedule=False, groups=False), cycle_length,
                                            exploration=exploration, floor=0.0, anneal=False),
                       integrator=SemiImplicitEuler(),
                       weight_decay=positive("weight_decay", weight_decay, allow_zero=True))


def build(log_posterior: LogPosterior, lr: float, cycle_length: int, exploration: float = 0.25,
          alpha: float = 0.01, sigma: float = 1.0, temperature: float = 1.0,
          momenta: TensorTree | float | None = None, **kwargs) -> Transform:
    """cSGHMC transform: ``engine.build(log_posterior, config(lr, cycle_length, exploration, alpha, ...))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, cycle_length, exploration, alpha, sigma, temperature, **kwargs: as :func:`config`.
        momenta: default initial momenta (a tree, a number, or None: N(0, T₀·σ²) with T₀ the
            temperature of step 0, i.e. zeros when the cycle starts exploring).

    Returns:
        A transform whose state is an :class:`~bayesflow.engine.SDEState`.
    """
    return build_with_defaults(log_posterior, config(lr, cycle_length, exploration, alpha, sigma, temperature,
                                                     **kwargs), momenta)
