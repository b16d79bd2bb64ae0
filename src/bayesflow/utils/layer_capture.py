r"""Finding, checking and hooking the ``torch.nn.Linear`` and ``torch.nn.Conv2d`` layers of an ``nn.Module``.

The capture side of the per-layer curvature (:mod:`bayesflow.utils.layer_curvature`,
:mod:`bayesflow.laplace.kfac`): which layers a dict of parameters covers, one forward pass at those
parameters with forward hooks recording each layer's input :math:`a` (detached) and output :math:`s`
(in the graph, for the backward passes), and the matrix that multiplies each weight (a Linear layer's
input, a Conv2d layer's patches).

Example:
    >>> import torch
    >>> from bayesflow.utils.layer_capture import covered_layers, forward_capture, layer_input
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 1))
    >>> params = dict(model.named_parameters())
    >>> layers = covered_layers(model, params)
    >>> out, seen = forward_capture(model, params, torch.ones(5, 1, 4, 4), layers)
    >>> out.shape, layer_input(layers["0"], seen["0"][0]).shape, seen["0"][1].shape   # patches (n, 9, 2·2)
    (torch.Size([5, 1]), torch.Size([5, 9, 4]), torch.Size([5, 2, 2, 2]))
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from bayesflow.tree import flatten
from bayesflow.utils.conv_curvature import check_conv_layer, conv_patches

__all__ = ["LAYER_TYPES", "check_batch_rows", "covered_layers", "curvature_layers", "default_input", "forward_capture",
           "layer_input", "param_key"]

LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)
"""The layer types whose weights and biases the per-layer curvature covers (Conv2d with ``groups=1``)."""

Layer = torch.nn.Linear | torch.nn.Conv2d
_METHOD = "the per-layer curvature"
_INPUTS = {"Linear": (2, "(batch, features)"), "Conv2d": (4, "(batch, channels, height, width)")}


def _kind(layer: Layer) -> str:
    return "Conv2d" if isinstance(layer, torch.nn.Conv2d) else "Linear"


def curvature_layers(model: Any, method: str = _METHOD) -> dict[str, Layer]:
    """The ``torch.nn.Linear`` and ``torch.nn.Conv2d`` submodules of ``model`` by name (``model.named_modules()``;
    ``""`` for itself).

    Raises:
        TypeError / ValueError: ``model`` is not a ``torch.nn.Module`` / has no Linear or Conv2d layer.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_capture import curvature_layers
        >>> list(curvature_layers(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(),
        ...                                           torch.nn.Flatten(), torch.nn.Linear(2, 1))))
        ['0', '3']
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LAYER_TYPES)}
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no torch.nn.Linear or torch.nn.Conv2d layer ({method} "
                         "here covers Linear and Conv2d layers only)")
    return layers


def param_key(layer: str, leaf: str) -> str:
    """The ``named_parameters`` key of a layer's ``leaf`` (``"weight"`` / ``"bias"``)."""
    return f"{layer}.{leaf}" if layer else leaf


def covered_layers(model: Any, params: Any, method: str = _METHOD) -> dict[str, Layer]:
    """The Linear and Conv2d layers that ``params`` covers (a weight or bias given), after checking ``params``.

    Raises:
        TypeError: ``params`` is not a dict of floating-point tensors.
        ValueError: a key that is no Linear/Conv2d weight or bias of ``model`` (parameters of other layers
            are not covered: leave them out of ``params``), a wrongly shaped tensor, a grouped Conv2d.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_capture import covered_layers
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> covered_layers(model, dict(model.named_parameters()))
        Traceback (most recent call last):
            ...
        ValueError: params['1.weight'] is not the weight or bias of a torch.nn.Linear or torch.nn.Conv2d layer ...
    """
    layers = curvature_layers(model, method)
    if not isinstance(params, dict) or not params:
        raise TypeError(f"params must be a non-empty dict of tensors by name (dict(model.named_parameters())), "
                        f"got {type(params).__name__}")
    owners = {param_key(name, leaf): (name, getattr(layer, leaf)) for name, layer in layers.items()
              for leaf in ("weight", "bias") if getattr(layer, leaf) is not None}
    covered = {}
    for key, value in params.items():
        if key not in owners:
            raise ValueError(f"params[{key!r}] is not the weight or bias of a torch.nn.Linear or torch.nn.Conv2d layer "
                             f"of the model ({method} covers Linear and Conv2d layers only): leave it out of params "
                             "(it is then held at the module's value) or use the torch.func route (build with a log "
                             "posterior)")
        name, expected = owners[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"params[{key!r}] must be a floating-point tensor, got {type(value).__name__}")
        if value.shape != expected.shape:
            raise ValueError(f"params[{key!r}] has shape {tuple(value.shape)}, but the {_kind(layers[name])} layer "
                             f"{name!r} needs {tuple(expected.shape)}")
        if isinstance(layers[name], torch.nn.Conv2d):
            check_conv_layer(name, layers[name], method)
        covered[name] = layers[name]
    return covered


