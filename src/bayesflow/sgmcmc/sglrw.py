r"""SGLRW: stochastic gradient lattice random walk (Mensch et al. 2026; Duffield et al. 2025), an engine configuration.

The overdamped Langevin SDE on θ alone,

.. math::
    dθ = \nabla ℓ(θ)\,dt + \sqrt{2T}\,dW,

is the engine's equation with z = θ, H = −ℓ, **D = I**, **Q = 0**, N = 1 (posteriors' per-datum
ℓ), temperature T, and the :class:`~bayesflow.engine.lattice.LatticeRandomWalk` integrator with
step h = ``lr``: with the Euler drift :math:`d = h\,\hat\nabla ℓ(θ_t)` and the spatial step
:math:`δx = \sqrt{2 T h}`, every coordinate moves by exactly one lattice site,

.. math::
    θ_{t+1,i} = θ_{t,i} + δx\,s_i, \qquad P(s_i = +1) = \tfrac12\big(1 + \operatorname{clamp}(d_i/δx, -1, 1)\big),
    \quad s_i \in \{-1, +1\},

so the step has mean d (where |d_i| ≤ δx) and variance δx² − d² (weak order 1, like SGLD's Euler
step). The step's probability is linear in the stochastic gradient, so mini-batch noise leaves each
coordinate's one-step law unchanged (SGLD's step gains the variance h²·Var(∇̂ℓ)); see
:mod:`bayesflow.engine.lattice`. Its stationary law (for small h) is :math:`\propto \exp(ℓ(θ)/T)`:
T = 1/num_data samples the Bayesian posterior, smaller T a cold posterior.

**T = 0 limit:** :math:`θ_{t+1} = θ_t + h\nabla ℓ(θ_t)`, i.e. ``torch.optim.SGD(lr=lr)`` on the
loss −ℓ (with ``weight_decay`` its coupled weight decay), step for step. (posteriors 0.1.3 divides
by δx = 0 at T = 0 and leaves θ where it is.)

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import sglrw
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = sglrw.build(log_posterior, lr=1e-2, temperature=1.0)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
    >>> state.params.abs()   # one lattice site: δx = sqrt(2 · 1.0 · 0.01)
    tensor([0.1414, 0.1414, 0.1414])
"""

from __future__ import annotations

import torch

from bayesflow.engine import LatticeRandomWalk, Scalar, SDEConfig, SDEState, preset
from bayesflow.sgmcmc._common import (
    build_with_defaults,
    cached_transform,
    learning_rate,
    make_config,
    module_init,
    positive,
    temperature_value,
)
from bayesflow.types import LogPosterior, Schedule, TensorTree, Transform

__all__ = ["SGLRWState", "build", "config", "init", "ternary_probs", "update"]

SGLRWState = SDEState
"""posteriors' name for this sampler's state: an :class:`~bayesflow.engine.SDEState`."""


@preset
def config(lr: float | Schedule, temperature: float | Schedule = 1.0, *, weight_decay: float = 0.0,
           **options) -> SDEConfig:
    """The engine configuration of SGLRW (see the module docstring for the SDE and the update).

    Args:
        lr: step size h, a float or a schedule ``step -> float``.
        temperature: T, a float or a schedule (1/num_data samples the posterior, 0 optimizes).
        weight_decay: λ of a Gaussian prior (λ/2)|θ|² added to −ℓ (torch's coupled weight decay).
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``).
    """
    lr = learning_rate(lr)
    temperature = temperature_value(temperature, groups=False)
    return make_config(options, step_size=lr, diffusion=Scalar(1.0), curl=None, temperature=temperature,
                       integrator=LatticeRandomWalk(), weight_decay=positive("weight_decay", weight_decay,
                                                                             allow_zero=True))


def build(log_posterior: LogPosterior, lr: float | Schedule, temperature: float | Schedule = 1.0,
          **kwargs) -> Transform:
    """SGLRW transform: ``engine.build(log_posterior, config(lr, temperature, ...))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, temperature, **kwargs: as :func:`config`.

    Returns:
        A transform with ``init(params, seed=None)`` and ``update(state, batch, inplace=False)``;
        the state is an :class:`~bayesflow.engine.SDEState` (``params``, ``log_posterior``, ``step``).
    """
    return build_with_defaults(log_posterior, config(lr, temperature, **kwargs))


