r"""Adam-preconditioned SGHMC: a sampler whose temperature-zero limit is exactly Adam.

SGHMC (:mod:`bayesflow.sgmcmc.sghmc`) with Adam's second moment as an adaptive diagonal mass. On
z = (θ, m), with P = diag(sqrt(v̂) + ε) from Adam's bias-corrected squared-gradient average

.. math::
    v \leftarrow β_2 v + (1 - β_2)\,a\odot a, \quad \hat v = v/(1 - β_2^{t+1}), \quad
    a = \hat\nabla ℓ(θ) - λθ,

(``SquaredGradientAverage(β₂, ε, bias_correction=True, amsgrad=...)``, updated once per step), the
Hamiltonian is :math:`H = -ℓ(θ) + \tfrac12 m^\top P^{-1} m` (**mass M = P**), with

.. math::
    D = \operatorname{diag}\big(0,\ \tfrac{1 - β_1}{h} P\big), \qquad Q = [[0, -I], [I, 0]],

N = 1, temperature T, and the **semi-implicit Euler** integrator with step h = k(1 − β₁),
k = sqrt(lr/(1 − β₁)), whose θ sub-step is scaled by Adam's first-moment bias correction
1/(1 − β₁^{t+1}) (``step_scales``):

.. math::
    m_{t+1} &= β_1 m_t + h\,a_t + \sqrt{2T(1 - β_1)}\,P_t^{1/2} ξ_t, \\
    θ_{t+1} &= θ_t + \frac{h}{1 - β_1^{t+1}}\,P_t^{-1} m_{t+1}.

The friction per step is exactly 1 − β₁ and the injected noise keeps m ~ N(0, T·P): the stationary
law is :math:`\propto \exp(ℓ(θ)/T)` for a frozen P. As for pSGLD, P is a running average of past
gradients treated as constant within a step, so its Γ term is zero by that convention (the bias
vanishes as β₂ → 1). Initial momenta default to **zero** (``momenta_init="zero"``): the mass P is
unknown before the first gradient, so a draw from N(0, T·M) cannot be made at ``init``, and a draw
from N(0, T·I) would be wildly off-scale for P ≈ ε; the noise of the first steps thermalises them
(the friction per step is 1 − β₁).

**T = 0 limit:** :math:`m = k\cdot` Adam's ``exp_avg`` of −∇loss, and θ moves by
:math:`lr\,\widehat{m}/(\sqrt{\hat v} + ε)`: exactly ``torch.optim.Adam(lr=lr, betas=betas, eps=eps,
weight_decay=weight_decay, amsgrad=amsgrad)`` on the loss −ℓ, step for step.

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import adam_sghmc
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = adam_sghmc.build(log_posterior, lr=1e-3, temperature=1e-4)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
"""

from __future__ import annotations

import math

from bayesflow.engine import (
    BiasCorrection,
    Block,
    Preconditioned,
    SDEConfig,
    SemiImplicitEuler,
    SquaredGradientAverage,
    hamiltonian_curl,
)
from bayesflow.engine.config import preset
from bayesflow.sgmcmc._common import build_with_defaults, fraction, make_config, positive, temperature_value
from bayesflow.types import LogPosterior, Schedule, TensorTree, Transform

__all__ = ["build", "config"]


@preset
def config(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
           temperature: float | Schedule = 1.0, *, weight_decay: float = 0.0, amsgrad: bool = False,
           **options) -> SDEConfig:
    """The engine configuration of Adam-preconditioned SGHMC (see the module docstring).

    Args:
        lr: Adam's learning rate (a constant: it sets both h and the friction scale).
        betas: (β₁, β₂): momentum decay per step and the second-moment decay, each in [0, 1).
        eps: ε > 0 added to sqrt(v̂).
        temperature: T (1/num_data samples the posterior, 0 is Adam).
        weight_decay: λ of a Gaussian prior (λ/2)|θ|² (torch Adam's coupled weight decay at T = 0).
        amsgrad: use the running maximum of v (AMSGrad).
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``,
            ``momenta_init``, here ``"zero"`` by default).
    """
    if callable(lr):
        raise ValueError("adam_sghmc needs a constant lr (it fixes h and the friction scale); got a schedule")
    lr = positive("lr", lr)
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = fraction("betas[0]", betas[0]), fraction("betas[1]", betas[1])
    h = math.sqrt(lr / (1.0 - beta1)) * (1.0 - beta1)
    rms = SquaredGradientAverage(beta2, positive("eps", eps), bias_correction=True, amsgrad=bool(amsgrad))
    options = {"momenta_init": "zero", **options}
    return make_config(options, step_size=h,
                       diffusion=Block({("momenta", "momenta"): Preconditioned(rms, 1.0, scale=(1.0 - beta1) / h)}),
                       curl=hamiltonian_curl(1.0), mass=Preconditioned(rms, 1.0),
                       temperature=temperature_value(temperature),
                       integrator=SemiImplicitEuler(), step_scales=(("params", BiasCorrection(beta1)),),
                       weight_decay=positive("weight_decay", weight_decay, allow_zero=True))


def build(log_posterior: LogPosterior, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-8, temperature: float | Schedule = 1.0, momenta: TensorTree | float | None = None,
          **kwargs) -> Transform:
    """Adam-SGHMC transform: ``engine.build(log_posterior, config(lr, betas, eps, temperature, ...))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, betas, eps, temperature, **kwargs: as :func:`config`.
        momenta: default initial momenta (a tree, a number, or None for zeros).

    Returns:
        A transform whose state is an :class:`~bayesflow.engine.SDEState`; ``state.preconditioner``
        holds Adam's second moment.
    """
    return build_with_defaults(log_posterior, config(lr, betas, eps, temperature, **kwargs), momenta)
