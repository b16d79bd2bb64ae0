"""The optimizer face and SampleCollector inside a Lightning Trainer, checked by numbers (CPU, seconds).

* T = 0: training with the face (and a per-step lr scheduler) in ``configure_optimizers`` gives the
  parameters of a plain loop with the same face, bitwise, and those of torch.optim.Adam to 1e-10.
* SampleCollector keeps exactly the samples of the steps s > burn_in with (s - burn_in) % every == 0
  (counting optimizer steps under gradient accumulation), and its moments are their mean and variance.
* examples/lightning_sghmc.py runs and its posterior is uncertain where there are no data.
"""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install bayesflow[integrations])")

from bayesflow.integrations import as_optimizer  # noqa: E402
from bayesflow.integrations.lightning import SampleCollector  # noqa: E402
from bayesflow.optim import adam  # noqa: E402
from bayesflow.sgmcmc import sghmc  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
              pytest.mark.filterwarnings("ignore:.*number of training batches.*")]

FLOAT64_RTOL = 1e-10  # tests/test_optim_equivalence.py's tolerance for the same comparison


class Regression(pl.LightningModule):
    def __init__(self, make_optimizer, schedule=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        self.make_optimizer, self.schedule = make_optimizer, schedule

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.parameters())
        if self.schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.schedule(optimizer), "interval": "step"}}


def _loader():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(64, 1, generator=generator, dtype=torch.float64)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def _trainer(steps, callbacks=(), **kwargs):
    return pl.Trainer(max_steps=steps, callbacks=list(callbacks), accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _plain_loop(module, optimizer, schedule, steps):
    batches = iter(())
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(_loader())
            x, y = next(batches)
        optimizer.zero_grad()
        F.mse_loss(module(x), y).backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()


def test_lightning_with_the_face_equals_a_plain_loop_and_torch_adam_at_zero_temperature():
    steps = 13  # three epochs and a bit: the loader restarts
    schedule = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # noqa: E731
    face = lambda params: as_optimizer(adam.build, params, lr=0.02, weight_decay=0.01)  # noqa: E731
    lightning_module = Regression(face, schedule)
    plain, reference = copy.deepcopy(lightning_module.net), copy.deepcopy(lightning_module.net)
    _trainer(steps).fit(lightning_module, _loader())

    plain_face = face(plain.parameters())
    _plain_loop(plain, plain_face, schedule(plain_face), steps)
    torch_adam = torch.optim.Adam(reference.parameters(), lr=0.02, weight_decay=0.01)
    _plain_loop(reference, torch_adam, schedule(torch_adam), steps)

    for ours, loop, theirs in zip(lightning_module.net.parameters(), plain.parameters(), reference.parameters()):
        assert torch.equal(ours, loop)
        assert (ours - theirs).abs().max().item() <= FLOAT64_RTOL * theirs.abs().max().item()
    assert not torch.equal(next(lightning_module.net.parameters()), next(Regression(face).net.parameters()))


class Recorder(pl.Callback):
    """Every parameter after every optimizer step (the reference for the collector)."""

    def __init__(self):
        self.trace = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trace[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sample_collector_keeps_the_thinned_samples_and_their_moments(accumulate):
    steps, burn_in, every = 17, 4, 3
    sampler = lambda params: as_optimizer(sghmc.build, params, lr=0.05, alpha=1.0, temperature=1 / 64,  # noqa: E731
                                          seed=0)
    module = Regression(sampler)
    collector, window = SampleCollector(burn_in=burn_in, every=every), SampleCollector(burn_in=burn_in, every=every,
                                                                                       max_samples=2)
    recorder = Recorder()
    trainer = _trainer(steps, [collector, window, recorder], accumulate_grad_batches=accumulate)
    trainer.fit(module, _loader())

    expected_steps = [s for s in range(1, steps + 1) if s > burn_in and (s - burn_in) % every == 0]
    assert collector.steps == expected_steps == [7, 10, 13, 16]
    assert trainer.global_step == steps and sorted(recorder.trace)[-steps:] == list(range(1, steps + 1))
    samples = collector.samples
    assert set(samples) == {n for n, _ in module.named_parameters()}
    for name, stacked in samples.items():
        expected = torch.stack([recorder.trace[s][name] for s in expected_steps])
        assert stacked.shape == (len(expected_steps), *dict(module.named_parameters())[name].shape)
        assert torch.equal(stacked, expected)
        torch.testing.assert_close(collector.mean[name], expected.mean(0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(collector.variance[name], expected.var(0, unbiased=False), rtol=1e-10,
                                   atol=1e-14)
        assert torch.equal(window.samples[name], expected[-2:])  # max_samples: the last ones
        torch.testing.assert_close(window.mean[name], expected.mean(0), rtol=1e-12, atol=1e-14)  # of all
    assert float(collector.variance["net.0.weight"].max()) > 0  # the chain moved between samples

    x = next(iter(_loader()))[0]
    predictions = collector.predict(module, x)
    assert predictions.shape == (len(expected_steps), 16, 1)
    last = dict(module.named_parameters())
    torch.testing.assert_close(predictions[-1], torch.func.functional_call(module, {
        n: samples[n][-1] for n in last}, (x,)), rtol=0, atol=0)


def test_sample_collector_rejects_bad_arguments_and_explains_an_empty_collection():
    with pytest.raises(ValueError, match="every"):
        SampleCollector(every=0)
    with pytest.raises(ValueError, match="burn_in"):
        SampleCollector(burn_in=-1)
    with pytest.raises(ValueError, match="nothing to collect"):
        SampleCollector(samples=False, moments=False)
    with pytest.raises(ValueError, match="burn_in=5"):
        _ = SampleCollector(burn_in=5).samples


def test_lightning_sghmc_example_is_uncertain_away_from_the_data():
    path = pathlib.Path(__file__).parent.parent / "examples" / "lightning_sghmc.py"
    spec = importlib.util.spec_from_file_location("lightning_sghmc_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(num_data=300, steps=700, burn_in=300, every=10, verbose=False)
    assert result["num_samples"] == 40
    assert result["accuracy"] > 0.9  # the blobs overlap a little: the Bayes rate is about 0.98
    near, far = result["near"], result["far"]
    assert far["epistemic"] > 3 * near["epistemic"] > 0
    for where in (near, far):
        assert where["total"] == pytest.approx(where["aleatoric"] + where["epistemic"], abs=1e-6)
    # epistemic uncertainty separates far from near inputs better than the total or aleatoric part (only
    # partly: a tanh MLP extrapolates confidently along the class directions, where samples agree)
    auroc = result["auroc"]
    assert auroc["epistemic"] > max(0.6, auroc["total"], auroc["aleatoric"])
