"""The phase schedule: several training phases chained inside one ``trainer.fit``.

One ``fit`` (not one per phase) keeps epoch counting, logging, resume and DDP in Lightning's
hands. The phase is a function of the epoch, and the epoch about to run is kept in this
callback's state, which Lightning restores before it builds the first training loader, so
``fit --ckpt_path last`` continues in the right phase with the right split.

A phase may end before its ``epochs`` (``EarlyStopping``): the epochs it trained are kept in
the state too, and the phases after it move up, so a resumed run stops and continues where the
uninterrupted one did.

Other parts of a run hear of the phases through ``PhaseListener``'s two hooks, called on the
LightningModule first and then on every callback that has them: the model passes them to its
continual-learning methods, ``music.evaluation.PhaseEvaluation`` evaluates and writes files.
"""

from __future__ import annotations

import os
import re
import math
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Literal, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from music.dashboard import logged_step
from music.data import task_split_classes
from music.rundir import run_dir
from music.speed import set_max_epochs


@dataclass
class Phase:
    """One stage of the study: train ``epochs`` epochs on the training split ``split``.

    ``lr`` overrides the model's learning rate for this phase. ``classes`` (e.g. ``[2, 3]``)
    makes the phase a task of several classes, the split ``classes_2_3`` of the data module,
    instead of naming a split.
    """

    name: str
    split: str | None = None
    epochs: int | None = None
    lr: float | None = None
    classes: list[int] | None = None

    def __post_init__(self) -> None:
        if self.classes is not None:
            if not self.classes:
                raise ValueError(f"Phase {self.name!r} has classes=[]: a task needs at least one class.")
            named = "classes_" + "_".join(str(c) for c in self.classes)
            if self.split not in (None, named):
                raise ValueError(f"Phase {self.name!r} names both split={self.split!r} and classes={self.classes}: "
                                 "give one of them.")
            self.split = named
        if self.split is None:
            raise ValueError(f"Phase {self.name!r} names neither a split nor classes: give one of them.")


@dataclass
class EarlyStopping:
    """Ends a phase before its ``epochs`` once ``monitor`` has not improved for ``patience``
    epochs of that phase: ``epochs`` becomes a maximum. Lightning's own ``EarlyStopping``
    would end the whole fit; this ends one phase, and the next starts.

    Args:
        monitor: the metric compared after every epoch (``val/loss``, ``val/acc``, ...: what the
            model logs; ``val/*`` needs ``data.val_size`` > 0).
        mode: ``min`` (a loss) or ``max`` (an accuracy).
        patience: epochs without improvement after which the phase ends.
        min_delta: what counts as an improvement: a change of more than this.
        restore_best: when a phase ends (early or not), put back the weights of its best epoch,
            which the checkpoint then holds too (a copy of the model's weights) so a resumed run
            can restore them. The optimizer keeps its state.
    """

    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 3
    min_delta: float = 0.0
    restore_best: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"early_stopping.mode={self.mode!r} is not allowed: choose min or max.")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"early_stopping.patience={self.patience} is not allowed: it must be an integer >= 1.")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"early_stopping.min_delta={self.min_delta} is not allowed: it must be a number >= 0.")

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


@runtime_checkable
class PhaseListener(Protocol):
    """Hooks the schedule calls, on the LightningModule first, then on the callbacks in order.

    ``on_phase_start``: phase ``index`` (``schedule.phases[index]``) is about to train, on its
    split, with its learning rate and (if ``reset_optimizer``) a fresh optimizer; also when a
    resumed fit starts inside it (``schedule.epoch`` > its first epoch), so a listener restores
    what it derives from the phase. ``on_phase_end``: its last epoch has trained; called before
    the next phase starts and before the phase's snapshot is saved."""

    def on_phase_start(self, trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning,
                       index: int) -> None: ...

    def on_phase_end(self, trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning,
                     index: int) -> None: ...


@runtime_checkable
class TakesPhaseTasks(Protocol):
    """A model that scores each sample among its task's classes (``scenario: task``) and can
    take the tasks from the phases."""

    def set_phase_tasks(self, tasks: list[list[int]]) -> None: ...


