"""Many chains: deep ensembles, Bayesian deep ensembles, temperature sweeps and their diagnostics."""

from bayesflow.ensemble.chains import bayesian_deep_ensemble, deep_ensemble, lift, replicate, stack, unstack
from bayesflow.ensemble.plots import plot_sweep, trace_plot
from bayesflow.ensemble.sweep import expected_calibration_error, sweep

__all__ = [
    "bayesian_deep_ensemble",
    "deep_ensemble",
    "expected_calibration_error",
    "lift",
    "plot_sweep",
    "replicate",
    "stack",
    "sweep",
    "trace_plot",
    "unstack",
]
