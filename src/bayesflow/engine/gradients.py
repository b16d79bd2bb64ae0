"""Where a step's gradient ∇ℓ comes from: autograd on a batch, vmap over chains, or the caller.

Each builder returns ``gradient_fn(leaves) -> (grads, value, owned)`` for one step: the ascent
gradient of the per-datum log posterior at the parameter leaves given, its value, and whether the
engine owns the gradient tensors (its own autograd output may be scaled or reused in place; a
caller's never is). ``aux_box[0]`` receives the log posterior's ``aux``.
"""

from __future__ import annotations

import operator

import torch

from bayesflow.engine.system import GradientNotAvailable
from bayesflow.engine.validation import mismatched_leaves
from bayesflow.tree import tree_leaves, tree_map, unflatten

_run_backward = getattr(getattr(torch.autograd, "graph", None), "_engine_run_backward", None)


def _works(run_backward) -> bool:
    """Whether a private autograd entry still has the signature used here (checked once, at import:
    a torch that changed it falls back to ``torch.autograd.grad`` instead of failing every step)."""
    try:
        with torch.enable_grad():
            x = torch.ones((), requires_grad=True)
            (g,) = run_backward((x * 2.0,), (torch.ones(()),), False, False, (x,), True, accumulate_grad=False)
        return g is not None and float(g) == 2.0
    except Exception:
        return False


if _run_backward is not None and not _works(_run_backward):
    _run_backward = None


def gradient(value: torch.Tensor, inputs: list) -> tuple:
    """``torch.autograd.grad(value, inputs, allow_unused=True)`` for a real scalar ``value``.

    The same C++ autograd engine call, without ``torch.autograd.grad``'s Python argument handling
    (a type test and tuple per input, the seed gradient via ``_make_grads``): ~30 µs per call at
    10 leaves measured alone, ≈ 3–4 % of a small model's whole update. Anything that needs it — a
    non-scalar, complex or grad-less value, tensor subclasses with ``__torch_function__`` — goes
    through ``torch.autograd.grad`` itself, which also raises its usual errors.
    """
    if (_run_backward is None or value.ndim != 0 or not value.requires_grad or not value.is_floating_point()
            or torch._C._has_torch_function((value, *inputs))):
        return torch.autograd.grad(value, inputs, allow_unused=True)
    # a fresh seed (as autograd.grad makes): the gradient of an identity may be the seed itself,
    # which the engine may then scale in place
    return _run_backward((value,), (torch.ones_like(value),), False, False, tuple(inputs), True,
                         accumulate_grad=False)


class Aliases:
    """Requires-grad aliases of parameter leaves (``detach().requires_grad_()``: same memory), kept
    while a chain is stepped in place on the same tensors.

    Making and freeing ten aliases (and their autograd accumulators) costs ~4 % of a small model's
    step. A kept set is used only while every leaf is the same tensor with the same memory (a swapped
    ``.data`` makes new aliases) and is dropped when the log posterior registered hooks on it (a
    fresh alias would not carry them into the next step). Only small models use it (see
    :class:`~bayesflow.engine.layout.Layout`), so what it keeps alive is at most 2^17 entries.
    """

    __slots__ = ("aliases", "pointers", "sources")

    def __init__(self):
        self.aliases = self.pointers = self.sources = None

    def of(self, leaves: list) -> list:
        aliases = self.aliases
        if (aliases is not None and all(map(operator.is_, leaves, self.sources))
                and list(map(_DATA_PTR, leaves)) == self.pointers):
            return aliases
        aliases = self.aliases = [leaf.detach().requires_grad_(True) for leaf in leaves]
        self.sources, self.pointers = list(leaves), list(map(_DATA_PTR, leaves))
        return aliases

    def check_hooks(self) -> None:
        if self.aliases is not None and any(alias._backward_hooks is not None for alias in self.aliases):
            self.aliases = self.pointers = self.sources = None


_DATA_PTR = torch.Tensor.data_ptr
_SHAPE_DTYPE = operator.attrgetter("shape", "dtype")
_is_batched_tensor = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
_is_batched = None if _is_batched_tensor is None else (
    lambda leaf: isinstance(leaf, torch.Tensor) and _is_batched_tensor(leaf))


