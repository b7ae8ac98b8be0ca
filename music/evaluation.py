"""Phase evaluation: the test set after every phase of the schedule, and the files and
TensorBoard views made of it.

A listener of ``music.callbacks.SequentialFineTuning`` (``on_phase_start``/``on_phase_end``):
it evaluates the model the run starts from (the row ``start``) and the model after every phase,
logs the test metrics at that step (``test/acc``, ``test/f1_macro``, per class
``test_per_class/f1/class_<c>``, ...; see ``music.dashboard``), so each quantity is one curve
across the phases, and on the phase axis (``by_phase/...``, at the evaluation's row), and
writes ``phase_metrics.json``, ``phase_costs.json``, ``accuracy_matrix.csv`` and
``continual_metrics.json`` in the run's directory; with ``evaluate_val``, the validation split
too, after every phase, into ``val_metrics.json`` (what hyperparameters are chosen on, so the
test set is never looked at to choose them). When fitting
starts it writes the run's settings to TensorBoard's HParams tab and the per-class charts to
its Custom Scalars tab.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import replace

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from music import dashboard
from music.callbacks import Phase, SequentialFineTuning
from music.checkpoint import write_atomically
from music.continual import accuracy_on, per_class_accuracy, summarise, to_json
from music.data import split_classes, split_domain
from music.figures import accuracy_matrix_figure, confusion_matrix_figure, phase_figure
from music.rundir import run_dir

START = "start"  # the row of the evaluation before the first phase


class PhaseEvaluation(Callback):
    """Evaluates the test set at the end of every phase (and, with ``evaluate_initial``, when
    fitting starts) and records it.

    Args:
        evaluate_test: evaluate the test set at each phase end.
        evaluate_initial: also evaluate the test set when fitting starts (not on resume), as the
            row named ``start``: the model the run starts from (the random initialisation, or
            the pretrained model a fine-tuning run is given with ``init_from``), the reference
            row 0 of the accuracy matrix. It restores the RNG afterwards, so training is the
            same with or without.
        log_figures: draw the confusion-matrix and accuracy-matrix figures for the loggers.
            Each costs 0.2-0.5 s of matplotlib, about a third of a short fine-tuning cell: grids of
            many cells turn them off and draw their figures once, from all cells, in the report.
        evaluate_val: also evaluate the validation split (``data.val_size`` > 0) at each phase
            end: ``val_metrics.json`` (the phase's validation metrics and confusion matrix) and
            ``val_rows``, for choosing hyperparameters (``music tune``) without the test set;
            with domains or a label map also each task's accuracy on its own validation samples
            (``val_task_accuracy``, as ``task_accuracy`` for the test set).

    With ``evaluate_test``, the rows evaluated so far also go to ``accuracy_matrix.csv`` (test
    accuracy per class and per fine-tuning task, row by row) and ``continual_metrics.json``
    (``music.continual``: average accuracy, forgetting, BWT, collapse share), and the metrics
    to TensorBoard under ``continual/``. A phase is a fine-tuning task when its split is defined
    by its classes (``class_<c>``, ``merged``, ``classes_<a>_<b>...``) or on a domain
    (``train@rot_45``). When the data module has domains or a label map
    (``MusicDataModule.separate_task_tests``), every evaluation also scores the test set of each
    task of the schedule (``dataloader(split, test=True)``: its classes, under its domain), and
    the task columns and continual metrics come from those accuracies; ``acc`` and the per-class
    columns stay those of the plain test set.
    """

    def __init__(self, evaluate_test: bool = True, evaluate_initial: bool = True, log_figures: bool = True,
                 evaluate_val: bool = False) -> None:
        self.evaluate_test = evaluate_test
        self.evaluate_initial = evaluate_initial
        self.log_figures = log_figures
        self.evaluate_val = evaluate_val
        self.val_rows: dict[str, list] = {}  # phase name -> validation confusion matrix, in order
        self.rows: dict[str, list] = {}  # evaluated row name -> test confusion matrix, in order
        self.evaluations: dict[str, dict] = {}  # evaluated row name -> split, step, epoch, headline metrics
        self.task_accuracy: dict[str, dict[str, float]] = {}  # row name -> task split -> accuracy on its test set
        self.val_task_accuracy: dict[str, dict[str, float]] = {}  # the same on the validation split
        self._phase_start: float | None = None  # wall clock of the phase under way (since a resume, if resumed)
        self._started = False  # HParams and layout written in this fit

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._started = False  # a new fit writes its HParams and layout again
        if stage == "fit" and self.evaluate_val and "val" not in getattr(trainer.datamodule, "split_names", []):
            raise ValueError("evaluation.evaluate_val=true needs a validation split: set data.val_size > 0.")

    # -- the schedule's hooks ----------------------------------------------------------------

    def on_phase_start(self, trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning,
                       index: int) -> None:
        if not self._started:
            self._started = True
            if self.evaluate_initial and START in (p.name for p in schedule.phases):
                raise ValueError(f"Phase name {START!r} is reserved for the evaluation before the first phase "
                                 "(evaluation.evaluate_initial=true): rename the phase.")
            if trainer.logger is not None and trainer.is_global_zero:
                dashboard.log_layout(trainer.logger, pl_module.num_classes)
                dashboard.log_hparams(trainer.logger, settings(trainer, pl_module, schedule))
            if schedule.epoch == 0 and self.evaluate_test and self.evaluate_initial:
                rng = torch.get_rng_state()  # the test loader draws a seed; training must not notice
                self._evaluate(trainer, pl_module, schedule, None, Phase(START, "test", 1))
                torch.set_rng_state(rng)
        self._phase_start = None  # the clock starts with the phase's first epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._phase_start is None:
            self._phase_start = time.perf_counter()

    def on_phase_end(self, trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning,
                     index: int) -> None:
        phase = replace(schedule.phases[index], epochs=schedule.trained_epochs(index))  # fewer if it ended early
        if self.evaluate_test:
            self._evaluate(trainer, pl_module, schedule, index, phase)
        if self.evaluate_val:
            self._validate(trainer, pl_module, schedule, index, phase)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.logger is not None and trainer.is_global_zero:
            dashboard.log_hparams(trainer.logger, {}, start=False)

    def state_dict(self) -> dict:
        return {"rows": self.rows, "evaluations": self.evaluations, "task_accuracy": self.task_accuracy,
                "val_rows": self.val_rows, "val_task_accuracy": self.val_task_accuracy}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = dict(state_dict.get("rows", {}))
        self.evaluations = dict(state_dict.get("evaluations", {}))
        self.task_accuracy = dict(state_dict.get("task_accuracy", {}))
        self.val_rows = dict(state_dict.get("val_rows", {}))
        self.val_task_accuracy = dict(state_dict.get("val_task_accuracy", {}))

    # -- evaluation and its records ----------------------------------------------------------

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning,
                  index: int | None, phase: Phase) -> None:
        loader = trainer.datamodule.dataloader("test", distributed=trainer.world_size > 1)
        seconds = time.perf_counter() - (self._phase_start or time.perf_counter())
        metrics, confusion = pl_module.evaluate(loader)
        step = dashboard.logged_step(trainer, pl_module)
        epoch = dashboard.logged_epoch(trainer, pl_module, starting=index is None)
        rank_zero_info(f"Phase '{phase.name}' test: acc {metrics['acc']:.4f}, loss {metrics['loss']:.4f}")
        logger = trainer.logger if trainer.is_global_zero else None
        scalars = dashboard.metric_scalars("test", metrics)
        if logger is not None:
            logger.log_metrics(scalars, step=step)
        if logger is not None and self.log_figures:
            title = f"{dashboard.run_name(logger)}\n{_describe(phase.name)}, step {step} (acc {metrics['acc']:.3f})"
            dashboard.log_figure(logger, "test/confusion_matrix", confusion_matrix_figure(confusion.tolist(), title),
                                 step)
        if index is not None:
            _record(run_dir(trainer), index, phase, metrics | {"confusion_matrix": confusion.tolist()})
            # Wall time goes to its own file: phase_metrics.json stays bit-identical across resumes.
            trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
            _record(run_dir(trainer), index, phase, {"train_seconds": seconds, "trainable_params": trainable},
                    filename="phase_costs.json")
        self.rows[phase.name] = confusion.tolist()
        datamodule = trainer.datamodule
        if getattr(datamodule, "separate_task_tests", False):
            self.task_accuracy[phase.name] = _task_accuracies(trainer, pl_module, schedule, test=True)
        self.evaluations[phase.name] = {"split": phase.split if index is not None else "–", "step": step,
                                        "epoch": epoch, "acc": metrics["acc"], "f1_macro": metrics["f1"],
                                        "loss": metrics["loss"]}
        if logger is not None:  # the phase axis: x = the evaluation's row (0 = start)
            logger.log_metrics(dashboard.phase_scalars(scalars), step=list(self.rows).index(phase.name))
        self._continual(trainer, step, schedule, index)

    def _validate(self, trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning, index: int,
                  phase: Phase) -> None:
        """The validation split after a phase, into ``val_rows`` and ``val_metrics.json``; the
        RNG is put back afterwards (a loader draws a seed), so training is the same with or without."""
        rng = torch.get_rng_state()
        metrics, confusion = pl_module.evaluate(trainer.datamodule.dataloader("val", distributed=trainer.world_size > 1))
        if getattr(trainer.datamodule, "separate_task_tests", False):
            self.val_task_accuracy[phase.name] = _task_accuracies(trainer, pl_module, schedule, val=True)
        torch.set_rng_state(rng)
        rank_zero_info(f"Phase '{phase.name}' val: acc {metrics['acc']:.4f}, loss {metrics['loss']:.4f}")
        self.val_rows[phase.name] = confusion.tolist()
        _record(run_dir(trainer), index, phase, metrics | {"confusion_matrix": confusion.tolist()},
                filename="val_metrics.json")

    def _continual(self, trainer: Trainer, step: int, schedule: SequentialFineTuning, index: int | None) -> None:
        """Accuracy matrix and continual-learning metrics over the rows evaluated so far."""
        datamodule = trainer.datamodule
        held_out = datamodule.held_out_classes
        names = list(self.rows)
        confusions = [self.rows[n] for n in names]
        last = index == len(schedule.phases) - 1
        later = schedule.phases[0 if index is None else index + 1:]
        if getattr(datamodule, "separate_task_tests", False):
            splits = [self.evaluations[n]["split"] for n in names]
            tasks = [datamodule.task_classes(s) if _is_task(s, datamodule) else None for s in splits]
            task_splits = [s for s, t in zip(splits, tasks) if t]
            accuracies = [[self.task_accuracy.get(n, {}).get(s, math.nan) for s in task_splits] for n in names]
            later_classes = {c for p in later if _is_task(p.split, datamodule) for c in datamodule.task_classes(p.split)}
        else:
            tasks = [split_classes(self.evaluations[n]["split"], held_out) for n in names]
            accuracies = None
            later_classes = {c for p in later for c in split_classes(p.split, held_out) or []}
        summary = _summary(confusions, tasks, names, accuracies)
        earlier = (_summary(confusions[:-1], tasks[:-1], names[:-1],
                            None if accuracies is None else [row[:-1] if tasks[-1] else row for row in accuracies[:-1]])
                   if last and len(names) > 1 else None)
        task_names = [f"task_{n}" for n, t in zip(names, tasks) if t]
        header = ["row", "phase", *(f"acc_{c}" for c in range(len(confusions[0]))), *task_names, "acc"]
        if accuracies is None:
            task_values = [[accuracy_on(conf, t) for t in tasks if t] for conf in confusions]
        else:
            task_values = accuracies
        table = [[i, n, *per_class_accuracy(conf).tolist(), *values, accuracy_on(conf, range(len(conf)))]
                 for i, (n, conf, values) in enumerate(zip(names, confusions, task_values))]
        if trainer.logger is not None and trainer.is_global_zero:
            scalars = dashboard.continual_scalars(summary, earlier, sorted(later_classes), last)
            trainer.logger.log_metrics(scalars, step=step)
            trainer.logger.log_metrics(dashboard.phase_scalars(scalars), step=len(names) - 1)
            self._log_tables(trainer.logger, step, names, table, last)
        _write_continual(run_dir(trainer), header, table, summary)

    def _log_tables(self, logger, step: int, names: list[str], table: list[list], last: bool) -> None:
        """The evaluations so far and the accuracy matrix as Markdown tables (Text tab); the
        evaluations as a chart on the phase axis; the accuracy matrix as a heat map after the
        last phase."""
        num_classes = len(self.rows[names[0]])
        evaluations = [[i, n, e["split"], e["step"], e["epoch"], e["acc"], e["f1_macro"], e["loss"]]
                       for i, (n, e) in enumerate((n, self.evaluations[n]) for n in names)]
        row = len(names) - 1  # the phase axis: x = the evaluation's row
        dashboard.log_text(logger, f"{dashboard.PHASE_GROUP}/evaluations", dashboard.markdown_table(
            ["row", "after", "split", "step", "epoch", "test acc", "F1 macro", "loss"], evaluations), row)
        if self.log_figures:
            title = f"{dashboard.run_name(logger)}\ntest accuracy (%) after each evaluation"
            figure = phase_figure(names, [e[5] for e in evaluations], title)
            dashboard.log_figure(logger, f"{dashboard.PHASE_GROUP}/acc_chart", figure, row)
        matrix = [row[2 : 2 + num_classes] for row in table]
        dashboard.log_text(logger, "test/accuracy_matrix", dashboard.markdown_table(
            ["after", *(f"class {c}" for c in range(num_classes))], [[n, *r] for n, r in zip(names, matrix)]), step)
        if last and self.log_figures:
            title = f"{dashboard.run_name(logger)}\ntest accuracy per class after each evaluation"
            dashboard.log_figure(logger, "test/accuracy_matrix", accuracy_matrix_figure(names, matrix, title), step)


def settings(trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning) -> dict[str, str | float | bool]:
    """The run's settings for the HParams tab, named as in the config: ``seed``,
    ``schedule.*`` (phases in order, their splits, epochs and learning rates), ``model.*``
    (with ``model.backbone``, the network's class) and ``data.*``."""
    seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (the CLI's seed_everything)
    values: dict[str, str | float | bool] = {"seed": int(seed) if seed is not None else "none"}
    values |= {"schedule.phases": " → ".join(p.name for p in schedule.phases),
               "schedule.splits": " → ".join(p.split for p in schedule.phases),
               "schedule.epochs": ", ".join(str(p.epochs) for p in schedule.phases),
               "schedule.lr": ", ".join("model.lr" if p.lr is None else str(p.lr) for p in schedule.phases),
               "schedule.reset_optimizer": schedule.reset_optimizer, "schedule.online": schedule.online}
    values |= dashboard.flat_settings("model", pl_module.hparams)
    if isinstance(getattr(pl_module, "backbone", None), torch.nn.Module):
        values["model.backbone"] = type(pl_module.backbone).__name__
    values |= dashboard.flat_settings("data", getattr(trainer.datamodule, "hparams", {}))
    return values


def _summary(confusions: list, tasks: list, names: list[str], task_accuracy: list | None = None) -> dict:
    """``music.continual.summarise`` of these rows, the reference row being the one before the
    first fine-tuning task, NaN as ``None``; with ``task_accuracy`` (domain tasks), it also
    names the task columns."""
    first_task = next((i for i, t in enumerate(tasks) if t), None)
    reference = first_task - 1 if first_task else None
    summary = summarise(confusions, tasks, reference, task_accuracy) | {"row_names": names, "reference_row": reference}
    if task_accuracy is not None:
        summary["task_columns"] = [f"task_{n}" for n, t in zip(names, tasks) if t]
    return to_json(summary)


def _is_task(split: str, datamodule) -> bool:
    """A phase on this split is a fine-tuning task: a split defined by its classes, or any
    split on a domain."""
    return split_domain(split)[1] is not None or split_classes(split, datamodule.held_out_classes) is not None


def _task_accuracies(trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning,
                     **which: bool) -> dict[str, float]:
    """Each task of the schedule scored on its own test (``test=True``) or validation
    (``val=True``) samples: its classes, under its domain, labelled as in training."""
    datamodule = trainer.datamodule
    return {split: pl_module.evaluate(datamodule.dataloader(split, distributed=trainer.world_size > 1, **which))[0]["acc"]
            for split in dict.fromkeys(p.split for p in schedule.phases if _is_task(p.split, datamodule))}


def _describe(row: str) -> str:
    return "at the start" if row == START else f"after {row}"


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
    rows = io.StringIO(newline="")
    writer = csv.writer(rows)
    writer.writerow(header)
    writer.writerows([[f"{v:.6f}" if isinstance(v, float) else v for v in row] for row in table])
    write_atomically(os.path.join(log_dir, "accuracy_matrix.csv"), rows.getvalue())
    write_atomically(os.path.join(log_dir, "continual_metrics.json"), json.dumps(summary, indent=1))
