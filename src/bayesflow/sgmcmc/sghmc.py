r"""SGHMC: stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin, 2014).

Underdamped Langevin dynamics on z = (θ, m) with :math:`H = -ℓ(θ) + \tfrac{1}{2σ^2}|m|^2`:

.. math::
    dθ = σ^{-2} m\,dt, \qquad
    dm = \big(\nabla ℓ(θ) - α σ^{-2} m\big)\,dt + \sqrt{2 α T}\,dW,

i.e. the engine's equation with **mass M = σ²**, **D = diag(0, α)** (friction α on the momenta),
**Q = [[0, −I], [I, 0]]** (``hamiltonian_curl(1)``), N = 1 and temperature T. The integrator is
**semi-implicit Euler** with step h = ``lr`` — the momenta first, then θ with the *new* momenta:

.. math::
    m_{t+1} &= m_t + h\,\hat\nabla ℓ(θ_t) - h α σ^{-2} m_t + \sqrt{2 h α κ T}\;ξ_t, \\
    θ_{t+1} &= θ_t + h σ^{-2} m_{t+1},

with κ = 1 − hβT/(2α) posteriors' gradient-noise correction (injected variance hT(2α − hβT); κ = 1
for β = 0). posteriors' SGHMC has the same coefficients but moves θ with the *old* momenta (explicit
Euler); the semi-implicit order is symplectic, has a much smaller bias (on N(0, 1) with α = 1, h = 0.1:
Var θ = 1.0026 against 1.1140, ENGINE.md §3) and makes T = 0 exactly torch's SGD with momentum.

The stationary law is :math:`\propto \exp(-H/T)`: θ ~ exp(ℓ/T), m ~ N(0, Tσ²). Initial momenta
default to a draw from N(0, T·σ²) (zeros at T = 0), not N(0, I).

**T = 0 limit:** :math:`m_{t+1} = (1 - hα/σ^2) m_t + h\nabla ℓ`, :math:`θ_{t+1} = θ_t + (h/σ^2)
m_{t+1}`, which is ``torch.optim.SGD(lr=η, momentum=μ)`` (dampening 0, on the loss −ℓ) with

.. math::
    η = h^2/σ^2, \quad μ = 1 - hα/σ^2 \qquad\Longleftrightarrow\qquad
    h = σ\sqrt{η}, \quad α = σ(1 - μ)/\sqrt{η},

and torch's momentum buffer is :math:`-m/h`. With σ = 1: ``sghmc.build(lp, lr=sqrt(η),
alpha=(1 - μ)/sqrt(η), temperature=0.0)`` is ``SGD(lr=η, momentum=μ)``.

**Learned mass** (``mass=LearnedMass(kind, burn_in)``, :mod:`bayesflow.engine.learned_mass`): Q becomes
:math:`[[0, -S], [S, 0]]`, :math:`S = \hat Σ^{1/2}` learned from θ's running moments during burn-in
and frozen after it (kinetic mass :math:`σ^2 \hat Σ^{-1}`); ``burn_in_lr`` is the step while the
estimate is rough.

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import sghmc
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = sghmc.build(log_posterior, lr=0.1, alpha=1.0, temperature=1.0)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
    >>> state.momenta.shape
    torch.Size([3])
"""

from __future__ import annotations

from bayesflow.engine import SDEConfig, SDEState, SemiImplicitEuler, preset
from bayesflow.engine.learned_mass import LearnedMass
from bayesflow.engine.learned_operators import learned_operators
from bayesflow.sgmcmc._common import (
    build_with_defaults,
    cached_transform,
    injected_temperature,
    learning_rate,
    make_config,
    module_init,
    positive,
    temperature_value,
    underdamped,
)
from bayesflow.types import LogPosterior, Schedule, TensorTree, Transform

__all__ = ["SGHMCState", "build", "config", "init", "update"]

SGHMCState = SDEState
"""posteriors' name for this sampler's state: an :class:`~bayesflow.engine.SDEState`."""


