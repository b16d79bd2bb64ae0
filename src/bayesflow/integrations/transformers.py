r"""Hugging Face models as bayesflow log posteriors: causal language models, whole or through LoRA adapters.

A causal LM gives :math:`p_θ(x_{t+1} \mid x_{\le t})`. For a batch of sequences with labels :math:`y`
(``labels``, or ``input_ids`` with padding set to -100; position t predicts token t + 1, the shift of
Hugging Face's loss), let :math:`\mathcal T_b = \{(i, t) : y_{i,t+1} \ne -100\}` be the batch's predicted
tokens. :func:`causal_lm_log_posterior` returns bayesflow's **per-datum** log posterior

.. math::
    ℓ(θ; b) = \frac{1}{|\mathcal T_b|} \sum_{(i,t) \in \mathcal T_b} \log p_θ(y_{i,t+1} \mid x_{i,\le t})
              + \frac{\log p(θ)}{N} \qquad (\text{reduction} = \text{"token"}),

the negative of ``model(**batch).loss`` plus the prior's share, with **N the number of predicted tokens
in the training set**; or, with ``reduction="sequence"``, the mean over the batch's B sequences of their
summed token log-likelihoods plus :math:`\log p(θ)/N` with **N the number of sequences**. The prior is
:math:`\log p(θ) = \sum_j \log \mathcal N(θ_j; μ_j, s^2)` over the entries of ``params`` (``prior_sd``
= s, ``prior_mean`` = μ, zero by default) or none (``prior_sd=None``: a flat prior, ℓ is the mean log
likelihood). As everywhere in bayesflow, samplers at **T = 1/N** sample
:math:`p(θ \mid \text{data}) \propto p(θ) \prod p(\text{tokens} \mid θ)` and T = 0 optimises: the SGD
preset at T = 0 is ``torch.optim.SGD`` on Hugging Face's loss, step for step.

**What is sampled.** ``params`` holds only what moves: :func:`trainable_parameters` selects a subset
(those with ``requires_grad``, names containing a string such as ``"lora_"``, or a predicate), and
``torch.func.functional_call`` runs the model with that subset substituted and every other tensor its
own. A peft-wrapped model's frozen base therefore never enters the state: no momenta, no gradients
(autograd differentiates only with respect to the given leaves), and the base weights stay bitwise as
they were — the Bayesian-LoRA recipe: a posterior over the adapters of a fixed pretrained model.

Example (Bayesian LoRA on a tiny Llama built from a config; nothing is downloaded):
    >>> import torch, transformers, peft
    >>> from bayesflow.integrations.transformers import causal_lm_log_posterior, lora_parameters
    >>> from bayesflow.sgmcmc import sghmc
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                                   num_attention_heads=2, num_key_value_heads=1)
    >>> model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
    ...                             peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    >>> batch = {"input_ids": torch.randint(0, 32, (4, 8))}
    >>> num_data = 4 * 7                                        # predicted tokens in the training set
    >>> log_posterior = causal_lm_log_posterior(model, num_data, prior_sd=1.0)
    >>> adapters = lora_parameters(model)                       # the frozen base stays out of params
    >>> transform = sghmc.build(log_posterior, lr=0.05, alpha=1.0, temperature=1 / num_data)
    >>> state = transform.init(adapters, seed=0)
    >>> state, logits = transform.update(state, batch, inplace=True)   # the model's adapters move
    >>> len(adapters), logits.shape
    (4, torch.Size([4, 8, 32]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real

import torch

from bayesflow.types import LogPosterior, TensorTree

__all__ = ["causal_lm_log_posterior", "causal_lm_logits", "lora_parameters", "trainable_parameters"]

IGNORE_INDEX = -100
"""Hugging Face's label of a token that is not predicted (padding, prompts)."""

_REDUCTIONS = ("token", "sequence")
_AUX = ("logits", None)


