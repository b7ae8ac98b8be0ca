"""The study grid as data: its settings (``Grid``), its cells (``plan``) and what makes a cell's
result what it is (``fingerprint``). Running the grid (``study``) and reporting on it
(``study_report``) both start from here, so neither needs the other.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser

from music.config import config_path
from music.experiments import instantiate, study_db
from music.merging import MergeMethod


@dataclass
class Cell:
    """One run of the grid. ``kind`` is pretrain, joint, seq, merged, method, task or merge;
    ``config`` the shipped config it is built on, ``method`` the method config added to it
    (a ``merge`` cell: its merge config). A ``merge`` cell's ``phases`` are the tasks it absorbs,
    in its ``ordering`` (None: all at once)."""

    seed: int
    kind: str
    name: str
    config: str
    phases: list[dict]
    lr: float
    ordering: list[int] | list[str] | None = None
    method: str | None = None

    @property
    def needs_pretrained(self) -> bool:
        return self.kind in ("seq", "merged", "method", "task", "merge")

    @property
    def label(self) -> str:
        return f"seed_{self.seed}/{self.name}"


@dataclass
class Grid:
    """The grid and where it runs. Where its files go is not a setting of the grid but the
    experiment's ``output`` (``Study``), placed on it with ``placed``: ``runs_dir`` (run
    directories and the default database; remote workers must see it at the same path, e.g.
    NFS), ``out`` (the report) and ``threads`` (torch threads per cell: the grid, not the cell,
    is the parallelism).

    Args:
        seeds: one replicate per seed: its own pretrained model (and held-out samples, with
            ``split_seed_follows_seed``).
        held_out_classes: the classes fine-tuned on, one phase each in sequential cells.
        orderings: the sequential orderings; null: every permutation of ``held_out_classes`` (of
            ``tasks``, when given: then an ordering lists task names).
        lrs: the fine-tuning learning rates.
        pretrain_lr: learning rate of pretraining and of the joint model.
        pretrain_epochs: epochs of pretraining on ``remaining``.
        finetune_epochs: epochs of every fine-tuning phase.
        joint_epochs: epochs of the joint model; null: as many as ``pretrain_epochs``.
        methods: continual-learning method configs (shipped names such as ``ewc``, ``si``,
            ``lwf``, ``replay``, ``online_ewc``, or paths); each adds one cell per learning rate,
            sequential in the first ordering. ``[]``: no method cells.
        samples_per_class: held-out samples per class (``data.samples_per_class``); null: the
            data config's; ``all``: every training sample of the held-out classes, so that
            ``remaining`` has none and each task is a class the pretrained model never saw.
        split_seed_follows_seed: each seed also draws its own held-out samples.
        limit_train_batches: batches per epoch (smoke grids); null: all.
        workers: worker processes of the default ``LocalCluster``; null: one per core.
        scheduler: a Dask scheduler address (``tcp://host:8786``); null: a ``LocalCluster``
            in this process.
        db: an SQLAlchemy URL of the results database; null: ``sqlite:///<study folder>/study.db``.
        logger: the Lightning logger of every cell (``{class_path: ..., init_args: {...}}``);
            null: the shipped configs' TensorBoard logger. ``save_dir`` defaults to the cell's run
            directory, ``run_name`` (MLflow) to ``seed_<s>/<cell>``, ``tags`` to the cell's.
        accelerator: the cells' Lightning accelerator. With ``gpu`` every cell asks its Dask
            worker for the resource ``GPU=1``: only workers started with ``--resources GPU=1``
            take it.
        tasks: the fine-tuning tasks, as training splits: ``class_<c>`` or ``<split>@<domain>``
            (``train@rot_45``, with ``data.domains`` defining the domain); null: one ``class_<c>``
            task per held-out class. With tasks given, ``orderings`` list task names and there are
            no ``merged`` cells (no split holds every domain's samples).
        data: more settings of every cell's data (``MusicDataModule`` arguments such as
            ``val_size``, ``domains``, ``dataset``), beside those the grid sets itself.
        merges: merge method configs (``addition_ties``, ``merge/addition_dare`` or a path: a
            ``music merge`` recipe, whose ``method`` is used, or a file that is itself
            ``{class_path, init_args}``). Each adds, per learning rate, one ``task`` cell per task
            (fine-tuned alone from each seed's pretrained model), one ``merge`` cell merging all task
            vectors at once and one absorbing them sequentially in each ordering
            (``music.merging.sequential_merge``), λ chosen on ``val`` (``data.val_size`` > 0).
        merge_lambdas: the λ grid of every merge cell, chosen per absorbed task on ``val``.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    held_out_classes: list[int] = field(default_factory=lambda: [3, 4, 7])
    orderings: list[list[int]] | list[list[str]] | None = None
    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-4, 1e-5])
    pretrain_lr: float = 1e-3
    pretrain_epochs: int = 5
    finetune_epochs: int = 10
    joint_epochs: int | None = None
    methods: list[str] = field(default_factory=list)
    samples_per_class: int | Literal["all"] | None = None
    split_seed_follows_seed: bool = True
    limit_train_batches: int | None = None
    workers: int | None = None
    scheduler: str | None = None
    db: str | None = None
    logger: dict | None = None
    accelerator: str = "cpu"
    tasks: list[str] | None = None
    data: dict | None = None
    merges: list[str] = field(default_factory=list)
    merge_lambdas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    runs_dir: str = field(default="", init=False)
    out: str = field(default="", init=False)
    threads: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} repeats a seed: each seed is one replicate.")
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"lrs={self.lrs} is not allowed: give at least one learning rate, each > 0.")
        for name in ("pretrain_epochs", "finetune_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed: it must be >= 1.")
        if self.joint_epochs is not None and self.joint_epochs < 1:
            raise ValueError(f"joint_epochs={self.joint_epochs} is not allowed: it must be >= 1 (or null).")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers} is not allowed: it must be >= 1 (or null for one per core).")
        if self.scheduler is not None and "://" not in self.scheduler:
            raise ValueError(f"scheduler={self.scheduler!r} is not a Dask scheduler address: give e.g. tcp://host:8786.")
        if self.logger is not None and "class_path" not in self.logger:
            raise ValueError(f"logger={self.logger} has no class_path: give {{class_path: ..., init_args: {{...}}}}.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods={self.methods} repeats a method.")
        if self.methods:
            for method in self.methods:
                try:
                    config_path(method)  # an unknown method config fails here, before any cell runs
                except FileNotFoundError as err:
                    raise ValueError(f"methods: {err}") from None
        if self.samples_per_class is not None and self.samples_per_class != "all" and (
                not isinstance(self.samples_per_class, int) or self.samples_per_class < 1):
            raise ValueError(f"samples_per_class={self.samples_per_class!r} is not allowed: give an integer >= 1, "
                             "'all', or null.")
        if self.tasks is not None:
            if not self.tasks or len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"tasks={self.tasks} is not allowed: give distinct tasks, or null for one per held-out class.")
            for task in self.tasks:
                if not re.fullmatch(r"class_\d+|[A-Za-z0-9_]+@[A-Za-z0-9_]+", task):
                    raise ValueError(f"task {task!r} is not allowed: give a split `class_<c>` or `<split>@<domain>` "
                                     "(e.g. train@rot_45).")
            names = [phase_name(t) for t in self.tasks]
            if len(set(names)) != len(names):
                raise ValueError(f"tasks={self.tasks} give phases of one name ({names}): give one task per domain.")
        if self.data is not None:
            owned = sorted(set(self.data) & GRID_DATA)
            if owned:
                raise ValueError(f"data.{owned[0]} is not allowed in study.data: the grid sets it (use the study's own "
                                 "setting, or --data.data_dir).")
        self._check_merges()
        tasks = self.held_out_classes if self.tasks is None else self.tasks
        what = "held_out_classes" if self.tasks is None else "tasks"
        if self.orderings is None:
            self.orderings = [list(p) for p in itertools.permutations(tasks)]
        for ordering in self.orderings:
            if sorted(map(str, ordering)) != sorted(map(str, tasks)) or len(ordering) != len(tasks):
                raise ValueError(f"ordering {ordering} is not a permutation of {what} {tasks}.")

    def _check_merges(self) -> None:
        if len(set(self.merges)) != len(self.merges):
            raise ValueError(f"merges={self.merges} repeats a merge method.")
        for merge in self.merges:
            merge_method(merge)  # an unknown or bad merge config fails here, before any cell runs
        if not self.merge_lambdas or len(set(self.merge_lambdas)) != len(self.merge_lambdas) or not all(
                math.isfinite(x) for x in self.merge_lambdas):
            raise ValueError(f"merge_lambdas={self.merge_lambdas} is not allowed: give distinct finite numbers.")
        val_size = (self.data or {}).get("val_size", 0)
        if self.merges and not (isinstance(val_size, int) and val_size > 0):
            raise ValueError(f"merges={self.merges} with val_size={val_size} is not allowed: λ is chosen on the `val` "
                             "split; set study.data.val_size > 0.")

    def task_list(self) -> list[str]:
        """The tasks as training splits (``class_3``, ``train@rot_45``), in the grid's order."""
        return [f"class_{c}" for c in self.held_out_classes] if self.tasks is None else list(self.tasks)

    def placed(self, runs_dir: str | Path, out: str | Path, threads: int = 1, **changes) -> Grid:
        """This grid (with ``changes`` to its settings) writing to ``runs_dir`` and ``out``, its
        cells on ``threads`` torch threads each."""
        if threads < 1:
            raise ValueError(f"threads={threads} is not allowed: it must be >= 1.")
        grid = replace(self, **changes)
        grid.runs_dir, grid.out, grid.threads = str(runs_dir), str(out), threads
        return grid

    @property
    def db_url(self) -> str:
        if not self.runs_dir and self.db is None:
            raise ValueError("this grid has no study folder: place it with Grid.placed(runs_dir, out) first.")
        return self.db or f"sqlite:///{Path(self.runs_dir).resolve() / 'study.db'}"

    def quick(self) -> Grid:
        """A smoke version of the same grid: one seed, two orderings, one learning rate, one
        epoch per phase of 5 batches, in ``<runs_dir>/quick`` with its database and report."""
        quick = Path(self.runs_dir) / "quick"
        return self.placed(quick, quick / "report", self.threads, seeds=self.seeds[:1], orderings=self.orderings[:2],
                           lrs=self.lrs[:1], pretrain_epochs=1, finetune_epochs=1, joint_epochs=1,
                           limit_train_batches=5, db=None)