@preset
def config(lr: float | Schedule, alpha: float = 0.01, beta: float = 0.0, sigma: float = 1.0,
           temperature: float | Schedule = 1.0, *, weight_decay: float = 0.0, mass: LearnedMass | None = None,
           burn_in_lr: float | None = None, **options) -> SDEConfig:
    """The engine configuration of SGHMC (see the module docstring for the SDE).

    Args:
        lr: step size h (a float or a schedule ``step -> float``).
        alpha: friction α ≥ 0, the momentum diffusion D_mm.
        beta: posteriors' gradient-noise estimate: injected variance lr·T·(2α − lr·β·T), i.e. the
            engine's noise at temperature (1 − lr·β·T/(2α))·T (needs a constant lr and T).
        sigma: standard deviation σ of the momenta's law; the mass is M = σ².
        temperature: T (1/num_data samples the posterior, 0 is SGD with momentum).
        weight_decay: λ of a Gaussian prior (λ/2)|θ|² (torch's coupled weight decay at T = 0).
        mass: a :class:`~bayesflow.engine.learned_mass.LearnedMass` to learn the mass during its
            burn-in (None: the constant mass σ²).
        burn_in_lr: with ``mass``, the step while its estimate is rough (until its last window starts;
            then 0.75·lr in the last window and lr after burn-in; None: ``lr`` throughout).
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``,
            ``momenta_init``).
    """
    fields = {"step_size": learning_rate(lr), **underdamped(alpha, sigma)}
    fields.update(learned_operators(mass, fields["step_size"], burn_in_lr, temperature))
    temperature = temperature_value(temperature)
    return make_config(options, **fields,
                       temperature=injected_temperature(temperature, fields["step_size"], beta, friction=float(alpha)),
                       integrator=SemiImplicitEuler(),
                       weight_decay=positive("weight_decay", weight_decay, allow_zero=True))


def build(log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.01, beta: float = 0.0,
          sigma: float = 1.0, temperature: float | Schedule = 1.0, momenta: TensorTree | float | None = None,
          **kwargs) -> Transform:
    """SGHMC transform: ``engine.build(log_posterior, config(lr, alpha, beta, sigma, temperature, ...))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, alpha, beta, sigma, temperature, **kwargs: as :func:`config`.
        momenta: default initial momenta for ``init``: a tree like params, a number (every entry),
            or None for a draw from N(0, T·σ²).

    Returns:
        A transform with ``init(params, momenta=..., seed=None)`` and ``update(state, batch,
        inplace=False)``; the state is an :class:`~bayesflow.engine.SDEState` (``params``,
        ``momenta``, ``log_posterior``, ``step``).
    """
    return build_with_defaults(log_posterior, config(lr, alpha, beta, sigma, temperature, **kwargs), momenta)


def init(params: TensorTree, momenta: TensorTree | float | None = None, seed=None) -> SDEState:
    """posteriors' module-level ``sghmc.init(params, momenta)``: momenta zero unless given (as posteriors
    starts them); ``seed``: the noise key's seed, drawn from torch's global generator when None.

    Example:
        >>> import torch
        >>> from bayesflow.sgmcmc import sghmc
        >>> log_posterior = lambda p, batch: (-0.5 * (p**2).sum(), None)
        >>> state = sghmc.init(torch.zeros(3), seed=0)
        >>> state, aux = sghmc.update(state, None, log_posterior, lr=1e-2, alpha=1.0)
        >>> state.momenta.shape
        torch.Size([3])
    """
    return module_init(build, params, seed, momenta=momenta)


def update(state: SDEState, batch, log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.01,
           beta: float = 0.0, sigma: float = 1.0, temperature: float | Schedule = 1.0, inplace: bool = False):
    """posteriors' module-level ``sghmc.update``: ``build(log_posterior, lr, alpha, beta, sigma,
    temperature).update(state, batch, inplace)`` (the transform is kept for the next such call)."""
    return cached_transform(build, log_posterior, lr=lr, alpha=alpha, beta=beta, sigma=sigma,
                            temperature=temperature).update(state, batch, inplace=inplace)
