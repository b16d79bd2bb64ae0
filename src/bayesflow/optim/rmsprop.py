r"""RMSprop (plain, centered, with momentum): the T = 0 limit of pSGLD and its momentum variant.

:func:`config` returns the engine configuration, :func:`build` the transform, :func:`transformation`
a torchopt-style gradient transformation. At ``temperature=0`` the trajectory equals
``torch.optim.RMSprop`` on ``loss = -log_posterior`` step for step (checked by property tests).
"""

from __future__ import annotations

import math

from bayesflow.engine import (
    Block,
    EulerMaruyama,
    Preconditioned,
    SDEConfig,
    SemiImplicitEuler,
    SquaredGradientAverage,
    hamiltonian_curl,
)
from bayesflow.engine import build as engine_build
from bayesflow.engine.config import preset
from bayesflow.optim._checks import check_beta, check_lr, check_nonnegative, check_unit, engine_options
from bayesflow.optim.transform import GradientTransformation, as_gradient_transformation
from bayesflow.types import LogPosterior, Transform

__all__ = ["build", "config", "transformation"]


@preset
def config(
    lr: float = 0.01,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    *,
    temperature: float = 0.0,
    num_data: float = 1.0,
    **options,
) -> SDEConfig:
    r"""The engine configuration of RMSprop (``torch.optim.RMSprop`` at ``temperature=0``).

    Write :math:`a = \nabla ℓ(θ)/N - λθ` for the potential gradient (λ = ``weight_decay``, torch's
    coupled decay) and P for the RMS preconditioner, updated once per step before any drift:

    .. math::
        v \leftarrow α v + (1-α)\, a^2, \qquad \bar a \leftarrow α \bar a + (1-α)\, a, \qquad
        P = \sqrt{v - \bar a^2} + ε

    (:math:`\bar a = 0` unless ``centered``). P is frozen within a step, so its Γ is zero
    (pSGLD's convention).

    **Without momentum** the state is θ, :math:`D = P^{-1}`, Q = 0, h = lr, Euler–Maruyama:

    .. math::
        dθ = P^{-1} a\,dt + \sqrt{2T P^{-1}}\,dW \quad\xrightarrow{\;T = 0\;}\quad
        θ_{t+1} = θ_t + \mathrm{lr}\; a_t / P_t,

    pSGLD at T > 0 and torch's RMSprop at T = 0.

    **With momentum** μ torch accumulates the *preconditioned* gradient, ``buf ← μ buf + g/P``. The
    state is (θ, m) with the preconditioned coupling and mass :math:`C = M = P^{-1}`:

    .. math::
        H = -ℓ/N + \tfrac λ2|θ|^2 + \tfrac12 m^\top P\, m, \quad
        D = \begin{pmatrix} 0 & 0 \\ 0 & γP^{-1} \end{pmatrix}, \quad
        Q = \begin{pmatrix} 0 & -P^{-1} \\ P^{-1} & 0 \end{pmatrix}, \quad
        h = \sqrt{\mathrm{lr}}, \quad γ = (1-μ)/h,

    integrated semi-implicitly. At T = 0 a step reads :math:`m_{t+1} = μ m_t + h\, a_t / P_t`,
    :math:`θ_{t+1} = θ_t + h\, m_{t+1}` (as :math:`C M^{-1} = I`): torch's update with
    :math:`m = -h\,\mathrm{buf}`.

    Args:
        lr: learning rate, > 0.
        alpha: α in [0, 1), the decay of the squared-gradient average.
        eps: ε ≥ 0 added to the root.
        weight_decay: λ ≥ 0, coupled L2 decay.
        momentum: μ in [0, 1].
        centered: divide by the root of the running *variance* (Graves 2013) instead.
        temperature: T; 0 is the optimizer, 1/num_data samples the posterior (pSGLD, Γ dropped).
        num_data: N, the normaliser of the log posterior.
        **options: engine options passed through (``check_finite``, ``on_nonfinite``,
            ``momenta_init``).

    Returns:
        An :class:`~bayesflow.engine.SDEConfig`.

    Example:
        >>> import torch, bayesflow
        >>> from bayesflow.optim import rmsprop
        >>> def log_posterior(params, batch):
        ...     return -0.5 * (params**2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> transform = bayesflow.engine.build(log_posterior, rmsprop.config(lr=1e-3, centered=True))
        >>> state = transform.init(params)
        >>> state, aux = transform.update(state, batch)

    References:
        Tieleman & Hinton, Lecture 6.5 (RMSprop), 2012. Graves, *Generating sequences with recurrent
        neural networks*, 2013. Li et al., *Preconditioned SGLD*, AAAI 2016.
    """
    lr = check_lr(lr)
    alpha = check_beta("alpha", alpha)
    eps = check_nonnegative("epsilon", eps)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    momentum = check_unit("momentum", momentum)
    common = dict(temperature=temperature, num_data=num_data, weight_decay=weight_decay,
                  **engine_options(options))
    rms = SquaredGradientAverage(alpha, eps, centered=bool(centered))
    if momentum == 0:
        return SDEConfig(step_size=lr, diffusion=Preconditioned(rms, -1.0), integrator=EulerMaruyama(), **common)
    h = math.sqrt(lr)
    inverse = Preconditioned(rms, -1.0)
    return SDEConfig(
        step_size=h,
        diffusion=Block({("momenta", "momenta"): Preconditioned(rms, -1.0, scale=(1.0 - momentum) / h)}),
        curl=hamiltonian_curl(inverse),
        mass=inverse,
        integrator=SemiImplicitEuler(),
        **common,
    )


def build(
    log_posterior: LogPosterior,
    lr: float = 0.01,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    *,
    temperature: float = 0.0,
    num_data: float = 1.0,
    **engine_options,
) -> Transform:
    """RMSprop as an engine transform: ``bayesflow.engine.build(log_posterior, config(...))``.

    See :func:`config` for the SDE and the arguments.

    Example:
        >>> import torch
        >>> from bayesflow.optim import rmsprop
        >>> def log_posterior(params, batch):  # a standard Gaussian; no data
        ...     return -0.5 * (params ** 2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> transform = rmsprop.build(log_posterior, lr=1e-3, momentum=0.9)
        >>> state = transform.init(params)
        >>> state, aux = transform.update(state, batch, inplace=True)
        >>> state.params  # as torch.optim.RMSprop after one step
        tensor([0.9900, 0.9900, 0.9900])
    """
    return engine_build(log_posterior, config(lr, alpha, eps, weight_decay, momentum, centered,
                                              temperature=temperature, num_data=num_data, **engine_options))


def transformation(lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                   momentum: float = 0.0, centered: bool = False, **engine_options) -> GradientTransformation:
    """RMSprop as a torchopt-style gradient transformation (see :mod:`bayesflow.optim.transform`).

    Example:
        >>> import torch, bayesflow
        >>> from bayesflow.optim import rmsprop
        >>> def log_posterior(params, batch):
        ...     return -0.5 * (params**2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> tx = rmsprop.transformation(lr=1e-3)
        >>> opt_state = tx.init(params)
        >>> loss_grads = params.clone()                  # ∇ of the loss |θ|²/2 at θ
        >>> updates, opt_state = tx.update(loss_grads, opt_state, params=params)
    """
    return as_gradient_transformation(config(lr, alpha, eps, weight_decay, momentum, centered, **engine_options))
