"""The engine's state record: immutable, optree-registered (a NamedTuple), checkpointable.

A state is saved with ``torch.save(state, f)`` (or as tensors with :func:`bayesflow.state_dict`) and
loaded with ``torch.load(f, weights_only=True)``: the record is registered as a safe global.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from bayesflow.types import TensorTree


class SDEState(NamedTuple):
    """State of an engine transform (field names follow posteriors where it has them).

    Attributes:
        params: θ, with the structure the user passed to ``init``.
        momenta: m (same structure as params) or None for first-order dynamics.
        xi: the thermostat ξ (a tensor) or None.
        log_posterior: the last evaluated log posterior (per datum); NaN before the first update.
        step: number of updates taken (int64, on the CPU so schedules read it without a sync).
        preconditioner: running statistics of stateful operators (e.g. RMSprop's average).
        gradient: the cached potential gradient of first-same-as-last splitting words, else ().
        rng: the generator state(s) of the noise: saving it resumes the identical trajectory.

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


# ``torch.save(state)`` loads back with ``torch.load(f, weights_only=True)``: the record is data
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([SDEState])
