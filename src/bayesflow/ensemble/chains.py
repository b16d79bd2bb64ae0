r"""K chains as one batched state: deep ensembles, Bayesian deep ensembles, temperature sweeps.

Every leaf of a K-chain state carries a leading chain dimension and one ``update`` advances all
chains in a single batched step (``torch.func.vmap`` of the single-chain log posterior, or a
log posterior that takes batched parameters). Each chain has its own noise stream, so chain k of a
batched run seeded ``s`` reproduces a single-chain run seeded ``s + k``:

* bitwise in float32 and float64 when the chains share their hyperparameters and vmap batches the
  log posterior's ops into kernels that sum in the same order (elementwise ops, ``x @ W`` with a
  weight matrix W) — but for SGNHT's thermostat, whose batched dot product mᵀm rounds differently
  (ξ to rounding, ≈ 1e-18 in float64);
* to rounding where vmap changes a reduction's order: a matrix–vector product ``x @ w`` over a 1-D
  parameter becomes a matrix product (measured after 50 SGLD steps: 3e-8 in float32, 1e-17 in float64);
* in bfloat16 and float16 to rounding, not bitwise: the batched kernels round differently from the
  single-chain ones, so a step can differ by one ulp, and later steps carry the difference on
  (measured on a linear softmax model: at most 1 ulp after one step, tens of ulps after 200);
* with a tensor of per-chain temperatures or step sizes (a sweep) to rounding, not bitwise, in every
  dtype — the per-chain values enter the step as a tensor, a single chain's as a Python number
  (measured after 200 SGLD / SGHMC steps: at most 2e-7 in float32, 4e-16 in float64).

* T = 0 on K chains is a deep ensemble (Lakshminarayanan et al. 2017);
* T = 1/num_data on K chains is a Bayesian deep ensemble — K parallel SG-MCMC chains,
  asymptotically unbiased;
* a tensor of K temperatures runs a temperature sweep (the cold-posterior curve) in one run.

Example:
    >>> import torch
    >>> from bayesflow.ensemble import lift, replicate
    >>> from bayesflow.sgmcmc import sghmc
    >>> def log_posterior(params, batch):  # a Gaussian mean, per datum
    ...     return -0.5 * ((batch - params) ** 2).sum(-1).mean(), None
    >>> batch = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
    >>> num_data, params = len(batch), torch.zeros(3)
    >>> single = sghmc.build(log_posterior, lr=1e-3, temperature=1 / num_data)
    >>> ensemble = lift(single, num_chains=8)
    >>> state = ensemble.init(replicate(params, 8, perturbation=0.1, seed=0), seed=0)
    >>> state, aux = ensemble.update(state, batch)       # all 8 chains, one batched step
    >>> state.params.shape
    torch.Size([8, 3])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import replace

import optree
import torch

from bayesflow.engine.noise import PERTURBATION, derive, drawn_seed, seed_key
from bayesflow.engine.sde import build
from bayesflow.tree import flatten, tree_map, unflatten
from bayesflow.types import TensorTree, Transform

__all__ = ["bayesian_deep_ensemble", "deep_ensemble", "lift", "replicate", "stack", "unstack"]


def lift(transform: Transform, num_chains: int, *, temperature=None, step_size=None,
         vectorize: str = "vmap") -> Transform:
    """The K-chain version of any engine transform (engine ``build`` or a preset).

    Overrides compose with what a preset does to them: for a preset (``sgld.build``, ``csgld.build``,
    ...) the preset's own ``config`` is called again with the new temperature or ``lr`` (its recipe,
    :func:`bayesflow.engine.preset`), so chain k runs the preset built with ``temperature[k]``
    and ``lr = step_size[k]`` — cSGLD keeps its cyclical exploration stage, posteriors' ``beta``
    correction is computed for each chain's T and lr. With a tensor of per-chain values its numbers
    equal that single chain's to floating-point rounding, not bitwise (the values enter the step as a
    tensor; measured after 200 steps: at most 2e-7 in float32, 4e-16 in float64); a float override,
    one value for every chain, is bitwise in float32 and float64 (see the module docstring). A
    preset whose operators depend on ``lr`` in a way one batched step cannot hold (Adam-type and
    momentum optimizers, Adam-SGHMC) refuses a per-chain ``step_size`` with a ValueError. An engine
    configuration without a recipe (or one edited after the preset made it) has its field replaced.

    Args:
        transform: a transform built by the engine (it carries its config and log posterior).
        num_chains: K.
        temperature: overrides the temperature: a float, or a tensor of K values (one per chain).
        step_size: overrides the step size — a preset's ``lr``, an engine config's h: a float, or a
            tensor of K values.
        vectorize: ``"vmap"`` (the log posterior is written for one chain) or ``"batched"`` (it takes
            params with a leading chain dimension and returns K values).

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import lift, replicate
        >>> from bayesflow.sgmcmc import sgld
        >>> single = sgld.build(lambda params, batch: (-0.5 * (params**2).sum(), None), lr=1e-2)
        >>> ensemble = lift(single, num_chains=4, temperature=torch.tensor([0.0, 0.01, 0.1, 1.0]))  # a sweep
        >>> state, aux = ensemble.update(ensemble.init(replicate(torch.zeros(3), 4), seed=0), None)
        >>> state.params.shape
        torch.Size([4, 3])
    """
    if transform.config is None or transform.log_posterior is None:
        raise TypeError("lift needs a transform built by bayesflow's engine (it carries config and log_posterior)")
    _check_num_chains(num_chains)
    config = transform.config
    overrides = {}
    if temperature is not None:
        overrides["temperature"] = _as_chain_values(temperature, num_chains, "temperature")
    if step_size is not None:
        overrides["step_size"] = _as_chain_values(step_size, num_chains, "step_size")
    if overrides:
        config = _override(config, overrides)
    return build(transform.log_posterior, config, chains=num_chains, vectorize=vectorize)


def _override(config, overrides: dict):
    """The configuration with ``overrides``, made by the preset's recipe where it has one (and the
    config is still what the recipe made), else by replacing the engine fields."""
    recipe = config.recipe
    if recipe is not None and recipe() == config:
        accepts = getattr(recipe.func, "accepts", frozenset())
        arguments = {"temperature" if name == "temperature" else "lr": value for name, value in overrides.items()}
        if set(arguments) <= accepts:
            return recipe(**arguments)
        if "lr" in arguments and "lr" not in accepts:
            raise ValueError("this preset has no lr to take one value per chain")
        # (an optimizer preset has no temperature: its SDE at temperature T is the plain replacement)
        if "lr" in arguments:
            config = recipe(lr=arguments["lr"])
        return replace(config, temperature=arguments["temperature"])
    return replace(config, **overrides)


def deep_ensemble(transform: Transform, num_chains: int, **kwargs) -> Transform:
    """K chains at T = 0: K independently initialised optimizers, one batched step.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import deep_ensemble, replicate
        >>> from bayesflow.optim import sgd
        >>> ensemble = deep_ensemble(sgd.build(lambda params, batch: (-0.5 * (params**2).sum(), None), lr=0.1), 8)
        >>> state = ensemble.init(replicate(torch.ones(3), 8, perturbation=0.5, seed=0))
        >>> state, aux = ensemble.update(state, None)  # one SGD step of all 8 members
    """
    return lift(transform, num_chains, temperature=0.0, **kwargs)


def bayesian_deep_ensemble(transform: Transform, num_chains: int, num_data: int, **kwargs) -> Transform:
    """K SG-MCMC chains at T = 1/num_data (per-datum log posterior): posterior samples from every chain.

    The temperature goes through the preset's recipe (see :func:`lift`): a cyclical or
    ``beta``-corrected sampler keeps its rules at T = 1/num_data.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import bayesian_deep_ensemble, replicate
        >>> from bayesflow.sgmcmc import sgld
        >>> single = sgld.build(lambda params, batch: (-0.5 * (params**2).sum(), None), lr=1e-2)
        >>> ensemble = bayesian_deep_ensemble(single, num_chains=8, num_data=1000)  # T = 1e-3 on every chain
        >>> state = ensemble.init(replicate(torch.zeros(3), 8, perturbation=1.0, seed=0), seed=0)
    """
    if isinstance(num_data, bool) or not isinstance(num_data, (int, float)) or not math.isfinite(num_data) or (
            num_data <= 0):
        raise ValueError(f"num_data must be the positive number of training data (the temperature is 1/num_data), "
                         f"got {num_data!r}")
    return lift(transform, num_chains, temperature=1.0 / num_data, **kwargs)


def _check_num_chains(num_chains) -> None:
    if isinstance(num_chains, bool) or not isinstance(num_chains, int) or num_chains < 1:
        raise ValueError(f"num_chains must be a positive integer, got {num_chains!r}")


def _as_chain_values(value, num_chains: int, name: str):
    """A float stays a float; K values become a 1-D float64 tensor (the engine casts per-chain scalars to
    the params' dtype where it uses them)."""
    if isinstance(value, (list, tuple)):
        value = torch.as_tensor(value, dtype=torch.float64)
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        if value.numel() != num_chains:
            raise ValueError(f"{name} has {value.numel()} values for {num_chains} chains")
        return value
    return value


def stack(params: Sequence[TensorTree]) -> TensorTree:
    """K parameter trees of the same structure -> one tree with a leading chain dimension.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import stack
        >>> stack([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])["w"]
        tensor([[0., 0.],
                [1., 1.]])
    """
    if not params:
        raise ValueError("stack needs at least one parameter tree")
    leaves, spec = flatten(params[0])
    columns = [leaves]
    for i, tree in enumerate(params[1:], start=1):
        other, other_spec = flatten(tree)
        if other_spec != spec:
            raise ValueError(f"parameter tree {i} has another structure than tree 0")
        columns.append(other)
    return unflatten(spec, [torch.stack(group) for group in zip(*columns)])


def unstack(params: TensorTree) -> list[TensorTree]:
    """Inverse of :func:`stack`: one tree per chain.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import unstack
        >>> unstack({"w": torch.tensor([[0.0, 1.0], [2.0, 3.0]])})
        [{'w': tensor([0., 1.])}, {'w': tensor([2., 3.])}]
    """
    leaves, spec = flatten(params)
    return [unflatten(spec, list(group)) for group in zip(*(leaf.unbind(0) for leaf in leaves))]


def replicate(params: TensorTree, num_chains: int, perturbation: float | Callable | None = None,
              seed: int | None = None) -> TensorTree:
    """K copies of ``params``, optionally perturbed.

    Args:
        params: one parameter tree.
        num_chains: K.
        perturbation: None (identical copies), a float σ (adds N(0, σ²) noise), or a callable
            ``perturbation(params, generator) -> params`` applied per chain (e.g. a prior draw).
        seed: seeds the perturbation's generator (a stream of its own: ``replicate(params, K, σ, seed=s)``
            and ``init(..., seed=s)`` draw independent numbers, :mod:`bayesflow.engine.noise`); None draws
            the seed from torch's global generator, as ``init`` does.

    Example:
        >>> import torch
        >>> from bayesflow.ensemble import replicate
        >>> params = replicate({"w": torch.zeros(2, 3), "b": torch.zeros(3)}, 8, perturbation=0.1, seed=0)
        >>> params["w"].shape, params["b"].shape
        (torch.Size([8, 2, 3]), torch.Size([8, 3]))
    """
    _check_num_chains(num_chains)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if perturbation is None or callable(perturbation):
        perturb = perturbation
    else:
        sigma = float(perturbation)
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"perturbation must be a non-negative standard deviation or a callable, got {sigma}")

        def perturb(tree, generator):
            return tree_map(lambda p: p + sigma * torch.randn(p.shape, generator=generator, dtype=p.dtype,
                                                               device=p.device), tree)

    generator = None
    if perturb is not None:  # torch's global generator is only drawn from when there is noise to draw
        device = flatten(params)[0][0].device
        generator = torch.Generator(device=device)
        generator.manual_seed(derive(seed_key(drawn_seed() if seed is None else seed), 0, PERTURBATION,
                                     full=device.type != "cpu"))
    copies = [tree_map(torch.clone, params) if perturb is None else perturb(params, generator)
              for _ in range(num_chains)]
    return stack(copies)


def chain_dimension(params: TensorTree) -> int:
    """The number of chains K of a batched parameter tree."""
    leaves = optree.tree_leaves(params)
    return leaves[0].shape[0]
