"""SG-MCMC samplers, each a configuration of the one SDE engine (:mod:`bayesflow.engine`).

Every module has ``config(...) -> SDEConfig`` and ``build(log_posterior, ...) -> Transform``
(``= bayesflow.engine.build(log_posterior, config(...))``), with posteriors' names and arguments where
posteriors has the sampler. ``temperature=0.0`` turns each into its optimizer:

========== ==================================================== =======================================
module      SDE (D, Q, integrator)                               T = 0
========== ==================================================== =======================================
sgld        D = I, Q = 0, Euler–Maruyama                         SGD
sghmc       D = diag(0, α), Q = [[0,−I],[I,0]], semi-implicit    SGD with momentum
sgnht       SGHMC + thermostat ξ (Γ_ξ = −1), semi-implicit       Nosé–Hoover-damped heavy ball
baoa        SGHMC operators, splitting "BAOA"                    damped heavy ball (trapezoidal θ)
baoab       SGHMC operators, splitting "BAOAB"                   damped velocity Verlet
obabo       SGHMC operators, splitting "OBABO"                   damped velocity Verlet
psgld       D = diag(1/(√v+ε)) (RMSprop), Γ dropped, Euler       RMSprop
adam_sghmc  mass = diag(√v̂+ε), D = diag(0, (1−β₁)M/h)            Adam
csgld       SGLD, cosine step size, T = 0 while exploring        SGD with cosine restarts
csghmc      SGHMC, cosine step size, T = 0 while exploring       heavy ball with cosine restarts
sglrw       D = I, Q = 0, lattice random walk (±δx per coordinate) SGD
========== ==================================================== =======================================

:mod:`~bayesflow.sgmcmc.noise_corrected` lowers SGLD's / SGHMC's / BAOAB's injected noise by the mini-batch
gradient noise estimated from per-sample gradients (Chen et al. 2014's B̂, per direction).
:mod:`~bayesflow.sgmcmc.control_variate` makes any of them an SGLD-CV-type sampler: control-variate
gradients around a mode (Baker et al. 2019), a log posterior to pass to ``build``;
:mod:`~bayesflow.sgmcmc.control_variate_table` the same over index batches at one batch gradient a step.
"""

from bayesflow.sgmcmc import (
    adam_sghmc,
    baoa,
    baoab,
    control_variate,
    control_variate_table,
    csghmc,
    csgld,
    noise_corrected,
    obabo,
    psgld,
    sghmc,
    sgld,
    sglrw,
    sgnht,
)

__all__ = ["adam_sghmc", "baoa", "baoab", "control_variate", "control_variate_table", "csghmc", "csgld",
           "noise_corrected", "obabo", "psgld", "sghmc", "sgld", "sglrw", "sgnht"]
