"""Many chains: deep ensembles, Bayesian deep ensembles, temperature sweeps and their diagnostics."""

from bayesflow.ensemble.batched import batched_forward
from bayesflow.ensemble.chains import bayesian_deep_ensemble, deep_ensemble, lift, replicate, stack, unstack
from bayesflow.ensemble.diagnostics import ess, rhat
from bayesflow.ensemble.moments import MomentsState, running_moments
from bayesflow.ensemble.plots import plot_sweep, trace_plot
from bayesflow.ensemble.summary import format_summary, summary, to_inference_data
from bayesflow.ensemble.sweep import sweep
from bayesflow.ensemble.temperature import (
    configurational_temperature,
    configurational_terms,
    kinetic_temperature,
    virial_temperature,
)
from bayesflow.metrics import expected_calibration_error  # re-exported: one implementation, shared

__all__ = [
    "MomentsState",
    "batched_forward",
    "bayesian_deep_ensemble",
    "configurational_temperature",
    "configurational_terms",
    "deep_ensemble",
    "ess",
    "expected_calibration_error",
    "format_summary",
    "kinetic_temperature",
    "lift",
    "plot_sweep",
    "replicate",
    "rhat",
    "running_moments",
    "stack",
    "summary",
    "sweep",
    "to_inference_data",
    "trace_plot",
    "unstack",
    "virial_temperature",
]