def lr_tag(lr: float) -> str:
    return f"lr{lr:.0e}".replace("e-0", "e-")


def method_name(method: str) -> str:
    """A method config's name in cell names and tables: ``ewc`` for ``ewc`` or ``path/ewc.yaml``."""
    return Path(method).stem


# data settings the grid sets in every cell itself
GRID_DATA = {"data_dir", "download", "held_out_classes", "split_seed", "samples_per_class", "log_eda"}


def merge_spec(config: str) -> dict[str, Any]:
    """The merge method a merge config names, as ``{class_path, init_args}``: a recipe's
    ``method`` (``configs/merge/addition_ties.yaml``), or the file itself."""
    try:
        path = config_path(config)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"merges: {err}") from None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    else:  # inline YAML
        loaded = yaml.safe_load(path)
    spec = loaded.get("method", loaded) if isinstance(loaded, dict) else None
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"merges: {config!r} ({path}) names no merge method: give a `music merge` recipe with a "
                         "`method`, or a file {class_path: music.merging.TIES, init_args: {...}}.")
    return {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}


def merge_method(config: str) -> MergeMethod:
    """The ``MergeMethod`` a merge config names, built by class path (no code runs from the file)."""
    spec = merge_spec(config)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=MergeMethod)
    try:
        return instantiate(parser, parser.parse_object({"method": spec}))["method"]
    except Exception as err:  # jsonargparse's errors, or the method's own check of its arguments
        first = " ".join(str(err).split())[:300]
        raise ValueError(f"merges: {config!r} does not build a MergeMethod from {spec}: {first}") from None


