r"""SGD, with momentum, dampening and Nesterov: the T = 0 limit of SGLD and SGHMC.

:func:`config` returns the engine configuration, :func:`build` the transform, :func:`transformation`
a torchopt-style gradient transformation. At ``temperature=0`` the trajectory equals
``torch.optim.SGD`` on ``loss = -log_posterior`` step for step (checked by property tests).
"""

from __future__ import annotations

import math

from bayesflow.engine import (
    Block,
    EulerMaruyama,
    FirstStep,
    Nesterov,
    Scalar,
    SDEConfig,
    SemiImplicitEuler,
    hamiltonian_curl,
)
from bayesflow.engine import build as engine_build
from bayesflow.engine.config import preset
from bayesflow.optim._checks import check_lr, check_nonnegative, check_unit, engine_options
from bayesflow.optim.transform import GradientTransformation, as_gradient_transformation
from bayesflow.types import LogPosterior, Transform

__all__ = ["build", "config", "transformation"]


@preset
def config(
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    temperature: float = 0.0,
    num_data: float = 1.0,
    **options,
) -> SDEConfig:
    r"""The engine configuration of SGD (``torch.optim.SGD`` at ``temperature=0``).

    Write :math:`a = \nabla ℓ(θ)/N - λθ` for the potential gradient (ℓ the log posterior per datum,
    λ = ``weight_decay``, torch's coupled L2 decay), μ = ``momentum`` and τ = ``dampening``.

    **Without momentum** the state is θ alone, :math:`H = -ℓ/N + \tfrac λ2 |θ|^2`, D = I, Q = 0,
    h = lr, Euler–Maruyama:

    .. math::
        dθ = a\,dt + \sqrt{2T}\,dW \quad\xrightarrow{\;T = 0\;}\quad θ_{t+1} = θ_t + \mathrm{lr}\; a_t,

    SGLD at T > 0 and torch's SGD at T = 0.

    **With momentum** the state is (θ, m), :math:`H = -ℓ/N + \tfrac λ2 |θ|^2 + \tfrac{1}{2M}|m|^2`,

    .. math::
        D = \begin{pmatrix} 0 & 0 \\ 0 & γ \end{pmatrix},\quad
        Q = \begin{pmatrix} 0 & -1 \\ 1 & 0 \end{pmatrix},\quad
        k = \sqrt{\mathrm{lr}},\quad h = k(1 - τ),\quad M = 1 - τ,\quad γ = (1 - μ)/k,

    integrated semi-implicitly (momenta first, then θ with the new momenta), i.e. SGHMC with
    friction γ and mass M. At T = 0 one step reads

    .. math::
        m_{t+1} = μ\, m_t + k(1-τ)\, a_t, \qquad θ_{t+1} = θ_t + k\, m_{t+1},

    which is torch's ``buf ← μ buf + (1 - τ) g``, ``θ ← θ - lr·buf`` with :math:`m = -k\,\mathrm{buf}`
    and g = -a. torch starts its buffer undampened (``buf = g`` at step 0); the configuration says so
    with a step-dependent scale of the momentum sub-step, ``FirstStep(1 / (1 - τ))``, so that
    :math:`m_1 = k\,a_0`. The mass M = 1 - τ keeps the position sub-step at :math:`h/M = k`, so the
    Hamiltonian is the same at every step; only the momentum sub-step changes length once.
    ``nesterov=True`` moves θ with the look-ahead momentum :math:`μ m_{t+1} + k a_t`
    (:class:`~bayesflow.engine.Nesterov`). Without dampening this is exactly the engine's SGHMC
    recipe (M = 1, no step scale).

    Args:
        lr: learning rate, > 0.
        momentum: μ in [0, 1] (1: no friction).
        dampening: τ in [0, 1) when ``momentum > 0`` (τ = 1 would discard every gradient after the
            first; it has no SDE form, as h = k(1 - τ) = 0). Ignored without momentum, as in torch.
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: λ ≥ 0, coupled L2 decay (a Gaussian prior in H).
        temperature: T; 0 is the optimizer, 1/num_data samples the posterior (SGLD / SGHMC).
        num_data: N, the normaliser of the log posterior (1 for per-datum values).
        **options: engine options passed through (``check_finite``, ``on_nonfinite``,
            ``momenta_init``).

    Returns:
        An :class:`~bayesflow.engine.SDEConfig`; ``bayesflow.engine.build(log_posterior, config)``
        is the transform :func:`build` returns.

    Example:
        >>> import torch, bayesflow
        >>> from bayesflow.optim import sgd
        >>> def log_posterior(params, batch):
        ...     return -0.5 * (params**2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> config = sgd.config(lr=0.1, momentum=0.9)
        >>> transform = bayesflow.engine.build(log_posterior, config)   # = sgd.build(...)
        >>> state = transform.init(params)
        >>> state, aux = transform.update(state, batch)

    References:
        Chen, Fox & Guestrin, *Stochastic Gradient Hamiltonian Monte Carlo*, ICML 2014.
        Sutskever et al., *On the importance of initialization and momentum in deep learning*, 2013.
    """
    momentum = check_unit("momentum", momentum)
    lr = check_lr(lr, per_chain=momentum == 0)  # with momentum, h = √lr and the friction (1 - μ)/√lr
    dampening = check_nonnegative("dampening", dampening)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError(f"Nesterov momentum requires a momentum and zero dampening, got momentum={momentum} "
                         f"and dampening={dampening}")
    common = dict(temperature=temperature, num_data=num_data, weight_decay=weight_decay,
                  **engine_options(options))
    if momentum == 0:
        return SDEConfig(step_size=lr, diffusion=Scalar(1.0), integrator=EulerMaruyama(), **common)
    if dampening >= 1:
        raise ValueError(f"Invalid dampening value: {dampening}; with momentum it must be in [0, 1) "
                         "(dampening=1 ignores every gradient after the first step: no SDE has that limit)")
    k = math.sqrt(lr)
    return SDEConfig(
        step_size=k * (1.0 - dampening),
        diffusion=Block({("momenta", "momenta"): Scalar((1.0 - momentum) / k)}),
        curl=hamiltonian_curl(1.0),
        mass=Scalar(1.0 - dampening),
        integrator=Nesterov() if nesterov else SemiImplicitEuler(),
        step_scales=(("momenta", FirstStep(1.0 / (1.0 - dampening))),) if dampening else (),
        **common,
    )


