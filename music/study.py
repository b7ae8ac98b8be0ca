"""A multi-seed study grid: how robust is "sequential beats merged", and what is forgotten?

For every seed, ONE model is pretrained (``configs/pretrain.yaml``) and every cell of that seed
fine-tunes that same checkpoint through the framework — the shipped configs run by
``python -m music fit``'s own entry point, with phases, learning rate and seed filled in:

- ``seq_<order>_lr<lr>``: sequential fine-tuning (``configs/seq_finetune.yaml``) for every
  ordering of the held-out classes and every learning rate;
- ``merged_lr<lr>``: merged fine-tuning (``configs/merged_finetune.yaml``);
- ``replay_lr<lr>``: sequential in the first ordering with a replay buffer of ``remaining``
  samples mixed into every phase (``data.replay_size``);
- ``joint``: a model trained from scratch on the whole training set (``split: train``) for as
  many epochs as pretraining — the upper bound.

A cell is a run directory ``<runs_dir>/seed_<s>/<cell>/`` (TensorBoard events, config, phase
snapshots, ``phase_metrics.json``, ``accuracy_matrix.csv``, ``continual_metrics.json``) and is
finished when its ``done`` marker exists: a restarted grid skips finished cells and resumes an
interrupted one from its ``last.ckpt``. The marker holds a fingerprint of the cell's settings,
so a grid restarted with different settings into the same directory fails instead of mixing
results. Cells run in worker processes (``workers``), each running many cells in-process so
the import and data-loading cost is paid once per worker, not once per cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@dataclass
class Cell:
    """One run of the grid. ``kind`` is pretrain, joint, seq, merged or replay."""

    seed: int
    kind: str
    name: str
    config: str
    phases: list[dict]
    lr: float
    ordering: list[int] | None = None
    replay_size: int = 0

    @property
    def needs_pretrained(self) -> bool:
        return self.kind in ("seq", "merged", "replay")


@dataclass
class Settings:
    """The grid (``configs/study.yaml``). ``workers: null`` uses one process per core."""

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    held_out_classes: list[int] = field(default_factory=lambda: [3, 4, 7])
    orderings: list[list[int]] | None = None  # None: every permutation of held_out_classes
    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-4, 1e-5])
    pretrain_lr: float = 1e-3
    pretrain_epochs: int = 5
    finetune_epochs: int = 10
    joint_epochs: int | None = None  # None: as many as pretrain_epochs
    replay_size: int = 300
    split_seed_follows_seed: bool = True  # each seed also draws its own held-out samples
    limit_train_batches: int | None = None
    data_dir: str = "data"  # MNIST root, downloaded if missing
    runs_dir: str = "study_runs"
    out: str = "results"
    workers: int | None = None

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
        if self.replay_size < 0:
            raise ValueError(f"replay_size={self.replay_size} is not allowed: it must be >= 0 (0: no replay cells).")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers} is not allowed: it must be >= 1 (or null for one per core).")
        if self.orderings is None:
            self.orderings = [list(p) for p in itertools.permutations(self.held_out_classes)]
        for ordering in self.orderings:
            if sorted(ordering) != sorted(self.held_out_classes):
                raise ValueError(f"ordering {ordering} is not a permutation of held_out_classes {self.held_out_classes}.")

    def quick(self) -> Settings:
        """A smoke version of the same grid: one seed, two orderings, one learning rate, one
        epoch per phase of 5 batches, in ``<runs_dir>/quick`` with its report there too."""
        return Settings(**asdict(self) | {
            "seeds": self.seeds[:1], "orderings": self.orderings[:2], "lrs": self.lrs[:1],
            "pretrain_epochs": 1, "finetune_epochs": 1, "joint_epochs": 1, "limit_train_batches": 5,
            "runs_dir": str(Path(self.runs_dir) / "quick"), "out": str(Path(self.runs_dir) / "quick" / "report"),
        })


def lr_tag(lr: float) -> str:
    return f"lr{lr:.0e}".replace("e-0", "e-")


def plan(settings: Settings) -> list[Cell]:
    """Every cell of the grid, pretraining first."""
    cells = []
    fine = settings.finetune_epochs

    def one_phase_per_class(ordering: list[int]) -> list[dict]:
        return [{"name": f"class_{c}", "split": f"class_{c}", "epochs": fine} for c in ordering]

    for seed in settings.seeds:
        cells.append(Cell(seed, "pretrain", "pretrain", "pretrain.yaml",
                          [{"name": "pretrain", "split": "remaining", "epochs": settings.pretrain_epochs}],
                          settings.pretrain_lr))
    for seed in settings.seeds:
        cells.append(Cell(seed, "joint", "joint", "pretrain.yaml",
                          [{"name": "joint", "split": "train",
                            "epochs": settings.joint_epochs or settings.pretrain_epochs}], settings.pretrain_lr))
        for lr in settings.lrs:
            for ordering in settings.orderings:
                cells.append(Cell(seed, "seq", f"seq_{'-'.join(map(str, ordering))}_{lr_tag(lr)}", "seq_finetune.yaml",
                                  one_phase_per_class(ordering), lr, list(ordering)))
            cells.append(Cell(seed, "merged", f"merged_{lr_tag(lr)}", "merged_finetune.yaml",
                              [{"name": "merged", "split": "merged", "epochs": fine}], lr))
            if settings.replay_size:
                ordering = settings.orderings[0]
                cells.append(Cell(seed, "replay", f"replay_{'-'.join(map(str, ordering))}_{lr_tag(lr)}",
                                  "seq_finetune.yaml", one_phase_per_class(ordering), lr, list(ordering),
                                  settings.replay_size))
    return cells


def cell_dir(settings: Settings, cell: Cell) -> Path:
    return Path(settings.runs_dir) / f"seed_{cell.seed}" / cell.name


def pretrained_checkpoint(settings: Settings, seed: int) -> Path:
    return Path(settings.runs_dir) / f"seed_{seed}" / "pretrain" / "checkpoints" / "phase-0-pretrain.ckpt"


def fingerprint(settings: Settings, cell: Cell) -> str:
    """What determines a cell's result (not where files live)."""
    keys = {"cell": asdict(cell), "held_out": settings.held_out_classes, "limit": settings.limit_train_batches,
            "split_seed": cell.seed if settings.split_seed_follows_seed else 0,
            "pretrain": [settings.pretrain_epochs, settings.pretrain_lr] if cell.needs_pretrained else None}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def cell_config(settings: Settings, cell: Cell) -> dict:
    """The shipped config with this cell's phases, seed, learning rate and paths filled in."""
    config = yaml.safe_load((CONFIGS / cell.config).read_text())
    run_dir = cell_dir(settings, cell)
    config["seed_everything"] = cell.seed
    config["trainer"]["logger"]["init_args"] |= {"save_dir": str(run_dir.parent.parent), "name": run_dir.parent.name,
                                                 "version": run_dir.name}
    config["trainer"] |= {"enable_progress_bar": False, "enable_model_summary": False}
    if settings.limit_train_batches:
        config["trainer"]["limit_train_batches"] = settings.limit_train_batches
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("SequentialFineTuning"):
            callback["init_args"]["phases"] = cell.phases
    config["model"]["lr"] = cell.lr
    if cell.needs_pretrained:
        config["model"]["init_from"] = str(pretrained_checkpoint(settings, cell.seed))
    config["data"] |= {"data_dir": settings.data_dir, "download": True, "log_eda": False,  # many cells, one data set
                       "held_out_classes": settings.held_out_classes,
                       "split_seed": cell.seed if settings.split_seed_follows_seed else 0,
                       "replay_size": cell.replay_size}
    return config


