"""A Bayesian neural network trained by Lightning: SGHMC through the optimizer face, samples by a callback.

Nothing in the LightningModule is Bayesian but ``configure_optimizers``: it returns
``as_optimizer(sghmc.build, ...)`` at temperature T = 1/N, so ``Trainer.fit`` samples the posterior of
a small MLP classifier (three Gaussian blobs in 2-D) instead of optimizing it. The loss is the mean
cross-entropy, i.e. -ℓ per datum (bayesflow's convention); the Gaussian prior N(0, s²) is the preset's
``weight_decay = 1/(s²·N)`` (its share (λ/2)|θ|² of the per-datum loss). A
:class:`~bayesflow.integrations.lightning.SampleCollector` keeps one sample every ``every`` steps after
burn-in; the predictive uncertainty of the collected samples at the end
(:func:`bayesflow.predictive.classification_uncertainty`) splits the entropy of the Bayesian model
average p̄(y|x) = mean_s p(y|x, θ_s) into

* total     H[p̄]                       (everything the model does not know),
* aleatoric mean_s H[p(·|x, θ_s)]        (noise the model is sure about: overlapping classes),
* epistemic total - aleatoric           (the mutual information between y and θ: disagreement
                                          between samples, large away from the data).

Run: ``python examples/lightning_sghmc.py`` (about ten seconds on a CPU). It prints the accuracy of
the model average, the three entropies at in-distribution test points and at points far from the
data, where the epistemic part grows most (about 5-10x), and how well each separates the two (AUROC,
:func:`bayesflow.predictive.ood_detection`; epistemic best, near 0.7: along the directions of the class
centres a tanh MLP extrapolates confidently and its posterior samples agree, a known limit of such
networks far from the data).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from bayesflow.integrations import as_optimizer
from bayesflow.integrations.lightning import SampleCollector
from bayesflow.predictive import classification_uncertainty, ood_detection
from bayesflow.sgmcmc import sghmc

CENTERS = torch.tensor([[0.0, 2.0], [-1.8, -1.0], [1.8, -1.0]])


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs (sd 0.8, overlapping a little): inputs (n, 2) and labels (n,)."""
    labels = torch.randint(0, 3, (n,), generator=generator)
    return CENTERS[labels] + 0.8 * torch.randn(n, 2, generator=generator), labels


class Classifier(pl.LightningModule):
    """An MLP whose optimizer is SGHMC at T = 1/N: ``fit`` samples its posterior."""

    def __init__(self, num_data: int, lr: float, alpha: float, prior_variance: float, seed: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
        self.num_data, self.lr, self.alpha = num_data, lr, alpha
        self.prior_variance, self.seed = prior_variance, seed

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)  # -mean log-likelihood: the per-datum loss (prior: weight_decay)

    def configure_optimizers(self):
        return as_optimizer(sghmc.build, self.parameters(), lr=self.lr, alpha=self.alpha,
                            temperature=1.0 / self.num_data,                        # the posterior
                            weight_decay=1.0 / (self.prior_variance * self.num_data),  # prior N(0, s²)
                            seed=self.seed)


def main(num_data: int = 600, steps: int = 3000, burn_in: int = 1000, every: int = 20, batch_size: int = 64,
         lr: float = 0.1, alpha: float = 1.0, prior_variance: float = 1.0, seed: int = 0,
         verbose: bool = True) -> dict:
    """Fit (sample), then return the collector and the predictive summary at near and far points."""
    pl.seed_everything(seed, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    x, y = make_data(num_data, generator)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                                         generator=generator)
    model = Classifier(num_data, lr, alpha, prior_variance, seed)
    collector = SampleCollector(burn_in=burn_in, every=every)
    trainer = pl.Trainer(max_steps=steps, callbacks=[collector], accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)

    test_x, test_y = make_data(1000, generator)
    angles = torch.linspace(0, 2 * math.pi, 200)
    far_x = 8.0 * torch.stack([angles.cos(), angles.sin()], 1)  # four times the blobs' radius
    near = classification_uncertainty(collector.predict(model, test_x))  # logits (S, 1000, 3) of the samples
    far = classification_uncertainty(collector.predict(model, far_x))
    result = {
        "num_samples": collector.num_samples,
        "accuracy": (near.log_predictive.argmax(-1) == test_y).float().mean().item(),  # of the model average
        "near": {part: getattr(near, part).mean().item() for part in ("total", "aleatoric", "epistemic")},
        "far": {part: getattr(far, part).mean().item() for part in ("total", "aleatoric", "epistemic")},
        "auroc": {part: r["auroc"] for part, r in ood_detection(near, far).items()},
        "collector": collector,
    }
    if verbose:
        print(f"{result['num_samples']} posterior samples; accuracy of the model average {result['accuracy']:.3f}")
        print("mean entropy (nats)   total  aleatoric  epistemic")
        for where in ("near", "far"):
            r = result[where]
            print(f"  {where:<18}  {r['total']:.3f}    {r['aleatoric']:.3f}      {r['epistemic']:.3f}")
        auroc = result["auroc"]
        print(f"  near/far AUROC      {auroc['total']:.3f}    {auroc['aleatoric']:.3f}      {auroc['epistemic']:.3f}")
    return result


if __name__ == "__main__":
    main()