class SequentialFineTuning(Callback):
    """Runs ``phases`` in order and saves ``checkpoints/phase-<i>-<name>.ckpt`` in the run's
    directory after each. It owns what a phase changes: the data module's training split, the
    learning rate, a fresh optimizer, and the number of epochs of the fit (the sum of the
    phases'); it keeps torch's RNG state in checkpoints, so a resumed run draws as an
    uninterrupted one.

    Args:
        phases: the phases, in order.
        reset_optimizer: give each phase a fresh optimizer (Adam's moments from the previous
            task would otherwise steer the first steps of the next).
        early_stopping: end every phase early when its validation metric stops improving
            (``EarlyStopping``); null: every phase trains all its epochs.
        online: an online, task-free stream, as online continual learning is evaluated: every
            training sample is seen once (one epoch a phase, ``data.iterations_per_epoch``
            null), and nothing tells the learner where one task ends and the next begins: the
            optimizer and learning rate run on across phases, continual-learning methods that
            act at task boundaries are refused (those that learn from the stream alone, DER++
            and ER-ACE, run), and active outputs are off. The phases still mark where the
            evaluation (``PhaseEvaluation``) scores the model.
    """

    def __init__(self, phases: list[Phase], reset_optimizer: bool = True,
                 early_stopping: EarlyStopping | None = None, online: bool = False) -> None:
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in phases]
        _check_phases(self.phases)
        if online:
            _check_online(self.phases, early_stopping)
        self.reset_optimizer = reset_optimizer and not online
        self.early_stopping = early_stopping
        self.online = online
        self.stopped: dict[int, int] = {}  # phase index -> epochs it trained, for phases ended early
        self.ends = _ends(self.phases, self.stopped)  # epoch after each phase
        self.epoch = 0  # the epoch running or about to run
        self._set_lr_on_resume = False  # set by load_state_dict: the restored optimizer gets the phase's lr
        self._reset_tracking()

    def phase_index(self, epoch: int) -> int:
        return next((i for i, end in enumerate(self.ends) if epoch < end), len(self.phases) - 1)

    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index(self.epoch)]

    def trained_epochs(self, index: int) -> int:
        """The epochs phase ``index`` trains: its ``epochs``, or fewer if it ended early."""
        return self.stopped.get(index, self.phases[index].epochs)

    # -- Lightning hooks ----------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "check_split"):
            raise ValueError("SequentialFineTuning needs a data module with named splits (MusicDataModule).")
        if stage == "fit":
            for phase in self.phases:
                datamodule.check_split(phase.split)
            iterations = getattr(datamodule, "iterations_per_epoch", None)
            if self.online and iterations is not None:
                raise ValueError(f"data.iterations_per_epoch={iterations} is not allowed with schedule.online: true: "
                                 "an online stream shows every sample once; set it to null.")
            if self.early_stopping is not None and self.early_stopping.monitor.startswith("val/") \
                    and "val" not in datamodule.split_names:
                raise ValueError(f"schedule.early_stopping.monitor={self.early_stopping.monitor!r} needs a validation "
                                 "split: set data.val_size > 0 (or monitor a train/ metric).")
            if trainer.max_epochs not in (None, -1, 1000, self.ends[-1]):  # 1000/-1: Lightning's "not set"
                rank_zero_warn(f"trainer.max_epochs={trainer.max_epochs} is ignored: the phases define the run "
                               f"({self.ends[-1]} epochs in all). Set `epochs` per phase, or shorten epochs with "
                               "trainer.limit_train_batches.")
            set_max_epochs(trainer, self.ends[-1])
            trainer.reload_dataloaders_every_n_epochs = 1  # the split may change at any epoch
        if isinstance(pl_module, TakesPhaseTasks):
            pl_module.set_phase_tasks([datamodule.task_classes(p.split) for p in self.phases])

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        set_max_epochs(trainer, self.ends[-1])  # a resumed run: the phases ended early are restored by now
        trainer.datamodule.train_split = self.phase.split
        if self.epoch == 0:  # a resumed run gets its learning rate back with the optimizer
            self._set_lr(trainer, pl_module)
        index = self.phase_index(self.epoch)
        self._tell(trainer, pl_module, "on_phase_start", index)
        rank_zero_info(f"Phase {index} '{self.phase.name}' (split {self.phase.split}) from epoch {self.epoch}.")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning has restored the optimizer of a resumed run (it does so after on_fit_start)
        if self._set_lr_on_resume:
            self._set_lr(trainer, pl_module)
            self._set_lr_on_resume = False

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"train/phase": self.phase_index(self.epoch)}, step=logged_step(trainer, pl_module))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.epoch = trainer.current_epoch + 1
        if self.early_stopping is not None:
            self._track(trainer, pl_module)
        if self.epoch not in self.ends:
            return
        index = self.ends.index(self.epoch)
        if self.early_stopping is not None and self.early_stopping.restore_best and self._best_state is not None:
            pl_module.load_state_dict(self._best_state)
            rank_zero_info(f"Phase '{self.phases[index].name}': the weights of its best epoch "
                           f"({self._best_epoch + 1}, {self.early_stopping.monitor} {self._best:.4f}) restored.")
        self._tell(trainer, pl_module, "on_phase_end", index)
        self._reset_tracking()
        if index + 1 < len(self.phases):
            # Switch before the snapshot, so a run resumed from it starts the next phase as an
            # uninterrupted one does: new split, fresh optimizer, the phase's learning rate.
            trainer.datamodule.train_split = self.phase.split
            if self.reset_optimizer:
                trainer.strategy.setup_optimizers(trainer)
            self._set_lr(trainer, pl_module)
            self._tell(trainer, pl_module, "on_phase_start", index + 1)
        # on every rank: save_checkpoint holds a barrier; rank zero writes, atomically (AtomicCheckpointIO)
        trainer.save_checkpoint(os.path.join(run_dir(trainer), "checkpoints",
                                             f"phase-{index}-{self.phases[index].name}.ckpt"), weights_only=False)

    def state_dict(self) -> dict:
        # Checkpoints hold no RNG state; keeping torch's here makes a resumed run shuffle as
        # the uninterrupted one would (torch is the only generator the framework draws from).
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"epoch": self.epoch, "phases": [asdict(p) for p in self.phases], "rng": rng,
                 "stopped": dict(self.stopped)}
        if self.early_stopping is not None:
            state["early_stopping"] = {"best": self._best, "best_epoch": self._best_epoch, "wait": self._wait,
                                       "best_state": self._best_state}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [Phase(**p) for p in state_dict["phases"]]
        epoch = state_dict["epoch"]
        stopped = {int(i): int(n) for i, n in state_dict.get("stopped", {}).items()}
        finished = sum(end <= epoch for end in _ends(saved, stopped))  # phases fully trained
        if saved[:finished] != self.phases[:finished]:
            raise ValueError(
                f"The checkpoint was made with phases {saved}, which differ from the configured {self.phases} "
                f"in the {finished} phase(s) already finished; resume with those as the run started with "
                "(the phases not yet finished may change)."
            )
        if finished < len(self.phases) and epoch >= self.ends[finished]:
            raise ValueError(
                f"The checkpoint has trained {epoch} epochs, {epoch - (self.ends[finished - 1] if finished else 0)} "
                f"of phase {self.phases[finished].name!r}, which is configured with epochs="
                f"{self.phases[finished].epochs}: give it more epochs than it has already trained."
            )
        self.stopped = {i: n for i, n in stopped.items() if i < finished}
        self.ends = _ends(self.phases, self.stopped)
        self.epoch = epoch
        tracking = state_dict.get("early_stopping")
        if tracking is not None and self.early_stopping is not None:  # the phase under way keeps its best so far
            self._best, self._best_epoch, self._wait = tracking["best"], tracking["best_epoch"], tracking["wait"]
            self._best_state = tracking["best_state"]
        # The optimizer comes back with the learning rate it had; the running phase's is set
        # again when no epoch of it has finished or its settings changed (a failed phase resumed
        # with a lower lr), as an uninterrupted run sets it when the phase starts.
        index = self.phase_index(epoch)
        self._set_lr_on_resume = epoch == (self.ends[index - 1] if index else 0) or (
            index >= len(saved) or saved[index] != self.phases[index])
        rng = state_dict.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- helpers -----------------------------------------------------------------------------

    def _reset_tracking(self) -> None:
        """Early stopping starts afresh with every phase: the best value, its epoch, the epochs
        since, and (``restore_best``) its weights."""
        self._best: float | None = None
        self._best_epoch = -1
        self._wait = 0
        self._best_state: dict | None = None

    def _track(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After an epoch: compare the monitored metric with the phase's best, and end the phase
        (its end and those of the phases after it move up) after ``patience`` epochs without
        improvement."""
        rule = self.early_stopping
        value = trainer.callback_metrics.get(rule.monitor)
        if value is None:
            known = ", ".join(sorted(trainer.callback_metrics)) or "none"
            raise ValueError(f"schedule.early_stopping.monitor={rule.monitor!r} is not a metric of this run "
                             f"(logged: {known}).")
        value = float(value)
        if rule.improved(value, self._best):
            self._best, self._best_epoch, self._wait = value, trainer.current_epoch, 0
            if rule.restore_best:
                self._best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            return
        self._wait += 1
        index = self.phase_index(trainer.current_epoch)
        if self._wait < rule.patience or self.epoch == self.ends[index]:
            return
        start = self.ends[index - 1] if index else 0
        self.stopped[index] = self.epoch - start
        self.ends = _ends(self.phases, self.stopped)
        set_max_epochs(trainer, self.ends[-1])
        rank_zero_info(f"Phase '{self.phases[index].name}' ends early after {self.stopped[index]} of its "
                       f"{self.phases[index].epochs} epochs: {rule.monitor} has not improved on {self._best:.4f} "
                       f"(epoch {self._best_epoch + 1}) for {rule.patience} epochs.")

    def _tell(self, trainer: Trainer, pl_module: LightningModule, hook: str, index: int) -> None:
        for listener in [pl_module, *trainer.callbacks]:
            if isinstance(listener, PhaseListener):
                getattr(listener, hook)(trainer, pl_module, self, index)

    def _set_lr(self, trainer: Trainer, pl_module: LightningModule) -> None:
        lr = self.phase.lr if self.phase.lr is not None else pl_module.lr
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr


def _ends(phases: list[Phase], stopped: dict[int, int]) -> list[int]:
    """The epoch after each phase, the phases ended early counted with the epochs they trained."""
    return list(accumulate(stopped.get(i, p.epochs) for i, p in enumerate(phases)))


def _check_online(phases: list[Phase], early_stopping: EarlyStopping | None) -> None:
    """An online stream passes once over each phase's data, with nothing changed at its end."""
    for p in phases:
        if p.epochs != 1:
            raise ValueError(f"Phase {p.name!r} has epochs={p.epochs}, which schedule.online: true does not allow: "
                             "an online stream shows every sample once (epochs: 1).")
        if p.lr is not None:
            raise ValueError(f"Phase {p.name!r} sets lr={p.lr}, which schedule.online: true does not allow: a change "
                             "of learning rate would tell the learner where a task starts.")
    if early_stopping is not None:
        raise ValueError("schedule.early_stopping is not allowed with schedule.online: true: a phase of one pass has "
                         "no epochs to stop early.")


def _check_phases(phases: list[Phase]) -> None:
    if not phases:
        raise ValueError("phases is empty: give at least one phase (name, split, epochs).")
    names = [p.name for p in phases]
    for p in phases:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", p.name):
            raise ValueError(f"Phase name {p.name!r} is not allowed: use letters, digits, '_', '.', '-'.")
        if names.count(p.name) > 1:
            raise ValueError(f"Phase name {p.name!r} is used twice: phase names must be unique {names}.")
        if not isinstance(p.epochs, int) or p.epochs < 1:
            raise ValueError(f"Phase {p.name!r} has epochs={p.epochs}: it must be an integer >= 1.")
        if p.lr is not None and not p.lr > 0:
            raise ValueError(f"Phase {p.name!r} has lr={p.lr}: a learning rate must be > 0.")
    tasks = [(p, task_split_classes(p.split)) for p in phases]
    tasks = [(p, classes) for p, classes in tasks if classes is not None]
    for i, (p, classes) in enumerate(tasks):
        for q, other in tasks[i + 1:]:
            shared = sorted(set(classes) & set(other))
            if shared and sorted(classes) != sorted(other):
                raise ValueError(f"Phases {p.name!r} (classes {classes}) and {q.name!r} (classes {other}) overlap in "
                                 f"classes {shared}: the tasks of a sequence must not share classes.")
