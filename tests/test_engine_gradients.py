"""Where the engine's gradient comes from: the direct autograd-engine call and the kept aliases."""

from __future__ import annotations

import pytest
import torch

from bayesflow.engine import SDEConfig, build
from bayesflow.engine.gradients import gradient

DTYPE = torch.float64


def _leaves(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=g, dtype=DTYPE).requires_grad_(True),
            torch.randn(5, generator=g, dtype=DTYPE).requires_grad_(True),
            torch.randn((), generator=g, dtype=DTYPE).requires_grad_(True)]


def _objective(leaves):
    a, b, c = leaves
    return (a.tanh() ** 2).sum() * c + (b * b.sin()).sum() - c.exp()


def test_gradient_equals_torch_autograd_grad_bitwise():
    """The direct engine call is autograd.grad without its argument handling: identical results,
    ``None`` for unused inputs (allow_unused), and the same seed semantics."""
    leaves = _leaves()
    unused = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    ours = gradient(_objective(leaves), [*leaves, unused])
    theirs = torch.autograd.grad(_objective(leaves), [*leaves, unused], allow_unused=True)
    assert ours[-1] is None and theirs[-1] is None
    for a, b in zip(ours[:-1], theirs[:-1]):
        assert torch.equal(a, b)


def test_gradient_of_an_identity_is_a_fresh_seed_each_call():
    """For ℓ = θ the gradient is the seed itself; the engine may scale its own gradient in place,
    so every call must get a fresh seed (a shared one would be corrupted for later calls)."""
    x = torch.tensor(2.0, dtype=DTYPE, requires_grad=True)
    first = gradient(x * 1, [x])[0]
    first.mul_(7.0)
    assert gradient(x * 1, [x])[0].item() == 1.0


@pytest.mark.parametrize("case", ["vector value", "complex value", "no graph"])
def test_gradient_falls_back_to_autograd_grad_and_its_errors(case):
    x = torch.ones(3, dtype=DTYPE, requires_grad=True)
    if case == "vector value":
        value, message = x * 2, "scalar outputs"
    elif case == "complex value":
        value, message = (x * 1j).sum(), "real scalar outputs"
    else:
        value, message = torch.tensor(1.0, dtype=DTYPE), "does not require grad"
    with pytest.raises(RuntimeError, match=message):
        gradient(value, [x])


def _quadratic(params, batch):
    return -0.5 * sum((v * v).sum() for v in params.values()), None


def _run(transform, params, steps, inplace):
    state = transform.init(params, seed=3)
    for _ in range(steps):
        state, _ = transform.update(state, None, inplace=inplace)
    return state


def test_in_place_steps_equal_functional_steps_with_kept_aliases():
    """In-place steps of a small model reuse their requires-grad aliases; the trajectory is the
    functional one (fresh aliases every step), bit for bit."""
    transform = build(_quadratic, SDEConfig(step_size=0.05, temperature=0.3))
    params = {"a": torch.randn(4, 3, dtype=DTYPE), "b": torch.randn(7, dtype=DTYPE)}
    functional = _run(transform, {k: v.clone() for k, v in params.items()}, 6, inplace=False)
    in_place = _run(transform, {k: v.clone() for k, v in params.items()}, 6, inplace=True)
    for key in params:
        assert torch.equal(functional.params[key], in_place.params[key])


def test_a_swapped_data_tensor_is_seen_by_the_next_step():
    """``param.data = other`` keeps the tensor object but moves its memory: a kept alias of the old
    memory would evaluate the gradient at stale values (silently wrong), so the aliases are remade."""
    transform = build(_quadratic, SDEConfig(step_size=0.1, temperature=0.0))
    w = torch.ones(5, dtype=DTYPE)
    state = transform.init({"w": w})
    state, _ = transform.update(state, None, inplace=True)  # w = 0.9 (gradient -w)
    w.data = torch.full((5,), 10.0, dtype=DTYPE)
    state, _ = transform.update(state, None, inplace=True)
    assert torch.allclose(state.params["w"], torch.full((5,), 9.0, dtype=DTYPE))


def test_hooks_a_log_posterior_registers_do_not_pile_up_across_steps():
    """A log posterior that registers a gradient hook each call gets it once per step, as with fresh
    aliases: kept aliases that carry a hook are dropped, not reused with the hook still on them."""
    def hooked(params, batch):
        params["w"].register_hook(lambda g: 2.0 * g)
        return -0.5 * (params["w"] ** 2).sum(), None

    transform = build(hooked, SDEConfig(step_size=0.1, temperature=0.0))
    state = transform.init({"w": torch.ones(3, dtype=DTYPE)})
    for _ in range(3):
        state, _ = transform.update(state, None, inplace=True)
    # each step: w ← w + 0.1 · 2 · (−w) = 0.8 w
    assert torch.allclose(state.params["w"], torch.full((3,), 0.8**3, dtype=DTYPE))


def test_the_private_autograd_entry_is_checked_once_and_a_changed_one_is_not_used():
    from bayesflow.engine import gradients

    # on the torch this project runs on the direct call is in use (the speed the README reports)
    assert gradients._run_backward is not None and gradients._works(gradients._run_backward)

    def changed_signature(tensors, grad_tensors):
        raise TypeError("takes 2 positional arguments")

    assert not gradients._works(changed_signature)
