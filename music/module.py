"""The LightningModule: any backbone, cross-entropy, and the study's evaluation metrics."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
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

from music.data import Block
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


# The hooks Lightning calls between a training loss and the optimizer step it leads to.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def steps_are_plain(trainer: Trainer, module: LightningModule) -> bool:
    """Whether ``manual_backward`` and ``LightningOptimizer.step`` would do nothing but
    ``loss.backward()`` and ``optimizer.step()`` plus calls of hooks nobody overrides: one device
    (no gradient sync), 32-bit precision (no loss scaling or casting), no profiler timing the
    step, and neither the module nor any callback overriding ``STEP_HOOKS`` (or ``backward``)."""
    return (type(trainer.strategy) is SingleDeviceStrategy
            and type(trainer.precision_plugin) is Precision
            and isinstance(trainer.profiler, PassThroughProfiler)
            and not is_overridden("backward", module)
            and not any(is_overridden(hook, listener) for hook in STEP_HOOKS for listener in [module, *trainer.callbacks]))


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
        init_from: weights (``.ckpt``, ``.pt`` or ``.safetensors``) that initialise the network
            before any stage (fit, validate, test, predict), so fine-tuning runs start from one
            shared pretrained model and an edited model is evaluated like any other. Read with
            ``weights_only=True``; a model loaded from a checkpoint never reads it again.
        finetune: which parameters to train (``full``, ``lora``, ``head-only``; see
            ``music.finetuning.FineTune``). Applied in ``configure_model``, i.e. after
            ``init_from`` has loaded the pretrained weights and before a checkpoint is restored.
        batches_per_block: batches per loop step, as the data module hands them over
            (``MusicDataModule.batches_per_block``; the CLI links the two). Above 1, each
            block is trained batch by batch through Lightning's manual optimization -- one
            ``optimizer.step`` per batch, so ``global_step`` still counts batches -- which
            rules out the Trainer's ``gradient_clip_val``, ``accumulate_grad_batches`` and
            learning-rate schedulers. Backward and step are the plain PyTorch calls when
            ``steps_are_plain`` (``direct_steps``), else Lightning's, with every hook.
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
        self._weights_loaded = False
        self.finetune = finetune
        self._finetune_applied = False
        self.num_classes = num_classes
        self.automatic_optimization = batches_per_block == 1
        self._no_cuda = False  # set when fitting starts
        self.val_metrics = classification_metrics(num_classes)
        self.test_metrics = classification_metrics(num_classes)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self._losses: list[Tensor] = []
        self._first_step: int | None = None
        self.direct_steps = False  # set when training starts: see ``steps_are_plain``

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def setup(self, stage: str) -> None:
        # Every stage (fit, validate, test, predict) starts from ``init_from``; a checkpoint
        # given as ``ckpt_path`` is restored after this and wins, and a model loaded from a
        # checkpoint (``on_load_checkpoint``) already has its weights and skips the file.
        if self.init_from and not self._weights_loaded:
            from music.checkpoint import load_state_dict  # weights_only / safetensors, never pickle code

            self.backbone.load_state_dict(load_state_dict(self.init_from))
            self._weights_loaded = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._weights_loaded = True

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
        self._losses: list[Tensor] = []  # one tensor of per-batch losses per loop step
        self._correct: list[Tensor] = []
        self._sizes: list[int] = []
        self._first_step = self.global_step

    def training_step(self, batch: tuple[Tensor, Tensor] | Block, batch_idx: int) -> Tensor | None:
        if self.automatic_optimization:
            if isinstance(batch, Block):
                raise ValueError(f"Got a block of {batch.num_batches} batches but the model has batches_per_block=1: "
                                 "give the model the data module's batches_per_block (the CLI links them).")
            return self._train_on([batch])
        # A block (DDP serves single batches): one optimizer step per batch, as automatic
        # optimization would take them (forward, zero_grad, backward, step).
        with _cheap_cuda_check(self._no_cuda):
            self._train_on(batch.batches() if isinstance(batch, Block) else [batch], self._stepper())
        return None

    def _train_on(self, batches: Iterable[tuple[Tensor, Tensor]], step: Callable[[Tensor], None] | None = None) -> Tensor:
        """Forward and loss of each batch, each followed by ``step(loss)`` if given. No host sync
        and no logging call per batch: results are kept on the device, summed at epoch end."""
        first_step = self.global_step  # the step at which the first batch's loss is computed
        losses, logits, labels = [], [], []
        for x, y in batches:
            out = self(x)
            loss = F.cross_entropy(out, y)
            if step is not None:
                step(loss)
            losses.append(loss.detach())
            logits.append(out.detach())
            labels.append(y)
        self._losses.append(torch.stack(losses))
        self._correct.append((torch.cat(logits).argmax(1) == torch.cat(labels)).sum())
        self._sizes += [len(y) for y in labels]
        every = self.trainer.log_every_n_steps
        if every and self.logger is not None:
            for i in range(-first_step % every, len(losses), every):  # batches at multiples of `every`
                self.logger.log_metrics({"train/loss_step": losses[i].item()}, step=first_step + i)
        return loss

    def _stepper(self) -> Callable[[Tensor], None]:
        """zero_grad, backward and step for one batch of a block. Lightning's ``manual_backward``
        and ``LightningOptimizer.step`` wrap the plain calls in hook calls, ~10% of a SimpleNN
        step on a CPU; when ``direct_steps`` says nobody listens, take the plain calls and only
        count the step as Lightning's own ``step`` does (so ``global_step`` is the same)."""
        optimizer = self.optimizers()
        if not self.direct_steps:
            def step(loss: Tensor) -> None:
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            return step
        plain = optimizer.optimizer

        def direct_step(loss: Tensor) -> None:
            plain.zero_grad()
            loss.backward()
            optimizer._on_before_step()  # Lightning's step counting, as LightningOptimizer.step calls it
            plain.step()
            optimizer._on_after_step()
        return direct_step

    def on_train_start(self) -> None:
        self.direct_steps = steps_are_plain(self.trainer, self)

    def on_fit_start(self) -> None:
        self._no_cuda = self.device.type != "cuda" and not torch.cuda.is_available()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        with _cheap_cuda_check(self._no_cuda):
            super().optimizer_step(*args, **kwargs)

    def _epoch_sums(self) -> Tensor:
        """Loss sum, correct count and sample count of this epoch on this rank."""
        if not self._losses:
            return torch.zeros(3, device=self.device)
        sizes = torch.tensor(self._sizes, device=self.device, dtype=torch.float)
        losses = torch.cat(self._losses).float()
        return torch.stack([(losses * sizes).sum(), torch.stack(self._correct).sum().float(), sizes.sum()])

    def check_finite(self) -> None:
        """Stop training if a loss this epoch was NaN or infinite, naming the first such step.

        Called before anything is saved at the end of an epoch, so checkpoints already
        written (the earlier phases' snapshots, ``last.ckpt`` of the previous epoch) stay good."""
        if self._first_step is None:  # no epoch started
            return
        losses = torch.cat(self._losses) if self._losses else torch.zeros(0, device=self.device)
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
        self.log_epoch({"train/loss": sums[0] / sums[2], "train/acc": sums[1] / sums[2]}, prog_bar=True)

    def log_epoch(self, values: dict[str, Tensor], **kwargs: Any) -> None:
        """``log_dict`` at ``global_step`` on TensorBoard's x-axis. Lightning's default counts
        loop steps, which are blocks when ``batches_per_block`` > 1, while ``train/loss_step``
        and the phases' test metrics are logged at optimizer steps: one axis for all of them."""
        self.log_dict(values, **kwargs)
        self.log_dict({"step": float(self.global_step), "epoch": float(self.current_epoch)})

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
        self.log_epoch(self._compute("val", self.val_metrics, self.val_loss))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_confusion.update(self._update(batch, self.test_metrics, self.test_loss), batch[1])

    def on_test_epoch_end(self) -> None:
        self.log_epoch(self._compute("test", self.test_metrics, self.test_loss))
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
        """A confusion-matrix figure for every logger that takes images (rank zero only)."""
        from music.plots import image_loggers, log_figure, pyplot  # matplotlib only when a figure is drawn

        if not image_loggers(self.loggers) or not self.trainer.is_global_zero:
            return

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(confusion, cmap="Blues")
        half = int(confusion.max()) / 2
        for i, row in enumerate(confusion.tolist()):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color="white" if count > half else "black")
        ax.set(xlabel="predicted", ylabel="true", xticks=range(self.num_classes), yticks=range(self.num_classes))
        fig.tight_layout()
        log_figure(self.loggers, tag, fig, self.global_step)
        plt.close(fig)

