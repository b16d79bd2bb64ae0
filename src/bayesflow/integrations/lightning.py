r"""Lightning: collect posterior samples and running moments of a model's parameters during ``fit``.

With the optimizer face (:func:`bayesflow.integrations.as_optimizer`) returned by
``configure_optimizers``, ``Trainer.fit`` runs an SG-MCMC chain (SGHMC at T = 1/num_data samples the
posterior). :class:`SampleCollector` records that chain after optimizer step s (``trainer.global_step``,
counted once per optimizer step, so gradient accumulation is respected) whenever

.. math::
    s > b \quad\text{and}\quad (s - b) \bmod k = 0 \qquad (b = \texttt{burn\_in},\ k = \texttt{every}),

keeping the samples :math:`θ_{s}` (one stacked tensor per parameter name, leading sample axis; the
last ``max_samples`` of them when given) and/or their running moments (Welford, as
:func:`bayesflow.ensemble.running_moments`):

.. math::
    \bar θ_n = \frac1n \sum_{j=1}^n θ_{s_j}, \qquad σ^2_n = \frac1n \sum_{j=1}^n (θ_{s_j} - \bar θ_n)^2 .

:meth:`SampleCollector.predict` evaluates the module at every collected sample
(``torch.func.functional_call``), for Bayesian model averages and predictive uncertainty. The
collector's state is saved in Lightning checkpoints (``state_dict``), so a resumed fit keeps collecting.

Needs ``lightning`` (``pip install lightning``, or ``bayesflow[integrations]``); ``pytorch_lightning``
is used when only that is installed.

Example:
    >>> import torch, bayesflow
    >>> import lightning.pytorch as pl
    >>> from bayesflow.integrations import as_optimizer
    >>> from bayesflow.integrations.lightning import SampleCollector
    >>> class Regression(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.linear = torch.nn.Linear(2, 1)
    ...     def forward(self, x):
    ...         return self.linear(x)
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return 0.5 * ((self(x) - y) ** 2).mean()          # −ℓ per datum
    ...     def configure_optimizers(self):
    ...         return as_optimizer(bayesflow.sgmcmc.sghmc.build, self.parameters(), lr=0.1, alpha=1.0,
    ...                             temperature=1 / 32, seed=0)   # T = 1/N: the posterior
    >>> x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=32)
    >>> collector = SampleCollector(burn_in=20, every=5)
    >>> trainer = pl.Trainer(max_steps=60, callbacks=[collector], logger=False, enable_checkpointing=False,
    ...                      enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Regression(), loader)
    >>> collector.steps
    [25, 30, 35, 40, 45, 50, 55, 60]
    >>> collector.samples["linear.weight"].shape, collector.mean["linear.bias"].shape
    (torch.Size([8, 1, 2]), torch.Size([1]))
"""

from __future__ import annotations

import numbers
from collections import deque
from collections.abc import Iterable

import torch

from bayesflow.ensemble.moments import running_moments

try:
    import lightning.pytorch as pl
except ImportError:  # the older distribution name
    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = None

__all__ = ["SampleCollector"]

