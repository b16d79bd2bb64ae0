r"""What diagonal and dense variational inference share: the reparameterisation noise, ∇ log p at
the drawn parameters, the optimizer step and the argument checks.

Both families minimise the negative evidence lower bound of a Gaussian :math:`q_\phi` against the
tempered posterior :math:`p_T(θ) \propto \exp(\log p(θ)/T)`,

.. math::
    \mathrm{NELBO}(\phi) = \mathbb E_{q_\phi}\big[-\log p(θ) + T \log q_\phi(θ)\big]
    = T\,\mathrm{KL}(q_\phi \,\|\, p_T) + \text{const},

estimated with S reparameterised draws :math:`θ_s = μ + A ε_s`, :math:`ε_s \sim N(0, I)` (A = diag σ
or the Cholesky factor L). The noise of step t is a function of the state's key and t alone
(:mod:`bayesflow.engine.noise`): a state determines its future, and a copy or a checkpoint of a
state continues on the same numbers.

Example:
    >>> import torch
    >>> from bayesflow.vi.nelbo import noise_generator, standard_normal
    >>> key, step = torch.tensor(7), torch.tensor(3)
    >>> flat, (a, b) = standard_normal([torch.zeros(2), torch.zeros(2, 3)], (), noise_generator(key, step, "cpu"))
    >>> a.shape, b.shape, torch.equal(flat, standard_normal([torch.zeros(8)], (), noise_generator(key, step, "cpu"))[0])
    (torch.Size([2]), torch.Size([2, 3]), True)
"""

from __future__ import annotations

import math
import threading
from numbers import Real
from typing import Any

import torch

from bayesflow.engine.gradients import autograd_gradient, unpack, vmapped_gradient
from bayesflow.engine.noise import STEP, NoiseStream, derive, fill_normal
from bayesflow.engine.validation import SMALL_CHECK_NUMEL, check_finite
from bayesflow.tree import flatten, tree_leaves, tree_map, unflatten

# the helpers of diag.py and dense.py; these four are documented for reuse
__all__ = ["check_draws", "check_temperature", "nelbo_value", "noise_generator", "standard_normal"]

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def check_temperature(temperature: Any):
    """``temperature`` as a float ≥ 0, or the schedule (a callable of the step) itself.

    Example:
        >>> from bayesflow.vi.nelbo import check_temperature
        >>> check_temperature(1), check_temperature(lambda step: 1.0 / (1 + step)) is not None
        (1.0, True)
    """
    if callable(temperature) and not isinstance(temperature, torch.Tensor):
        return temperature
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1 and temperature.is_floating_point():
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not math.isfinite(temperature) or (
            temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 or a schedule (a callable of the step), "
                         f"got {temperature!r}")
    return float(temperature)


def current_temperature(temperature, step: torch.Tensor) -> float:
    """The temperature of the step: the number, or the schedule evaluated at ``step`` (the state's
    step tensor, as posteriors passes it; it lives on the CPU, so reading it costs no device sync)."""
    if not callable(temperature):
        return temperature
    value = temperature(step)
    try:
        return check_temperature(value)
    except ValueError:
        raise ValueError(f"the temperature schedule returned {value!r} at step {int(step)}; "
                         "expected a finite number >= 0") from None


