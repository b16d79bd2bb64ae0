r"""Kronecker-factored (KFAC) Laplace approximation for the ``nn.Linear`` layers of an ``nn.Module``.

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
  It costs ``dz`` batched backward passes (``dz`` the output size).
* ``"empirical"``: one :math:`g_n` per datum from the true labels (the empirical Fisher).

**Exactness.** For one datum the Kronecker product is exact: ``"ggn"`` gives the exact GGN
:math:`J^\top H_\ell J` of a one-layer model (e.g. one Linear layer with softmax cross-entropy) and
``"empirical"`` the exact empirical Fisher :math:`\nabla\ell\,\nabla\ell^\top` of any model's Linear
block. For linear regression with a Gaussian likelihood of fixed variance (:math:`H_\ell` the same for
every datum) ``"ggn"`` is exact *in total* for any number of data: :math:`N A \otimes G =
\sum_n \tilde a_n \tilde a_n^\top \otimes H_\ell`.

Accumulation uses forward hooks on the Linear modules and one backward pass (``"empirical"``) or one
batched backward pass (``"ggn"``) through the captured layer outputs: no per-sample Jacobians. It
assumes that the log likelihood is a sum over data (rows) that do not interact (no batch norm) and that
each Linear layer is called once per forward, on ``(batch, features)`` inputs. Parameters outside the
Linear layers are held at their MAP values (they are returned unchanged by :func:`sample`).

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from numbers import Real
from typing import Any

import torch

from bayesflow.laplace._common import check_callable, scalar_value
from bayesflow.laplace.kfac_posterior import KFACLaplaceState, _key, precision_dense, sample
from bayesflow.tree import flatten
from bayesflow.types import Transform

__all__ = ["FISHER_TYPES", "KFACLaplaceState", "build", "init", "precision_dense", "sample", "update"]

FISHER_TYPES = ("ggn", "empirical")
"""The choices of ``fisher_type``: the exact-expectation GGN/Fisher, or the empirical Fisher."""


def _linear_layers(model: Any) -> dict[str, torch.nn.Linear]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no torch.nn.Linear layer (KFAC here covers "
                         "Linear layers only)")
    return layers


def _check_prior(prior_prec: Any) -> float:
    if isinstance(prior_prec, torch.Tensor) and prior_prec.numel() == 1:
        prior_prec = float(prior_prec)
    if isinstance(prior_prec, bool) or not isinstance(prior_prec, Real):
        raise TypeError(f"prior_prec must be a number, got {prior_prec!r}")
    if not (math.isfinite(prior_prec) and prior_prec >= 0):
        raise ValueError(f"prior_prec must be a finite non-negative precision, got {prior_prec!r}")
    return float(prior_prec)


def _default_input(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(f"batch must be a tuple (inputs, targets, ...) whose first item is the model's input, got "
                    f"{type(batch).__name__}; pass input_fn to build to say how to get the input from a batch")


def build(model: torch.nn.Module, outer_log_likelihood: Callable[[torch.Tensor, Any], torch.Tensor],
          prior_prec: float = 0.0, fisher_type: str = "ggn",
          input_fn: Callable[[Any], Any] | None = None) -> Transform:
    r"""The KFAC Laplace transform: ``init(params)`` and ``update(state, batch, inplace)``.

    Args:
        model: a ``torch.nn.Module`` with at least one ``torch.nn.Linear`` submodule (or a Linear itself).
        outer_log_likelihood: ``outer_log_likelihood(output, batch) -> value``, the log likelihood of the
            model's output summed over the batch (a scalar).
        prior_prec: :math:`\lambda \ge 0`, the isotropic prior precision.
        fisher_type: ``"ggn"`` (exact expectation over labels) or ``"empirical"`` (true labels); see the
            module docstring.
        input_fn: ``input_fn(batch)``, the model's input; ``batch[0]`` when None.

    Returns:
        A :class:`~bayesflow.types.Transform` of :func:`init` and :func:`update` with these arguments.

    Raises:
        TypeError / ValueError: a model with no Linear layer, a negative prior, an unknown fisher_type.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import kfac
        >>> kfac.build(torch.nn.Tanh(), lambda z, b: z.sum())
        Traceback (most recent call last):
            ...
        ValueError: model (Tanh) has no torch.nn.Linear layer (KFAC here covers Linear layers only)
    """
    _linear_layers(model)
    check_callable("outer_log_likelihood", outer_log_likelihood)
    prior_prec = _check_prior(prior_prec)
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if input_fn is not None:
        check_callable("input_fn", input_fn)
    return Transform(partial(init, model=model, prior_prec=prior_prec),
                     partial(update, model=model, outer_log_likelihood=outer_log_likelihood,
                             fisher_type=fisher_type, input_fn=input_fn))


def init(params: dict[str, torch.Tensor], model: torch.nn.Module, prior_prec: float = 0.0) -> KFACLaplaceState:
    r"""The initial state: ``params`` (kept, not copied), zero factors, ``num_data`` and ``step`` 0.

    Args:
        params: the MAP, a dict by name holding (at least) every Linear layer's ``weight`` and ``bias``
            (``dict(model.named_parameters())``).
        model: the module whose Linear layers are approximated.
        prior_prec: :math:`\lambda \ge 0`.

    Raises:
        TypeError / ValueError: no Linear layer, a missing or wrongly shaped Linear parameter.

    Example:
        >>> import torch
        >>> from bayesflow.laplace import kfac
        >>> kfac.init({"weight": torch.zeros(3, 3)}, torch.nn.Linear(2, 3))
        Traceback (most recent call last):
            ...
        ValueError: params['weight'] has shape (3, 3), but the Linear layer '' needs (3, 2)
    """
    layers = _linear_layers(model)
    prior = _check_prior(prior_prec)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of tensors by name (dict(model.named_parameters())), "
                        f"got {type(params).__name__}")
    A, G = {}, {}
    for name, layer in layers.items():
        for leaf, value in (("weight", layer.weight), ("bias", layer.bias)):
            if value is None:
                continue
            key = _key(name, leaf)
            if key not in params:
                raise ValueError(f"params has no {key!r}, a parameter of the Linear layer {name!r}")
            given = params[key]
            if not isinstance(given, torch.Tensor) or not given.is_floating_point():
                raise TypeError(f"params[{key!r}] must be a floating-point tensor")
            if given.shape != value.shape:
                raise ValueError(f"params[{key!r}] has shape {tuple(given.shape)}, but the Linear layer "
                                 f"{name!r} needs {tuple(value.shape)}")
        weight = params[_key(name, "weight")]
        width = layer.in_features + (layer.bias is not None)
        A[name] = torch.zeros(width, width, dtype=weight.dtype, device=weight.device)
        G[name] = torch.zeros(layer.out_features, layer.out_features, dtype=weight.dtype, device=weight.device)
    first = next(iter(A.values()))
    zero = torch.zeros((), dtype=torch.int64)
    return KFACLaplaceState(params, A, G, torch.tensor(prior, dtype=first.dtype, device=first.device),
                            zero.clone(), zero.clone())


def _forward_capture(state: KFACLaplaceState, model: torch.nn.Module, inputs: Any,
                     layers: dict[str, torch.nn.Linear]):
    """The model's output at ``state.params`` and, per Linear layer, its input (detached) and output."""
    captured: dict[str, list] = {name: [] for name in layers}

    def hook(name, module, args, output):
        captured[name].append((args[0], output))

    handles = [layer.register_forward_hook(partial(hook, name)) for name, layer in layers.items()]
    params = {key: value.detach().requires_grad_(True) for key, value in state.params.items()}
    try:
        with torch.enable_grad():
            output = torch.func.functional_call(model, params, (inputs,))
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model must return a tensor output (e.g. logits), got {type(output).__name__}")
    for name, calls in captured.items():
        if len(calls) != 1:
            raise ValueError(f"the Linear layer {name!r} was called {len(calls)} times in one forward; KFAC here "
                             "needs each Linear layer called exactly once")
        if calls[0][0].ndim != 2:
            raise ValueError(f"the Linear layer {name!r} got an input of shape {tuple(calls[0][0].shape)}; KFAC "
                             "here needs (batch, features) inputs")
    return output, {name: calls[0] for name, calls in captured.items()}


