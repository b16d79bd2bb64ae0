r"""pSGLD: RMSprop-preconditioned SGLD (Li, Chen, Carlson & Carin, 2016).

SGLD with a diagonal, adaptive diffusion: on z = θ, H = −ℓ, N = 1, temperature T,

.. math::
    D = \operatorname{diag}\big(1/(\sqrt{v} + ε)\big), \qquad
    v \leftarrow ρ v + (1 - ρ)\,a \odot a, \quad a = \hat\nabla ℓ(θ) - λθ,

(``Preconditioned(SquaredGradientAverage(ρ, ε), power=-1)``, updated once per step before the drift,
with ``centered=True`` subtracting the squared running mean of a), **Q = 0**, and the Euler–Maruyama
integrator with step h = ``lr``:

.. math::
    θ_{t+1} = θ_t + h\,D_t\,\big(\hat\nabla ℓ(θ_t) - λθ_t\big) + \sqrt{2Th}\,D_t^{1/2}\,ξ_t.

(Li et al. write the step as ε/2 with ε = 2h.)

**Γ is dropped** (``gamma=False``), as Li et al. do in practice: D depends on z only through v, a
running average of *past* gradients that is frozen within a step, so its Γ term is expensive and
small when v varies slowly (ρ close to 1). The price is a bias in the stationary law that vanishes
as ρ → 1; for a fixed D the stationary law is exp(ℓ/T) up to the Euler bias (per direction
1/(1 − h D_i λ_i / 2) on a Gaussian with curvatures λ_i).

**T = 0 limit:** :math:`θ_{t+1} = θ_t + h\,a_t/(\sqrt{v_t} + ε)`, exactly
``torch.optim.RMSprop(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, centered=centered)``
on the loss −ℓ, step for step.

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import psgld
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = psgld.build(log_posterior, lr=1e-3, alpha=0.99, temperature=1.0)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
"""

from __future__ import annotations

from bayesflow.engine import EulerMaruyama, Preconditioned, SDEConfig, SquaredGradientAverage, preset
from bayesflow.sgmcmc._common import (
    build_with_defaults,
    fraction,
    learning_rate,
    make_config,
    positive,
    temperature_value,
)
from bayesflow.types import LogPosterior, Schedule, Transform

__all__ = ["build", "config"]


@preset
def config(lr: float | Schedule, alpha: float = 0.99, eps: float = 1e-8, temperature: float | Schedule = 1.0, *,
           centered: bool = False, weight_decay: float = 0.0, **options) -> SDEConfig:
    """The engine configuration of pSGLD (see the module docstring for the SDE).

    Args:
        lr: step size h (a float or a schedule); RMSprop's ``lr`` at T = 0.
        alpha: decay ρ ∈ [0, 1) of the squared-gradient average (RMSprop's ``alpha``).
        eps: ε > 0 added to sqrt(v).
        temperature: T (1/num_data samples the posterior, 0 is RMSprop).
        centered: subtract the squared running mean of the gradient from v (centered RMSprop).
        weight_decay: λ of a Gaussian prior (λ/2)|θ|² (torch's coupled weight decay at T = 0).
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``).
    """
    rms = SquaredGradientAverage(fraction("alpha", alpha), positive("eps", eps), centered=bool(centered))
    return make_config(options, step_size=learning_rate(lr), diffusion=Preconditioned(rms, -1.0),
                       temperature=temperature_value(temperature),
                       integrator=EulerMaruyama(), gamma=False,
                       weight_decay=positive("weight_decay", weight_decay, allow_zero=True))


def build(log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.99, eps: float = 1e-8,
          temperature: float | Schedule = 1.0, **kwargs) -> Transform:
    """pSGLD transform: ``engine.build(log_posterior, config(lr, alpha, eps, temperature, ...))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, alpha, eps, temperature, **kwargs: as :func:`config`.

    Returns:
        A transform whose state is an :class:`~bayesflow.engine.SDEState`; ``state.preconditioner``
        holds the running average v.
    """
    return build_with_defaults(log_posterior, config(lr, alpha, eps, temperature, **kwargs))