def phase_name(task: str) -> str:
    """A task's phase name: ``class_3`` -> ``class_3``; the domain for the training or held-out
    samples under it (``train@rot_45``, ``merged@rot_45`` -> ``rot_45``); ``remaining@perm_1``
    -> ``remaining_perm_1``."""
    split, _, domain = task.partition("@")
    return task if not domain else domain if split in ("train", "merged") else f"{split}_{domain}"


def ordering_tag(ordering: list) -> str:
    """An ordering in cell names: ``3-4-7`` (classes), ``rot_0-rot_45`` (tasks)."""
    return "-".join(str(o) if isinstance(o, int) else phase_name(o) for o in ordering)


def plan(grid: Grid) -> list[Cell]:
    """Every cell of the grid, pretraining first."""
    cells = []
    fine = grid.finetune_epochs

    def phase(task: int | str) -> dict:
        split = f"class_{task}" if isinstance(task, int) else task
        return {"name": phase_name(split), "split": split, "epochs": fine}

    def one_phase_per_class(ordering: list) -> list[dict]:
        return [phase(t) for t in ordering]

    for seed in grid.seeds:
        cells.append(Cell(seed, "pretrain", "pretrain", "pretrain",
                          [{"name": "pretrain", "split": "remaining", "epochs": grid.pretrain_epochs}], grid.pretrain_lr))
    for seed in grid.seeds:
        cells.append(Cell(seed, "joint", "joint", "pretrain",
                          [{"name": "joint", "split": "train", "epochs": grid.joint_epochs or grid.pretrain_epochs}],
                          grid.pretrain_lr))
        for lr in grid.lrs:
            for ordering in grid.orderings:
                cells.append(Cell(seed, "seq", f"seq_{ordering_tag(ordering)}_{lr_tag(lr)}", "seq_finetune",
                                  one_phase_per_class(ordering), lr, list(ordering)))
            if grid.tasks is None:
                cells.append(Cell(seed, "merged", f"merged_{lr_tag(lr)}", "merged_finetune",
                                  [{"name": "merged", "split": "merged", "epochs": fine}], lr))
            for method in grid.methods:
                ordering = grid.orderings[0]
                cells.append(Cell(seed, "method", f"method_{method_name(method)}_{ordering_tag(ordering)}_{lr_tag(lr)}",
                                  "seq_finetune", one_phase_per_class(ordering), lr, list(ordering), method=method))
            if grid.merges:
                tasks = grid.task_list()
                for task in tasks:
                    cells.append(Cell(seed, "task", f"task_{phase_name(task)}_{lr_tag(lr)}", "seq_finetune",
                                      [phase(task)], lr))
                for merge in grid.merges:
                    name = f"merge_{method_name(merge)}"
                    cells.append(Cell(seed, "merge", f"{name}_all_{lr_tag(lr)}", "pretrain",
                                      [phase(t) for t in tasks], lr, method=merge))
                    for ordering in grid.orderings:
                        cells.append(Cell(seed, "merge", f"{name}_{ordering_tag(ordering)}_{lr_tag(lr)}", "pretrain",
                                          one_phase_per_class(ordering), lr, list(ordering), method=merge))
    return cells


