r"""BAOAB: the Leimkuhler–Matthews splitting of underdamped Langevin dynamics.

The SDE is SGHMC's (:mod:`bayesflow.sgmcmc.sghmc`): z = (θ, m), :math:`H = -ℓ(θ) + |m|^2/(2σ^2)`,
**mass M = σ²**, **D = diag(0, α)**, **Q = [[0, −I], [I, 0]]**, N = 1, temperature T. The integrator
is the palindromic splitting word **"BAOAB"** (weak order 2) with step h = ``lr``:

.. math::
    m &\leftarrow m + \tfrac h2 \hat\nabla ℓ(θ), \quad θ \leftarrow θ + \tfrac h2 σ^{-2} m, \quad
    m \leftarrow e^{-αh/σ^2} m + σ\sqrt{T(1 - e^{-2αh/σ^2})}\;ξ, \\
    θ &\leftarrow θ + \tfrac h2 σ^{-2} m, \quad m \leftarrow m + \tfrac h2 \hat\nabla ℓ(θ).

The closing kick's gradient is cached in the state and reused as the next step's opening kick (first
same as last), so a step costs one gradient, taken at the step's *final* θ: use ``update(state,
batch)`` (``step(state, grads)`` cannot supply it). On a Gaussian target BAOAB's stationary θ-variance
is exact for every stable h; the momenta's is 1 − h²/4 on N(0, 1) (ENGINE.md §3). With mini-batches
the cached gradient comes from the previous batch.

**T = 0 limit:** a deterministic damped velocity-Verlet with momentum decay e^{−αh/σ²} per step.

**Learned mass** (``mass=LearnedMass(kind, burn_in)``, :mod:`bayesflow.engine.learned_mass`): the
curl becomes :math:`[[0, -S], [S, 0]]` with :math:`S = \hat Σ^{1/2}` learned from θ's running moments
during burn-in and frozen after it, i.e. the kinetic mass :math:`M = σ^2 \hat Σ^{-1}`; the step h is
then in whitened units (on a Gaussian at T = 1, h ≈ 1–1.7 whatever its conditioning). ``burn_in_lr`` is
the step while the estimate is rough (stiff targets need a far smaller one with the identity).

Example:
    >>> import torch
    >>> from bayesflow.sgmcmc import baoab
    >>> def log_posterior(params, batch):
    ...     return -0.5 * (params**2).sum(), None
    >>> transform = baoab.build(log_posterior, lr=0.1, alpha=1.0, temperature=1.0)
    >>> state = transform.init(torch.zeros(3), seed=0)
    >>> state, aux = transform.update(state, batch=None)
"""

from __future__ import annotations

from bayesflow.engine import SDEConfig, Splitting, preset
from bayesflow.engine.learned_mass import LearnedMass
from bayesflow.engine.learned_operators import learned_operators
from bayesflow.sgmcmc._common import build_with_defaults, learning_rate, make_config, temperature_value, underdamped
from bayesflow.types import LogPosterior, Schedule, TensorTree, Transform

__all__ = ["build", "config"]


@preset
def config(lr: float | Schedule, alpha: float = 0.01, sigma: float = 1.0, temperature: float | Schedule = 1.0,
           *, mass: LearnedMass | None = None, burn_in_lr: float | None = None, **options) -> SDEConfig:
    """The engine configuration of BAOAB (see the module docstring for the SDE and the word).

    Args:
        lr: step size h (a float or a schedule).
        alpha: friction α ≥ 0.
        sigma: standard deviation σ of the momenta's law (mass σ²).
        temperature: T (1/num_data samples the posterior).
        mass: a :class:`~bayesflow.engine.learned_mass.LearnedMass` to learn the mass during its
            burn-in (None: the constant mass σ²).
        burn_in_lr: with ``mass``, the step while its estimate is rough (until its last window starts;
            then 0.75·lr in the last window and lr after burn-in; None: ``lr`` throughout).
        **options: engine fields passed through (``num_data``, ``check_finite``, ``on_nonfinite``,
            ``momenta_init``).

    Example (a dense mass learned over 700 steps in windows of 100, 200 and 400; step 0.05 until the last):
        >>> from bayesflow.engine.learned_mass import LearnedMass
        >>> from bayesflow.sgmcmc import baoab
        >>> config = baoab.config(lr=1.0, alpha=1.0, mass=LearnedMass("dense", burn_in=700), burn_in_lr=0.05)
        >>> config.step_size(299), config.step_size(300), config.step_size(700)
        (0.05, 0.75, 1.0)
    """
    fields = {"step_size": learning_rate(lr), **underdamped(alpha, sigma)}
    fields.update(learned_operators(mass, fields["step_size"], burn_in_lr, temperature))
    return make_config(options, **fields, temperature=temperature_value(temperature),
                       integrator=Splitting("BAOAB"))


def build(log_posterior: LogPosterior, lr: float | Schedule, alpha: float = 0.01, sigma: float = 1.0,
          temperature: float | Schedule = 1.0, momenta: TensorTree | float | None = None, **kwargs) -> Transform:
    """BAOAB transform: ``engine.build(log_posterior, config(lr, alpha, sigma, temperature))``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, value per datum.
        lr, alpha, sigma, temperature, **kwargs: as :func:`config`.
        momenta: default initial momenta (a tree, a number, or None for N(0, T·σ²)).

    Returns:
        A transform whose state is an :class:`~bayesflow.engine.SDEState`; its ``gradient`` field
        carries the cached closing-kick gradient.
    """
    return build_with_defaults(log_posterior, config(lr, alpha, sigma, temperature, **kwargs), momenta)
