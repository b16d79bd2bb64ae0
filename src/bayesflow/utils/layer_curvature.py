r"""Exact per-layer curvature of ``torch.nn.Linear`` layers from one forward and one (batched) backward pass.

For a Linear layer :math:`s_n = W a_n + b` inside a model :math:`z_n = f(x_n)` and a log likelihood
:math:`L = \sum_n \log p(y_n \mid z_n)` whose rows do not interact, the per-sample gradient of
datum :math:`n` is the outer product :math:`\nabla_W \log p_n = g_n a_n^\top`, :math:`g_n =
\partial \log p_n / \partial s_n`. So the diagonal curvatures never need per-sample Jacobians:

.. math::
    \mathrm{diag}\,F_W = \sum_n g_n^{\odot 2} (a_n^{\odot 2})^\top = (g^{\odot 2})^\top a^{\odot 2}, \qquad
    \mathrm{diag}\,F_b = \sum_n g_n^{\odot 2}

(the empirical Fisher, ``curvature="empirical"``: one backward pass), and with
:math:`J_{c,n} = \partial z_{n,c} / \partial s_n` (one backward pass batched over the output's
:math:`C` coordinates) and :math:`H_n = \nabla^2_{z_n} (-\log p_n)`,

.. math::
    \mathrm{diag}\,(J^\top H J)_W = \sum_n q_n (a_n^{\odot 2})^\top, \qquad
    q_{n,o} = \sum_{c, c'} J_{c,n,o}\, H_{n,c,c'}\, J_{c',n,o}

(the generalised Gauss-Newton, ``curvature="ggn"``; :math:`H` as it is, not clamped). Forward hooks
capture each layer's input :math:`a` and output :math:`s`; :mod:`bayesflow.laplace.kfac` uses the same
capture with the columns of a root :math:`R_n R_n^\top = H_n` (:func:`hessian_root`).

Assumptions (checked where cheap): rows do not interact (no batch norm), each covered Linear layer is
called at most once per forward on ``(batch, features)`` inputs, and ``params`` holds only Linear
weights and biases (other parameters: leave them out, they are held at the module's values).

Example:
    >>> import torch
    >>> from bayesflow.utils.layer_curvature import layer_diagonal
    >>> model = torch.nn.Linear(2, 1)
    >>> loglik = lambda z, batch: -0.5 * ((z - batch[1]) ** 2).sum()
    >>> x, y = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.zeros(2, 1)
    >>> params = {"weight": torch.tensor([[1.0, 0.0]]), "bias": torch.zeros(1)}
    >>> layer_diagonal(model, params, (x, y), loglik, "ggn").diagonal   # Σ_n a_n², and n
    {'weight': tensor([[10.,  4.]]), 'bias': tensor([2.])}
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch

from bayesflow.tree import flatten

__all__ = ["CURVATURES", "LayerDiagonal", "backward_columns", "check_batch_rows", "default_input", "forward_capture",
           "hessian_root", "layer_diagonal", "linear_layers", "linear_params", "output_hessian", "param_key"]

CURVATURES = ("empirical", "ggn")
"""The diagonals :func:`layer_diagonal` computes: the empirical Fisher, or the exact GGN."""

_METHOD = "the per-layer curvature"


def linear_layers(model: Any, method: str = _METHOD) -> dict[str, torch.nn.Linear]:
    """The ``torch.nn.Linear`` submodules of ``model`` by name (``model.named_modules()``; ``""`` for itself).

    Raises:
        TypeError / ValueError: ``model`` is not a ``torch.nn.Module`` / has no Linear layer.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import linear_layers
        >>> list(linear_layers(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))))
        ['0', '2']
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no torch.nn.Linear layer ({method} here covers "
                         "Linear layers only)")
    return layers


def param_key(layer: str, leaf: str) -> str:
    """The ``named_parameters`` key of a layer's ``leaf`` (``"weight"`` / ``"bias"``)."""
    return f"{layer}.{leaf}" if layer else leaf