def task_cells(grid: Grid, cell: Cell) -> dict[str, Cell]:
    """Split -> the ``task`` cell (same seed and learning rate) whose fine-tuned model gives
    that task's vector to the merge cell ``cell``."""
    return {c.phases[0]["split"]: c for c in plan(grid) if c.kind == "task" and c.seed == cell.seed and c.lr == cell.lr}


def task_checkpoint(grid: Grid, cell: Cell) -> Path:
    """The fine-tuned model a ``task`` cell leaves."""
    return cell_dir(grid, cell) / "checkpoints" / f"phase-0-{cell.phases[0]['name']}.ckpt"


def cell_dir(grid: Grid, cell: Cell) -> Path:
    return Path(grid.runs_dir) / f"seed_{cell.seed}" / cell.name


def pretrained_checkpoint(grid: Grid, seed: int) -> Path:
    return Path(grid.runs_dir) / f"seed_{seed}" / "pretrain" / "checkpoints" / "phase-0-pretrain.ckpt"


def determinants(grid: Grid, cell: Cell) -> dict:
    """What determines a cell's result (not where files live, nor how it is scheduled). Keys
    of settings left at their defaults are left out, so the cells of a grid made without them
    keep their fingerprints."""
    described = asdict(cell)
    if described["method"] is None:
        del described["method"]
    out = {"cell": described, "held_out": grid.held_out_classes, "limit": grid.limit_train_batches,
           "split_seed": cell.seed if grid.split_seed_follows_seed else 0, "accelerator": grid.accelerator,
           "pretrain": [grid.pretrain_epochs, grid.pretrain_lr] if cell.needs_pretrained else None}
    if grid.samples_per_class is not None:
        out["samples_per_class"] = grid.samples_per_class
    if grid.data is not None:
        out["data"] = grid.data
    if cell.kind == "merge":
        out["merge"] = {"method": merge_spec(cell.method), "lambdas": grid.merge_lambdas, "select_on": "val"}
    return out


def fingerprint(grid: Grid, cell: Cell) -> str:
    return study_db.fingerprint(determinants(grid, cell))
