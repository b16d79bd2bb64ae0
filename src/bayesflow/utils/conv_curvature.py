r"""Exact per-layer curvature and KFAC moments of ``torch.nn.Conv2d`` layers (``groups=1``), from patches.

A Conv2d layer is a Linear layer applied at every output position :math:`l = 1..L` (``L = H_out W_out``)
to the patch :math:`a_{n,l}` of its input under the kernel (as ``torch.nn.functional.unfold``: ``(n, D, L)``,
:math:`D = C_\text{in} k_h k_w`, padding, stride and dilation as the layer's), with the weight flattened
as PyTorch stores it, :math:`W \in \mathbb R^{C_\text{out} \times D}` (``weight.reshape(C_out, -1)``):
:math:`s_{n,l} = W a_{n,l} + b`. The weight is shared over positions, so with the output signals
:math:`g_{n,l} = \partial \log p_n / \partial s_{n,l}` the per-sample gradients are sums over positions,

.. math::
    \nabla_W \log p_n = \sum_l g_{n,l}\, a_{n,l}^\top, \qquad \nabla_b \log p_n = \sum_l g_{n,l},

and the exact diagonals are the squares of these summed over data (``einsum`` per chunk of data, no
per-sample autograd): the empirical Fisher :math:`\sum_n (\sum_l g_{n,l} a_{n,l}^\top)^{\odot 2}`, the
GGN the same summed over the columns :math:`c` of a signed root :math:`H_n = V_n \Lambda_n V_n^\top`
(:math:`g_{n,l,c} = J_{s_{n,l}}^\top V_n e_c |\lambda_c|^{1/2}`, weighted by
:math:`\operatorname{sign}\lambda_c`: exact for indefinite :math:`H_n` too).

KFAC ("expand", Grosse & Martens 2016's KFC; curvlinops' ``KFACType.EXPAND``) treats positions as extra
data and drops the cross-position terms :math:`l \ne l'` of the per-sample curvature
:math:`\sum_{l,l'} \tilde a_{n,l} \tilde a_{n,l'}^\top \otimes g_{n,l} g_{n,l'}^\top`; its factors
average :math:`\tilde a = [a; 1]` over positions and sum :math:`g` over them (:func:`input_moment`,
:func:`output_moment`), so that :math:`L = 1` is the Linear layer's KFAC exactly.

Example:
    >>> import torch
    >>> from bayesflow.utils.conv_curvature import conv_patches
    >>> layer = torch.nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
    >>> x = torch.randn(4, 2, 5, 5)
    >>> patches = conv_patches(layer, x)   # (n, C_in·kh·kw, L)
    >>> out = layer.weight.reshape(3, -1) @ patches + layer.bias[:, None]
    >>> patches.shape, torch.allclose(out.reshape(4, 3, 3, 3), layer(x), atol=1e-6)
    (torch.Size([4, 18, 9]), True)
"""

from __future__ import annotations

import torch

__all__ = ["check_conv_layer", "conv_diagonal", "conv_gradient", "conv_patches", "input_moment", "output_moment"]

_CHUNK_ELEMENTS = 1 << 22
"""The most per-sample weight-gradient entries :func:`conv_diagonal` holds at once (32 MiB in float64)."""


def check_conv_layer(name: str, layer: torch.nn.Conv2d, method: str) -> None:
    """ValueError unless ``layer`` is a Conv2d that ``method`` covers (``groups=1``).

    Example:
        >>> import torch
        >>> from bayesflow.utils.conv_curvature import check_conv_layer
        >>> check_conv_layer("c", torch.nn.Conv2d(4, 4, 3, groups=2), "KFAC")
        Traceback (most recent call last):
            ...
        ValueError: the Conv2d layer 'c' has groups=2; KFAC covers Conv2d layers with groups=1 only ...
    """
    if layer.groups != 1:
        raise ValueError(f"the Conv2d layer {name!r} has groups={layer.groups}; {method} covers Conv2d layers with "
                         "groups=1 only (grouped and depthwise convolutions are not covered): leave its parameters "
                         "out, or use the torch.func route (build with a log posterior)")