def linear_params(model: Any, params: Any, method: str = _METHOD) -> dict[str, torch.nn.Linear]:
    """The Linear layers that ``params`` covers (a weight or bias given), after checking ``params``.

    Raises:
        TypeError: ``params`` is not a dict of floating-point tensors.
        ValueError: a key that is no Linear weight or bias of ``model`` (parameters of other layers are
            not covered: leave them out of ``params``), or a wrongly shaped tensor.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import linear_params
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
        >>> linear_params(model, dict(model.named_parameters()))
        Traceback (most recent call last):
            ...
        ValueError: params['1.weight'] is not the weight or bias of a torch.nn.Linear layer of the model ...
    """
    layers = linear_layers(model, method)
    if not isinstance(params, dict) or not params:
        raise TypeError(f"params must be a non-empty dict of tensors by name (dict(model.named_parameters())), "
                        f"got {type(params).__name__}")
    owners = {param_key(name, leaf): (name, getattr(layer, leaf)) for name, layer in layers.items()
              for leaf in ("weight", "bias") if getattr(layer, leaf) is not None}
    covered = {}
    for key, value in params.items():
        if key not in owners:
            raise ValueError(f"params[{key!r}] is not the weight or bias of a torch.nn.Linear layer of the model "
                             f"({method} covers Linear layers only): leave it out of params (it is then held at "
                             "the module's value) or use the torch.func route (build with a log posterior)")
        name, expected = owners[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"params[{key!r}] must be a floating-point tensor, got {type(value).__name__}")
        if value.shape != expected.shape:
            raise ValueError(f"params[{key!r}] has shape {tuple(value.shape)}, but the Linear layer {name!r} "
                             f"needs {tuple(expected.shape)}")
        covered[name] = layers[name]
    return covered


