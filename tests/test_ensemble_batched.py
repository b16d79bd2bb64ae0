"""batched_forward: K copies of an nn.Sequential in one baddbmm forward equal vmap of functional_call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bayesflow.ensemble import batched_forward, deep_ensemble, replicate
from bayesflow.optim import sgd

K = 4


def stacked(model, seed=0):
    return {k: v.detach() for k, v in replicate(dict(model.named_parameters()), K, perturbation=0.1,
                                                  seed=seed).items()}


def vmapped(model, params, x, per_chain=False):
    def one(p, inputs):
        return torch.func.functional_call(model, p, (inputs,))
    return torch.func.vmap(one, in_dims=(0, 0 if per_chain else None))(params, x)


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), (5, 8)),
    "nested, no bias": (lambda: nn.Sequential(nn.Linear(8, 6), nn.Sequential(nn.Tanh(), nn.Linear(6, 6, bias=False)),
                                              nn.GELU(), nn.Identity(), nn.Linear(6, 2)), (5, 8)),
    "flatten images": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.SiLU(), nn.Linear(4, 3)), (5, 3, 2, 2)),
    "sequence": (lambda: nn.Sequential(nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 2)), (5, 7, 8)),
    "single linear": (lambda: nn.Linear(8, 3), (5, 8)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(6, 3)), (5, 3, 12, 12)),
    "conv1d, same padding, layer norm": (lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3, padding="same", dilation=2, bias=False), nn.GELU(), nn.AvgPool1d(2), nn.Flatten(),
        nn.Linear(20, 8), nn.LayerNorm(8), nn.Linear(8, 2)), (5, 2, 10)),
    "sequence, layer norm without bias": (lambda: nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6, bias=False),
                                                                nn.Tanh(), nn.LayerNorm(6, elementwise_affine=False),
                                                                nn.Linear(6, 2)), (5, 7, 8)),
    "single convolution": (lambda: nn.Conv3d(2, 3, 2), (5, 2, 3, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("per_chain", [False, True])
def test_batched_forward_equals_vmap_of_functional_call(name, per_chain):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make()
    params = stacked(model)
    x = torch.randn(K, *shape) if per_chain else torch.randn(*shape)
    ours = batched_forward(model)(params, x, per_chain=per_chain)
    torch.testing.assert_close(ours, vmapped(model, params, x, per_chain), rtol=1e-6, atol=1e-6)


def test_layers_without_a_batched_form_are_named_at_construction():
    with pytest.raises(TypeError, match=r"1 \(BatchNorm1d\).*vmap"):
        batched_forward(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))
    with pytest.raises(TypeError, match="Flatten"):
        batched_forward(nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(3, 3)))
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        batched_forward(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match=r"0: only zero-padded.*'reflect'"):
        batched_forward(nn.Sequential(nn.Conv2d(3, 3, 3, padding_mode="reflect")))
    with pytest.raises(TypeError, match="1: pooling that returns indices"):
        batched_forward(nn.Sequential(nn.Conv2d(3, 3, 3), nn.MaxPool2d(2, return_indices=True)))
    forward = batched_forward(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="per_chain"):
        forward(stacked(nn.Linear(3, 2)), torch.zeros(K + 1, 5, 3), per_chain=True)


def test_dropout_follows_the_modules_mode():
    model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5), nn.Linear(64, 2))
    params, x = stacked(model), torch.randn(5, 8)
    forward = batched_forward(model)
    model.eval()
    torch.testing.assert_close(forward(params, x), vmapped(model, params, x), rtol=1e-6, atol=1e-6)
    model.train()
    torch.manual_seed(1)
    first = forward(params, x)
    assert not torch.allclose(first, forward(params, x))  # fresh masks each call


def test_deep_ensemble_with_batched_forward_equals_the_vmap_route():
    """The fast route is the same ensemble: 20 SGD steps of K chains agree with vmap's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    forward = batched_forward(model)

    def single(params, batch):
        return -F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1]), None

    def batched(params, batch):
        logits = forward(params, batch[0])
        nll = F.cross_entropy(logits.flatten(0, 1), batch[1].repeat(K), reduction="none")
        return -nll.view(K, -1).mean(1), None

    states = []
    for log_posterior, vectorize in ((single, "vmap"), (batched, "batched")):
        transform = deep_ensemble(sgd.build(log_posterior, lr=0.1, momentum=0.9), K, vectorize=vectorize)
        state = transform.init(stacked(model, seed=3))
        for _ in range(20):
            state, _ = transform.update(state, (x, y), inplace=True)
        states.append(state.params)
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["cnn", "conv1d, same padding, layer norm", "sequence, layer norm without bias"])
def test_gradients_through_convolutions_and_layer_norms_equal_vmaps(name):
    """Each chain's parameter gradient through the grouped convolution and the per-chain affine
    layer norm is the one vmap of the single-chain model gives."""
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make()
    params = {k: v.requires_grad_(True) for k, v in stacked(model).items()}
    x = torch.randn(*shape)
    target = torch.randn_like(vmapped(model, params, x))
    ours = torch.autograd.grad(((batched_forward(model)(params, x) - target) ** 2).sum(), list(params.values()))
    theirs = torch.autograd.grad(((vmapped(model, params, x) - target) ** 2).sum(), list(params.values()))
    for key, a, b in zip(params, ours, theirs):
        # float32 sums of different orders (grouped convolution vs vmap): round-off ~1e-7 of the leaf's
        # scale, so entries near zero need an absolute tolerance on that scale (1e-6 flaked on AMD CPUs)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()), msg=key)
