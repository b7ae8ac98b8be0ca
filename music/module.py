"""The LightningModule: any backbone, cross-entropy, and the study's evaluation metrics."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import OptimizerCallable
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

from music import speed
from music.checkpoint import load_state_dict
from music.data import task_split_classes
from music.dashboard import log_figure, logged_epoch, logged_step, metric_scalars, run_name
from music.figures import confusion_matrix_figure
from music.finetuning import FineTune, ParameterReport, apply_finetune
from music.models import SimpleNN
from music.plots import image_loggers
from music.speed import BlockSteps, runtime_cuda_check

SCENARIOS = ("class", "task")
# Adam's first step is lr / (1 - beta1), up to 1e4 x lr for betas in use; float32 overflows above 3.4e38.
MAX_LR = 1e34


@runtime_checkable
class Method(Protocol):
    """A continual-learning method as the model uses it (``music.methods`` implements it): a
    term added to every training batch's loss, told when each phase of the schedule starts,
    with a state that travels in the model's checkpoints. Unannotated, so that the config
    parser accepts any class with these methods (it compares annotations exactly)."""

    def loss(self, model, x, y, logits): ...  # -> Tensor | None, added to the batch's loss

    # Optional (``music.methods.Method`` has both; the model calls them where a method has them):
    # ``batch_logits(model, logits, y)`` -> the logits the batch's own cross-entropy scores;
    # ``on_before_optimizer_step(model)``, between backward and every optimizer step.

    def on_phase_start(self, trainer, model, schedule, index): ...

    def state_dict(self): ...

    def load_state_dict(self, state): ...


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
        lr: learning rate; phases of the schedule may override it.
        optimizer: optimizer class or callable taking ``(params, lr=...)``; Adam by default.
        init_from: weights (``.ckpt``, ``.pt`` or ``.safetensors``) that initialise the network
            before any stage (fit, validate, test, predict), so fine-tuning runs start from one
            shared pretrained model and an edited model is evaluated like any other. Read with
            ``weights_only=True``; a model loaded from a checkpoint never reads it again. When
            it is a Lightning checkpoint, the run's logged steps and epochs continue its counts
            (``step_offset``, ``epoch_offset``), so a fine-tuning run lines up after the run it
            starts from on TensorBoard's x-axis; Lightning's own counters start at 0.
        finetune: which parameters to train (``full``, ``lora``, ``head-only``; see
            ``music.finetuning.FineTune``). Applied in ``configure_model``, i.e. after
            ``init_from`` has loaded the pretrained weights and before a checkpoint is restored.
        batches_per_block: batches per loop step, as the data module hands them over
            (``MusicDataModule.batches_per_block``; the CLI links the two). Above 1, each block
            is trained batch by batch by ``music.speed.BlockSteps`` through manual optimization.
        log_every_n_steps: optimizer steps between points of ``train/loss_step``. The model logs
            it itself, at optimizer steps, because a Lightning loop step is a whole block; the
            shipped configs set the Trainer's own interval to 1 loop step.
        methods: continual-learning methods (``music.methods``: EWC, online EWC, SI, LwF,
            replay), each adding its term to every batch's loss and keeping its state across
            the tasks; a task is a run of phases on one training split. Empty: naive fine-tuning.
        scenario: ``class`` (class-incremental: one head over all classes) or ``task``
            (task-incremental: each sample's logits are masked to the classes of its task, in
            training, replay and evaluation alike, as if the task were known at test time).
        tasks: the class sets of the tasks, for ``scenario: task``; ``None``: one per phase of
            the schedule (a label belongs to the last task that trains it).
        pretrained_on: the training split ``init_from``'s weights were trained on: the methods
            take it as a finished task 0 (EWC's Fisher, replay's memory, LwF's teacher), so a
            fine-tuning run protects what pretraining learned. SI has no path integral of it.
        active_outputs: in the class scenario, train with only the outputs of the classes seen
            so far (the current and earlier phases' classes) in the softmax, as van de Ven's
            reference protocol for class-incremental Split-MNIST does; the others are masked
            out of every training loss and method estimate (evaluation scores all outputs).
            ``None`` (default): on exactly where that protocol applies, a run from scratch (no
            ``init_from``, no ``pretrained_on``) whose every phase is a task of named classes
            (``classes: [...]``, as Split-MNIST's); off for the 3 -> 4 -> 7 runs, whose head
            knows all classes from pretraining, and for an online stream (``schedule.online``),
            which tells no task boundaries. ``true`` needs ``scenario: class``.
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
        log_every_n_steps: int = 50,
        methods: list[Method] | None = None,
        scenario: Literal["class", "task"] = "class",
        tasks: list[list[int]] | None = None,
        pretrained_on: str | None = None,
        active_outputs: bool | None = None,
    ) -> None:
        super().__init__()
        if scenario not in SCENARIOS:
            raise ValueError(f"scenario={scenario!r} is not allowed: choose one of {list(SCENARIOS)}.")
        if not 0 < lr <= MAX_LR:  # False for nan too
            raise ValueError(f"lr={lr} is not allowed: the learning rate must be a finite number > 0 and <= {MAX_LR:g}.")
        if active_outputs and scenario != "class":
            raise ValueError(f"active_outputs={active_outputs} is not allowed with scenario={scenario!r}: "
                             "it applies to the class scenario only (the task scenario already masks to each task).")
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} is not allowed: a classifier needs >= 2 classes.")
        if log_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps={log_every_n_steps} is not allowed: it must be >= 0 (0: no step losses).")
        if batches_per_block < 1:
            raise ValueError(f"batches_per_block={batches_per_block} is not allowed: it must be an integer >= 1.")
        if isinstance(finetune, dict):  # as stored in a checkpoint's hyperparameters
            finetune = FineTune(**finetune)
        self.save_hyperparameters(ignore=["backbone", "finetune", "methods"])
        # a plain dict, so checkpoints stay loadable with weights_only=True
        self.hparams["finetune"] = asdict(finetune) if finetune is not None else None
        self.backbone = backbone if backbone is not None else SimpleNN(num_classes=num_classes)
        self.lr = lr
        self.optimizer = optimizer
        self.init_from = init_from
        self._weights_loaded = False
        self.step_offset = 0  # steps and epochs trained before init_from was saved: see logged_step
        self.epoch_offset = 0
        self.finetune = finetune
        self._finetune_applied = False
        self.num_classes = num_classes
        self.log_every_n_steps = log_every_n_steps
        self.automatic_optimization = batches_per_block == 1
        self.blocks = BlockSteps() if batches_per_block > 1 else None
        self._cuda_check = contextlib.ExitStack()  # music.speed.runtime_cuda_check while training
        self.val_metrics = classification_metrics(num_classes)
        self.test_metrics = classification_metrics(num_classes)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self._epoch_start_step: int | None = None  # global step when the running epoch started
        self._losses: list[Tensor] = []  # this epoch's per-batch losses, on the device until its end
        self._correct: list[Tensor] = []
        self._sizes: list[int] = []
        self.methods = list(methods or [])
        self.scenario = scenario
        self.tasks = tasks
        self.pretrained_on = pretrained_on
        self._phase_tasks: list[list[int]] | None = None  # the schedule's, when ``tasks`` is None
        self._allowed: Tensor | None = None  # task scenario: label -> the classes its logits keep
        self.active_outputs = active_outputs
        self._active: Tensor | None = None  # active outputs: the classes seen so far, set at each phase start

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def setup(self, stage: str) -> None:
        # Every stage (fit, validate, test, predict) starts from ``init_from``; a checkpoint
        # given as ``ckpt_path`` is restored after this and wins, and a model loaded from a
        # checkpoint (``on_load_checkpoint``) already has its weights and skips the file.
        if self.init_from and not self._weights_loaded:
            self.backbone.load_state_dict(load_state_dict(self.init_from))  # weights_only / safetensors
            self._weights_loaded = True
            self.step_offset, self.epoch_offset = training_progress(self.init_from)
        if self.scenario == "task" and self._allowed is None:
            self._allowed = self.task_masks()

    # -- the scenario ------------------------------------------------------------------------

    def set_phase_tasks(self, tasks: list[list[int]]) -> None:
        """The classes of each phase of the schedule: the tasks of ``scenario: task`` when
        ``tasks`` is not given (the schedule passes them before the model's ``setup``)."""
        self._phase_tasks = tasks
        self._allowed = None

    def task_masks(self) -> Tensor:
        """Row ``c``: the classes a sample labelled ``c`` may be predicted as (its task's)."""
        tasks = self.tasks if self.tasks is not None else self._phase_tasks
        if tasks is None:
            raise ValueError("scenario=task needs the tasks: give model.tasks or a schedule of phases.")
        allowed = torch.ones(self.num_classes, self.num_classes, dtype=torch.bool)
        for classes in tasks:
            bad = [c for c in classes if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"Task classes {bad} are outside the model's classes 0..{self.num_classes - 1}.")
            for c in classes:
                allowed[c] = False
                allowed[c, classes] = True
        return allowed.to(self.device)

    def scenario_logits(self, logits: Tensor, y: Tensor, active: bool = True) -> Tensor:
        """The logits as the scenario scores them: unchanged (class-incremental) or masked to
        each sample's task (task-incremental); in training (``active``) with active outputs,
        also masked to the classes seen so far."""
        if self.scenario == "class":
            if active and self._active is not None:
                return logits.masked_fill(~self._active.to(logits.device), float("-inf"))
            return logits
        if self._allowed is None:
            self._allowed = self.task_masks()
        allowed = self._allowed.to(logits.device)[y]
        return logits.masked_fill(~allowed, float("-inf"))

    def uses_active_outputs(self, schedule: Any) -> bool:
        """Whether training masks the outputs of classes not seen yet (see ``active_outputs``)."""
        if self.scenario != "class":
            return False
        if schedule.online:
            if self.active_outputs:
                raise ValueError("model.active_outputs=true is not allowed with schedule.online: true: the classes "
                                 "seen so far come from task boundaries, which an online stream does not give.")
            return False
        if self.active_outputs is not None:
            return self.active_outputs
        return (self.init_from is None and self.pretrained_on is None
                and all(task_split_classes(phase.split) is not None for phase in schedule.phases))

    def active_classes(self, datamodule: Any, schedule: Any, index: int) -> Tensor | None:
        """The outputs training phase ``index`` may use: the classes of it and the phases before
        (``None``: all)."""
        if not self.uses_active_outputs(schedule):
            return None
        active = torch.zeros(self.num_classes, dtype=torch.bool)
        for phase in schedule.phases[:index + 1]:
            active[datamodule.task_classes(phase.split)] = True
        return active.to(self.device)

    # -- the schedule's phases: the methods hear of them through the model that holds them ---

    def on_phase_start(self, trainer: Trainer, pl_module: LightningModule, schedule: Any, index: int) -> None:
        for method in self.methods:  # first: a finished task's estimates see the outputs it trained
            method.on_phase_start(trainer, self, schedule, index)
        self._active = self.active_classes(trainer.datamodule, schedule, index)

    def on_phase_end(self, trainer: Trainer, pl_module: LightningModule, schedule: Any, index: int) -> None:
        self.check_finite()  # the schedule tells the model first: nothing is evaluated or saved after a NaN

    # -- checkpoints -------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PROGRESS_OFFSET_KEY] = {"step": self.step_offset, "epoch": self.epoch_offset}
        if self.methods:
            checkpoint["methods"] = [method.state_dict() for method in self.methods]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._weights_loaded = True
        offset = checkpoint.get(PROGRESS_OFFSET_KEY, {})
        self.step_offset, self.epoch_offset = offset.get("step", 0), offset.get("epoch", 0)
        for method, state in zip(self.methods, checkpoint.get("methods", [])):
            method.load_state_dict(state)

    # -- training ----------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.finetune is None or self._finetune_applied:
            return
        self.backbone = apply_finetune(self.backbone, self.finetune)
        self._finetune_applied = True
        report = ParameterReport.of(self.backbone)
        rank_zero_info(f"Fine-tuning mode {self.finetune.mode!r}: {report.trainable:,} of {report.total:,} "
                       f"parameters trainable\n{report.table(trainable_only=True)}")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def on_train_start(self) -> None:
        if self.blocks is not None:
            self.blocks.start(self.trainer, self)
        self._cuda_check.enter_context(runtime_cuda_check(self.device))

    def on_train_end(self) -> None:
        self._cuda_check.close()  # (a crashed fit leaves it on: without CUDA both checks say no)

    def on_train_epoch_start(self) -> None:
        self._losses, self._correct, self._sizes = [], [], []
        self._epoch_start_step = self.global_step

    def objective(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        """The training loss of one batch: cross-entropy (of the logits as the methods reshape
        them, e.g. ER-ACE's) plus every method's term (penalty, distillation, a replayed batch's
        loss)."""
        scored = self.scenario_logits(logits, y)
        for method in self.methods:
            reshape = getattr(method, "batch_logits", None)
            if reshape is not None:
                scored = reshape(self, scored, y)
        loss = F.cross_entropy(scored, y)
        for method in self.methods:
            term = method.loss(self, x, y, logits)
            if term is not None:
                loss = loss + term
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The methods' hook between backward and step (A-GEM's projection), in automatic
        optimization and for every step of a block alike (``music.speed``)."""
        for method in self.methods:
            hook = getattr(method, "on_before_optimizer_step", None)
            if hook is not None:
                hook(self)

    def training_step(self, batch: tuple[Tensor, Tensor] | speed.Block, batch_idx: int) -> Tensor | None:
        if self.blocks is not None:
            self.blocks.train(self, batch)  # one optimizer step per batch of the block
            return None
        if isinstance(batch, speed.Block):
            raise ValueError(f"Got a block of {batch.num_batches} batches but the model has batches_per_block=1: "
                             "give the model the data module's batches_per_block (the CLI links them).")
        x, y = batch
        logits = self(x)
        loss = self.objective(logits, y, x)
        self.record_training(loss.detach().view(1), logits.detach(), y, self.global_step, [len(y)])
        return loss

    def record_training(self, losses: Tensor, logits: Tensor, labels: Tensor, first_step: int,
                        sizes: list[int]) -> None:
        """Keep the batches' losses and correct counts on the device, summed once at the end of
        the epoch (a host sync per batch would cost more than a SimpleNN step), and log
        ``train/loss_step`` at every ``log_every_n_steps``-th optimizer step."""
        self._losses.append(losses)
        self._correct.append((logits.argmax(1) == labels).sum())
        self._sizes += sizes
        every = self.log_every_n_steps
        if every and self.loggers:
            for i in range(-first_step % every, len(losses), every):  # batches at multiples of `every`
                step = first_step + i + self.step_offset
                for logger in self.loggers:
                    logger.log_metrics({"train/loss_step": losses[i].item()}, step=step)

    def check_finite(self) -> None:
        """Stop training if a loss this epoch was NaN or infinite, naming the first such step.

        Runs before anything is saved at the end of an epoch (``on_phase_end`` comes before the
        phase's snapshot, ``on_train_epoch_end`` before ``last.ckpt``), so checkpoints already
        written stay good."""
        if self._epoch_start_step is None:  # no epoch started
            return
        losses = torch.cat(self._losses) if self._losses else torch.zeros(0, device=self.device)
        bad = (~torch.isfinite(losses)).nonzero()  # every rank reduces below, even with no steps
        first = bad[0, 0] + self._epoch_start_step if len(bad) else torch.tensor(-1, device=self.device)
        step = int(self.trainer.strategy.reduce(first.float(), reduce_op="max"))
        if step >= 0:
            raise FloatingPointError(
                f"Non-finite training loss at global step {step} (epoch {self.current_epoch}); training stopped. "
                "Checkpoints written before this epoch are kept. Try a lower learning rate."
            )

    def on_train_epoch_end(self) -> None:
        self.check_finite()
        if self._losses:
            sizes = torch.tensor(self._sizes, device=self.device, dtype=torch.float)
            sums = torch.stack([(torch.cat(self._losses).float() * sizes).sum(),
                                torch.stack(self._correct).sum().float(), sizes.sum()])
        else:
            sums = torch.zeros(3, device=self.device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self.log_at_step({"train/loss": sums[0] / sums[2], "train/acc": sums[1] / sums[2]}, prog_bar=True)

    def log_at_step(self, values: dict[str, Tensor | float], **kwargs: Any) -> None:
        """``log_dict`` for the progress bar and callbacks, and the loggers at ``logged_step``:
        Lightning's x-axis counts loop steps (blocks, when ``batches_per_block`` > 1) from 0,
        while the phases' test metrics and ``train/loss_step`` are at optimizer steps continued
        from ``init_from``'s: one axis for all of them."""
        self.log_dict(values, logger=False, **kwargs)
        if not self.loggers:
            return
        scalars = {k: float(v) for k, v in values.items()}
        scalars["train/epoch"] = float(logged_epoch(self.trainer, self, starting=True))
        for logger in self.loggers:
            logger.log_metrics(scalars, step=logged_step(self.trainer, self))

    # -- evaluation: one step for validation, test and ``evaluate`` ----------------------------

    def _eval_step(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection, loss: MeanMetric) -> Tensor:
        x, y = batch
        logits = self.scenario_logits(self(x), y, active=False)
        loss.update(F.cross_entropy(logits, y), weight=len(y))
        metrics.update(logits, y)
        return logits

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self.log_at_step(metric_scalars("val", self._compute(self.val_metrics, self.val_loss)))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_confusion.update(self._eval_step(batch, self.test_metrics, self.test_loss), batch[1])

    def on_test_epoch_end(self) -> None:
        values = self._compute(self.test_metrics, self.test_loss)
        self.log_at_step(metric_scalars("test", values))
        self.log_confusion_matrix("test/confusion_matrix", self.test_confusion.compute(), f"acc {float(values['acc']):.3f}")
        self.test_confusion.reset()

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Predicted classes of a batch (labels, if the split has them, are ignored)."""
        return self(batch[0]).argmax(1)

    @staticmethod
    def _compute(metrics: MetricCollection, loss: MeanMetric) -> dict[str, Tensor]:
        """``evaluate``'s keys: ``acc``, ``loss``, ``f1`` (macro), ``f1/3`` (class 3), ..."""
        values = metrics.compute() | {"loss": loss.compute()}
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
            self.test_confusion.update(self._eval_step(batch, self.test_metrics, self.test_loss), batch[1])
        values = {k: float(v) for k, v in self._compute(self.test_metrics, self.test_loss).items()}
        confusion = self.test_confusion.compute().cpu()
        self.test_confusion.reset()
        self.train(was_training)
        return values, confusion

    def log_confusion_matrix(self, tag: str, confusion: Tensor, note: str = "") -> None:
        """A confusion-matrix figure (``music.figures``) for every logger that takes images, at
        ``logged_step``, titled with the run, the step and ``note`` (rank zero only)."""
        loggers = image_loggers(self.loggers)
        if not loggers or not self.trainer.is_global_zero:
            return
        step = logged_step(self.trainer, self)
        title = f"{run_name(self.logger)}\n{tag.split('/')[0]} set, step {step}" + (f" ({note})" if note else "")
        log_figure(loggers, tag, confusion_matrix_figure(confusion.tolist(), title), step)


# Where a checkpoint keeps the steps and epochs trained before its run's ``init_from`` was saved.
PROGRESS_OFFSET_KEY = "music_progress_offset"


def training_progress(path: str) -> tuple[int, int]:
    """Optimizer steps and epochs that produced the weights in ``path``: a Lightning
    checkpoint's ``global_step`` and finished epochs, plus the offset it had itself continued
    from; ``(0, 0)`` for files without counters (``.pt``, ``.safetensors``)."""
    if not str(path).endswith(".ckpt"):
        return 0, 0
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # counters, not weights
    except RuntimeError:  # a legacy (non-zip) torch file cannot be memory-mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "global_step" not in checkpoint:
        return 0, 0
    steps, epochs = speed.training_progress(checkpoint)
    offset = checkpoint.get(PROGRESS_OFFSET_KEY, {})
    return steps + offset.get("step", 0), epochs + offset.get("epoch", 0)