def is_done(settings: Settings, cell: Cell) -> bool:
    marker = cell_dir(settings, cell) / "done"
    if not marker.exists():
        return False
    recorded = json.loads(marker.read_text()).get("fingerprint")
    if recorded != fingerprint(settings, cell):
        raise ValueError(
            f"{cell_dir(settings, cell)} was finished with other settings (fingerprint {recorded}, now "
            f"{fingerprint(settings, cell)}): use another runs_dir or delete that cell to re-run it."
        )
    return True


def run_cell(settings: Settings, cell: Cell) -> dict:
    """Run one cell through ``python -m music fit``'s entry point (in this process) and mark it
    done; an interrupted cell resumes from its ``last.ckpt``."""
    from music.checkpoint import write_atomically
    from music.cli import main

    run_dir = cell_dir(settings, cell)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "cell.yaml"
    config_path.write_text(yaml.safe_dump(cell_config(settings, cell), sort_keys=False))
    args = ["fit", "--config", str(config_path)]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        args += ["--ckpt_path", str(last)]
    start = time.perf_counter()
    main(args)
    record = {"cell": asdict(cell), "fingerprint": fingerprint(settings, cell), "seconds": time.perf_counter() - start,
              "resumed": last.exists() and "--ckpt_path" in args}
    write_atomically(str(run_dir / "done"), json.dumps(record, indent=1))
    return record


