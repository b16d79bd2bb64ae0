"""Bayesian LoRA at toy size: the Bayesian-Llama recipe, in seconds on a CPU, nothing downloaded.

1. *Pretrain* a tiny Llama (built from a ``LlamaConfig``) on "general text" — increasing arithmetic
   progressions of tokens — with bayesflow's Adam at T = 0 (``transform.update`` on the model's own
   parameters).
2. *Fine-tune* on a new domain — decreasing progressions — with peft LoRA adapters made Bayesian: SGHMC at
   T = 1/N samples the adapters' posterior (a Gaussian prior, N the number of predicted tokens), the base
   model stays frozen (bitwise: it is never part of the sampler's state).
3. Collect posterior samples of the adapters and split each next-token distribution's uncertainty,
   TU = H[p̄] = AU (mean entropy of the samples) + EU (mutual information), per sequence.
4. Score out-of-distribution inputs — random token strings, the toy "Samoan" — against held-out
   in-domain sequences: AUROC of each uncertainty (``bayesflow.predictive.ood_detection``).

Run: ``python examples/bayesian_lora.py`` (about 6 s of CPU). It prints

    12 posterior samples of 896 adapter entries (base model frozen), N = 960 tokens
        total: in-domain 2.225  random tokens 2.364 nats/token   AUROC 0.71
    aleatoric: in-domain 2.095  random tokens 2.147 nats/token   AUROC 0.57
    epistemic: in-domain 0.131  random tokens 0.217 nats/token   AUROC 0.96

— epistemic uncertainty separates the unfamiliar inputs far better than the total or aleatoric
uncertainty, the seed's observation about Bayesian Llama at toy size.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft
import torch
import transformers

from bayesflow.integrations.transformers import (
    causal_lm_log_posterior,
    causal_lm_logits,
    lora_parameters,
    trainable_parameters,
)
from bayesflow.optim import adam
from bayesflow.predictive import classification_uncertainty, ood_detection, sequence_uncertainty
from bayesflow.sgmcmc import sghmc

VOCAB, LENGTH = 64, 16


def progressions(count: int, steps: tuple[int, ...], generator: torch.Generator) -> dict:
    """Token sequences x_t = (x_0 + s·t) mod VOCAB with s drawn from ``steps``."""
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    step = torch.tensor(steps)[torch.randint(0, len(steps), (count, 1), generator=generator)]
    input_ids = (start + step * torch.arange(LENGTH)) % VOCAB
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def batches(data: dict, size: int):
    count = len(data["input_ids"])
    return [{key: value[i:i + size] for key, value in data.items()} for i in range(0, count, size)]


def main(pretrain_steps: int = 150, sample_steps: int = 300, num_samples: int = 12, seed: int = 0,
         verbose: bool = True) -> dict:
    """Run the recipe; return the per-sequence uncertainties and the OOD scores."""
    torch.set_num_threads(1)  # a model this small runs faster on one thread than on a shared pool
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()

    # 1. pretraining at T = 0 (Adam): the whole model, point estimate
    general = batches(progressions(256, (1, 2, 3), generator), 32)
    pretrain = adam.build(causal_lm_log_posterior(model, num_data=1, aux=None), lr=1e-2)
    state = pretrain.init(trainable_parameters(model))
    for step in range(pretrain_steps):
        state, _ = pretrain.update(state, general[step % len(general)], inplace=True)

    # 2. Bayesian LoRA: SGHMC on the adapters at T = 1/N, the base frozen
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    domain = batches(progressions(64, (-1, -2), generator), 16)
    num_data = sum(int(batch["input_ids"][:, 1:].numel()) for batch in domain)  # predicted tokens
    log_posterior = causal_lm_log_posterior(model, num_data, prior_sd=1.0)
    sampler = sghmc.build(log_posterior, lr=0.2, alpha=1.0, temperature=1 / num_data)
    state = sampler.init(lora_parameters(model), seed=seed)
    burn_in = sample_steps - 10 * num_samples
    samples = []
    for step in range(sample_steps):
        state, _ = sampler.update(state, domain[step % len(domain)], inplace=True)
        if step >= burn_in and (step - burn_in) % 10 == 9:
            samples.append({name: value.detach().clone() for name, value in state.params.items()})

    # 3. per-token TU = AU + EU over the samples, reduced to sequences (mean over predicted tokens)
    def uncertainty(data: dict):
        with torch.no_grad():
            tokens = classification_uncertainty(lambda k: causal_lm_logits(model, samples[k], data)[:, :-1],
                                                num_samples=len(samples))
        return sequence_uncertainty(tokens, data["attention_mask"][:, 1:], reduction="mean")

    in_domain = uncertainty(progressions(64, (-1, -2), generator))
    ood = uncertainty({"input_ids": torch.randint(0, VOCAB, (64, LENGTH), generator=generator),
                       "attention_mask": torch.ones(64, LENGTH, dtype=torch.long)})
    scores = ood_detection(in_domain, ood, scores=("total", "aleatoric", "epistemic"))
    if verbose:
        print(f"{len(samples)} posterior samples of {sum(v.numel() for v in samples[0].values())} adapter entries "
              f"(base model frozen), N = {num_data} tokens")
        for name in ("total", "aleatoric", "epistemic"):
            print(f"{name:>9}: in-domain {float(getattr(in_domain, name).mean()):.3f}  random tokens "
                  f"{float(getattr(ood, name).mean()):.3f} nats/token   AUROC {scores[name]['auroc']:.2f}")
    return {"in_domain": in_domain, "ood": ood, "scores": scores, "samples": samples}


if __name__ == "__main__":
    main()