def init(params: TensorTree, seed=None) -> SDEState:
    """posteriors' module-level ``sglrw.init(params)`` (``seed``: the noise key's seed, drawn from torch's
    global generator when None).

    Example:
        >>> import torch
        >>> from bayesflow.sgmcmc import sglrw
        >>> state = sglrw.init(torch.zeros(3), seed=0)
        >>> state, aux = sglrw.update(state, None, lambda p, batch: (-0.5 * (p**2).sum(), None), lr=1e-2)
        >>> int(state.step)
        1
    """
    return module_init(build, params, seed)


def update(state: SDEState, batch, log_posterior: LogPosterior, lr: float | Schedule,
           temperature: float | Schedule = 1.0, inplace: bool = False):
    """posteriors' module-level ``sglrw.update``: ``build(log_posterior, lr, temperature).update(state, batch,
    inplace)`` (the transform is kept for the next call with the same arguments)."""
    return cached_transform(build, log_posterior, lr=lr, temperature=temperature).update(state, batch,
                                                                                          inplace=inplace)


def ternary_probs(drift_val: torch.Tensor, diffusion_val, stepsize, delta_x) -> torch.Tensor:
    r"""The probabilities of a ternary lattice step −δx, 0, +δx that match an SDE step's mean and variance.

    posteriors' helper (same name, arguments and result). An Euler step of length h of
    :math:`dθ = a\,dt + σ\,dW` has mean :math:`ha` and second moment :math:`hσ^2 + O(h^2)`; on the
    lattice :math:`δx\,\{-1, 0, 1\}` these are matched by

    .. math::
        v = \operatorname{clamp}(hσ^2/δx^2, 0, 1), \quad m = \operatorname{clamp}(ha/δx, -v, v), \quad
        p_\pm = \tfrac12 (v \pm m), \quad p_0 = 1 - p_+ - p_-,

    exactly where nothing is clamped. At :math:`δx = \sqrt{hσ^2}` (:func:`build`'s
    :math:`δx = \sqrt{2Th}`, σ² = 2T) :math:`p_0 = 0`: the binary step the sampler takes.

    Args:
        drift_val: the drift a, a tensor (any shape).
        diffusion_val: σ, a number or a tensor broadcastable to ``drift_val``.
        stepsize: h > 0.
        delta_x: the lattice spacing δx > 0.

    Returns:
        A tensor of shape ``drift_val.shape + (3,)``: ``[p_minus, p_zero, p_plus]`` on the last axis.

    Example:
        >>> import torch
        >>> from bayesflow.sgmcmc.sglrw import ternary_probs
        >>> ternary_probs(torch.tensor([0.0, 1.0]), diffusion_val=1.0, stepsize=0.25, delta_x=1.0)
        tensor([[0.1250, 0.7500, 0.1250],
                [0.0000, 0.7500, 0.2500]])
    """
    if not isinstance(drift_val, torch.Tensor):
        raise TypeError(f"drift_val must be a tensor, got {type(drift_val).__name__}")
    like = {"dtype": drift_val.dtype, "device": drift_val.device}
    sigma, h, dx = (torch.as_tensor(v, **like) for v in (diffusion_val, stepsize, delta_x))
    variance = (h * sigma.square() / dx.square()).clamp(0.0, 1.0)   # keeps p_minus + p_plus <= 1
    mean = torch.maximum(torch.minimum(h * drift_val / dx, variance), -variance)   # keeps both probabilities >= 0
    p_plus = (0.5 * (variance + mean)).clamp(0.0, 1.0)
    p_minus = (0.5 * (variance - mean)).clamp(0.0, 1.0)
    p_zero = (1.0 - p_plus - p_minus).clamp(0.0, 1.0)
    return torch.stack(torch.broadcast_tensors(p_minus, p_zero, p_plus), dim=-1)