def _explicit_padding(layer: torch.nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` for ``torch.nn.functional.pad``, as Conv2d pads (``"same"``: the odd
    one on the right/bottom, as ATen does)."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        pads = []
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = layer.padding
    return (pw, pw, ph, ph)


def conv_patches(layer: torch.nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    r"""The patches :math:`a_{n,l}` of ``inputs`` ``(n, C_in, H, W)`` under the layer's kernel, ``(n, D, L)``.

    ``D = C_in·kh·kw`` ordered as ``weight.reshape(C_out, -1)`` (channel slowest), ``L`` the output
    positions row-major, so ``weight.reshape(C_out, -1) @ patches`` is the layer's output without bias.
    Any padding (numbers, ``"same"``, ``"valid"``) and ``padding_mode`` is applied as the layer applies it;
    the result equals ``torch.nn.functional.unfold`` (for zero padding), formed from strided views.

    Example:
        >>> import torch
        >>> from bayesflow.utils.conv_curvature import conv_patches
        >>> conv_patches(torch.nn.Conv2d(1, 1, 2), torch.arange(9.0).reshape(1, 1, 3, 3))[0]
        tensor([[0., 1., 3., 4.],
                [1., 2., 4., 5.],
                [3., 4., 6., 7.],
                [4., 5., 7., 8.]])
    """
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = torch.nn.functional.pad(inputs, _explicit_padding(layer), mode=mode)
    # unfold's patches as strided windows (one copy, by reshape): CPU im2col is ~10x slower at this
    (kh, kw), (dh, dw), (sh, sw) = layer.kernel_size, layer.dilation, layer.stride
    windows = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    n, channels, rows, cols = windows.shape[:4]   # (n, C_in, H_out, W_out, kh, kw)
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(n, channels * kh * kw, rows * cols)


def conv_diagonal(signals: torch.Tensor, patches: torch.Tensor, signs: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\sum_{n,c} \sigma_{n,c} (\sum_l g_{n,l,c} a_{n,l}^\top)^{\odot 2}` and
    :math:`\sum_{n,c} \sigma_{n,c} (\sum_l g_{n,l,c})^{\odot 2}`: the exact weight ``(C_out, D)`` and bias
    ``(C_out,)`` diagonals from ``signals`` ``(k, n, C_out, L)`` (``k`` columns per datum) and ``patches``
    ``(n, D, L)``; ``signs`` :math:`\sigma` ``(n, k)``, all ones when None. Per-sample gradients are formed
    a chunk of data at a time (at most ``2**22`` entries).

    Example:
        >>> import torch
        >>> from bayesflow.utils.conv_curvature import conv_diagonal
        >>> g, a = torch.ones(1, 2, 1, 3), torch.ones(2, 1, 3)   # two data, three positions, all ones
        >>> conv_diagonal(g, a)   # Σ_n (Σ_l 1·1)² = 2·9
        (tensor([[18.]]), tensor([18.]))
    """
    k, n, out, _ = signals.shape
    patches = patches.to(signals.dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(k * out * patches.shape[1], 1))
    weight = signals.new_zeros(out, patches.shape[1])
    bias = signals.new_zeros(out)
    for start in range(0, n, rows):
        g, a = signals[:, start:start + rows], patches[start:start + rows]
        per_sample = torch.einsum("knol,ndl->knod", g, a).square()   # (Σ_l g aᵀ)² per datum and column
        per_sample_bias = g.sum(-1).square()
        if signs is None:
            weight += per_sample.sum((0, 1))
            bias += per_sample_bias.sum((0, 1))
        else:
            sign = signs[start:start + rows].mT.to(signals.dtype)   # (k, rows)
            weight += torch.einsum("knod,kn->od", per_sample, sign)
            bias += torch.einsum("kno,kn->o", per_sample_bias, sign)
    return weight, bias


def conv_gradient(signal: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`\sum_{n,l} g_{n,l} a_{n,l}^\top` ``(C_out, D)`` and :math:`\sum_{n,l} g_{n,l}` from ``signal``
    ``(n, C_out, L)`` and ``patches`` ``(n, D, L)``: the batch gradient of the weight and bias.

    Example:
        >>> import torch
        >>> from bayesflow.utils.conv_curvature import conv_gradient
        >>> conv_gradient(torch.ones(2, 1, 3), torch.ones(2, 1, 3))
        (tensor([[6.]]), tensor([6.]))
    """
    return torch.einsum("nol,ndl->od", signal, patches.to(signal.dtype)), signal.sum((0, 2))


def input_moment(patches: torch.Tensor, bias: bool) -> torch.Tensor:
    r""":math:`\sum_n \frac1L \sum_l \tilde a_{n,l} \tilde a_{n,l}^\top`, ``(D [+1], D [+1])``, with
    :math:`\tilde a = [a; 1]` when ``bias`` (the last row/column), from ``patches`` ``(n, D, L)``.

    Divided by the number of data this is KFAC's :math:`A` (its bias corner is 1, as a Linear layer's).

    Example:
        >>> import torch
        >>> from bayesflow.utils.conv_curvature import input_moment
        >>> input_moment(torch.tensor([[[1.0, 3.0]]]), bias=True)   # one datum, L = 2: (1 + 9)/2, (1 + 3)/2, 1
        tensor([[5., 2.],
                [2., 1.]])
    """
    if bias:
        patches = torch.cat([patches, torch.ones_like(patches[:, :1])], dim=1)
    return torch.einsum("ndl,nel->de", patches, patches) / patches.shape[-1]


def output_moment(signals: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_{n,l,c} g_{n,l,c}\, g_{n,l,c}^\top`, ``(C_out, C_out)``, from ``signals``
    ``(..., C_out, L)`` (any leading columns and data): summed, not averaged, over positions.

    Divided by the number of data this is KFAC's :math:`G`.

    Example:
        >>> import torch
        >>> from bayesflow.utils.conv_curvature import output_moment
        >>> output_moment(torch.tensor([[[1.0, 2.0]]]))   # one datum, one channel, L = 2: 1 + 4
        tensor([[5.]])
    """
    flat = signals.movedim(-2, -1).reshape(-1, signals.shape[-2])
    return flat.mT @ flat
