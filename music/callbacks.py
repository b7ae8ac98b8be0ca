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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from music import dashboard
from music.checkpoint import write_atomically
from music.rundir import run_dir
from music.data import task_split_classes
from music.figures import accuracy_matrix_figure, confusion_matrix_figure

START = "start"  # the row of the evaluation before the first phase


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


class SequentialFineTuning(Callback):
    """Runs ``phases`` in order; after each it evaluates the test set and saves a snapshot.

    At every phase end it logs the test metrics (``test/acc``, ``test/f1_macro``, per class
    ``test_per_class/f1/class_<c>``, ...; see ``music.dashboard``) at that global step, so each
    quantity is one curve across the phases, writes them to ``phase_metrics.json`` and saves
    ``checkpoints/phase-<i>-<name>.ckpt`` in the run's log dir. The number of epochs of the run
    is the sum of the phases' epochs. When fitting starts it writes the run's settings to
    TensorBoard's HParams tab and the per-class charts to its Custom Scalars tab.

    Args:
        phases: the phases, in order.
        reset_optimizer: give each phase a fresh optimizer (Adam's moments from the previous
            task would otherwise steer the first steps of the next).
        evaluate_test: evaluate the test set at each phase end.
        evaluate_initial: also evaluate the test set when fitting starts (not on resume), as the
            row named ``start``: the model the run starts from (the random initialisation, or
            the pretrained model a fine-tuning run is given with ``init_from``), the reference
            row 0 of the accuracy matrix. It restores the RNG afterwards, so training is the
            same with or without.
        log_figures: draw the confusion-matrix and accuracy-matrix figures for the loggers.
            Each costs 0.2-0.5 s of matplotlib, about a third of a short fine-tuning cell: grids of
            many cells turn them off and draw their figures once, from all cells, in the report.

    With ``evaluate_test``, the rows evaluated so far also go to ``accuracy_matrix.csv`` (test
    accuracy per class and per fine-tuning task, row by row) and ``continual_metrics.json``
    (``music.continual``: average accuracy, forgetting, BWT, collapse share), and the metrics
    to TensorBoard under ``continual/``. A phase is a fine-tuning task when it trains on a
    held-out split (``class_<c>`` or ``merged``).
    """

    def __init__(self, phases: list[Phase], reset_optimizer: bool = True, evaluate_test: bool = True,
                 evaluate_initial: bool = True, log_figures: bool = True) -> None:
        self.phases = [p if isinstance(p, Phase) else Phase(**p) for p in phases]
        _check_phases(self.phases)
        self.reset_optimizer = reset_optimizer
        self.evaluate_test = evaluate_test
        self.ends = list(accumulate(p.epochs for p in self.phases))  # epoch after each phase
        self.epoch = 0  # the epoch running or about to run
        self.evaluate_initial = evaluate_initial
        self.log_figures = log_figures
        if evaluate_initial and START in (p.name for p in self.phases):
            raise ValueError(f"Phase name {START!r} is reserved for the evaluation before the first phase "
                             "(evaluate_initial=true): rename the phase.")
        self.rows: dict[str, list] = {}  # evaluated row name -> test confusion matrix, in order
        self.evaluations: dict[str, dict] = {}  # evaluated row name -> step, epoch, headline metrics
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
        if trainer.logger is not None and trainer.is_global_zero:
            dashboard.log_layout(trainer.logger)
            dashboard.log_hparams(trainer.logger, self.settings(trainer, pl_module))
        if self.epoch == 0:  # a resumed run gets its learning rate back with the optimizer
            self._set_lr(trainer, pl_module)
            if self.evaluate_test and self.evaluate_initial:
                rng = torch.get_rng_state()  # the test loader draws a seed; training must not notice
                self._evaluate(trainer, pl_module, None, Phase(START, "test", 1))
                torch.set_rng_state(rng)
        self._phase_start = time.perf_counter()
        rank_zero_info(f"Phase {self.phase_index(self.epoch)} '{self.phase.name}' (split {self.phase.split}) "
                       f"from epoch {self.epoch}.")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({"train/phase": self.phase_index(self.epoch)}, step=logged_step(trainer, pl_module))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.logger is not None and trainer.is_global_zero:
            dashboard.log_hparams(trainer.logger, {}, start=False)

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
        return {"epoch": self.epoch, "phases": [asdict(p) for p in self.phases], "rng": rng, "rows": self.rows,
                "evaluations": self.evaluations}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = [Phase(**p) for p in state_dict["phases"]]
        if saved[: self.phase_index(state_dict["epoch"]) + 1] != self.phases[: self.phase_index(state_dict["epoch"]) + 1]:
            raise ValueError(
                f"The checkpoint was made with phases {saved}, which differ from the configured {self.phases} "
                "in the phases already run; resume with the configuration the run started with."
            )
        self.epoch = state_dict["epoch"]
        self.rows = dict(state_dict.get("rows", {}))
        self.evaluations = dict(state_dict.get("evaluations", {}))
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

    def settings(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, str | float | bool]:
        """The run's settings for the HParams tab, named as in the config: ``seed``,
        ``schedule.*`` (phases in order, their splits, epochs and learning rates), ``model.*``
        (with ``model.backbone``, the network's class) and ``data.*``."""
        seed = os.environ.get("PL_GLOBAL_SEED")  # set by seed_everything (the CLI's seed_everything)
        settings: dict[str, str | float | bool] = {"seed": int(seed) if seed is not None else "none"}
        settings |= {"schedule.phases": " → ".join(p.name for p in self.phases),
                     "schedule.splits": " → ".join(p.split for p in self.phases),
                     "schedule.epochs": ", ".join(str(p.epochs) for p in self.phases),
                     "schedule.lr": ", ".join("model.lr" if p.lr is None else str(p.lr) for p in self.phases),
                     "schedule.reset_optimizer": self.reset_optimizer}
        settings |= dashboard.flat_settings("model", pl_module.hparams)
        if isinstance(getattr(pl_module, "backbone", None), torch.nn.Module):
            settings["model.backbone"] = type(pl_module.backbone).__name__
        settings |= dashboard.flat_settings("data", getattr(trainer.datamodule, "hparams", {}))
        return settings

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, index: int | None, phase: Phase) -> None:
        loader = trainer.datamodule.dataloader("test", distributed=trainer.world_size > 1)
        seconds = time.perf_counter() - self._phase_start
        metrics, confusion = pl_module.evaluate(loader)
        step, epoch = logged_step(trainer, pl_module), logged_epoch(trainer, pl_module, index is None)
        rank_zero_info(f"Phase '{phase.name}' test: acc {metrics['acc']:.4f}, loss {metrics['loss']:.4f}")
        logger = trainer.logger if trainer.is_global_zero else None
        if logger is not None:
            logger.log_metrics(dashboard.metric_scalars("test", metrics), step=step)
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
        self.evaluations[phase.name] = {"split": phase.split if index is not None else "–", "step": step,
                                        "epoch": epoch, "acc": metrics["acc"], "f1_macro": metrics["f1"],
                                        "loss": metrics["loss"]}
        self._continual(trainer, step, last=index == len(self.phases) - 1)

    def _continual(self, trainer: Trainer, step: int, last: bool = False) -> None:
        """Accuracy matrix and continual-learning metrics over the rows evaluated so far."""
        from music.continual import accuracy_on, per_class_accuracy, summarise, to_json

        held_out = getattr(trainer.datamodule, "held_out_classes", [])
        by_name = {p.name: p for p in self.phases}

        def task(name: str) -> list[int] | None:
            split = by_name[name].split if name in by_name else None
            if split == "merged":
                return list(held_out)
            if split and task_split_classes(split) is not None:
                return task_split_classes(split)
            return [int(split.removeprefix("class_"))] if split and split.startswith("class_") else None

        names = list(self.rows)
        tasks = [task(n) for n in names]
        first_task = next((i for i, t in enumerate(tasks) if t), None)
        reference = first_task - 1 if first_task else None
        confusions = [self.rows[n] for n in names]
        summary = to_json(summarise(confusions, tasks, reference) | {"row_names": names,
                                                                      "reference_row": reference})
        task_columns = [(f"task_{n}", t) for n, t in zip(names, tasks) if t]
        header = ["row", "phase", *(f"acc_{c}" for c in range(len(confusions[0]))),
                  *(name for name, _ in task_columns), "acc"]
        table = [[i, n, *per_class_accuracy(conf).tolist(), *(accuracy_on(conf, t) for _, t in task_columns),
                  accuracy_on(conf, range(len(conf)))] for i, (n, conf) in enumerate(zip(names, confusions))]
        if trainer.logger is not None and trainer.is_global_zero:
            self._log_tables(trainer.logger, step, names, table, summary, last)
        _write_continual(run_dir(trainer), header, table, summary)

    def _log_tables(self, logger, step: int, names: list[str], table: list[list], summary: dict, last: bool) -> None:
        """Continual metrics at ``step``; the evaluations so far and the accuracy matrix as
        Markdown tables (Text tab); the accuracy matrix as a heat map after the last phase."""
        logger.log_metrics(dashboard.continual_scalars(summary), step=step)
        num_classes = len(self.rows[names[0]])
        evaluations = [[i, n, e["split"], e["step"], e["epoch"], e["acc"], e["f1_macro"], e["loss"]]
                       for i, (n, e) in enumerate((n, self.evaluations[n]) for n in names)]
        dashboard.log_text(logger, "test/evaluations", dashboard.markdown_table(
            ["row", "after", "split", "step", "epoch", "test acc", "F1 macro", "loss"], evaluations), step)
        matrix = [row[2 : 2 + num_classes] for row in table]
        dashboard.log_text(logger, "test/accuracy_matrix", dashboard.markdown_table(
            ["after", *(f"class {c}" for c in range(num_classes))], [[n, *r] for n, r in zip(names, matrix)]), step)
        if last and self.log_figures:
            title = f"{dashboard.run_name(logger)}\ntest accuracy per class after each evaluation"
            dashboard.log_figure(logger, "test/accuracy_matrix", accuracy_matrix_figure(names, matrix, title), step)

    def _snapshot(self, trainer: Trainer, index: int, phase: Phase) -> None:
        # on every rank: save_checkpoint holds a barrier; rank zero writes, atomically (AtomicCheckpointIO)
        trainer.save_checkpoint(os.path.join(run_dir(trainer), "checkpoints", f"phase-{index}-{phase.name}.ckpt"),
                                weights_only=False)


def logged_step(trainer: Trainer, pl_module: LightningModule) -> int:
    """The x-axis value for now: the global step, continued from the model the run started
    from (``step_offset``: ``Classifier(init_from=...)`` reads it from a Lightning checkpoint)."""
    return trainer.global_step + getattr(pl_module, "step_offset", 0)


def logged_epoch(trainer: Trainer, pl_module: LightningModule, starting: bool = False) -> int:
    """Epochs trained so far, continued like ``logged_step``: at a phase end, the epoch just
    finished counts."""
    return trainer.current_epoch + (0 if starting else 1) + getattr(pl_module, "epoch_offset", 0)


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
    tasks = [(p, task_split_classes(p.split)) for p in phases]
    tasks = [(p, classes) for p, classes in tasks if classes is not None]
    for i, (p, classes) in enumerate(tasks):
        for q, other in tasks[i + 1:]:
            shared = sorted(set(classes) & set(other))
            if shared and sorted(classes) != sorted(other):
                raise ValueError(f"Phases {p.name!r} (classes {classes}) and {q.name!r} (classes {other}) overlap in "
                                 f"classes {shared}: the tasks of a sequence must not share classes.")