def unpack(out, chains: int | None, differentiable: bool = True) -> tuple:
    """``(value, aux)`` from what a log posterior returned, with a clear error for anything else:
    a bare value, a non-tensor value, a value of the wrong shape, or one that autograd cannot
    differentiate (it does not depend on the params passed in)."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"log_posterior must return (value, aux): the per-datum log posterior and an auxiliary "
                        f"output (None if there is none); got {type(out).__name__}")
    value, aux = out
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"log_posterior's value must be a floating-point tensor, got {value!r:.80}")
    expected = () if chains is None else (chains,)
    if value.shape != expected:
        where = "one value per chain (vectorize='batched')" if chains is not None else "a scalar"
        raise ValueError(f"log_posterior's value must be {where}: shape {expected}, got {tuple(value.shape)}")
    if differentiable:
        require_graph(value)
    return value, aux


_FUNCTIONAL_CALL_HINT = (
    "A log posterior must compute its value from the params it is given: for an nn.Module write "
    "`logits = torch.func.functional_call(model, params, (x,))`, not `model(x)` (which reads the module's own "
    "parameters, so the gradient with respect to params is zero and nothing moves)")


def require_graph(value: torch.Tensor, name: str = "log_posterior's value") -> None:
    """A ValueError unless ``value`` depends on the params being differentiated.

    Inside a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``) ``requires_grad`` says exactly that:
    a value computed from other tensors (a module's own parameters, detached copies) does not require grad
    at the transform's level, whose gradient would silently be zero.
    """
    if not value.requires_grad:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("update evaluates the log posterior's gradient, which torch.inference_mode() "
                               "switches off: call update outside inference mode (sampling and predictions "
                               "may use it)")
        raise ValueError(f"{name} does not depend on the params it was given (no autograd graph "
                         "to differentiate): was it computed under torch.no_grad(), from .detach()/.item() "
                         f"values, or from tensors other than the params passed in? {_FUNCTIONAL_CALL_HINT}")


def _materialized(grads, leaves: list) -> list:
    """Zeros for the leaves the log posterior does not use (autograd returns None for them).

    Some unused leaves are allowed (a frozen embedding, a head not used by this batch); when *no*
    leaf reaches the value, the log posterior ignores its params altogether — the classic
    ``model(x)`` in place of ``functional_call`` — and the step would silently do nothing.
    """
    if all(g is None for g in grads):
        raise ValueError("log_posterior's value does not depend on any of the params it was given (their "
                         f"gradients are all missing). {_FUNCTIONAL_CALL_HINT}")
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]


def _requiring_grad(leaves: list, aliases: Aliases | None) -> list:
    """Leaves autograd differentiates with respect to: the kept aliases, or fresh ones."""
    return [leaf.detach().requires_grad_(True) for leaf in leaves] if aliases is None else aliases.of(leaves)


def autograd_gradient(log_posterior, spec, batch, chains: int | None, aux_box: list, aliases: Aliases | None = None):
    """Plain autograd on fresh leaves sharing the parameters' memory (no ``torch.func`` per-call cost).

    With ``chains`` (``vectorize="batched"``) the log posterior takes all chains at once and returns
    one value per chain; the chains are independent, so the gradient of the sum is each chain's own.
    ``aliases``: reuse the requires-grad leaves of the previous step when the parameters are the
    same tensors (in-place steps of a small model, where making them is a visible cost).
    """
    def gradient_fn(leaves):
        detached = _requiring_grad(leaves, aliases)
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(True)  # the engine steps under no_grad; torch.enable_grad() costs µs
        try:
            value, aux = unpack(log_posterior(unflatten(spec, detached), batch), chains)
            total = value.sum() if chains is not None else value
            grads = gradient(total, detached)
        finally:
            torch._C._set_grad_enabled(enabled)
            if aliases is not None:
                aliases.check_hooks()
        grads = _materialized(grads, leaves)
        aux_box[0] = aux
        return grads, value.detach(), True

    return gradient_fn


def vmapped_gradient(log_posterior, spec, batch, chains: int, aux_box: list, aliases: Aliases | None = None):
    """A single-chain log posterior mapped over the chain dimension with ``torch.func.vmap``.

    Only the forward pass is vmapped; one ordinary autograd backward runs through it: the chains are
    independent, so the gradient of the summed values is every chain's own gradient, and this avoids
    the per-call cost of functorch's grad transform (vmap of grad_and_value). The leaves are mapped
    as flat positional arguments and the batch is captured, not passed: vmap then has no pytree to
    walk (its Python pytree handling cost ~4 % of a small model's step). ``aliases``: as in
    :func:`autograd_gradient`.
    """
    held = []

    def single(*leaves):
        # (inside vmap a value's requires_grad is not its graph's: checked on the mapped output)
        value, aux = unpack(log_posterior(unflatten(spec, list(leaves)), batch), None, differentiable=False)
        if _is_batched is not None and not any(map(_is_batched, tree_leaves(aux))):
            # aux that does not depend on the chain (None, constants, Python values) leaves vmap
            # directly: vmap would only broadcast it, through its Python pytree code (~4 % of a
            # small model's step); it is broadcast below as vmap would
            held.append(aux)
            return value
        return value, aux

    batched = torch.func.vmap(single)

    def gradient_fn(leaves):
        detached = _requiring_grad(leaves, aliases)
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(True)
        try:
            held.clear()
            out = batched(*detached)
            if held:
                value, aux = out, tree_map(lambda t: t.expand(chains, *t.shape) if isinstance(t, torch.Tensor) else t,
                                           held[0])
            else:
                value, aux = out
            require_graph(value)  # (its shape, one value per chain, was checked inside the map)
            grads = gradient(value.sum(), detached)
        finally:
            torch._C._set_grad_enabled(enabled)
            if aliases is not None:
                aliases.check_hooks()
        grads = _materialized(grads, leaves)
        aux_box[0] = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)
        return grads, value.detach(), True

    return gradient_fn


def caller_gradient(grad_leaves: list, log_posterior, signature: list, spec, integrator):
    """The gradient a caller computed (DDP, Lightning, custom autograd), usable once per step."""
    given = [grad_leaves]

    def gradient_fn(leaves):
        if not given:
            raise GradientNotAvailable(f"{integrator!r} needs a gradient at a second point in the step; "
                                       "use update(state, batch) instead of step(state, grads)")
        if list(map(_SHAPE_DTYPE, given[0])) != signature:
            raise ValueError(mismatched_leaves(given[0], leaves, spec))
        value = None if log_posterior is None else torch.as_tensor(log_posterior).detach()
        return given.pop(), value, False

    return gradient_fn
