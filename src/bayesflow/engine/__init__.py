"""The SDE engine: operators, temperature, integrators and the one ``build``.

See :mod:`bayesflow.engine.sde` for the equation and conventions.
"""

from bayesflow.engine.block import Block, ThermostatCoupling, as_block, hamiltonian_curl
from bayesflow.engine.config import SDEConfig, preset
from bayesflow.engine.integrators import (
    EulerMaruyama,
    Integrator,
    Nesterov,
    SemiImplicitEuler,
    Splitting,
)
from bayesflow.engine.lattice import LatticeRandomWalk
from bayesflow.engine.learned_mass import LearnedMass
from bayesflow.engine.learned_operators import BurnInStep, LearnedCovariance, LearnedRoot
from bayesflow.engine.matrices import Dense, Function
from bayesflow.engine.noise_correction import GradientNoise, NoiseCorrected, NoiseReport
from bayesflow.engine.operators import Diagonal, Operator, Scalar, Zero
from bayesflow.engine.preconditioners import Preconditioned, SquaredGradientAverage
from bayesflow.engine.schedules import BiasCorrection, Constant, Cyclical, FirstStep
from bayesflow.engine.sde import build
from bayesflow.engine.state import SDEState
from bayesflow.engine.system import GradientNotAvailable

__all__ = [
    "BiasCorrection",
    "Block",
    "BurnInStep",
    "Constant",
    "Cyclical",
    "Dense",
    "Diagonal",
    "EulerMaruyama",
    "FirstStep",
    "Function",
    "GradientNoise",
    "GradientNotAvailable",
    "Integrator",
    "LatticeRandomWalk",
    "LearnedCovariance",
    "LearnedMass",
    "LearnedRoot",
    "Nesterov",
    "NoiseCorrected",
    "NoiseReport",
    "Operator",
    "Preconditioned",
    "SDEConfig",
    "SDEState",
    "Scalar",
    "SemiImplicitEuler",
    "Splitting",
    "SquaredGradientAverage",
    "ThermostatCoupling",
    "Zero",
    "as_block",
    "build",
    "hamiltonian_curl",
    "preset",
]