def forward_capture(model: torch.nn.Module, params: dict[str, torch.Tensor], inputs: Any,
                    layers: dict[str, torch.nn.Linear], method: str = _METHOD,
                    ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    r"""``model(inputs)`` at ``params`` (made leaves that require grad) and each layer's ``(a, s)``.

    ``a`` is the layer's input (detached), ``s`` its output (in the graph).

    Raises:
        TypeError / ValueError: a non-tensor output, a layer not called exactly once (a layer that is
            never called could still have its weight used directly: it is an error, not zero curvature),
            an input that is not ``(batch, features)``.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import forward_capture, linear_layers
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
        >>> out, seen = forward_capture(model, dict(model.named_parameters()), torch.ones(4, 2), linear_layers(model))
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
        if len(calls) != 1:
            raise ValueError(f"the Linear layer {name!r} was called {len(calls)} times in one forward; {method} "
                             "here needs each Linear layer called exactly once (leave the parameters of a layer "
                             "that is not used out of params)")
        if calls[0][0].ndim != 2:
            raise ValueError(f"the Linear layer {name!r} got an input of shape {tuple(calls[0][0].shape)}; "
                             f"{method} here needs (batch, features) inputs")
    return output, {name: calls[0] for name, calls in captured.items()}


def check_batch_rows(batch: Any, n: int, output: torch.Tensor) -> None:
    """ValueError unless the output and every batch tensor (ndim > 0) have ``n`` rows."""
    if output.ndim == 0 or output.shape[0] != n:
        raise ValueError(f"the model's output has shape {tuple(output.shape)}, but its Linear layers saw {n} rows "
                         "of data: the output's leading dimension must be the batch")
    for leaf in flatten(batch)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] != n:
            raise ValueError(f"mismatched batch: a batch tensor has shape {tuple(leaf.shape)}, but the model's "
                             f"input has {n} rows (every batch tensor's leading dimension must be {n})")


def output_hessian(loss: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    r""":math:`H_n = \nabla^2_{z_n} \ell`, ``(n, C, C)`` (``C`` the size of one row of ``output``), by one
    batched double-backward pass; zero where :math:`\ell` is linear in the output.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import output_hessian
        >>> z = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> output_hessian((z**3).sum(), z)   # diag(6 z)
        tensor([[[ 6.,  0.],
                 [ 0., 12.]]])
    """
    n = output.shape[0]
    dz = output[0].numel()
    (dloss,) = torch.autograd.grad(loss, output, create_graph=True)
    basis = torch.eye(dz, dtype=output.dtype, device=output.device).unsqueeze(1).expand(dz, n, dz)
    hess = None
    if dloss.requires_grad:
        (hess,) = torch.autograd.grad(dloss, output, basis.reshape(dz, *output.shape), is_grads_batched=True,
                                      retain_graph=True, allow_unused=True)
    if hess is None:
        return torch.zeros(n, dz, dz, dtype=output.dtype, device=output.device)
    return hess.reshape(dz, n, dz).permute(1, 2, 0)   # H[n, i, c] = ∂²ℓ / ∂z_{n,i} ∂z_{n,c}


def hessian_root(hess: torch.Tensor) -> torch.Tensor:
    r"""A root :math:`R_n R_n^\top = H_n` of ``(n, C, C)`` Hessians (eigenvalues clamped at 0).

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import hessian_root
        >>> root = hessian_root(torch.tensor([[[2.0, 1.0], [1.0, 2.0]]]))
        >>> torch.allclose(root @ root.mT, torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        True
    """
    values, vectors = torch.linalg.eigh(0.5 * (hess + hess.mT))
    return vectors * values.clamp(min=0).sqrt().unsqueeze(-2)


def backward_columns(output: torch.Tensor, outs: list[torch.Tensor], columns: torch.Tensor,
                     ) -> list[torch.Tensor | None]:
    r"""Per layer output :math:`s`, :math:`(\partial z / \partial s)^\top` applied to each of ``columns``:
    ``columns`` is ``(k, n, C)`` (one output cotangent per row and column), each result ``(k, n, out)``,
    ``None`` for a layer that does not reach the output. One backward pass batched over ``k``.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import backward_columns
        >>> s = torch.ones(3, 2, requires_grad=True)
        >>> backward_columns(2 * s, [s], torch.ones(1, 3, 2))[0].shape
        torch.Size([1, 3, 2])
    """
    k = columns.shape[0]
    grads = torch.autograd.grad(output, outs, columns.reshape(k, *output.shape), is_grads_batched=True,
                                retain_graph=True, allow_unused=True)
    return list(grads)


class LayerDiagonal(NamedTuple):
    """What :func:`layer_diagonal` returns.

    Attributes:
        diagonal: by key of ``params``, the curvature's diagonal (shaped like the parameter).
        gradient: by key, :math:`\\nabla_\\theta L` (the batch's summed log likelihood), or None.
        log_likelihood: :math:`L`, a detached 0-d tensor.
        output: the model's output (detached).
    """

    diagonal: dict[str, torch.Tensor]
    gradient: dict[str, torch.Tensor] | None
    log_likelihood: torch.Tensor
    output: torch.Tensor


def default_input(batch: Any) -> Any:
    """``batch[0]``, the model's input of a ``(inputs, targets, ...)`` batch (the default ``input_fn``).

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import default_input
        >>> default_input((torch.ones(2, 3), torch.zeros(2))).shape
        torch.Size([2, 3])
    """
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(f"batch must be a tuple (inputs, targets, ...) whose first item is the model's input, got "
                    f"{type(batch).__name__}; pass input_fn to build to say how to get the input from a batch")


def _scalar(value: Any) -> torch.Tensor:
    if isinstance(value, tuple):
        raise TypeError("outer_log_likelihood must return the log likelihood value alone (no aux), got a tuple")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"outer_log_likelihood must return a tensor value, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"outer_log_likelihood must return a scalar value (one number), got a value of shape "
                         f"{tuple(value.shape)} (sum the log likelihood over the batch)")
    return value.reshape(())


def _ggn_squares(jac: torch.Tensor, hess: torch.Tensor) -> torch.Tensor:
    # q[n, o] = Σ_{c,c'} J[c,n,o] H[n,c,c'] J[c',n,o]: H as it is (indefinite H gives the exact diag(JᵀHJ))
    return (jac * torch.einsum("ncd,dno->cno", hess, jac)).sum(0)


def _linear_sums(params: dict[str, torch.Tensor], captured: dict, signals: list, weight_sum: Callable,
                 ) -> dict[str, torch.Tensor]:
    """By key of ``params``: ``weight_sum(signal, a)`` for a weight, ``Σ_n signal`` for a bias (zero where a
    layer's signal is None: its output does not reach the log likelihood)."""
    sums = {}
    for (name, (a, _)), signal in zip(captured.items(), signals):
        weight, bias = param_key(name, "weight"), param_key(name, "bias")
        if signal is not None and weight in params:
            sums[weight] = weight_sum(signal, a)
        if signal is not None and bias in params:
            sums[bias] = signal.sum(0)
    return {key: sums[key].detach().to(p.dtype) if key in sums else torch.zeros_like(p) for key, p in params.items()}


def layer_diagonal(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: Any,
                   outer_log_likelihood: Callable[[torch.Tensor, Any], torch.Tensor], curvature: str = "empirical",
                   input_fn: Callable[[Any], Any] | None = None, with_gradient: bool = False) -> LayerDiagonal:
    r"""The empirical Fisher or GGN diagonal of the Linear weights and biases in ``params`` (module docstring).

    Args:
        model: a ``torch.nn.Module`` with ``torch.nn.Linear`` layers.
        params: a dict of Linear weights and biases by ``named_parameters`` key (a subset is fine).
        batch: the batch; ``input_fn(batch)`` (``batch[0]`` by default) is the model's input.
        outer_log_likelihood: ``outer_log_likelihood(output, batch)``, :math:`L` summed over the batch.
        curvature: ``"empirical"`` (:math:`\sum_n (\nabla \log p_n)^2`) or ``"ggn"``.
        input_fn: as above.
        with_gradient: also return :math:`\nabla_\theta L` (one extra backward pass for ``"ggn"``).

    Returns:
        A :class:`LayerDiagonal` (zeros for a layer that does not reach the output).

    Raises:
        TypeError / ValueError: bad ``params`` (:func:`linear_params`), an unknown curvature, a non-scalar
            log likelihood, a batch whose tensors do not all have the input's rows, a layer in ``params``
            not called exactly once.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import layer_diagonal
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> loglik = lambda z, b: -0.5 * ((z - b[1]) ** 2).sum()
        >>> out = layer_diagonal(model, {"weight": torch.ones(1, 1)}, (torch.tensor([[1.0], [2.0]]),
        ...                      torch.zeros(2, 1)), loglik, with_gradient=True)
        >>> out.diagonal, out.gradient, out.log_likelihood   # Σ (x² w)², -Σ x² w, -Σ x²/2
        ({'weight': tensor([[17.]])}, {'weight': tensor([[-5.]])}, tensor(-2.5000))
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    layers = linear_params(model, params)
    output, captured = forward_capture(model, params, (input_fn or default_input)(batch), layers)
    n = next(iter(captured.values()))[0].shape[0]
    check_batch_rows(batch, n, output)
    outs = [s for _, s in captured.values()]
    squares: list[torch.Tensor | None] = [None] * len(outs)   # per layer, Σ over the output's columns
    grads: list[torch.Tensor | None] = [None] * len(outs)
    with torch.enable_grad():
        value = _scalar(outer_log_likelihood(output, batch))
        if value.requires_grad:
            if curvature == "empirical" or with_gradient:
                grads = list(torch.autograd.grad(value, outs, retain_graph=curvature == "ggn", allow_unused=True))
            if curvature == "empirical":
                squares = [None if g is None else g.square() for g in grads]
            else:
                hess = output_hessian(-value, output)
                dz = hess.shape[-1]
                basis = torch.eye(dz, dtype=output.dtype, device=output.device).unsqueeze(1).expand(dz, n, dz)
                jacs = backward_columns(output, outs, basis)
                squares = [None if j is None else _ggn_squares(j, hess) for j in jacs]
    diagonal = _linear_sums(params, captured, squares, lambda square, a: square.mT @ a.square())
    gradient = _linear_sums(params, captured, grads, lambda grad, a: grad.mT @ a) if with_gradient else None
    return LayerDiagonal(diagonal, gradient, value.detach(), output.detach())