def _init_worker(log_dir: str) -> None:
    """One thread per worker (the grid is the parallelism) and the worker's chatter in a file."""
    import torch

    torch.set_num_threads(1)
    os.makedirs(log_dir, exist_ok=True)
    log = os.open(os.path.join(log_dir, f"worker-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)


def run_study(settings: Settings, log=print) -> dict:
    """Run every unfinished cell (pretraining of a seed before its fine-tuning cells) and
    return ``{"ran": [...], "skipped": [...], "failed": {...}, "seconds": ...}``."""
    start = time.perf_counter()
    cells = plan(settings)
    Path(settings.runs_dir).mkdir(parents=True, exist_ok=True)
    (Path(settings.runs_dir) / "grid.json").write_text(
        json.dumps({"settings": asdict(settings), "cells": [asdict(c) for c in cells]}, indent=1))
    todo = [c for c in cells if not is_done(settings, c)]
    skipped = [c.name if c.kind == "pretrain" else f"seed_{c.seed}/{c.name}" for c in cells if c not in todo]
    log(f"{len(cells)} cells, {len(skipped)} already done, {len(todo)} to run")
    workers = settings.workers or os.cpu_count() or 1
    ran, failed = [], {}
    pretrain_pending = {c.seed for c in todo if c.kind == "pretrain"}
    ready = [c for c in todo if not (c.needs_pretrained and c.seed in pretrain_pending)]
    waiting = [c for c in todo if c not in ready]

    def finished(cell: Cell, error: BaseException | None) -> None:
        label = f"seed_{cell.seed}/{cell.name}"
        if error is None:
            ran.append(label)
        else:
            failed[label] = f"{type(error).__name__}: {error}"
        if cell.kind == "pretrain":
            pretrain_pending.discard(cell.seed)
            for other in [c for c in waiting if c.seed == cell.seed]:
                waiting.remove(other)
                if error is None:
                    ready.append(other)
                else:
                    failed[f"seed_{other.seed}/{other.name}"] = f"pretraining of seed {cell.seed} failed"
        log(f"[{time.perf_counter() - start:6.0f} s] {'done' if error is None else 'FAILED'} {label}"
            f" ({len(ran) + len(failed)}/{len(todo)})" + (f": {failed[label]}" if error else ""))

    def priority(cell: Cell) -> tuple[int, int]:
        # fine-tuning cells of the seeds already pretrained first, so finished seeds accumulate
        # and a grid stopped early still has complete seeds to report; the costly joint runs last
        return {"pretrain": 1, "joint": 2}.get(cell.kind, 0), cell.seed

    if workers == 1:  # in this process: no start-up cost (tests, debugging)
        while ready:
            ready.sort(key=priority)
            cell = ready.pop(0)
            try:
                run_cell(settings, cell)
                finished(cell, None)
            except Exception as error:  # one bad cell must not stop the grid
                finished(cell, error)
    else:
        context = get_context("spawn")  # fresh interpreters: no forked torch threads or locks
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(str(Path(settings.runs_dir) / "worker_logs"),)) as pool:
            running: dict[Future, Cell] = {}
            while ready or running:
                while ready and len(running) < workers:
                    ready.sort(key=priority)
                    cell = ready.pop(0)
                    running[pool.submit(run_cell, settings, cell)] = cell
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    finished(running.pop(future), future.exception())
    return {"ran": ran, "skipped": skipped, "failed": failed, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict:
    """``scripts/study.py``: parse ``--config configs/study.yaml`` (plus overrides), run the
    grid, write the report."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(Settings, as_group=False)
    parser.add_argument("--quick", type=bool, default=False, help="a smoke grid (see Settings.quick)")
    parser.add_argument("--report_only", type=bool, default=False, help="only (re)write the report")
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("config", "quick", "report_only", "__path__")}
    settings = Settings(**values)
    if args.quick:
        settings = settings.quick()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers
    result = {"ran": [], "skipped": [], "failed": {}, "seconds": math.nan}
    if not args.report_only:
        result = run_study(settings)
        timing = Path(settings.runs_dir) / "timing.json"
        history = json.loads(timing.read_text()) if timing.exists() else []
        timing.write_text(json.dumps(history + [{"seconds": result["seconds"], "ran": len(result["ran"]),
                                                 "skipped": len(result["skipped"]), "workers": settings.workers
                                                 or os.cpu_count()}], indent=1))
    from music.report import write_report

    report = write_report(settings)
    print(f"report: {report}")
    if result["failed"]:
        print(f"{len(result['failed'])} cells failed:\n" + "\n".join(f"  {k}: {v}" for k, v in result["failed"].items()),
              file=sys.stderr)
    return result
