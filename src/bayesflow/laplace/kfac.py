r"""Kronecker-factored (KFAC) Laplace approximation for the ``nn.Linear`` and ``nn.Conv2d`` layers of a module.

For a Linear layer :math:`s = W a + b` write :math:`\tilde W = [W, b]` (``(out, in + 1)``; no bias
column without a bias) and :math:`\tilde a = [a; 1]`. The gradient of datum :math:`n`'s negative log
likelihood :math:`\ell_n` with respect to :math:`\tilde W` is :math:`g_n \tilde a_n^\top`,
:math:`g_n = \partial \ell_n / \partial s_n`, so its curvature over :math:`\mathrm{vec}\,\tilde W`
(column-stacking) is :math:`\tilde a_n \tilde a_n^\top \otimes g_n g_n^\top`. KFAC averages the two
factors separately over the :math:`N` data seen,

.. math::
    A = \frac1N \sum_n \tilde a_n \tilde a_n^\top, \qquad
    G = \frac1N \sum_n \sum_c g_{n,c}\, g_{n,c}^\top, \qquad
    P_{\text{layer}} = N\,(A \otimes G) + \lambda I,

with :math:`\lambda` the prior precision (``prior_prec``) and :math:`N` the state's ``num_data`` (the
number of data accumulated; replace it with ``state.replace(num_data=...)`` to rescale to a data set
of another size). Layers are independent (block-diagonal :math:`P`). In PyTorch's row-major
flattening of :math:`\tilde W` the same matrix is :math:`N\,(G \otimes A) + \lambda I`.

Two choices of the :math:`g_{n,c}` (``fisher_type``):

* ``"ggn"`` (default): :math:`g_{n,c} = J_{s_n}^\top R_n e_c` for the columns of a square root
  :math:`R_n R_n^\top = H_{\ell}(z_n)` of the Hessian of :math:`\ell_n` in the model output
  :math:`z_n`, so :math:`\sum_c g_{n,c} g_{n,c}^\top = J_{s_n}^\top H_\ell J_{s_n}`: the
  generalised Gauss-Newton, which for exponential-family likelihoods in their natural parameter
  (softmax cross-entropy, Gaussian) *is* the Fisher :math:`E_{\hat y \sim p(\cdot \mid z_n)}[g g^\top]`
  with the expectation over labels taken exactly instead of by sampling labels.
  It costs one batched backward column per non-null direction of the :math:`H_n` (``r``: ``dz``, the output
  size, less the directions null for every datum: ``dz - 1`` for softmax cross-entropy).
* ``"mc"``: :math:`g_{n,s} = J_{s_n}^\top R_n \varepsilon_{n,s} / \sqrt{S}` with
  :math:`\varepsilon_{n,s} \sim N(0, I)`, :math:`s = 1..S` (``mc_samples``): an unbiased estimate of the
  same GGN (:math:`E[R \varepsilon \varepsilon^\top R^\top] = H_\ell`) at the cost of ``S`` backward
  columns instead of ``r`` — the ``G`` factor's Gram matrix, which dominates ``"ggn"`` on wide layers
  (``r·n`` rows), shrinks to ``S·n`` rows. The draws come from the state's noise key and step.
* ``"empirical"``: one :math:`g_n` per datum from the true labels (the empirical Fisher).

**Conv2d** (``groups=1``; any kernel, stride, padding, dilation, padding mode): KFC (Grosse & Martens
2016) in its "expand" form (curvlinops' ``KFACType.EXPAND``). The layer is a Linear layer
:math:`s_{n,l} = W a_{n,l} + b` on the patches :math:`a_{n,l}` (``unfold``, :math:`D = C_\text{in} k_h k_w`)
at its :math:`L = H_\text{out} W_\text{out}` output positions, :math:`W` the weight flattened as PyTorch
stores it, ``(C_out, D)``. Its per-datum curvature :math:`\sum_{l,l'} \tilde a_{n,l} \tilde a_{n,l'}^\top
\otimes g_{n,l} g_{n,l'}^\top` is approximated by dropping the cross-position terms and factorising the
rest, positions taken as extra data:

.. math::
    A = \frac1N \sum_n \frac1L \sum_l \tilde a_{n,l} \tilde a_{n,l}^\top, \qquad
    G = \frac1N \sum_n \sum_l \sum_c g_{n,l,c}\, g_{n,l,c}^\top, \qquad
    N A \otimes G = \tfrac1{NL} \textstyle\sum_{n,l} \tilde a \tilde a^\top \otimes \sum_{n,l,c} g g^\top

(:math:`A` averages over positions, so its bias corner stays 1; :math:`G` sums over them). The product
is curvlinops' ``KFACType.EXPAND`` matrix, and for :math:`L = 1` (a kernel covering the whole padded
input, e.g. a 1x1 convolution of a 1x1 image) it is the Linear layer's KFAC term by term.

**Exactness.** For one datum the Kronecker product is exact: ``"ggn"`` gives the exact GGN
:math:`J^\top H_\ell J` of a one-layer model (e.g. one Linear layer with softmax cross-entropy) and
``"empirical"`` the exact empirical Fisher :math:`\nabla\ell\,\nabla\ell^\top` of any model's Linear
block (of a Conv2d block too when its :math:`L = 1`; with :math:`L > 1` the dropped cross-position
terms make Conv2d blocks approximate even for one datum). For linear regression with a Gaussian
likelihood of fixed variance (:math:`H_\ell` the same for every datum) ``"ggn"`` is exact *in total*
for any number of data: :math:`N A \otimes G = \sum_n \tilde a_n \tilde a_n^\top \otimes H_\ell`.

Accumulation uses forward hooks on the Linear and Conv2d modules and one backward pass
(``"empirical"``) or one batched backward pass (``"ggn"``) through the captured layer outputs: no
per-sample Jacobians (the machinery of :mod:`bayesflow.utils.layer_curvature`, shared with the diagonal
module routes). It assumes that the log likelihood is a sum over data (rows) that do not interact (no
batch norm) and that each covered layer is called once per forward, on ``(batch, features)`` (Linear) or
``(batch, channels, height, width)`` (Conv2d) inputs. Parameters outside these layers are held at their
MAP values (they are returned unchanged by :func:`sample`); a grouped Conv2d (``groups > 1``) is refused.

Example:
    >>> import torch
    >>> from bayesflow.laplace import kfac
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> loglik = lambda logits, batch: -torch.nn.functional.cross_entropy(logits, batch[1], reduction="sum")
    >>> transform = kfac.build(model, loglik, prior_prec=1.0)
    >>> state = transform.init(dict(model.named_parameters()))
    >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> state, logits = transform.update(state, (x, y))
    >>> {name: tuple(a.shape) for name, a in state.A.items()}, state.G["2"].shape, state.num_data
    ({'0': (4, 4), '2': (5, 5)}, torch.Size([2, 2]), tensor(8))
    >>> draws = kfac.sample(state, (100,), generator=torch.Generator().manual_seed(0))
    >>> draws["2.weight"].shape, kfac.precision_dense(state).shape   # 16 + 10 Linear parameters
    (torch.Size([100, 2, 4]), torch.Size([26, 26]))
    >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(2 * 4 * 4, 2))
    >>> transform = kfac.build(cnn, loglik, prior_prec=1.0)
    >>> state, _ = transform.update(transform.init(dict(cnn.named_parameters())), (torch.randn(8, 1, 4, 4), y))
    >>> state.A["0"].shape, state.G["0"].shape   # C_in·3·3 + 1 (bias), C_out
    (torch.Size([10, 10]), torch.Size([2, 2]))
    >>> kfac.sample(state, (100,))["0.weight"].shape
    torch.Size([100, 2, 1, 3, 3])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from numbers import Real
from typing import Any

import torch

from bayesflow.engine.noise import STEP, NoiseStream, derive
from bayesflow.engine.validation import check_bool, check_finite_params
from bayesflow.laplace._common import check_callable, scalar_value
from bayesflow.laplace.kfac_posterior import KFACLaplaceState, _key, precision_dense, sample
from bayesflow.tree import flatten
from bayesflow.types import Transform
from bayesflow.utils.conv_curvature import check_conv_layer, input_moment, output_moment
from bayesflow.utils.layer_capture import (
    check_batch_rows,
    curvature_layers,
    default_input,
    forward_capture,
    layer_input,
)
from bayesflow.utils.layer_curvature import backward_columns, hessian_root, output_hessian

__all__ = ["FISHER_TYPES", "KFACLaplaceState", "build", "init", "precision_dense", "sample", "update"]

FISHER_TYPES = ("ggn", "mc", "empirical")
"""The choices of ``fisher_type``: the exact-expectation GGN/Fisher, its Monte-Carlo estimate, the empirical Fisher."""


def _layers(model: Any) -> dict[str, torch.nn.Linear | torch.nn.Conv2d]:
    layers = curvature_layers(model, "KFAC")
    for name, layer in layers.items():
        if isinstance(layer, torch.nn.Conv2d):
            check_conv_layer(name, layer, "KFAC")
    return layers


def _kind(layer: torch.nn.Module) -> str:
    return "Conv2d" if isinstance(layer, torch.nn.Conv2d) else "Linear"


def _check_prior(prior_prec: Any) -> float:
    if isinstance(prior_prec, torch.Tensor) and prior_prec.numel() == 1:
        prior_prec = float(prior_prec)
    if isinstance(prior_prec, bool) or not isinstance(prior_prec, Real):
        raise TypeError(f"prior_prec must be a number, got {prior_prec!r}")
    if not (math.isfinite(prior_prec) and prior_prec >= 0):
        raise ValueError(f"prior_prec must be a finite non-negative precision, got {prior_prec!r}")
    return float(prior_prec)


def build(model: torch.nn.Module, outer_log_likelihood: Callable[[torch.Tensor, Any], torch.Tensor],
          prior_prec: float = 0.0, fisher_type: str = "ggn",
          input_fn: Callable[[Any], Any] | None = None, mc_samples: int = 1) -> Transform:
    r"""The KFAC Laplace transform: ``init(params)`` and ``update(state, batch, inplace)``.

    Args:
        model: a ``torch.nn.Module`` with at least one ``torch.nn.Linear`` or ``torch.nn.Conv2d`` (``groups=1``)
            submodule (or such a layer itself).
        outer_log_likelihood: ``outer_log_likelihood(output, batch) -> value``, the log likelihood of the
            model's output summed over the batch (a scalar).
        prior_prec: :math:`\lambda \ge 0`, the isotropic prior precision.
        fisher_type: ``"ggn"`` (exact expectation over labels) or ``"empirical"`` (true labels); see the
            module docstring.
        input_fn: ``input_fn(batch)``, the model's input; ``batch[0]`` when None.
        mc_samples: :math:`S \ge 1`, the draws per datum of ``fisher_type="mc"``.

    Returns:
        A :class:`~bayesflow.types.Transform` of :func:`init` and :func:`update` with these arguments
        (``init(params, seed=None)`` seeds the noise key of ``"mc"``).

    Raises:
        TypeError / ValueError: a model with no Linear/Conv2d layer, a grouped Conv2d, a negative prior, an
            unknown fisher_type.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import kfac
        >>> kfac.build(torch.nn.Tanh(), lambda z, b: z.sum())
        Traceback (most recent call last):
            ...
        ValueError: model (Tanh) has no torch.nn.Linear or torch.nn.Conv2d layer (KFAC here covers Linear and ...
    """
    _layers(model)
    check_callable("outer_log_likelihood", outer_log_likelihood)
    prior_prec = _check_prior(prior_prec)
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if input_fn is not None:
        check_callable("input_fn", input_fn)
    _check_mc_samples(mc_samples)
    return Transform(partial(init, model=model, prior_prec=prior_prec),
                     partial(update, model=model, outer_log_likelihood=outer_log_likelihood,
                             fisher_type=fisher_type, input_fn=input_fn, mc_samples=mc_samples))


def _mc_draws(state: KFACLaplaceState, root: torch.Tensor, samples: int) -> torch.Tensor:
    """ε / √S, ``(n, dz, S)``: batch ``step``'s standard normals from the state's noise key."""
    if state.rng is None:
        raise ValueError("fisher_type='mc' draws from the state's noise key, and this state has none: make it "
                         "with kfac.init (or the transform's init)")
    seed = derive(int(state.rng), int(state.step), STEP, full=root.device.type != "cpu")
    generator = torch.Generator(device=root.device).manual_seed(seed)
    draws = torch.randn(root.shape[0], root.shape[-1], samples, generator=generator, dtype=root.dtype,
                        device=root.device)
    return draws / math.sqrt(samples)


def _check_mc_samples(mc_samples: Any) -> int:
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
    return mc_samples


def init(params: dict[str, torch.Tensor], model: torch.nn.Module, prior_prec: float = 0.0,
         seed: Any = None) -> KFACLaplaceState:
    r"""The initial state: ``params`` (kept, not copied), zero factors, ``num_data`` and ``step`` 0.

    Args:
        params: the MAP, a dict by name holding (at least) every Linear/Conv2d layer's ``weight`` and
            ``bias`` (``dict(model.named_parameters())``).
        model: the module whose Linear and Conv2d layers are approximated.
        prior_prec: :math:`\lambda \ge 0`.
        seed: the noise key's seed for ``fisher_type="mc"`` (an int or a ``torch.Generator``; None draws it
            from torch's global generator).

    Raises:
        TypeError / ValueError: no Linear/Conv2d layer, a grouped Conv2d, a missing or wrongly shaped
            parameter of a covered layer, or a parameter holding NaN or ±inf.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import kfac
        >>> kfac.init({"weight": torch.zeros(3, 3)}, torch.nn.Linear(2, 3))
        Traceback (most recent call last):
            ...
        ValueError: params['weight'] has shape (3, 3), but the Linear layer '' needs (3, 2)
    """
    layers = _layers(model)
    prior = _check_prior(prior_prec)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of tensors by name (dict(model.named_parameters())), "
                        f"got {type(params).__name__}")
    A, G, covered = {}, {}, []
    for name, layer in layers.items():
        for leaf, value in (("weight", layer.weight), ("bias", layer.bias)):
            if value is None:
                continue
            key = _key(name, leaf)
            covered.append(key)
            if key not in params:
                raise ValueError(f"params has no {key!r}, a parameter of the {_kind(layer)} layer {name!r}")
            given = params[key]
            if not isinstance(given, torch.Tensor) or not given.is_floating_point():
                raise TypeError(f"params[{key!r}] must be a floating-point tensor")
            if given.shape != value.shape:
                raise ValueError(f"params[{key!r}] has shape {tuple(given.shape)}, but the {_kind(layer)} layer "
                                 f"{name!r} needs {tuple(value.shape)}")
        weight = params[_key(name, "weight")]
        width = weight[0].numel() + (layer.bias is not None)   # in, or C_in·kh·kw, [+ 1]
        A[name] = torch.zeros(width, width, dtype=weight.dtype, device=weight.device)
        G[name] = torch.zeros(weight.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device)
    check_finite_params(*flatten({key: params[key] for key in covered}))
    first = next(iter(A.values()))
    zero = torch.zeros((), dtype=torch.int64)
    rng = NoiseStream(torch.device("cpu"), None).initial_state(seed)
    return KFACLaplaceState(params, A, G, torch.tensor(prior, dtype=first.dtype, device=first.device),
                            zero.clone(), zero.clone(), rng)


def update(state: KFACLaplaceState, batch: Any, model: torch.nn.Module,
           outer_log_likelihood: Callable[[torch.Tensor, Any], torch.Tensor], fisher_type: str = "ggn",
           input_fn: Callable[[Any], Any] | None = None, inplace: bool = False,
           mc_samples: int = 1) -> tuple[KFACLaplaceState, Any]:
    r"""Folds a batch into the running means :math:`A` and :math:`G` (at ``params``) and ``num_data``.

    With :math:`n` data seen and a batch of :math:`m` rows, :math:`A \leftarrow A + (S_A - m A)/(n + m)`,
    :math:`S_A = \sum_{\text{batch}} \tilde a \tilde a^\top` (likewise :math:`G`; for a Conv2d layer the
    sums of the module docstring over positions), so any split of the data into batches gives the factors
    of one full-data pass.

    Args:
        state: the current state (its ``params`` are where the curvature is taken; they do not move).
        batch: the batch; ``input_fn(batch)`` (``batch[0]`` by default) is the model's input, and every
            tensor in it must have the input's number of rows.
        model, outer_log_likelihood, fisher_type, input_fn, mc_samples: as in :func:`build`.
        inplace: update the state's own factor, ``num_data`` and ``step`` tensors (and return it).

    Returns:
        ``(state, output)``, output the model's output on the batch (detached).

    Raises:
        TypeError / ValueError: a non-scalar log likelihood, a mismatched batch, a layer called more than
            once or on inputs that are not ``(batch, features)`` (Linear) / ``(batch, C, H, W)`` (Conv2d).

    Example:
        >>> import torch
        >>> from bayesflow.laplace import kfac
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> loglik = lambda z, b: -0.5 * ((z - b[1]) ** 2).sum()   # H = 1
        >>> state = kfac.init(dict(model.named_parameters()), model)
        >>> x = torch.tensor([[1.0], [2.0]])
        >>> state, _ = kfac.update(state, (x, torch.zeros(2, 1)), model, loglik)
        >>> state.A[""], state.G[""], kfac.precision_dense(state)   # N A G = Σ x² = 5
        (tensor([[2.5000]]), tensor([[1.]]), tensor([[5.]]))
    """
    check_bool(inplace, "inplace")
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    layers = _layers(model)
    missing = sorted(set(layers) ^ set(state.A))
    if missing:
        raise ValueError(f"the state's layers {sorted(state.A)} are not the model's Linear and Conv2d layers "
                         f"{sorted(layers)}")
    inputs = (input_fn or default_input)(batch)
    output, captured = forward_capture(model, state.params, inputs, layers, "KFAC")
    n = next(iter(captured.values()))[0].shape[0]
    check_batch_rows(batch, n, output)
    outs = [captured[name][1] for name in layers]
    with torch.enable_grad():
        loss = -scalar_value("outer_log_likelihood", outer_log_likelihood(output, batch),
                             " (sum the log likelihood over the batch)")
        if fisher_type == "empirical":
            grads = torch.autograd.grad(loss, outs, allow_unused=True)   # (n, out) each
        else:   # the columns of R_n R_nᵀ = H_n: Σ_c g_c g_cᵀ = J_sᵀ H J_s
            hess = output_hessian(loss, output)   # (n, dz, dz)
            if fisher_type == "mc":   # S random combinations of the columns: E[R ε εᵀ Rᵀ] = H
                root = hessian_root(hess)
                root = root @ _mc_draws(state, root, _check_mc_samples(mc_samples))
            else:   # the null directions of every H_n (softmax's 1) cost a backward column and add nothing
                root = hessian_root(hess, trim=True)   # (n, dz, r)
            # columns contiguous: the batched backward's matmuls and ReLU masks then run on dense rows
            grads = backward_columns(output, outs, root.permute(2, 0, 1).contiguous())
    m = torch.as_tensor(n, dtype=torch.int64)
    total = state.num_data + m
    # the running mean A + (S - m A)/(seen + m) = (seen/total) A + S/total, folded into the Gram product
    # (addmm's beta and alpha) so that no factor-sized temporaries are made
    keep, scale = int(state.num_data) / int(total), 1.0 / int(total)
    new_A, new_G = {}, {}
    for (name, layer), grad in zip(layers.items(), grads):
        a = layer_input(layer, captured[name][0].detach().to(state.A[name].dtype))   # (n, in) / (n, D, L)
        conv = isinstance(layer, torch.nn.Conv2d)
        if conv:   # Σ_n (1/L) Σ_l ã ãᵀ: L = 1 is the Linear layer's Σ_n ã ãᵀ
            new_A[name] = _fold(state.A[name], input_moment(a, layer.bias is not None), keep, scale, inplace)
        else:
            if layer.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
            new_A[name] = _fold_gram(state.A[name], a, keep, scale, inplace)
        if grad is None:   # the layer does not reach the output
            new_G[name] = _fold(state.G[name], None, keep, scale, inplace)
        elif conv:   # Σ over columns, data and positions of g gᵀ
            sum_g = output_moment(grad.detach().to(state.G[name].dtype).flatten(-2))
            new_G[name] = _fold(state.G[name], sum_g, keep, scale, inplace)
        else:
            g = grad.detach().to(state.G[name].dtype).reshape(-1, grad.shape[-1])
            new_G[name] = _fold_gram(state.G[name], g, keep, scale, inplace)
    aux = output.detach()
    if inplace:
        state.num_data.add_(m)
        state.step.add_(1)
        return state, aux
    return state._replace(A=new_A, G=new_G, num_data=total, step=state.step + 1), aux


def _fold_gram(mean: torch.Tensor, rows: torch.Tensor, keep: float, scale: float, inplace: bool) -> torch.Tensor:
    """``keep · mean + scale · rowsᵀ rows`` (in place into ``mean`` when asked)."""
    if inplace:
        return mean.addmm_(rows.mT, rows, beta=keep, alpha=scale)
    return torch.addmm(mean, rows.mT, rows, beta=keep, alpha=scale)


def _fold(mean: torch.Tensor, total: torch.Tensor | None, keep: float, scale: float, inplace: bool) -> torch.Tensor:
    """``keep · mean + scale · total`` (``total`` None: zero; in place into ``mean`` when asked)."""
    kept = mean.mul_(keep) if inplace else mean * keep
    return kept if total is None else kept.add_(total, alpha=scale)