def _check_batch(batch: Any, n: int, output: torch.Tensor) -> None:
    if output.ndim == 0 or output.shape[0] != n:
        raise ValueError(f"the model's output has shape {tuple(output.shape)}, but its Linear layers saw {n} rows "
                         "of data: the output's leading dimension must be the batch")
    leaves, _ = flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] != n:
            raise ValueError(f"mismatched batch: a batch tensor has shape {tuple(leaf.shape)}, but the model's "
                             f"input has {n} rows (every batch tensor's leading dimension must be {n})")


def update(state: KFACLaplaceState, batch: Any, model: torch.nn.Module,
           outer_log_likelihood: Callable[[torch.Tensor, Any], torch.Tensor], fisher_type: str = "ggn",
           input_fn: Callable[[Any], Any] | None = None, inplace: bool = False) -> tuple[KFACLaplaceState, Any]:
    r"""Folds a batch into the running means :math:`A` and :math:`G` (at ``params``) and ``num_data``.

    With :math:`n` data seen and a batch of :math:`m` rows, :math:`A \leftarrow A + (S_A - m A)/(n + m)`,
    :math:`S_A = \sum_{\text{batch}} \tilde a \tilde a^\top` (likewise :math:`G`), so any split of the data
    into batches gives the factors of one full-data pass.

    Args:
        state: the current state (its ``params`` are where the curvature is taken; they do not move).
        batch: the batch; ``input_fn(batch)`` (``batch[0]`` by default) is the model's input, and every
            tensor in it must have the input's number of rows.
        model, outer_log_likelihood, fisher_type, input_fn: as in :func:`build`.
        inplace: update the state's own factor, ``num_data`` and ``step`` tensors (and return it).

    Returns:
        ``(state, output)``, output the model's output on the batch (detached).

    Raises:
        TypeError / ValueError: a non-scalar log likelihood, a mismatched batch, a Linear layer called
            more than once or on inputs that are not ``(batch, features)``.

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
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
    layers = _linear_layers(model)
    missing = sorted(set(layers) ^ set(state.A))
    if missing:
        raise ValueError(f"the state's layers {sorted(state.A)} are not the model's Linear layers {sorted(layers)}")
    inputs = (input_fn or _default_input)(batch)
    output, captured = _forward_capture(state, model, inputs, layers)
    n = next(iter(captured.values()))[0].shape[0]
    _check_batch(batch, n, output)
    outs = [captured[name][1] for name in layers]
    with torch.enable_grad():
        loss = -scalar_value("outer_log_likelihood", outer_log_likelihood(output, batch),
                             " (sum the log likelihood over the batch)")
        if fisher_type == "empirical":
            grads = torch.autograd.grad(loss, outs, allow_unused=True)
            grads = [None if g is None else g.unsqueeze(0) for g in grads]   # (1, n, out)
        else:
            flat = output.reshape(n, -1)
            dz = flat.shape[1]
            (dloss,) = torch.autograd.grad(loss, output, create_graph=True)
            basis = torch.eye(dz, dtype=flat.dtype, device=flat.device).unsqueeze(1).expand(dz, n, dz)
            hess = None
            if dloss.requires_grad:   # else ℓ is linear in the output: H = 0
                (hess,) = torch.autograd.grad(dloss, output, basis.reshape(dz, *output.shape),
                                              is_grads_batched=True, retain_graph=True, allow_unused=True)
            hess = torch.zeros_like(basis) if hess is None else hess.reshape(dz, n, dz)
            hess = hess.permute(1, 2, 0)   # (n, dz, dz): H_n[i, c] = ∂² ℓ / ∂z_i ∂z_c
            values, vectors = torch.linalg.eigh(0.5 * (hess + hess.mT))
            root = vectors * values.clamp(min=0).sqrt().unsqueeze(-2)   # R_n R_nᵀ = H_n
            cotangent = root.permute(2, 0, 1).reshape(dz, *output.shape)   # column c of every R_n
            grads = torch.autograd.grad(output, outs, cotangent, is_grads_batched=True, allow_unused=True)
    m = torch.as_tensor(n, dtype=torch.int64)
    total = state.num_data + m
    new_A, new_G = {}, {}
    for (name, layer), grad in zip(layers.items(), grads):
        a = captured[name][0].detach().to(state.A[name].dtype)
        if layer.bias is not None:
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        sum_a = a.mT @ a
        if grad is None:   # the layer does not reach the output
            sum_g = torch.zeros_like(state.G[name])
        else:
            g = grad.detach().to(state.G[name].dtype).reshape(-1, grad.shape[-1])
            sum_g = g.mT @ g
        weight = 1.0 / total.to(sum_a.dtype)
        step_a, step_g = (sum_a - n * state.A[name]) * weight, (sum_g - n * state.G[name]) * weight
        if inplace:
            state.A[name].add_(step_a)
            state.G[name].add_(step_g)
        else:
            new_A[name], new_G[name] = state.A[name] + step_a, state.G[name] + step_g
    aux = output.detach()
    if inplace:
        state.num_data.add_(m)
        state.step.add_(1)
        return state, aux
    return state._replace(A=new_A, G=new_G, num_data=total, step=state.step + 1), aux
