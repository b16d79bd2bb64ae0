r"""Adam and AMSGrad: the T = 0 limit of an Adam-preconditioned SGHMC.

:func:`config` returns the engine configuration, :func:`build` the transform, :func:`transformation`
a torchopt-style gradient transformation. At ``temperature=0`` the trajectory equals
``torch.optim.Adam`` on ``loss = -log_posterior`` step for step (checked by property tests).
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
from bayesflow.engine import build as engine_build
from bayesflow.engine.config import preset
from bayesflow.optim._checks import check_beta, check_lr, check_nonnegative, engine_options
from bayesflow.optim.transform import GradientTransformation, as_gradient_transformation
from bayesflow.types import LogPosterior, Transform

__all__ = ["build", "config", "transformation"]


@preset
def config(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    temperature: float = 0.0,
    num_data: float = 1.0,
    **options,
) -> SDEConfig:
    r"""The engine configuration of Adam (``torch.optim.Adam`` at ``temperature=0``).

    Write :math:`a = \nabla ℓ(θ)/N - λθ` (λ = ``weight_decay``, torch's coupled decay) and
    :math:`(β_1, β_2)` = ``betas``. The adaptive mass is the bias-corrected RMS of a, updated once
    per step before any drift:

    .. math::
        v \leftarrow β_2 v + (1-β_2)\, a^2, \qquad
        M_t = \sqrt{\hat v_t} + ε, \quad \hat v_t = v_t / (1 - β_2^{t+1})

    (AMSGrad replaces v by its running maximum). The state is (θ, m) with
    :math:`H = -ℓ/N + \tfrac λ2 |θ|^2 + \tfrac12 m^\top M^{-1} m` and

    .. math::
        D = \begin{pmatrix} 0 & 0 \\ 0 & c\,M \end{pmatrix},\quad
        Q = \begin{pmatrix} 0 & -1 \\ 1 & 0 \end{pmatrix},\quad
        k = \sqrt{\mathrm{lr}/(1-β_1)},\quad h = k(1-β_1),\quad c = (1-β_1)/h,

    integrated semi-implicitly, the position sub-step scaled by the first-moment bias correction
    :math:`1/(1-β_1^{t+1})`. At T = 0 a step reads

    .. math::
        m_{t+1} = β_1 m_t + h\, a_t, \qquad
        θ_{t+1} = θ_t + \frac{h}{1-β_1^{t+1}}\, \frac{m_{t+1}}{M_t},

    which is torch's Adam with :math:`m = -k\,\mathrm{exp\_avg}` (as :math:`hk = \mathrm{lr}`).
    At T > 0 it samples with friction proportional to the mass (scale-adapted SGHMC).

    Args:
        lr: learning rate, > 0.
        betas: (β₁, β₂), each in [0, 1).
        eps: ε ≥ 0 added to the root of the second moment.
        weight_decay: λ ≥ 0, coupled L2 decay (:mod:`bayesflow.optim.adamw` decouples it).
        amsgrad: use the running maximum of the second moment (Reddi et al. 2018).
        temperature: T; 0 is the optimizer.
        num_data: N, the normaliser of the log posterior.
        **options: engine options passed through (``check_finite``, ``on_nonfinite``,
            ``momenta_init``).

    Returns:
        An :class:`~bayesflow.engine.SDEConfig`.

    Example:
        >>> import torch, bayesflow
        >>> from bayesflow.optim import adam
        >>> def log_posterior(params, batch):
        ...     return -0.5 * (params**2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> transform = bayesflow.engine.build(log_posterior, adam.config(lr=1e-3))
        >>> state = transform.init(params)
        >>> state, aux = transform.update(state, batch)

    References:
        Kingma & Ba, *Adam: a method for stochastic optimization*, ICLR 2015. Reddi, Kale & Kumar,
        *On the convergence of Adam and beyond*, ICLR 2018.
    """
    lr = check_lr(lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    beta1 = check_beta("beta parameter at index 0", betas[0])
    beta2 = check_beta("beta parameter at index 1", betas[1])
    eps = check_nonnegative("epsilon", eps)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    rms = SquaredGradientAverage(beta2, eps, bias_correction=True, amsgrad=bool(amsgrad))
    k = math.sqrt(lr / (1.0 - beta1))
    h = k * (1.0 - beta1)
    return SDEConfig(
        step_size=h,
        diffusion=Block({("momenta", "momenta"): Preconditioned(rms, 1.0, scale=(1.0 - beta1) / h)}),
        curl=hamiltonian_curl(1.0),
        mass=Preconditioned(rms, 1.0),
        integrator=SemiImplicitEuler(),
        step_scales=(("params", BiasCorrection(beta1)),),
        temperature=temperature,
        num_data=num_data,
        weight_decay=weight_decay,
        **engine_options(options),
    )


def build(
    log_posterior: LogPosterior,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    temperature: float = 0.0,
    num_data: float = 1.0,
    **engine_options,
) -> Transform:
    """Adam as an engine transform: ``bayesflow.engine.build(log_posterior, config(...))``.

    See :func:`config` for the SDE and the arguments.

    Example:
        >>> import torch
        >>> from bayesflow.optim import adam
        >>> def log_posterior(params, batch):  # a standard Gaussian; no data
        ...     return -0.5 * (params ** 2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> transform = adam.build(log_posterior, lr=1e-3, amsgrad=True)
        >>> state = transform.init(params)
        >>> state, aux = transform.update(state, batch, inplace=True)
        >>> state.params  # as torch.optim.Adam(amsgrad=True) after one step
        tensor([0.9990, 0.9990, 0.9990])
    """
    return engine_build(log_posterior, config(lr, betas, eps, weight_decay, amsgrad,
                                              temperature=temperature, num_data=num_data, **engine_options))


def transformation(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, amsgrad: bool = False, **engine_options) -> GradientTransformation:
    """Adam as a torchopt-style gradient transformation (see :mod:`bayesflow.optim.transform`).

    Example:
        >>> import torch, bayesflow
        >>> from bayesflow.optim import adam
        >>> def log_posterior(params, batch):
        ...     return -0.5 * (params**2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> tx = adam.transformation(lr=1e-3)        # interchangeable with torchopt.adam(lr=1e-3)
        >>> opt_state = tx.init(params)
        >>> loss_grads = params.clone()                  # ∇ of the loss |θ|²/2 at θ
        >>> updates, opt_state = tx.update(loss_grads, opt_state, params=params)
    """
    return as_gradient_transformation(config(lr, betas, eps, weight_decay, amsgrad, **engine_options))
