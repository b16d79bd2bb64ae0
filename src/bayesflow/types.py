"""Types shared across bayesflow: tensor trees, log posteriors, transforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeAlias

import torch

TensorTree: TypeAlias = Any
"""A tensor or any optree pytree of tensors (dict of model parameters is the normal case)."""

LogPosterior: TypeAlias = Callable[[TensorTree, Any], tuple[torch.Tensor, Any]]
"""``log_posterior(params, batch) -> (value, aux)`` with ``value`` the log posterior per datum."""

LogProbFn: TypeAlias = LogPosterior
"""posteriors' name for :data:`LogPosterior`: ``fn(params, batch) -> (value, aux)``."""

ForwardFn: TypeAlias = Callable[[TensorTree, Any], tuple[torch.Tensor, Any]]
"""``forward(params, batch) -> (output, aux)``: a model's output (posteriors' name)."""

OuterLogProbFn: TypeAlias = Callable[[torch.Tensor, Any], torch.Tensor]
"""``outer_log_likelihood(output, batch) -> value``: a log likelihood of a model's output (posteriors' name)."""

TensorLike: TypeAlias = float | int | bool | torch.Tensor
"""A number or a tensor."""

Schedule: TypeAlias = Callable[[int], float]
"""A function of the step count returning a float (step size or temperature schedules)."""


class InitFn(Protocol):
    def __call__(self, params: TensorTree, *args: Any, **kwargs: Any) -> Any: ...


class UpdateFn(Protocol):
    def __call__(self, state: Any, batch: Any, inplace: bool = False) -> tuple[Any, Any]: ...


class Transform(NamedTuple):
    """An ``(init, update)`` pair, as in posteriors and optax.

    ``state = transform.init(params)`` and ``state, aux = transform.update(state, batch)``.
    Engine transforms also carry ``step`` (advance given gradients) and their ``config``.

    Example:
        >>> import torch
        >>> from bayesflow.sgmcmc import sgld
        >>> transform = sgld.build(lambda params, batch: (-0.5 * (params**2).sum(), None), lr=1e-2)
        >>> state = transform.init(torch.zeros(3), seed=0)
        >>> state, aux = transform.update(state, None)  # batch: whatever the log posterior takes
        >>> state.params.shape
        torch.Size([3])
    """

    init: Callable[..., Any]
    update: Callable[..., tuple[Any, Any]]
    step: Callable[..., Any] | None = None
    config: Any = None
    log_posterior: Any = None
    chains: int | None = None
