"""The inputs of a traced step (:mod:`bayesflow.engine.compiled`): where each comes from at run time.

* the **gradient** inside a plan is the opaque operator ``bayesflow::gradient``, which calls the
  running step's gradient function (the top of :data:`ACTIVE`) with ordinary autograd;
* the **noise** of a step is recorded once (:class:`Recorder`: kind, buffer, leaf shapes) and drawn
  eagerly before each call; inside the trace :class:`Replay` hands out those buffers in order;
* a schedule's **step scale** is a tensor input (:class:`Given`);
* example copies keep their inputs' strides (:func:`copy_like`): compiled kernels index memory with
  the strides they were compiled for.

Example (a recorded draw, replayed from the same buffer):
    >>> import torch
    >>> from bayesflow.engine.noise import NoiseStream
    >>> from bayesflow.engine.plan_inputs import Recorder, Replay
    >>> stream = NoiseStream(torch.device("cpu"))
    >>> stream.begin(stream.initial_state(0), step=0)
    >>> recorder = Recorder(stream)
    >>> buffer, views = recorder.normal([torch.empty(2, 3)], "params")
    >>> [(kind, tuple(like[0].shape)) for kind, _, like in recorder.draws]
    [('normal', (2, 3))]
    >>> replayed, (view,) = Replay([buffer], None, None).normal([torch.empty(2, 3)], "params")
    >>> torch.equal(view, buffer.view(2, 3))
    True
"""

from __future__ import annotations

import torch

from bayesflow.engine.noise import views_of
from bayesflow.engine.system import _exclusive

__all__ = ["ACTIVE", "Given", "Recorder", "Replay", "active", "copy_like", "flat_shape", "given_gradient",
           "gradient_operator", "memory_layout", "zero_gradient"]

ACTIVE: list = []
"""The gradient functions (with their dispatch state) of the steps now running: a stack, steps may nest."""


@torch.library.custom_op("bayesflow::gradient", mutates_args=())
def gradient_operator(params: list[torch.Tensor], value_like: torch.Tensor,
                      before: list[torch.Tensor]) -> list[torch.Tensor]:
    """∇ℓ at ``params`` and ℓ (shaped like ``value_like``): the running step's gradient function.

    Opaque to the tracer and the compiler, so the user's log posterior runs with ordinary autograd.
    ``before``: copies of the in-place state taken before the step moved it (or none); as inputs of
    this operator they are complete when it runs, and it leaves them in the running step's stash,
    from which a failed evaluation restores the state (:mod:`bayesflow.engine.rollback`).
    """
    gradient_fn, include, exclude, stash = ACTIVE[-1]
    stash[:] = before
    # an operator's kernel runs below autograd; the user's log posterior runs with the dispatch state
    # of the step that called the plan (autograd included), captured when the step began
    with torch._C._ForceDispatchKeyGuard(include, exclude):
        grads, value, _ = gradient_fn(params)
    # an operator's outputs own their memory and are contiguous (its fake below): autograd may hand out
    # views of one buffer (the backward of a concatenation), broadcast views (the gradient of a sum) or a
    # strided leaf's layout; those are copied
    storages = {g.untyped_storage().data_ptr() for g in grads}
    if len(storages) != len(grads) or not _exclusive(grads) or any(
            g.dtype != p.dtype or g.shape != p.shape for g, p in zip(grads, params)):
        grads = [torch.empty_like(p, memory_format=torch.contiguous_format).copy_(g) for g, p in zip(grads, params)]
    return [*grads, value.detach().to(value_like.dtype).broadcast_to(value_like.shape).clone()]


@gradient_operator.register_fake
def _(params, value_like, before):
    # contiguous, as the real operator's outputs always are: the compiled kernels index them with these
    # strides (``empty_like`` would keep a transposed leaf's strides, which autograd's output may not have)
    return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params] + [
        torch.empty_like(value_like, memory_format=torch.contiguous_format)]


def active(gradient_fn, stash: list | None = None) -> tuple:
    """An :data:`ACTIVE` entry: the gradient function, the dispatch state it runs with, and the stash
    of the state's copies that the gradient operator fills (see :func:`gradient_operator`)."""
    return (gradient_fn, torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set(),
            [] if stash is None else stash)


def given_gradient(given, owned):
    def gradient_fn(leaves):
        return given[0], given[1], owned

    return gradient_fn


def zero_gradient(params):
    """The gradient function of tracing: the plan does not depend on gradient values."""
    return [torch.zeros_like(p) for p in params], torch.zeros(()), True


class Given:
    """A step scale whose value this step is a tensor (a schedule evaluated outside the plan)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __call__(self, step):
        return self.value


class Recorder:
    """Noise that records each draw (kind, key, leaf shapes) while drawing it from the real stream."""

    def __init__(self, noise):
        self.noise, self.draws, self.chains = noise, [], noise.chains

    def normal(self, like, key):
        return self._draw("normal", like, key)

    def uniform(self, like, key):
        return self._draw("uniform", like, key)

    def _draw(self, kind, like, key):
        # zero-memory stand-ins with the leaves' shape, dtype and device (what a draw reads of them)
        stand_ins = [torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape) for t in like]
        self.draws.append((kind, ("compiled", len(self.draws)), stand_ins))
        return getattr(self.noise, kind)(like, key)


class Replay:
    """Noise inside a traced step: the buffers drawn before it, in the recorded order."""

    def __init__(self, inputs, views: list | None, chains):
        self.inputs, self.views, self.chains, self.draw = list(inputs), views, chains, 0

    def normal(self, like, key):
        if self.views is None:  # flat buffers only: views made in the graph
            buffer = self.inputs[self.draw]
            self.draw += 1
            return buffer, views_of(buffer, like, self.chains)
        count = self.views[self.draw]
        self.draw += 1
        buffer, *views = self.inputs[:1 + count]
        del self.inputs[:1 + count]
        return buffer, views

    uniform = normal


def memory_layout(tensor: torch.Tensor) -> tuple:
    """What a compiled kernel assumes of an input, and so part of a plan's key: shape, strides, dtype."""
    return tensor.shape, tensor.stride(), tensor.dtype


def copy_like(tensor: torch.Tensor) -> torch.Tensor:
    """A copy with the same strides (``clone`` makes a view with gaps contiguous; the compiled kernels
    index memory with the strides of the examples they were compiled for)."""
    if 0 in tensor.stride() and tensor.numel() > 1:  # a broadcast view (a sum's gradient) is never written
        return tensor
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device).copy_(tensor)


def flat_shape(like, chains):
    if chains is None:
        return (sum(t.numel() for t in like),)
    return (chains, sum(t[0].numel() for t in like))
