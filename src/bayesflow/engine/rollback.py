"""Refused and failed steps leave the state as it was: the copies an in-place step restores, and the
record of a refusal.

An in-place step of a word that evaluates ∇ℓ after moving (BAOAB, OBABO) has written θ and m when
that evaluation fails (a non-finite value under ``on_nonfinite="reject"`` or ``"raise"``, or an
exception from the user's log posterior): the eager step takes copies first, into reused scratch
buffers, and writes them back (two copies per step, only for those words and only in place; a learned
mass's statistics, which take in θ before that evaluation, are copied too). A
compiled plan hands the gradient operator the state as it was instead (``bayesflow::gradient``'s
``before``), which inductor serves without copying: its plans write the state only after evaluating.
"""

from __future__ import annotations

import torch

from bayesflow.engine.context import Context
from bayesflow.engine.state import SDEState
from bayesflow.engine.validation import Rejected
from bayesflow.tree import tree_map

__all__ = ["guarded", "refused", "restore", "snapshot"]


def snapshot(ctx: Context, statistics: list | None = None) -> list:
    """Copies of every component of the step's state (reused buffers), to :func:`restore` on failure.

    ``statistics``: the preconditioner's state tensors, which a learned mass updates in place before
    the step evaluates ∇ℓ (copied too when there are any)."""
    saved = []
    parts = [(component, accumulator.leaves) for component, accumulator in ctx.z.items()]
    if statistics:
        parts.append(("preconditioner", statistics))
    for name, leaves in parts:
        copy = ctx.scratch(("rollback", name), leaves)
        torch._foreach_copy_(copy, leaves)
        saved.append((leaves, copy))
    return saved


def restore(saved: list | None) -> None:
    """Write the copies of :func:`snapshot` back into the state's tensors (nothing when None).

    A compiled plan's copies arrive while it runs (the gradient operator's stash); a plan interrupted
    before its evaluation has none to write back."""
    if saved:
        for leaves, copy in saved:
            if copy:
                torch._foreach_copy_(leaves, copy)


def refused(state: SDEState, inplace: bool) -> SDEState:
    """A step refused under ``on_nonfinite="reject"``: the state as it was, with the step (so that a retry
    draws new noise) and the count of refused steps moved on."""
    rejected = state.rejected if state.rejected is not None else torch.zeros_like(state.step)
    if inplace:
        state.step.add_(1)
        if state.rejected is not None:
            rejected.add_(1)
            return state
        return state._replace(rejected=rejected + 1)
    # a record of its own: an in-place step of the refused state must not write the state it was given
    fields = {name: tree_map(_copy, getattr(state, name))
              for name in ("params", "momenta", "xi", "log_posterior", "preconditioner", "gradient")}
    return state._replace(**fields, step=state.step + 1, rejected=rejected + 1)


def _copy(leaf):
    return leaf.clone() if isinstance(leaf, torch.Tensor) else leaf


def guarded(run, saved: list | None, state: SDEState, inplace: bool):
    """``(run(), None)``; or, when ``run`` raises :class:`~bayesflow.engine.validation.Rejected`,
    ``(None, refused state)``. Any failure first writes ``saved`` (:func:`snapshot`) back."""
    try:
        return run(), None
    except Rejected:
        restore(saved)
        return None, refused(state, inplace)
    except BaseException:
        restore(saved)
        raise
