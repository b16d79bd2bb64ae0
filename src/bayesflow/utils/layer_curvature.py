r"""Exact per-layer curvature of ``torch.nn.Linear`` and ``torch.nn.Conv2d`` layers from one forward and one
(batched) backward pass.

For a Linear layer :math:`s_n = W a_n + b` inside a model :math:`z_n = f(x_n)` and a log likelihood
:math:`L = \sum_n \log p(y_n \mid z_n)` whose rows do not interact, the per-sample gradient of
datum :math:`n` is the outer product :math:`\nabla_W \log p_n = g_n a_n^\top`, :math:`g_n =
\partial \log p_n / \partial s_n`. So the diagonal curvatures never need per-sample Jacobians:

.. math::
    \mathrm{diag}\,F_W = \sum_n g_n^{\odot 2} (a_n^{\odot 2})^\top = (g^{\odot 2})^\top a^{\odot 2}, \qquad
    \mathrm{diag}\,F_b = \sum_n g_n^{\odot 2}

(the empirical Fisher, ``curvature="empirical"``: one backward pass), and with the columns
:math:`r_{n,c} = J_{s_n}^\top V_n e_c |\lambda_{n,c}|^{1/2}` of a signed root of
:math:`H_n = \nabla^2_{z_n} (-\log p_n) = V_n \Lambda_n V_n^\top` (:func:`signed_hessian_root`; one
backward pass batched over the output's :math:`C` coordinates),

.. math::
    \mathrm{diag}\,(J^\top H J)_W = \sum_n q_n (a_n^{\odot 2})^\top, \qquad
    q_n = \sum_c \operatorname{sign}(\lambda_{n,c})\, r_{n,c}^{\odot 2}

(the generalised Gauss-Newton, ``curvature="ggn"``; :math:`H` as it is, not clamped). A Conv2d layer
(``groups=1``) is a Linear layer on the patches :math:`a_{n,l}` of its input at each output position
:math:`l`, with the weight shared: its per-sample gradient :math:`\sum_l g_{n,l} a_{n,l}^\top` is formed
a chunk of data at a time and squared (:mod:`bayesflow.utils.conv_curvature`), still exact. Forward hooks
capture each layer's input :math:`a` and output :math:`s`; :mod:`bayesflow.laplace.kfac` uses the same
capture with the columns of a root :math:`R_n R_n^\top = H_n` (:func:`hessian_root`).

Assumptions (checked where cheap): rows do not interact (no batch norm), each covered layer is called
at most once per forward on ``(batch, features)`` (Linear) or ``(batch, channels, height, width)``
(Conv2d) inputs, and ``params`` holds only Linear/Conv2d weights and biases (other parameters: leave
them out, they are held at the module's values).

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
from typing import Any, NamedTuple

import torch

from bayesflow.utils.conv_curvature import conv_diagonal, conv_gradient
from bayesflow.utils.layer_capture import (
    LAYER_TYPES,
    check_batch_rows,
    covered_layers,
    curvature_layers,
    default_input,
    forward_capture,
    layer_input,
    linear_layers,
    linear_params,
    param_key,
)

# the capture names stay importable from here (they lived here before utils/layer_capture.py)
__all__ = ["CURVATURES", "LAYER_TYPES", "LayerDiagonal", "backward_columns", "check_batch_rows", "covered_layers",
           "curvature_layers", "default_input", "forward_capture", "hessian_root", "layer_diagonal", "layer_input",
           "linear_layers", "linear_params", "output_hessian", "param_key", "signed_hessian_root"]

CURVATURES = ("empirical", "ggn")
"""The diagonals :func:`layer_diagonal` computes: the empirical Fisher, or the exact GGN."""


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


def hessian_root(hess: torch.Tensor, trim: bool = False) -> torch.Tensor:
    r"""A root :math:`R_n R_n^\top = H_n` of ``(n, C, C)`` Hessians (eigenvalues clamped at 0), ``(n, C, r)``.

    ``trim``: leave out the eigen-directions that are null, to working precision (eigenvalue at most
    :math:`C\,\epsilon \max_i |\lambda_{n,i}|`), for *every* datum of the batch: their columns are zero, and
    every column costs one batched backward pass and a share of each Gram product. The softmax
    cross-entropy Hessian :math:`\mathrm{diag}(p) - pp^\top` has the null vector :math:`\mathbf 1`, so its
    root has ``r = C - 1`` columns. (The count is read on the host: one synchronisation per call.)
    Without ``trim``, ``r = C``.

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import hessian_root
        >>> root = hessian_root(torch.tensor([[[2.0, 1.0], [1.0, 2.0]]]))
        >>> torch.allclose(root @ root.mT, torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        True
        >>> p = torch.tensor([[0.2, 0.3, 0.5]])
        >>> softmax_hessian = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        >>> trimmed = hessian_root(softmax_hessian, trim=True)
        >>> trimmed.shape, torch.allclose(trimmed @ trimmed.mT, softmax_hessian, atol=1e-7)
        (torch.Size([1, 3, 2]), True)
    """
    values, vectors = torch.linalg.eigh(0.5 * (hess + hess.mT))
    values = values.clamp(min=0)
    if trim:
        values, vectors = _without_null_columns(values, vectors)
    return vectors * values.sqrt().unsqueeze(-2)


def signed_hessian_root(hess: torch.Tensor, trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(root, sign)`` with :math:`\sum_c \sigma_{n,c}\, r_{n,:,c} r_{n,:,c}^\top = H_n` for ``(n, C, C)``
    Hessians, :math:`r = V |\Lambda|^{1/2}`, :math:`\sigma = \operatorname{sign} \Lambda` ``(n, C)``: exact for
    indefinite :math:`H_n` (no clamping), so a sum of signed squares of the columns is the exact diagonal.
    ``trim``: leave out the columns (eigenvalue ranks) that are zero to working precision for every datum,
    as :func:`hessian_root` does (one host read per call).

    Example:
        >>> import torch
        >>> from bayesflow.utils.layer_curvature import signed_hessian_root
        >>> hess = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])   # eigenvalues -1, 3
        >>> root, sign = signed_hessian_root(hess)
        >>> sign, torch.allclose(root * sign.unsqueeze(-2) @ root.mT, hess)
        (tensor([[-1.,  1.]]), True)
    """
    values, vectors = torch.linalg.eigh(0.5 * (hess + hess.mT))
    if trim:
        values, vectors = _without_null_columns(values, vectors)
    return vectors * values.abs().sqrt().unsqueeze(-2), torch.sign(values)


def _without_null_columns(values: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The eigenvalue ranks (columns) that are zero to working precision, :math:`|\lambda| \le C\epsilon
    \max_i |\lambda_{n,i}|`, for every datum left out of ``(n, C)`` values and ``(n, C, C)`` vectors: a
    column stays if any datum's eigenvalue there is not zero (one host read)."""
    if not values.numel():
        return values, vectors
    tol = values.shape[-1] * torch.finfo(values.dtype).eps * values.abs().amax(-1, keepdim=True)
    keep = (values.abs() > tol).any(0)
    if bool(keep.all()):
        return values, vectors
    return values[:, keep], vectors[..., keep]


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


def _scalar(value: Any) -> torch.Tensor:
    if isinstance(value, tuple):
        raise TypeError("outer_log_likelihood must return the log likelihood value alone (no aux), got a tuple")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"outer_log_likelihood must return a tensor value, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"outer_log_likelihood must return a scalar value (one number), got a value of shape "
                         f"{tuple(value.shape)} (sum the log likelihood over the batch)")
    return value.reshape(())


def _layer_diagonal(layer, a: torch.Tensor, columns: torch.Tensor, signs: torch.Tensor | None):
    """A layer's weight and bias diagonals from its columns ``(k, n, out[, H, W])`` of signals."""
    if isinstance(layer, torch.nn.Conv2d):
        return conv_diagonal(columns.flatten(-2), a, signs)
    squares = columns.square()
    q = squares.sum(0) if signs is None else torch.einsum("kno,nk->no", squares, signs.to(squares.dtype))
    return q.mT @ a.square().to(q.dtype), q.sum(0)


def _layer_gradient(layer, a: torch.Tensor, grad: torch.Tensor):
    if isinstance(layer, torch.nn.Conv2d):
        return conv_gradient(grad.flatten(-2), a)
    return grad.mT @ a.to(grad.dtype), grad.sum(0)


def _by_key(params: dict[str, torch.Tensor], per_layer: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """The per-layer ``(weight, bias)`` results by key of ``params``, shaped like them (zero for a layer
    missing from ``per_layer``: its output does not reach the log likelihood)."""
    sums = {}
    for name, (weight, bias) in per_layer.items():
        sums[param_key(name, "weight")], sums[param_key(name, "bias")] = weight, bias
    return {key: sums[key].detach().to(p.dtype).reshape(p.shape) if key in sums else torch.zeros_like(p)
            for key, p in params.items()}


def layer_diagonal(model: torch.nn.Module, params: dict[str, torch.Tensor], batch: Any,
                   outer_log_likelihood: Callable[[torch.Tensor, Any], torch.Tensor], curvature: str = "empirical",
                   input_fn: Callable[[Any], Any] | None = None, with_gradient: bool = False) -> LayerDiagonal:
    r"""The empirical Fisher or GGN diagonal of the Linear/Conv2d weights and biases in ``params`` (module
    docstring).

    Args:
        model: a ``torch.nn.Module`` with ``torch.nn.Linear`` / ``torch.nn.Conv2d`` layers.
        params: a dict of Linear/Conv2d weights and biases by ``named_parameters`` key (a subset is fine).
        batch: the batch; ``input_fn(batch)`` (``batch[0]`` by default) is the model's input.
        outer_log_likelihood: ``outer_log_likelihood(output, batch)``, :math:`L` summed over the batch.
        curvature: ``"empirical"`` (:math:`\sum_n (\nabla \log p_n)^2`) or ``"ggn"``.
        input_fn: as above.
        with_gradient: also return :math:`\nabla_\theta L` (one extra backward pass for ``"ggn"``).

    Returns:
        A :class:`LayerDiagonal` (zeros for a layer that does not reach the output).

    Raises:
        TypeError / ValueError: bad ``params`` (:func:`covered_layers`), an unknown curvature, a non-scalar
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
    layers = covered_layers(model, params)
    output, captured = forward_capture(model, params, (input_fn or default_input)(batch), layers)
    n = next(iter(captured.values()))[0].shape[0]
    check_batch_rows(batch, n, output)
    outs = [s for _, s in captured.values()]
    columns: list[torch.Tensor | None] = [None] * len(outs)   # per layer, (k, n, out...) backward signals
    grads: list[torch.Tensor | None] = [None] * len(outs)
    signs = None   # (n, k): each column's sign, all +1 when None
    with torch.enable_grad():
        value = _scalar(outer_log_likelihood(output, batch))
        if value.requires_grad:
            if curvature == "empirical" or with_gradient:
                grads = list(torch.autograd.grad(value, outs, retain_graph=curvature == "ggn", allow_unused=True))
            if curvature == "empirical":
                columns = [None if g is None else g.unsqueeze(0) for g in grads]
            else:   # Σ_c σ_c r_c r_cᵀ = H exactly (indefinite H as it is): one backward batched over C columns
                # the null directions of every H_n (softmax's 1) cost a backward column and add nothing
                root, signs = signed_hessian_root(output_hessian(-value, output), trim=True)
                columns = backward_columns(output, outs, root.permute(2, 0, 1).contiguous())
    inputs = {name: layer_input(layers[name], a) for name, (a, _) in captured.items()}
    diagonal = _by_key(params, {name: _layer_diagonal(layers[name], inputs[name], c, signs)
                                for name, c in zip(captured, columns) if c is not None})
    gradient = None
    if with_gradient:
        gradient = _by_key(params, {name: _layer_gradient(layers[name], inputs[name], g)
                                    for name, g in zip(captured, grads) if g is not None})
    return LayerDiagonal(diagonal, gradient, value.detach(), output.detach())