def trainable_parameters(model: torch.nn.Module,
                         include: str | Sequence[str] | Callable[[str, torch.nn.Parameter], bool] | None = None,
                         ) -> dict[str, torch.nn.Parameter]:
    """The parameters to sample or train, by name (the keys ``functional_call`` expects).

    Args:
        model: any ``torch.nn.Module`` (a transformers or peft model included).
        include: which parameters: None — those with ``requires_grad`` (peft freezes the base model, so
            these are its adapters); a string or a sequence of strings — names containing any of them
            (``"lora_"``: LoRA's ``lora_A`` / ``lora_B`` matrices, whatever ``requires_grad`` says); a
            predicate ``include(name, parameter) -> bool``.

    Returns:
        ``{name: parameter}``: the module's own ``Parameter`` objects, so in-place steps
        (``update(..., inplace=True)``) move the model itself; pass
        ``{k: v.detach().clone() for k, v in ...items()}`` to leave the model as it is.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``include`` is of another kind.
        ValueError: nothing was selected.

    Example:
        >>> import torch
        >>> from bayesflow.integrations.transformers import trainable_parameters
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> model[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> sorted(trainable_parameters(model))                  # what requires grad
        ['1.bias', '1.weight']
        >>> sorted(trainable_parameters(model, include="weight"))
        ['0.weight', '1.weight']
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if include is None:
        def selected(name, parameter):
            return parameter.requires_grad
    elif isinstance(include, str) or (isinstance(include, Sequence) and include
                                      and all(isinstance(s, str) for s in include)):
        parts = (include,) if isinstance(include, str) else tuple(include)

        def selected(name, parameter):
            return any(part in name for part in parts)
    elif callable(include):
        selected = include
    else:
        raise TypeError(f"include must be None, a string, a non-empty sequence of strings or a predicate "
                        f"(name, parameter) -> bool, got {include!r:.80}")
    params = {name: parameter for name, parameter in model.named_parameters() if selected(name, parameter)}
    if not params:
        what = "requires_grad" if include is None else f"include={include!r:.80}"
        raise ValueError(f"no parameter of the model is selected by {what}: nothing to sample (for a peft model, "
                         f"was the adapter added? for a plain model, is everything frozen?)")
    return params


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """LoRA's adapter matrices of a peft model (names containing ``"lora_"``): ``trainable_parameters(model,
    include="lora_")``.

    Example:
        >>> import torch
        >>> from bayesflow.integrations.transformers import lora_parameters
        >>> class Adapted(torch.nn.Module):                      # what peft's LoRA layers look like
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.base = torch.nn.Linear(4, 4).requires_grad_(False)
        ...         self.lora_A, self.lora_B = torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(2, 4, bias=False)
        >>> sorted(lora_parameters(Adapted()))
        ['lora_A.weight', 'lora_B.weight']
    """
    return trainable_parameters(model, include="lora_")


def causal_lm_logits(model: torch.nn.Module, params: TensorTree, batch: Mapping) -> torch.Tensor:
    """The logits ``(B, L, V)`` of ``model`` run with ``params`` substituted (every other tensor its own).

    ``batch`` is the model's keyword inputs (``input_ids``, ``attention_mask``, ...; a dict or a tokenizer's
    ``BatchEncoding``) passed through ``torch.func.functional_call``; ``labels`` are left out (the loss is
    computed by :func:`causal_lm_log_posterior`, not by the model) and the key-value cache is off.
    Use it for predictions from posterior samples: ``lambda k: causal_lm_logits(model, draws[k], batch)``
    feeds :func:`bayesflow.predictive.classification_uncertainty`.

    Raises:
        TypeError: ``batch`` is not a mapping of keyword inputs, or ``params`` not a dict.
    """
    _check_batch(batch)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict {{name: tensor}} of the model's parameters, "
                        f"got {type(params).__name__}")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        inputs.setdefault("use_cache", False)  # no key-value cache to build while training
    outputs = torch.func.functional_call(model, params, args=(), kwargs=inputs)
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def causal_lm_log_posterior(model: torch.nn.Module, num_data: float, prior_sd: float | None = None, *,
                            prior_mean: TensorTree | float = 0.0, reduction: str = "token",
                            aux: str | None = "logits") -> LogPosterior:
    r"""``log_posterior(params, batch) -> (value, logits)`` of a causal language model (module docstring).

    Args:
        model: a causal LM returning ``logits`` (a transformers ``...ForCausalLM`` or a peft model of one).
            It runs in its current mode: ``model.eval()`` for a likelihood without dropout.
        num_data: N — the number of predicted tokens in the training set (``reduction="token"``), e.g.
            ``sum(int((b["labels"][:, 1:] != -100).sum()) for b in loader)``, or of sequences
            (``"sequence"``). Sample at temperature 1/N.
        prior_sd: s > 0 of the isotropic Gaussian prior N(prior_mean, s² I) on ``params``, or None for
            no prior term.
        prior_mean: μ — a number, or a dict like ``params`` (e.g. the pretrained weights, detached, for a
            prior centred on them); zero suits LoRA adapters (B = 0 is the base model).
        reduction: ``"token"`` (ℓ per predicted token: minus Hugging Face's loss) or ``"sequence"``.
        aux: ``"logits"`` (the batch's logits, detached, as ``aux``) or None (no aux: nothing kept alive).

    Returns:
        The log posterior. ``batch`` holds the model's keyword inputs (``input_ids``, ``attention_mask``,
        ...) and optionally ``labels`` (default: ``input_ids`` with ``attention_mask == 0`` positions
        ignored). A batch without any predicted token contributes only the prior term.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``num_data`` or ``prior_sd`` is not a positive finite number, or ``reduction`` /
            ``aux`` is unknown; at call time, a batch without ``labels`` or ``input_ids``, or a
            ``prior_mean`` dict lacking a key of ``params``.

    Example (the value is minus Hugging Face's own loss without a prior):
        >>> import torch, transformers
        >>> from bayesflow.integrations.transformers import causal_lm_log_posterior, trainable_parameters
        >>> config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> model = transformers.LlamaForCausalLM(config)
        >>> batch = {"input_ids": torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))}
        >>> log_posterior = causal_lm_log_posterior(model, num_data=100)
        >>> value, logits = log_posterior(trainable_parameters(model), batch)
        >>> torch.allclose(value, -model(**batch, labels=batch["input_ids"]).loss)
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
    num_data = _positive("num_data", num_data)
    if prior_sd is not None:
        prior_sd = _positive("prior_sd", prior_sd)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if aux not in _AUX:
        raise ValueError(f"aux must be one of {_AUX}, got {aux!r}")
    if not isinstance(prior_mean, (Real, dict)) or isinstance(prior_mean, bool):
        raise ValueError(f"prior_mean must be a number or a dict like params, got {type(prior_mean).__name__}")
    log_normaliser = None if prior_sd is None else -math.log(prior_sd) - 0.5 * math.log(2 * math.pi)

    def log_prior(params: dict) -> torch.Tensor | float:
        if prior_sd is None:
            return 0.0
        if isinstance(prior_mean, dict):
            missing = sorted(set(params) - set(prior_mean))
            if missing:
                more = "..." if len(missing) > 3 else ""
                raise ValueError(f"prior_mean has no entry for the parameters {missing[:3]}{more}")
            squares = sum((value - prior_mean[name]).square().sum() for name, value in params.items())
        else:
            squares = sum((value - prior_mean).square().sum() for value in params.values())
        count = sum(value.numel() for value in params.values())
        return -0.5 * squares / prior_sd**2 + count * log_normaliser

    def log_posterior(params, batch):
        labels = _labels(batch)  # before the forward pass: a batch that cannot be scored fails here
        logits = causal_lm_logits(model, params, batch)
        targets = labels[:, 1:]
        scores = logits[:, :-1]
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # as HF's loss: never in half precision
        log_likelihood = -torch.nn.functional.cross_entropy(
            scores.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        if reduction == "token":  # count on the device: no host sync
            mean_log_likelihood = log_likelihood / (targets != IGNORE_INDEX).sum().clamp_min(1)
        else:
            mean_log_likelihood = log_likelihood / targets.shape[0]
        value = mean_log_likelihood + log_prior(params) / num_data
        return value, (logits.detach() if aux == "logits" else None)

    return log_posterior


def _check_batch(batch) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a mapping of the model's keyword inputs (input_ids, attention_mask, "
                        f"labels, ...), got {type(batch).__name__}")


def _labels(batch: Mapping) -> torch.Tensor:
    """``labels``, or ``input_ids`` with padding (``attention_mask == 0``) ignored."""
    _check_batch(batch)
    labels = batch.get("labels")
    if labels is not None:
        return labels
    input_ids = batch.get("input_ids")
    if input_ids is None:
        raise ValueError(f"batch needs labels or input_ids to score, got the keys {sorted(batch)}")
    mask = batch.get("attention_mask")
    return input_ids if mask is None else input_ids.masked_fill(mask == 0, IGNORE_INDEX)


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
