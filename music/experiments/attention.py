"""A ViT end to end: pretrain, fine-tune in full and LoRA mode, and draw where the CLS token looks."""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path

import torch

from music.attention import attention_figure, cls_attention
from torch.utils.tensorboard import SummaryWriter

from music.experiments.common import Data, Output, final_phase, fit, machine, write_table
from music.finetuning import merged_state_dict
from music.module import Classifier
from music.runner import build


class AttentionMaps:
    """Pretrains a ViT with ``configs`` (unless ``pretrained`` is given or ``pretrain`` is off),
    fine-tunes that checkpoint once per mode on ``split`` for ``epochs``, then draws the last
    block's CLS attention of every model over the same test images:
    ``attention_<name>.png`` (also in TensorBoard as ``attention/last_block``) and ``vit_<name>.md``
    with test accuracy, F1, trainable parameters and train time, in ``<output.root>/attention/``
    beside the runs, or in ``output.results`` when it is set.

    Args:
        configs: configs of the ViT run (``vit_mnist``: a small-input ViT-Tiny from scratch;
            ``[vit_full]`` with ``pretrain: false`` for timm's ImageNet-pretrained weights).
        name: the name of this study's runs and files.
        pretrain: train the config's own phases first; off when the backbone is pretrained already.
        pretrained: a snapshot to fine-tune instead of pretraining.
        split: the fine-tuning split.
        epochs: fine-tuning epochs (whole epochs: the config's ``limit_train_batches`` is lifted).
        modes: mode name -> ``model.finetune`` settings.
        images: test images to draw.
        data: where the dataset is.
        output: where runs and files go, threads, smoke mode.
    """

    def __init__(self, configs: list[str] = ["vit_mnist"], name: str = "vit_mnist", pretrain: bool = True,
                 pretrained: str | None = None, split: str = "merged", epochs: int = 1,
                 modes: dict[str, dict] = {"full": {"mode": "full"},
                                           "lora": {"mode": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.0,
                                                    "target_modules": ["qkv", "fc1"], "extra_trainable": ["LayerNorm"]}},
                 images: int = 6, data: Data = Data(), output: Output = Output(threads=2)) -> None:
        if epochs < 1 or images < 1:
            raise ValueError(f"epochs={epochs} and images={images} must both be integers >= 1.")
        self.configs, self.name, self.pretrain, self.pretrained = configs, name, pretrain, pretrained
        self.split, self.epochs, self.modes, self.images = split, epochs, modes, images
        self.data, self.output = data, output

    def run(self) -> dict[str, dict]:
        start = time.perf_counter()
        rows, snapshots = {}, {}
        init = Path(self.pretrained) if self.pretrained else None
        if init is None and self.pretrain:
            run_dir = fit(self.configs, f"{self.name}/pretrain", self.data, self.output, "attention").run_dir
            rows["pretrained"] = _row(run_dir)
            init = final_phase(run_dir)[2]
        phases = [{"name": self.split, "split": self.split, "epochs": self.epochs}]
        for mode, finetune in self.modes.items():
            overrides = {"model.finetune": finetune, "schedule.phases": phases}
            if not self.output.quick:
                overrides["trainer.limit_train_batches"] = None
            if init:
                overrides["model.init_from"] = str(init)
            run_dir = fit(self.configs, f"{self.name}/{mode}", self.data, self.output, "attention", overrides).run_dir
            rows[mode], snapshots[mode] = _row(run_dir), final_phase(run_dir)[2]
        if init is not None:
            snapshots = {"pretrained": init} | snapshots
        self.draw(snapshots)
        self.write(rows, time.perf_counter() - start)
        return rows

    def draw(self, snapshots: dict[str, Path]) -> None:
        cli = build(self.configs, {"data.data_dir": self.data.data_dir, "data.download": self.data.download})
        cli.datamodule.setup()
        test = cli.datamodule.dataset("test")
        pick = torch.linspace(0, len(test) - 1, self.images).long().tolist()
        images, labels = test.__getitems__(pick)
        models = {mode: _plain_backbone(snapshot, cli.model.backbone) for mode, snapshot in snapshots.items()}
        maps = {mode: cls_attention(model, images) for mode, model in models.items()}
        with torch.no_grad():
            predictions = {mode: model(images).argmax(1) for mode, model in models.items()}
        fig = attention_figure(images, maps, labels, predictions)
        tables = self.output.tables("attention")
        tables.mkdir(parents=True, exist_ok=True)
        fig.savefig(tables / f"attention_{self.name}.png", dpi=110)
        with SummaryWriter(str(self.output.folder("attention") / self.name / "attention")) as writer:
            writer.add_figure("attention/last_block", fig)

    def write(self, rows: dict[str, dict], seconds: float) -> None:
        header = ["model", "test accuracy", "macro F1", "trainable params", "train time (s)"]
        display = [[name, f"{r['acc']:.2%}", f"{r['f1']:.4f}", f"{r['trainable_params']:,}", f"{r['train_seconds']:.0f}"]
                   for name, r in rows.items()]
        notes = (f"`music attention` with configs {self.configs}: fine-tuned on `{self.split}` for {self.epochs} epoch(s) "
                 f"per mode, modes {self.modes}. Machine: {machine(self.output.threads)}"
                 f"{'; quick (smoke) run' if self.output.quick else ''}. Total wall time {seconds:.0f} s.")
        print(write_table(self.output.tables("attention"), f"vit_{self.name}", f"ViT ({self.name}), as measured", notes, header,
                          display, [{"model": name, **r} for name, r in rows.items()]))


def _row(run_dir: Path) -> dict:
    name, metrics, _ = final_phase(run_dir)
    costs = json.loads((run_dir / "phase_costs.json").read_text())[name]
    return {"acc": metrics["acc"], "f1": metrics["f1"], **costs}


def _plain_backbone(snapshot: Path, like: torch.nn.Module) -> torch.nn.Module:
    """The snapshot's network with LoRA merged into plain weights, in a fresh copy of ``like``
    (the config's backbone, attention materialised)."""

    with warnings.catch_warnings():  # "random weights": they are replaced from the snapshot
        warnings.simplefilter("ignore")
        model = Classifier.load_from_checkpoint(snapshot, backbone=copy.deepcopy(like), weights_only=True)
    plain = copy.deepcopy(like)
    plain.load_state_dict(merged_state_dict(model.backbone))
    return plain.eval()
