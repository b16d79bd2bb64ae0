r"""AdamW: Adam with decoupled weight decay, as an engine configuration.

:func:`config` returns the engine configuration, :func:`build` the transform, :func:`transformation`
a torchopt-style gradient transformation. At ``temperature=0`` the trajectory equals
``torch.optim.AdamW`` on ``loss = -log_posterior`` step for step (checked by property tests).
"""

from __future__ import annotations

from dataclasses import replace

from bayesflow.engine import SDEConfig, preset
from bayesflow.engine import build as engine_build
from bayesflow.optim import adam
from bayesflow.optim._checks import check_lr, check_nonnegative
from bayesflow.optim.transform import GradientTransformation, as_gradient_transformation
from bayesflow.types import LogPosterior, Transform

__all__ = ["build", "config", "transformation"]


@preset
def config(
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    temperature: float = 0.0,
    num_data: float = 1.0,
    **options,
) -> SDEConfig:
    r"""The engine configuration of AdamW (``torch.optim.AdamW`` at ``temperature=0``).

    The SDE of :func:`bayesflow.optim.adam.config` without a prior term in H (λ = 0), plus a linear
    drift :math:`-\tfrac{\mathrm{lr}\,λ_{\mathrm{dec}}}{h}\,θ` on θ outside the Hamiltonian. The
    engine applies it exactly once per step, before the step, as

    .. math::
        θ \leftarrow (1 - \mathrm{lr}\cdot λ_{\mathrm{dec}})\,θ

    (``SDEConfig.decoupled_weight_decay = lr * weight_decay``), after the gradient has been taken
    at the undecayed θ: torch's AdamW order. The decay is not scaled by the adaptive mass — that is
    what "decoupled" means (Loshchilov & Hutter) — so at T > 0 the stationary law is that of a
    different potential than ℓ; AdamW is an optimizer first.

    Args:
        lr: learning rate, > 0.
        betas: (β₁, β₂), each in [0, 1).
        eps: ε ≥ 0.
        weight_decay: λ_dec ≥ 0, the decoupled decay per unit learning rate (torch's default 1e-2).
        amsgrad: use the running maximum of the second moment.
        temperature: T; 0 is the optimizer.
        num_data: N, the normaliser of the log posterior.
        **options: engine options passed through (``check_finite``, ``on_nonfinite``,
            ``momenta_init``).

    Returns:
        An :class:`~bayesflow.engine.SDEConfig`.

    Example:
        >>> import torch, bayesflow
        >>> from bayesflow.optim import adamw
        >>> def log_posterior(params, batch):
        ...     return -0.5 * (params**2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> transform = bayesflow.engine.build(log_posterior, adamw.config(lr=1e-3, weight_decay=0.1))
        >>> state = transform.init(params)
        >>> state, aux = transform.update(state, batch)

    References:
        Loshchilov & Hutter, *Decoupled weight decay regularization*, ICLR 2019.
    """
    lr = check_lr(lr)
    weight_decay = check_nonnegative("weight_decay", weight_decay)
    base = adam.config(lr, betas, eps, 0.0, amsgrad, temperature=temperature, num_data=num_data, **options)
    return replace(base, decoupled_weight_decay=lr * weight_decay)


def build(
    log_posterior: LogPosterior,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    temperature: float = 0.0,
    num_data: float = 1.0,
    **engine_options,
) -> Transform:
    """AdamW as an engine transform: ``bayesflow.engine.build(log_posterior, config(...))``.

    See :func:`config` for the SDE and the arguments.

    Example:
        >>> import torch
        >>> from bayesflow.optim import adamw
        >>> def log_posterior(params, batch):  # a standard Gaussian; no data
        ...     return -0.5 * (params ** 2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> transform = adamw.build(log_posterior, lr=1e-3, weight_decay=0.05)
        >>> state = transform.init(params)
        >>> state, aux = transform.update(state, batch, inplace=True)
        >>> state.params  # as torch.optim.AdamW after one step
        tensor([0.9990, 0.9990, 0.9990])
    """
    return engine_build(log_posterior, config(lr, betas, eps, weight_decay, amsgrad,
                                              temperature=temperature, num_data=num_data, **engine_options))


def transformation(lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 1e-2, amsgrad: bool = False, **engine_options) -> GradientTransformation:
    """AdamW as a torchopt-style gradient transformation (see :mod:`bayesflow.optim.transform`).

    Example:
        >>> import torch, bayesflow
        >>> from bayesflow.optim import adamw
        >>> def log_posterior(params, batch):
        ...     return -0.5 * (params**2).sum(), None
        >>> params, batch = torch.ones(3), None
        >>> tx = adamw.transformation(lr=1e-3)       # interchangeable with torchopt.adamw(lr=1e-3)
        >>> opt_state = tx.init(params)
        >>> loss_grads = params.clone()                  # ∇ of the loss |θ|²/2 at θ
        >>> updates, opt_state = tx.update(loss_grads, opt_state, params=params)
    """
    return as_gradient_transformation(config(lr, betas, eps, weight_decay, amsgrad, **engine_options))