def check_n_samples(n_samples: Any) -> int:
    """``n_samples`` as a positive int (the number of Monte-Carlo draws per step)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    return n_samples


def check_stl(stl: Any) -> bool:
    """``stl`` as a bool (sticking-the-landing gradient on or off)."""
    if not isinstance(stl, (bool, int)) or stl not in (0, 1):
        raise TypeError(f"stl must be a bool, got {stl!r}")
    return bool(stl)


def check_optimizer(optimizer: Any) -> Any:
    """``optimizer`` if it is a torchopt-style gradient transformation (``init`` and ``update``)."""
    if isinstance(optimizer, type) or not (callable(getattr(optimizer, "init", None))
                                           and callable(getattr(optimizer, "update", None))):
        raise TypeError("optimizer must be a torchopt-style GradientTransformation with init(params) and "
                        "update(updates, state, params=..., inplace=...), such as torchopt.adam(lr=1e-2) "
                        f"(lower case) or bayesflow.optim.adam.transformation(lr=1e-2); got {optimizer!r}")
    return optimizer


def initial_key(seed) -> torch.Tensor:
    """The noise key of a state (an int64 CPU scalar) from ``seed``: an int, a ``torch.Generator`` (the
    seed is drawn from it) or None (drawn from torch's global generator)."""
    return NoiseStream(torch.device("cpu")).initial_state(seed)


def noise_generator(rng: torch.Tensor, step: torch.Tensor, device) -> torch.Generator:
    """A generator on ``device`` seeded for draw ``(key, step)`` (:func:`bayesflow.engine.noise.derive`).

    Example:
        >>> import torch
        >>> from bayesflow.vi.nelbo import noise_generator
        >>> a = torch.randn(3, generator=noise_generator(torch.tensor(1), torch.tensor(0), "cpu"))
        >>> torch.equal(a, torch.randn(3, generator=noise_generator(torch.tensor(1), torch.tensor(0), "cpu")))
        True
    """
    if not isinstance(rng, torch.Tensor) or rng.ndim != 0 or rng.dtype != torch.int64:
        raise ValueError(f"a VI state carries one noise key, an int64 scalar tensor (state.rng); got {rng!r:.80}. "
                         "A stack of states must be indexed (state[k]) before it is updated")
    device = torch.device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(derive(int(rng), int(step), STEP, full=device.type != "cpu"))
    return generator


_workspace = threading.local()


def _scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable noise buffer: a fresh buffer of a large model costs more in page faults
    than drawing into it (≈ 0.6 ms for 670 000 floats, an eighth of the draw)."""
    buffer = getattr(_workspace, "noise", None)
    if buffer is None or buffer.numel() != numel or buffer.dtype != dtype or buffer.device != device:
        buffer = _workspace.noise = torch.empty(numel, dtype=dtype, device=device)
    return buffer


def standard_normal(like: list, sample_shape: tuple, generator: torch.Generator | None, reuse: bool = False
                    ) -> tuple[torch.Tensor, list]:
    """Standard normals for every leaf of ``like``, shaped ``sample_shape + leaf.shape``.

    One flat buffer is drawn (leaf-major: all draws of the first leaf, then the second...) and the
    returned views share its memory. A leaf of another dtype or device than the first gets a copy.
    ``generator`` None draws from torch's global generator. ``reuse``: draw into this thread's
    scratch buffer, overwritten by the next draw (for noise that does not outlive an update).

    Example:
        >>> import torch
        >>> from bayesflow.vi.nelbo import standard_normal
        >>> flat, (w, b) = standard_normal([torch.zeros(2, 3), torch.zeros(())], (4,), torch.Generator().manual_seed(0))
        >>> flat.shape, w.shape, b.shape, torch.equal(w.reshape(-1), flat[:24])
        (torch.Size([28]), torch.Size([4, 2, 3]), torch.Size([4]), True)
    """
    first = like[0]
    count = math.prod(sample_shape)
    sizes = [count * leaf.numel() for leaf in like]
    flat = (_scratch(sum(sizes), first.dtype, first.device) if reuse
            else torch.empty(sum(sizes), dtype=first.dtype, device=first.device))
    fill_normal(flat, generator)   # torch.randn's numbers, drawn cache-sized chunks at a time
    views = [part.view((*sample_shape, *leaf.shape)) for part, leaf in zip(flat.split(sizes), like)]
    views = [view if leaf.dtype == first.dtype and leaf.device == first.device
             else view.to(dtype=leaf.dtype, device=leaf.device) for view, leaf in zip(views, like)]
    return flat, views


def _detached(aux):
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)


def log_posterior_and_gradient(log_posterior, spec, leaves: list, batch, n_samples: int
                               ) -> tuple[list, torch.Tensor, Any]:
    r""":math:`\nabla_θ \log p(θ)` (a list of new tensors the caller owns), :math:`\log p(θ)` and aux at
    the leaves given: one ordinary autograd backward (:func:`~bayesflow.engine.gradients.autograd_gradient`)
    for one draw; for S > 1 draws (leaves with a leading dimension S) the log posterior is vmapped and
    differentiated with one backward through the summed values
    (:func:`~bayesflow.engine.gradients.vmapped_gradient`). Raises the engine's clear errors for a value
    that is not a scalar or does not depend on the params."""
    aux_box = [None]
    if n_samples == 1:
        grads, value, _ = autograd_gradient(log_posterior, spec, batch, None, aux_box)(leaves)
        return _writable(grads), value, _detached(aux_box[0])
    grads, value, _ = vmapped_gradient(log_posterior, spec, batch, n_samples, aux_box)(leaves)
    return _writable(grads), value, aux_box[0]


def check_draws(value: torch.Tensor, grads: list, spec, step: torch.Tensor) -> None:
    """A FloatingPointError naming the step and the first non-finite quantity unless the log posterior's
    value(s) and gradients at the draws are finite (one host read), before the state is written.

    NaN or ±inf there would reach μ and σ through the optimizer and every later step: the engine's
    finiteness test (:func:`~bayesflow.engine.validation.check_finite`), as an SDE preset's ``update``.

    Example:
        >>> import torch
        >>> from bayesflow.tree import flatten
        >>> from bayesflow.vi.nelbo import check_draws
        >>> check_draws(torch.tensor(-1.0), [torch.ones(2)], flatten(torch.zeros(2))[1], torch.tensor(0))
        >>> check_draws(torch.tensor(float("nan")), [torch.ones(2)], flatten(torch.zeros(2))[1], torch.tensor(3))
        Traceback (most recent call last):
            ...
        FloatingPointError: the log posterior's value is nan at step 3: the value is not finite (at the draws ...)
    """
    small = sum(g.numel() for g in grads) <= SMALL_CHECK_NUMEL
    problem = check_finite(value, grads, spec, int(step), small)
    if problem is not None:
        raise FloatingPointError(f"{problem} (at the draws θ = μ + Aε, A = diag σ or L)")


def _writable(grads: list) -> list:
    """The gradients, each safe to write in place: autograd may hand back a broadcast view (the gradient
    of ``p.sum()`` is the seed expanded) or one tensor for two inputs (``(p + q).sum()``); those are copied."""
    seen = set()
    out = []
    for g in grads:
        if not g.is_contiguous() or g.data_ptr() in seen:
            g = g.clone(memory_format=torch.contiguous_format)
        seen.add(g.data_ptr())
        out.append(g)
    return out


def value_and_aux(log_posterior, theta, batch, n_samples: int) -> tuple[torch.Tensor, Any]:
    """``log_posterior(theta, batch)`` checked (a scalar value and an aux); for S > 1 draws (leaves with
    a leading dimension S) mapped with ``torch.func.vmap``: S values, and the aux of every draw (an aux
    without tensors, such as None, is returned once)."""
    if n_samples == 1:
        return unpack(log_posterior(theta, batch), None, differentiable=False)
    held = []

    def single(p):
        value, aux = unpack(log_posterior(p, batch), None, differentiable=False)
        if not any(isinstance(t, torch.Tensor) for t in tree_leaves(aux)):
            held.append(aux)
            return value
        return value, aux

    out = torch.func.vmap(single)(theta)
    return (out, held[0]) if held else out


def nelbo_value(log_p: torch.Tensor, temperature: float, log_det: torch.Tensor, flat_eps: torch.Tensor,
                n_samples: int) -> torch.Tensor:
    r"""The NELBO estimate :math:`-\overline{\log p(θ_s)} + T\,\overline{\log q(θ_s)}` from the draws' noise.

    Along the draws θ_s = μ + Aε_s, :math:`\log q(θ_s) = -\log|\det A| - \tfrac12|ε_s|^2 - \tfrac d2\log 2π`
    (A = diag σ or L): no density needs evaluating. ``log_det`` = log|det A|, ``flat_eps`` all the draws'
    noise, ``log_p`` the S values (or the one value).

    Example:
        >>> import math, torch
        >>> from bayesflow.vi.nelbo import nelbo_value
        >>> value = nelbo_value(torch.tensor(-1.0), 1.0, torch.tensor(0.0), torch.zeros(3), 1)
        >>> torch.isclose(value, torch.tensor(1.0 - 1.5 * math.log(2 * math.pi)))   # -log p + log q at ε = 0
        tensor(True)
    """
    d = flat_eps.numel() // n_samples
    if n_samples > 1:
        log_p = log_p.mean()
    value = torch.add(log_det, torch.dot(flat_eps, flat_eps), alpha=0.5 / n_samples)  # -log q - d/2 log 2π
    return torch.add(log_p, value, alpha=temperature).add_(temperature * d * HALF_LOG_2PI).neg_()


def optimizer_step(optimizer, grads: list, opt_state, variational: list, inplace: bool):
    """Apply ``optimizer`` to the NELBO gradients of the variational parameters.

    ``grads`` and ``variational`` are lists of trees (``[params, log_sd_diag]`` or ``[params,
    L_factor]``, the structure ``optimizer.init`` was called on). The increments are added with one
    ``torch._foreach_add`` (torchopt is not needed). ``inplace``: the variational tensors and the
    optimizer state's tensors are written in place (an optimizer that returns new state tensors has
    them copied into the old ones), and ``variational`` itself is returned; an optimizer with
    ``writes_params`` (bayesflow.optim's) then writes the new values itself (``update(...,
    write_params=True)``), with no increments made.
    """
    if inplace and getattr(optimizer, "writes_params", False):
        # an optimizer that advances the tensors itself (bayesflow.optim's): no increments to make and add
        _, new_opt_state = optimizer.update(grads, opt_state, params=variational, inplace=True, write_params=True)
        return variational, _keep_in_place(opt_state, new_opt_state)
    updates, new_opt_state = optimizer.update(grads, opt_state, params=variational, inplace=inplace)
    leaves, spec = flatten(variational)
    increments, increments_spec = flatten(updates)
    if increments_spec != spec:
        raise ValueError(f"the optimizer returned updates with the structure {increments_spec}, expected {spec}")
    if not inplace:
        return unflatten(spec, torch._foreach_add(leaves, increments)), new_opt_state
    torch._foreach_add_(leaves, increments)
    return variational, _keep_in_place(opt_state, new_opt_state)


def _keep_in_place(opt_state, new_opt_state):
    """The old optimizer state with the new one's values (an in-place update keeps the state's tensors):
    tensors the optimizer replaced are copied into the old ones."""
    if new_opt_state is not opt_state:
        old, old_spec = flatten(opt_state)
        new, new_spec = flatten(new_opt_state)
        if new_spec != old_spec:
            raise ValueError("inplace=True needs an optimizer whose state keeps its structure; "
                             f"got {new_spec} after {old_spec}")
        changed = [(a, b) for a, b in zip(old, new) if a is not b]
        if any(not isinstance(a, torch.Tensor) for a, _ in changed):
            raise ValueError("inplace=True needs an optimizer whose state holds tensors only (they are updated "
                             "in place); use inplace=False")
        if changed:
            torch._foreach_copy_(*map(list, zip(*changed)))
    return opt_state


def optimizer_init(optimizer, variational: list):
    """``optimizer.init(variational)``; an optimizer with ``writes_params`` keeps the variational tensors
    as its own parameters (``share=True``) so that in-place steps write them directly."""
    if getattr(optimizer, "writes_params", False):
        return optimizer.init(variational, share=True)
    return optimizer.init(variational)


def finish(state, inplace: bool, value: torch.Tensor, **fields):
    """The state after a step: ``fields`` replaced, ``nelbo`` set, ``step`` + 1 (in place: written into
    the state's own tensors, the other fields having been updated in place already)."""
    if inplace:
        state.nelbo.copy_(value)
        state.step.add_(1)
        return state
    return state._replace(nelbo=value.to(state.nelbo.dtype), step=state.step + 1, **fields)
