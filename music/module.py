"""The LightningModule: any backbone, cross-entropy, and the study's evaluation metrics."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.wrappers import ClasswiseWrapper

from music.finetuning import FineTune
from music.models import SimpleNN


@contextlib.contextmanager
def _cheap_cuda_check(enabled: bool) -> Iterator[None]:
    """On a machine without CUDA, ask the CUDA runtime (not NVML) whether CUDA is available.

    Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (so that asking does not start
    CUDA before a fork); then every ``Adam.step`` -- which asks, for CUDA-graph checks -- loads
    NVML anew: ~0.2 ms a step on a machine without a GPU, over 10% of a SimpleNN step. The
    runtime's answer costs microseconds, and with no GPU there is nothing to protect."""
    if not enabled or os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        yield
        return
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    try:
        yield
    finally:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy plus precision/recall/F1, macro and per class (keys like ``f1/3``).

    Compute groups are off: with ``ClasswiseWrapper`` members, torchmetrics 1.x warns
    "compute called before update" after every ``reset`` (the values stay right), and
    sharing states saves nothing measurable on a 10-class problem."""
    labels = [str(c) for c in range(num_classes)]
    metrics: dict[str, Any] = {"acc": MulticlassAccuracy(num_classes, average="micro")}
    for name, metric in (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score)):
        metrics[name] = metric(num_classes, average="macro")
        metrics[f"{name}_per_class"] = ClasswiseWrapper(metric(num_classes, average=None), labels, prefix=f"{name}/")
    return MetricCollection(metrics, compute_groups=False)


class Classifier(LightningModule):
    """Trains and evaluates a backbone on a classification split.

    Args:
        backbone: the network (a plain ``nn.Module``); ``None`` builds ``SimpleNN``.
        num_classes: size of the label space (linked from the data module by the CLI).
        lr: learning rate; phases of ``SequentialFineTuning`` may override it.
        optimizer: optimizer class or callable taking ``(params, lr=...)``; Adam by default.
        init_from: checkpoint whose weights initialise the model when fitting starts, so
            fine-tuning runs start from one shared pretrained model. It is read with
            ``weights_only=True`` and only when fitting, so a later
            ``load_from_checkpoint`` never needs the file.
        finetune: which parameters to train (``full``, ``lora``, ``head-only``; see
            ``music.finetuning.FineTune``). Applied in ``configure_model``, i.e. after
            ``init_from`` has loaded the pretrained weights and before a checkpoint is restored.
        batches_per_block: batches per loop step, as the data module hands them over
            (``MusicDataModule.batches_per_block``; the CLI links the two). Above 1, each
            block is trained batch by batch through Lightning's manual optimization -- one
            ``optimizer.step`` per batch, so ``global_step`` still counts batches -- which
            rules out the Trainer's ``gradient_clip_val``, ``accumulate_grad_batches`` and
            learning-rate schedulers.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_classes: int = 10,
        lr: float = 1e-3,
        optimizer: OptimizerCallable = torch.optim.Adam,
        init_from: str | None = None,
        finetune: FineTune | None = None,
        batches_per_block: int = 1,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr={lr} is not allowed: the learning rate must be > 0.")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} is not allowed: a classifier needs >= 2 classes.")
        if batches_per_block < 1:
            raise ValueError(f"batches_per_block={batches_per_block} is not allowed: it must be an integer >= 1.")
        if isinstance(finetune, dict):  # as stored in a checkpoint's hyperparameters
            finetune = FineTune(**finetune)
        self.save_hyperparameters(ignore=["backbone", "finetune"])
        # a plain dict, so checkpoints stay loadable with weights_only=True
        self.hparams["finetune"] = asdict(finetune) if finetune is not None else None
        self.backbone = backbone if backbone is not None else SimpleNN(num_classes=num_classes)
        self.lr = lr
        self.optimizer = optimizer
        self.init_from = init_from
        self.finetune = finetune
        self._finetune_applied = False
        self.num_classes = num_classes
        self.automatic_optimization = batches_per_block == 1
        self._no_cuda = False  # set when fitting starts
        self.val_metrics = classification_metrics(num_classes)
        self.test_metrics = classification_metrics(num_classes)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self._step_losses: list[Tensor] = []
        self._first_step: int | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.init_from:
            from music.task_vector import load_state_dict  # weights_only / safetensors, never pickle code

            self.backbone.load_state_dict(load_state_dict(self.init_from))

    def configure_model(self) -> None:
        if self.finetune is None or self._finetune_applied:
            return
        from music.finetuning import ParameterReport, apply_finetune

        self.backbone = apply_finetune(self.backbone, self.finetune)
        self._finetune_applied = True
        report = ParameterReport.of(self.backbone)
        rank_zero_info(f"Fine-tuning mode {self.finetune.mode!r}: {report.trainable:,} of {report.total:,} "
                       f"parameters trainable\n{report.table(trainable_only=True)}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets ``_current_fx_name`` around every hook call, ~40 times a training
        # step; nn.Module.__setattr__ (which looks for parameters, buffers and submodules)
        # made that ~0.1 ms a step. It is a plain attribute, so set it directly.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- training: per-step results stay on the device, summed once per epoch -----------------

    def on_train_epoch_start(self) -> None:
        self._step_losses: list[Tensor] = []
        self._step_correct: list[Tensor] = []
        self._step_sizes: list[int] = []
        self._first_step = self.global_step

    def training_step(self, batch: tuple[Tensor, Tensor] | list[tuple[Tensor, Tensor]], batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            if isinstance(batch, list):
                raise ValueError(f"Got a block of {len(batch)} batches but the model has batches_per_block=1: "
                                 "give the model the data module's batches_per_block (the CLI links them).")
            return self._train_batch(*batch)
        # A block: one optimizer step per batch, through Lightning's hooks, as automatic
        # optimization would take them (forward, zero_grad, backward, step).
        optimizer = self.optimizers()
        with _cheap_cuda_check(self._no_cuda):
            for x, y in batch if isinstance(batch, list) else [batch]:  # DDP serves single batches
                loss = self._train_batch(x, y)
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
        return None

    def _train_batch(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        # No host sync and no per-step logging call: keep the step's results, sum at epoch end.
        self._step_losses.append(loss.detach())
        self._step_correct.append((logits.detach().argmax(1) == y).sum())
        self._step_sizes.append(len(y))
        every = self.trainer.log_every_n_steps
        if every and self.global_step % every == 0 and self.logger is not None:
            self.logger.log_metrics({"train/loss_step": loss.item()}, step=self.global_step)
        return loss

    def on_fit_start(self) -> None:
        self._no_cuda = self.device.type != "cuda" and not torch.cuda.is_available()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        with _cheap_cuda_check(self._no_cuda):
            super().optimizer_step(*args, **kwargs)

    def _epoch_sums(self) -> Tensor:
        """Loss sum, correct count and sample count of this epoch on this rank."""
        if not self._step_losses:
            return torch.zeros(3, device=self.device)
        sizes = torch.tensor(self._step_sizes, device=self.device, dtype=torch.float)
        losses = torch.stack(self._step_losses).float()
        return torch.stack([(losses * sizes).sum(), torch.stack(self._step_correct).sum().float(), sizes.sum()])

    def check_finite(self) -> None:
        """Stop training if a loss this epoch was NaN or infinite, naming the first such step.

        Called before anything is saved at the end of an epoch, so checkpoints already
        written (the earlier phases' snapshots, ``last.ckpt`` of the previous epoch) stay good."""
        if self._first_step is None:  # no epoch started
            return
        losses = torch.stack(self._step_losses) if self._step_losses else torch.zeros(0, device=self.device)
        bad = (~torch.isfinite(losses)).nonzero()  # every rank reduces below, even with no steps
        first = bad[0, 0] + self._first_step if len(bad) else torch.tensor(-1, device=self.device)
        step = int(self.trainer.strategy.reduce(first.float(), reduce_op="max"))
        if step >= 0:
            raise FloatingPointError(
                f"Non-finite training loss at global step {step} (epoch {self.current_epoch}); training stopped. "
                "Checkpoints written before this epoch are kept. Try a lower learning rate."
            )

    def on_train_epoch_end(self) -> None:
        self.check_finite()
        sums = self.trainer.strategy.reduce(self._epoch_sums(), reduce_op="sum")
        self.log_dict({"train/loss": sums[0] / sums[2], "train/acc": sums[1] / sums[2]}, prog_bar=True)

    # -- evaluation ----------------------------------------------------------------------------

    def _update(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection, loss: MeanMetric) -> Tensor:
        x, y = batch
        logits = self(x)
        loss.update(F.cross_entropy(logits, y), weight=len(y))
        metrics.update(logits, y)
        return logits

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._update(batch, self.val_metrics, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self._compute("val", self.val_metrics, self.val_loss))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_confusion.update(self._update(batch, self.test_metrics, self.test_loss), batch[1])

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._compute("test", self.test_metrics, self.test_loss))
        self.log_confusion_matrix("test/confusion_matrix", self.test_confusion.compute())
        self.test_confusion.reset()

    @staticmethod
    def _compute(prefix: str, metrics: MetricCollection, loss: MeanMetric) -> dict[str, Tensor]:
        values = {f"{prefix}/{k}": v for k, v in metrics.compute().items()} | {f"{prefix}/loss": loss.compute()}
        metrics.reset()
        loss.reset()
        return values

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> tuple[dict[str, float], Tensor]:
        """Metrics and confusion matrix on ``loader``, usable inside ``fit`` (where
        ``trainer.test`` cannot be nested). Under DDP, give each rank a shard: ``compute``
        gathers the counts from all ranks."""
        was_training = self.training
        self.eval()
        for x, y in loader:
            batch = (x.to(self.device), y.to(self.device))
            self.test_confusion.update(self._update(batch, self.test_metrics, self.test_loss), batch[1])
        values = {k.removeprefix("test/"): float(v) for k, v in self._compute("test", self.test_metrics, self.test_loss).items()}
        confusion = self.test_confusion.compute().cpu()
        self.test_confusion.reset()
        self.train(was_training)
        return values, confusion

    def log_confusion_matrix(self, tag: str, confusion: Tensor) -> None:
        """A confusion-matrix figure in TensorBoard's Images tab (rank zero only)."""
        if not isinstance(self.logger, TensorBoardLogger) or not self.trainer.is_global_zero:
            return
        from music.plots import pyplot  # matplotlib only when a figure is drawn

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(confusion, cmap="Blues")
        half = int(confusion.max()) / 2
        for i, row in enumerate(confusion.tolist()):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if count > half else "black")
        ax.set(xlabel="predicted", ylabel="true", xticks=range(self.num_classes), yticks=range(self.num_classes))
        fig.tight_layout()
        self.logger.experiment.add_figure(tag, fig, global_step=self.global_step)
        plt.close(fig)

