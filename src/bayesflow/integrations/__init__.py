"""bayesflow inside the training loops people already use.

* :func:`as_optimizer` (:mod:`bayesflow.integrations.optimizer`): any engine transform — SGHMC, SGLD,
  Adam, ... — as a ``torch.optim.Optimizer`` that reads ``.grad`` (so AMP, clipping, DDP, accumulation,
  Lightning, the Hugging Face Trainer and ``torch.optim.lr_scheduler`` work unchanged).
* :mod:`bayesflow.integrations.lightning`: a Lightning callback that collects posterior samples and
  running moments of the parameters (needs ``lightning``; imported on first use).
* :mod:`bayesflow.integrations.pyro`: a pyro model as a per-datum log posterior in unconstrained space;
  :mod:`bayesflow.integrations.transformers`: Hugging Face causal LMs and peft LoRA adapters as log
  posteriors (both import their package only when called).

The integration packages (lightning, transformers, peft, pyro) are optional extras
(``pip install bayesflow[integrations]``), never runtime dependencies.

Example:
    >>> import torch, bayesflow
    >>> from bayesflow.integrations import as_optimizer
    >>> model = torch.nn.Linear(2, 1)
    >>> optimizer = as_optimizer(bayesflow.optim.adam.build, model.parameters(), lr=1e-3)
    >>> isinstance(optimizer, torch.optim.Optimizer)
    True
"""

from __future__ import annotations

import importlib

from bayesflow.integrations.optimizer import EngineOptimizer, as_optimizer

__all__ = ["EngineOptimizer", "as_optimizer"]  # (SampleCollector and lightning load lazily: not star-imported)

_LAZY = {"lightning": ("bayesflow.integrations.lightning", None),
         "pyro": ("bayesflow.integrations.pyro", None),
         "transformers": ("bayesflow.integrations.transformers", None),
         "SampleCollector": ("bayesflow.integrations.lightning", "SampleCollector")}


def __getattr__(name: str):
    """Modules that import an optional package (lightning) load on first access, not with bayesflow."""
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
