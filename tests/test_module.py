import json
from pathlib import Path

from collections import Counter

import pytest
import torch
from conftest import run
from lightning.pytorch import Callback
from torch import nn

from music.runner import lightning
from music.module import Classifier
from music.speed import STEP_HOOKS


class Fixed(nn.Module):
    """Predicts the class stored in the input's first pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return nn.functional.one_hot(x.flatten(1)[:, 0].long(), 3).float() * 10 + self.dummy


def test_evaluate_computes_macro_and_per_class_metrics():
    predicted = torch.tensor([0, 0, 1, 1, 2, 1])
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    model = Classifier(Fixed(), num_classes=3)
    metrics, confusion = model.evaluate([(predicted.view(-1, 1).float(), truth)])
    assert metrics["acc"] == pytest.approx(5 / 6)
    assert metrics["recall/2"] == pytest.approx(0.5) and metrics["precision/1"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert confusion.tolist() == [[2, 0, 0], [0, 2, 0], [0, 1, 1]]
    assert model.training  # evaluation leaves the mode as it found it


def test_default_backbone_is_simple_nn_sized_for_the_classes():
    assert Classifier(num_classes=10).backbone.fc3.out_features == 10


def test_init_from_loads_pretrained_weights_when_fitting(tmp_path):
    pretrained = Classifier()
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "p.ckpt")
    model = Classifier(init_from=str(tmp_path / "p.ckpt"))
    assert not torch.equal(model.backbone.fc1.weight, pretrained.backbone.fc1.weight)
    model.setup("fit")
    assert torch.equal(model.backbone.fc1.weight, pretrained.backbone.fc1.weight)


class StepHookCounter(Callback):
    """Listens between each loss and its optimizer step, so blocks must go through Lightning's steps."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.calls["on_before_backward"] += 1

    def on_after_backward(self, trainer, pl_module) -> None:
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.calls["on_before_optimizer_step"] += 1


@pytest.mark.parametrize("listener", [None, StepHookCounter], ids=["direct steps", "a callback on the step hooks"])
def test_blocks_train_exactly_as_single_batches(shrink, listener):
    """A block is trained batch by batch: same weights, steps and logged metrics, bit for bit,
    through the plain backward/step calls or, when a callback listens, Lightning's with every hook."""
    phases = [{"name": "pretrain", "split": "remaining", "epochs": 2}]  # 103 batches an epoch: 21 blocks of 5

    def fit(blocks: int, *callbacks: Callback):
        cli = lightning(["--config", str(shrink("seq", phases=phases, batches_per_block=blocks))], run=False)
        cli.trainer.callbacks.extend(callbacks)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return cli

    listening = [listener()] if listener else []
    single, blocks = fit(1), fit(5, *listening)
    assert single.model.automatic_optimization and not blocks.model.automatic_optimization
    assert blocks.model.blocks.direct is not bool(listening)
    steps = 2 * -(-len(single.datamodule.splits["remaining"]) // single.datamodule.batch_size)
    assert single.trainer.global_step == blocks.trainer.global_step == steps
    if listening:
        assert listening[0].calls == {hook: steps for hook in STEP_HOOKS}
    for (name, a), b in zip(single.model.state_dict().items(), blocks.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for key in ("train/loss", "train/acc"):
        assert torch.equal(single.trainer.callback_metrics[key], blocks.trainer.callback_metrics[key])


def test_init_from_initialises_every_stage(shrink, tmp_path):
    """``test``/``validate``/``predict --model.init_from`` evaluate the weights named, as ``fit``
    starts from them: the pretrained model's test accuracy comes back exactly."""
    config = shrink("pretrain", val_size=200)
    fitted = run("fit", "--config", config, "--trainer.limit_train_batches", 2)
    snapshot = Path(fitted.trainer.log_dir) / "checkpoints" / "phase-0-pretrain.ckpt"
    pretrained = json.loads((Path(fitted.trainer.log_dir) / "phase_metrics.json").read_text())["pretrain"]
    tested = run("test", "--config", config, "--model.init_from", snapshot)
    assert tested.trainer.callback_metrics["test/acc"].item() == pytest.approx(pretrained["acc"], abs=1e-7)
    random = run("test", "--config", config, "--untrained", "true")
    assert random.trainer.callback_metrics["test/acc"].item() != pytest.approx(pretrained["acc"], abs=1e-3)
    validated = run("validate", "--config", config, "--model.init_from", snapshot)
    from_ckpt = run("validate", "--config", config, "--ckpt_path", snapshot)
    assert validated.trainer.callback_metrics["val/acc"] == from_ckpt.trainer.callback_metrics["val/acc"]
    predictions = torch.cat(lightning(["predict", "--config", str(config), "--model.init_from", str(snapshot),
                                       "--return_predictions", "true"]).trainer.predict_loop.predictions)
    labels = tested.datamodule.dataset("test").labels
    assert (predictions == labels).float().mean().item() == pytest.approx(pretrained["acc"], abs=1e-7)