_Callback = pl.Callback if pl is not None else object


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class SampleCollector(_Callback):
    """A Lightning callback that keeps samples and/or running moments of the parameters (module docstring).

    Args:
        burn_in: b, optimizer steps discarded before the first sample.
        every: k, the thinning: one sample every k optimizer steps after burn-in.
        max_samples: keep only the last this many samples (None: all); the moments use every sample.
        samples: keep the samples.
        moments: keep the running mean and (population) variance.
        names: the parameter names (``pl_module.named_parameters()``) to record; None: every parameter
            that requires grad.
        device: where samples are stored (default the CPU: GPU memory stays free); the moments stay
            on the parameters' device.
        dtype: store samples and accumulate moments in this dtype (None: the parameters').

    Attributes:
        steps: the optimizer steps at which samples were taken.
        samples: ``{name: tensor}`` with a leading sample axis (the kept samples).
        mean, variance: ``{name: tensor}``, the running moments of every sample taken.
        moments_state: the :class:`~bayesflow.ensemble.MomentsState` behind them.

    Raises:
        ImportError: lightning is not installed.
        ValueError: a negative burn-in, ``every`` or ``max_samples`` below 1, nothing to collect.
    """

    def __init__(self, burn_in: int = 0, every: int = 1, max_samples: int | None = None, *, samples: bool = True,
                 moments: bool = True, names: Iterable[str] | None = None, device: str | torch.device | None = "cpu",
                 dtype: torch.dtype | None = None):
        if pl is None:
            raise ImportError("SampleCollector needs lightning: pip install lightning (or bayesflow[integrations])")
        super().__init__()
        self.burn_in = _count("burn_in", burn_in, 0)
        self.every = _count("every", every, 1)
        self.max_samples = None if max_samples is None else _count("max_samples", max_samples, 1)
        if not (samples or moments):
            raise ValueError("nothing to collect: give samples=True, moments=True or both")
        if isinstance(names, str):
            raise TypeError(f"names must be a list of parameter names, got the string {names!r}")
        self.keep_samples, self.keep_moments = bool(samples), bool(moments)
        self.names = None if names is None else list(names)
        self._given_names = self.names
        self.device, self.dtype = device, dtype
        self.steps: list[int] = []
        self._samples: deque = deque(maxlen=self.max_samples)
        self._moments = running_moments(dtype=dtype)
        self.moments_state = None
        self._last_step = None

    # ----- Lightning hooks -------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        if step > self.burn_in and (step - self.burn_in) % self.every == 0:
            self.collect(pl_module, step)

    def collect(self, module: torch.nn.Module, step: int | None = None) -> None:
        """Record the module's current parameters now (the hook calls this; usable by hand too)."""
        named = dict(module.named_parameters())
        if self.names is None:
            self.names = [name for name, p in named.items() if p.requires_grad]
        missing = [name for name in self.names if name not in named]
        if missing:
            raise ValueError(f"parameters {missing} are not in the module (it has {list(named)[:8]}...)")
        params = {name: named[name].detach() for name in self.names}
        if self.keep_samples:
            self._samples.append({name: p.to(device=self.device, dtype=self.dtype, copy=True)
                                  for name, p in params.items()})
        if self.keep_moments:
            if self.moments_state is None:
                self.moments_state = self._moments.init(params)
            self.moments_state, _ = self._moments.update(self.moments_state, params, inplace=True)
        self.steps.append(len(self.steps) if step is None else int(step))

    # ----- results ---------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return len(self._samples)

    @property
    def samples(self) -> dict[str, torch.Tensor]:
        if not self._samples:
            raise ValueError(self._nothing("samples" if self.keep_samples else "samples (samples=False)"))
        return {name: torch.stack([s[name] for s in self._samples]) for name in self._samples[0]}

    @property
    def mean(self) -> dict[str, torch.Tensor]:
        return self._moment("mean")

    @property
    def variance(self) -> dict[str, torch.Tensor]:
        return self._moment("variance")

    def _moment(self, field: str) -> dict[str, torch.Tensor]:
        if self.moments_state is None:
            raise ValueError(self._nothing("moments" if self.keep_moments else "moments (moments=False)"))
        return dict(getattr(self.moments_state, field))

    def _nothing(self, what: str) -> str:
        return (f"no {what} collected: samples are taken after optimizer step s when s > burn_in={self.burn_in} "
                f"and (s - burn_in) % every={self.every} == 0; {self._last_step or 0} steps were seen")

    def predict(self, module: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        """``module(*args, **kwargs)`` at every kept sample, stacked on a leading sample axis (no grad).

        Example (the Bayesian model average of a classifier's probabilities):
            ``probs = collector.predict(model, x).softmax(-1).mean(0)``.
        """
        samples = self.samples
        reference = dict(module.named_parameters())
        outputs = []
        with torch.no_grad():
            for k in range(self.num_samples):
                params = {name: s[k].to(device=reference[name].device, dtype=reference[name].dtype)
                          for name, s in samples.items()}
                outputs.append(torch.func.functional_call(module, params, args, kwargs))
        return torch.stack(outputs)

    # ----- checkpoints -----------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        """Unique per configuration, so several collectors can live (and be checkpointed) in one Trainer."""
        return self._generate_state_key(burn_in=self.burn_in, every=self.every, max_samples=self.max_samples,
                                        samples=self.keep_samples, moments=self.keep_moments,
                                        names=None if self._given_names is None else tuple(self._given_names))

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "samples": list(self._samples), "moments": self.moments_state,
                "names": self.names, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps = list(state_dict["steps"])
        self._samples = deque(state_dict["samples"], maxlen=self.max_samples)
        self.moments_state = state_dict["moments"]
        self.names = state_dict["names"]
        self._last_step = state_dict["last_step"]