def build(
    log_posterior: LogPosterior,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    temperature: float = 0.0,
    num_data: float = 1.0,
    **engine_options,
) -> Transform:
    """SGD as an engine transform: ``bayesflow.engine.build(log_posterior, config(...))``.

    See :func:`config` for the SDE and the arguments.

    Example:
        >>> import torch
        >>> from bayesflow.optim import sgd
        >>> def log_posterior(params, batch):  # a standard Gaussian; no data
        ...     return -0.5 * (params ** 2).sum(), None
        >>> params, loader = torch.ones(3), [None] * 5  # five steps; any iterable of batches
        >>> transform = sgd.build(log_posterior, lr=0.1, momentum=0.9, nesterov=True)
        >>> state = transform.init(params)
        >>> for batch in loader:
        ...     state, aux = transform.update(state, batch, inplace=True)
        >>> state.params  # as torch.optim.SGD after five steps
        tensor([-0.1046, -0.1046, -0.1046])
    """
    return engine_build(log_posterior, config(lr, momentum, dampening, nesterov, weight_decay,
                                              temperature=temperature, num_data=num_data, **engine_options))


def transformation(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                   weight_decay: float = 0.0, **engine_options) -> GradientTransformation:
    """SGD as a torchopt-style gradient transformation (see :mod:`bayesflow.optim.transform`).

    Example:
        >>> import torch, bayesflow
        >>> from bayesflow.optim import sgd
        >>> def log_posterior(params, batch):
        ...     return -0.5 * (params**2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> tx = sgd.transformation(lr=0.1, momentum=0.9)
        >>> opt_state = tx.init(params)
        >>> loss_grads = params.clone()                  # ∇ of the loss |θ|²/2 at θ
        >>> updates, opt_state = tx.update(loss_grads, opt_state, params=params)
        >>> params = params + updates                     # torchopt.apply_updates(params, updates)
    """
    return as_gradient_transformation(config(lr, momentum, dampening, nesterov, weight_decay, **engine_options))
