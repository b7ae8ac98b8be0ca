"""Sequential fine-tuning: several training phases chained inside one ``trainer.fit``.

One ``fit`` (not one per phase) keeps epoch counting, logging, resume and DDP in Lightning's
hands. The phase is a function of the epoch, and the epoch about to run is kept in this
callback's state, which Lightning restores before it builds the first training loader, so
``fit --ckpt_path last`` continues in the right phase with the right split.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from itertools import accumulate

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from music.checkpoint import write_atomically


class RunDirectory(Callback):
    """Fixes the run directory: where MUSIC writes a run's own files (phase snapshots,
    ``phase_metrics.json``, accuracy matrix, split manifest) and, unless it has a ``dirpath``,
    where ``ModelCheckpoint`` saves.

    Without it the run directory follows the logger (``run_dir``). With it the logger only
    logs: any Lightning logger (TensorBoard, CSV, MLflow, W&B) can be used, and runs that log
    to one tracking server still write their files into folders of their own.
    """

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = os.path.join(self.path, "checkpoints")


def run_dir(trainer: Trainer) -> str:
    """The directory of the run's files: a ``RunDirectory`` callback's path if there is one,
    else where Lightning's ``ModelCheckpoint`` puts ``checkpoints/`` for this logger
    (``<save_dir>/<name>/<version>``, e.g. TensorBoard's ``version_N`` folder), else
    ``default_root_dir``. Unlike ``trainer.log_dir`` it is one folder per run for every logger."""
    fixed = next((c.path for c in trainer.callbacks if isinstance(c, RunDirectory)), None)
    if fixed is not None:
        return fixed
    logger = trainer.logger
    if logger is None:
        return trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


@dataclass
class Phase:
    """One stage of the study: train ``epochs`` epochs on the training split ``split``.

    ``lr`` overrides the model's learning rate for this phase.
    """

    name: str
    split: str
    epochs: int
    lr: float | None = None


class SequentialFineTuning(Callback):
    """Runs ``phases`` in order; after each it evaluates the test set and saves a snapshot.

    At every phase end it logs the test metrics under ``test/<phase>/...``, writes them to
    ``phase_metrics.json`` and saves ``checkpoints/phase-<i>-<name>.ckpt`` in the run's log
    dir. The number of epochs of the run is the sum of the phases' epochs.

    Args:
        phases: the phases, in order.
        reset_optimizer: give each phase a fresh optimizer (Adam's moments from the previous
            task would otherwise steer the first steps of the next).
        evaluate_test: evaluate the test set at each phase end.
        evaluate_initial: also evaluate the test set when fitting starts (not on resume): the
            reference row 0 of the accuracy matrix, e.g. the pretrained model a fine-tuning run
            starts from. It restores the RNG afterwards, so training is the same with or without.

    With ``evaluate_test``, the rows evaluated so far also go to ``accuracy_matrix.csv`` (test
    accuracy per class and per fine-tuning task, row by row) and ``continual_metrics.json``
    (``music.continual``: average accuracy, forgetting, BWT, collapse share), and the metrics
    to TensorBoard under ``continual/``. A phase is a fine-tuning task when it trains on a
    held-out split (``class_<c>`` or ``merged``).
    """

    def __init__(self, phases: list[Phase], reset_optimizer: bool = True, evaluate_test: bool = True,
                 evaluate_initial: bool = True) -> None:
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in phases]
        _check_phases(self.phases)
        self.reset_optimizer = reset_optimizer
        self.evaluate_test = evaluate_test
        self.ends = list(accumulate(p.epochs for p in self.phases))  # epoch after each phase
        self.epoch = 0  # the epoch running or about to run
        self.evaluate_initial = evaluate_initial
        if evaluate_initial and "initial" in (p.name for p in self.phases):
            raise ValueError("Phase name 'initial' is reserved for the evaluation before the first phase "
                             "(evaluate_initial=true): rename the phase.")
        self.rows: dict[str, list] = {}  # evaluated row name -> test confusion matrix, in order
        self._phase_start = time.perf_counter()  # wall time of a phase (since a resume, if resumed)

    def phase_index(self, epoch: int) -> int:
        return next((i for i, end in enumerate(self.ends) if epoch < end), len(self.phases) - 1)

    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index(self.epoch)]

    # -- Lightning hooks ----------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "check_split"):
            raise ValueError("SequentialFineTuning needs a data module with named splits (MusicDataModule).")
        for phase in self.phases:
            datamodule.check_split(phase.split)
        if trainer.fit_loop.max_epochs not in (None, -1, 1000, self.ends[-1]):  # 1000/-1: Lightning's "not set"
            rank_zero_warn(f"trainer.max_epochs={trainer.fit_loop.max_epochs} is ignored: the phases define the run "
                           f"({self.ends[-1]} epochs in all). Set `epochs` per phase, or shorten epochs with "
                           "trainer.limit_train_batches.")
        trainer.fit_loop.max_epochs = self.ends[-1]
        trainer.reload_dataloaders_every_n_epochs = 1  # the split may change at any epoch

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.datamodule.train_split = self.phase.split
        if self.epoch == 0:  # a resumed run gets its learning rate back with the optimizer
            self._set_lr(trainer, pl_module)
            if self.evaluate_test and self.evaluate_initial:
                rng = torch.get_rng_state()  # the test loader draws a seed; training must not notice
                self._evaluate(trainer, pl_module, None, Phase("initial", "test", 1))
                torch.set_rng_state(rng)
        self._phase_start = time.perf_counter()
        rank_zero_info(f"Phase {self.phase_index(self.epoch)} '{self.phase.name}' (split {self.phase.split}) "
                       f"from epoch {self.epoch}.")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"phase": self.phase_index(self.epoch)}, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if hasattr(pl_module, "check_finite"):
            pl_module.check_finite()  # before this hook evaluates or saves anything
        finished = trainer.current_epoch
        self.epoch = finished + 1
        if self.epoch not in self.ends:
            return
        index = self.ends.index(self.epoch)
        phase = self.phases[index]
        if self.evaluate_test:
            self._evaluate(trainer, pl_module, index, phase)
        if index + 1 < len(self.phases):
            # Switch before the snapshot, so a run resumed from it starts the next phase as an
            # uninterrupted one does: new split, fresh optimizer, the phase's learning rate.
            trainer.datamodule.train_split = self.phase.split
            if self.reset_optimizer:
                trainer.strategy.setup_optimizers(trainer)
            self._set_lr(trainer, pl_module)
        self._snapshot(trainer, index, phase)
        self._phase_start = time.perf_counter()  # the next phase's clock leaves out evaluation and saving

    def state_dict(self) -> dict:
        # Checkpoints hold no RNG state; keeping torch's here makes a resumed run shuffle as
        # the uninterrupted one would (torch is the only generator the framework draws from).
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"epoch": self.epoch, "phases": [asdict(p) for p in self.phases], "rng": rng, "rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [Phase(**p) for p in state_dict["phases"]]
        if saved[: self.phase_index(state_dict["epoch"]) + 1] != self.phases[: self.phase_index(state_dict["epoch"]) + 1]:
            raise ValueError(
                f"The checkpoint was made with phases {saved}, which differ from the configured {self.phases} "
                "in the phases already run; resume with the configuration the run started with."
            )
        self.epoch = state_dict["epoch"]
        self.rows = dict(state_dict.get("rows", {}))
        rng = state_dict.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- helpers -----------------------------------------------------------------------------

    def _set_lr(self, trainer: Trainer, pl_module: LightningModule) -> None:
        lr = self.phase.lr if self.phase.lr is not None else pl_module.lr
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, index: int | None, phase: Phase) -> None:
        loader = trainer.datamodule.dataloader("test", distributed=trainer.world_size > 1)
        seconds = time.perf_counter() - self._phase_start
        metrics, confusion = pl_module.evaluate(loader)
        rank_zero_info(f"Phase '{phase.name}' test: acc {metrics['acc']:.4f}, loss {metrics['loss']:.4f}")
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({f"test/{phase.name}/{k}": v for k, v in metrics.items()},
                                       step=trainer.global_step)
        pl_module.log_confusion_matrix(f"test/{phase.name}/confusion_matrix", confusion)
        if index is not None:
            _record(run_dir(trainer), index, phase, metrics | {"confusion_matrix": confusion.tolist()})
            # Wall time goes to its own file: phase_metrics.json stays bit-identical across resumes.
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            _record(run_dir(trainer), index, phase, {"train_seconds": seconds, "trainable_params": trainable},
                    filename="phase_costs.json")
        self.rows[phase.name] = confusion.tolist()
        self._continual(trainer)

    def _continual(self, trainer: Trainer) -> None:
        """Accuracy matrix and continual-learning metrics over the rows evaluated so far."""
        from music.continual import accuracy_on, per_class_accuracy, summarise, to_json

        held_out = getattr(trainer.datamodule, "held_out_classes", [])
        by_name = {p.name: p for p in self.phases}

        def task(name: str) -> list[int] | None:
            split = by_name[name].split if name in by_name else None
            if split == "merged":
                return list(held_out)
            return [int(split.removeprefix("class_"))] if split and split.startswith("class_") else None

        names = list(self.rows)
        tasks = [task(n) for n in names]
        first_task = next((i for i, t in enumerate(tasks) if t), None)
        reference = first_task - 1 if first_task else None
        confusions = [self.rows[n] for n in names]
        summary = to_json(summarise(confusions, tasks, reference) | {"row_names": names,
                                                                      "reference_row": reference})
        if trainer.logger is not None and trainer.is_global_zero:
            scalars = {f"continual/{k}": v for k, v in summary.items() if isinstance(v, float)}
            scalars |= {f"continual/forgetting/{c}": v for c, v in summary["forgetting_per_class"].items()
                        if v is not None}
            trainer.logger.log_metrics(scalars, step=trainer.global_step)
        task_columns = [(f"task_{n}", t) for n, t in zip(names, tasks) if t]
        header = ["row", "phase", *(f"acc_{c}" for c in range(len(confusions[0]))),
                  *(name for name, _ in task_columns), "acc"]
        table = [[i, n, *per_class_accuracy(conf).tolist(), *(accuracy_on(conf, t) for _, t in task_columns),
                  accuracy_on(conf, range(len(conf)))] for i, (n, conf) in enumerate(zip(names, confusions))]
        _write_continual(run_dir(trainer), header, table, summary)

    def _snapshot(self, trainer: Trainer, index: int, phase: Phase) -> None:
        # on every rank: save_checkpoint holds a barrier; rank zero writes, atomically (AtomicCheckpointIO)
        trainer.save_checkpoint(os.path.join(run_dir(trainer), "checkpoints", f"phase-{index}-{phase.name}.ckpt"),
                                weights_only=False)


@rank_zero_only
def _record(log_dir: str, index: int, phase: Phase, metrics: dict, filename: str = "phase_metrics.json") -> None:
    """Merge one phase's test metrics into ``phase_metrics.json``; idempotent, so a phase
    re-run after a crash overwrites its own entry instead of adding a second one."""
    path = os.path.join(log_dir, filename)
    records = {}
    if os.path.exists(path):
        with open(path) as f:
            records = json.load(f)
    records[phase.name] = {"index": index, "split": phase.split, "epochs": phase.epochs, "lr": phase.lr, **metrics}
    write_atomically(path, json.dumps(records, indent=1))


@rank_zero_only
def _write_continual(log_dir: str, header: list, table: list[list], summary: dict) -> None:
    import csv
    import io

    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(header)
    writer.writerows([[f"{v:.6f}" if isinstance(v, float) else v for v in row] for row in table])
    write_atomically(os.path.join(log_dir, "accuracy_matrix.csv"), rows.getvalue())
    write_atomically(os.path.join(log_dir, "continual_metrics.json"), json.dumps(summary, indent=1))


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
