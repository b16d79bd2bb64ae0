"""The engine's state record: immutable, optree-registered (a NamedTuple), checkpointable.

A state is saved with ``torch.save(state, f)`` (or as tensors with :func:`bayesflow.state_dict`) and
loaded with ``torch.load(f, weights_only=True)``: the record is registered as a safe global. Like
posteriors' states it acts as a batch of tensors (:mod:`bayesflow.records`): ``torch.stack`` of K
single-chain states is a K-chain state, ``state[k]`` is chain k, ``torch.cat`` builds traces.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from bayesflow.records import record
from bayesflow.types import TensorTree


@record
class SDEState(NamedTuple):
    """State of an engine transform (field names follow posteriors where it has them).

    Attributes:
        params: θ, with the structure the user passed to ``init``.
        momenta: m (same structure as params) or None for first-order dynamics.
        xi: the thermostat ξ (a tensor) or None.
        log_posterior: the last evaluated log posterior (per datum); NaN before the first update.
        step: number of updates taken, refused ones included (int64, on the CPU so schedules read it
            without a sync; one per chain for K chains, all equal). It indexes the noise; schedules, bias
            corrections and first-step scales read the accepted steps, ``step - rejected``.
        preconditioner: running statistics of stateful operators (e.g. RMSprop's average).
        gradient: the cached potential gradient of first-same-as-last splitting words, else ().
        rng: the noise key of every chain (int64, on the CPU): the noise of a step is a function of
            the key and ``step`` alone (:mod:`bayesflow.engine.noise`), so a state determines its future.
        rejected: the number of steps refused under ``on_nonfinite="reject"`` (int64, like ``step``):
            a refused step leaves every other field as it was but ``step``, which moves on so that a
            retry draws new noise; the retry is the same step of the dynamics (its schedule values,
            Adam's bias correction), as in torch, which never sees a skipped batch.

    Example:
        >>> import torch
        >>> from bayesflow.engine import build
        >>> transform = build(lambda p, batch: (-0.5 * (p**2).sum(), None), step_size=0.1)   # SGLD: no momenta
        >>> state = transform.init(torch.zeros(3), seed=0)
        >>> state.momenta is None, int(state.step), bool(state.log_posterior.isnan())
        (True, 0, True)
        >>> state = state._replace(params=torch.ones(3))   # a NamedTuple: fields are replaced, never set
    """

    params: TensorTree
    momenta: TensorTree | None
    xi: torch.Tensor | None
    log_posterior: torch.Tensor
    step: torch.Tensor
    preconditioner: tuple[Any, ...]
    gradient: tuple[torch.Tensor, ...]
    rng: torch.Tensor
    rejected: torch.Tensor | None = None