# the names from before Conv2d layers were covered
linear_layers, linear_params = curvature_layers, covered_layers


def forward_capture(model: torch.nn.Module, params: dict[str, torch.Tensor], inputs: Any,
                    layers: dict[str, Layer], method: str = _METHOD,
                    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    r"""``model(inputs)`` at ``params`` (made leaves that require grad) and each layer's ``(a, s)``.

    ``a`` is the layer's input (detached; :func:`layer_input` makes a Conv2d's patches), ``s`` its output
    (in the graph).

    Raises:
        TypeError / ValueError: a non-tensor output, a layer not called exactly once (a layer that is
            never called could still have its weight used directly: it is an error, not zero curvature),
            an input that is not ``(batch, features)`` (Linear) / ``(batch, channels, height, width)`` (Conv2d).

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_capture import curvature_layers, forward_capture
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> out, seen = forward_capture(model, dict(model.named_parameters()), torch.ones(4, 2),
        ...                             curvature_layers(model))
        >>> out.shape, seen["2"][0].shape, seen["2"][1].requires_grad
        (torch.Size([4, 1]), torch.Size([4, 3]), True)
    """
    captured: dict[str, list] = {name: [] for name in layers}

    def hook(name, module, args, output):
        captured[name].append((args[0].detach(), output))

    handles = [layer.register_forward_hook(partial(hook, name)) for name, layer in layers.items()]
    leaves = {key: value.detach().requires_grad_(True) for key, value in params.items()}
    try:
        with torch.enable_grad():
            output = torch.func.functional_call(model, leaves, (inputs,))
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model must return a tensor output (e.g. logits), got {type(output).__name__}")
    for name, calls in captured.items():
        kind = _kind(layers[name])
        if len(calls) != 1:
            raise ValueError(f"the {kind} layer {name!r} was called {len(calls)} times in one forward; {method} "
                             f"here needs each {kind} layer called exactly once (leave the parameters of a layer "
                             "that is not used out of params)")
        ndim, shape = _INPUTS[kind]
        if calls[0][0].ndim != ndim:
            raise ValueError(f"the {kind} layer {name!r} got an input of shape {tuple(calls[0][0].shape)}; "
                             f"{method} here needs {shape} inputs")
    return output, {name: calls[0] for name, calls in captured.items()}


def layer_input(layer: Layer, a: torch.Tensor) -> torch.Tensor:
    """What multiplies the weight: ``a`` ``(n, in)`` for a Linear layer, its patches ``(n, C_in·kh·kw, L)``
    (:func:`bayesflow.utils.conv_curvature.conv_patches`) for a Conv2d layer.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_capture import layer_input
        >>> layer_input(torch.nn.Conv2d(2, 1, 3, padding=1), torch.ones(5, 2, 4, 4)).shape
        torch.Size([5, 18, 16])
    """
    return conv_patches(layer, a) if isinstance(layer, torch.nn.Conv2d) else a


def check_batch_rows(batch: Any, n: int, output: torch.Tensor) -> None:
    """ValueError unless the output and every batch tensor (ndim > 0) have ``n`` rows, ``n`` > 0."""
    if n == 0:  # no sample: the curvature routes index the first row, and there is nothing to add
        raise ValueError("the batch has no rows (the model's layers saw 0 samples): pass a non-empty batch")
    if output.ndim == 0 or output.shape[0] != n:
        raise ValueError(f"the model's output has shape {tuple(output.shape)}, but its layers saw {n} rows of "
                         "data: the output's leading dimension must be the batch")
    for leaf in flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] != n:
            raise ValueError(f"mismatched batch: a batch tensor has shape {tuple(leaf.shape)}, but the model's "
                             f"input has {n} rows (every batch tensor's leading dimension must be {n})")


def default_input(batch: Any) -> Any:
    """``batch[0]``, the model's input of a ``(inputs, targets, ...)`` batch (the default ``input_fn``).

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_capture import default_input
        >>> default_input((torch.ones(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(f"batch must be a tuple (inputs, targets, ...) whose first item is the model's input, got "
                    f"{type(batch).__name__}; pass input_fn to build to say how to get the input from a batch")
