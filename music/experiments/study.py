"""``music study``: a multi-seed grid — how robust is "sequential beats merged", and what is forgotten?

For every seed ONE model is pretrained (the shipped config ``pretrain``) and every cell of that
seed fine-tunes that same checkpoint — each cell is ``music fit`` over a shipped config with its
phases, learning rate and seed filled in:

- ``seq_<order>_lr<lr>``: sequential fine-tuning (``seq_finetune``) for every ordering of the
  held-out classes and every learning rate;
- ``merged_lr<lr>``: merged fine-tuning (``merged_finetune``);
- ``method_<method>_<order>_lr<lr>``: sequential in the first ordering with a continual-learning
  method (``methods``: the shipped configs ``ewc``, ``online_ewc``, ``si``, ``lwf``, ``replay``,
  or any config that sets ``model.methods``), told that the model was pretrained on
  ``remaining`` (``model.pretrained_on``) so that it protects that knowledge too;
- ``joint``: a model trained from scratch on the whole training set (``split: train``) for as
  many epochs as pretraining — the upper bound;
- ``task_<task>_lr<lr>`` and ``merge_<merge>_{all,<order>}_lr<lr>`` (``merges``): each task
  fine-tuned alone, and their task vectors merged into the pretrained model by each merge
  method, all at once and absorbed one at a time in each ordering, λ chosen on ``val``
  (``study_merge``); a merge cell runs in the worker without training and waits for its
  seed's task cells.

Cells are Dask tasks: each seed's pretraining is a task and its fine-tuning cells depend on it.
By default they run on an in-process ``LocalCluster`` (one single-threaded worker process per
core); ``--study.scheduler tcp://host:8786`` runs them on any Dask cluster, whose workers reach
the study folder (``<output.root>/<output.name>``) and ``data.data_dir`` at the same paths (a
shared directory). A cell's files go to ``<study folder>/seed_<s>/<cell>/`` (``--run_dir``: phase
snapshots, ``phase_metrics.json``, accuracy matrix, ``config.yaml``, ``cell.log``); the logger (``study.logger``, any Lightning
logger) only logs. A finished cell is a row in the study database (``study_db``), written in
one transaction by the worker that ran it: a restarted grid skips the cells stored there and
an interrupted cell resumes from its last checkpoint (``last.ckpt`` of pretraining and joint
cells, the newest phase snapshot of a fine-tuning cell). Each row holds a fingerprint of the
cell's settings; a grid whose settings differ from the stored cells' is refused before any
cell runs. The report (``study_report``) is made by queries on that database.
"""

from __future__ import annotations

import csv
import gc
import importlib
import inspect
import json
import socket
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from distributed import as_completed

from music.evaluation import START
from music.config import BASE_CONFIG
from music.continual import accuracy_on
from music.experiments import study_db
from music.experiments.common import Data, Output, dask_client, output_to
from music.experiments.study_grid import Cell, Grid, cell_dir, determinants, fingerprint, plan, pretrained_checkpoint
from music.experiments.study_merge import run_merge_cell
from music.experiments.study_merge_report import write_merge_report
from music.experiments.study_report import write_report
from music.runner import lightning
from music.speed import plain_process_malloc


def cell_logger(grid: Grid, cell: Cell) -> dict:
    """The cell's logger: ``grid.logger`` (null: the shipped config's own), with the cell's
    folder, run name and tags filled in where the logger takes them and the user left them open."""
    logger = grid.logger or {"class_path": yaml.safe_load(BASE_CONFIG.read_text())["trainer"]["logger"]["class_path"]}
    given = dict(logger.get("init_args") or {})
    module, _, name = logger["class_path"].rpartition(".")
    accepted = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    defaults = {"save_dir": str(cell_dir(grid, cell)), "run_name": cell.label,
                "tags": {"seed": str(cell.seed), "cell": cell.name, "kind": cell.kind,
                         "fingerprint": fingerprint(grid, cell)}}
    filled = {key: value for key, value in defaults.items() if key in accepted and key not in given}
    return {"class_path": logger["class_path"], "init_args": given | filled}


def cell_config(grid: Grid, data: Data, cell: Cell) -> dict:
    """The delta over the shipped config ``cell.config``: phases, seed, learning rate, data, logger."""
    trainer: dict[str, Any] = {"enable_progress_bar": False, "enable_model_summary": False,
                               "accelerator": grid.accelerator, "logger": cell_logger(grid, cell)}
    if grid.limit_train_batches:
        trainer["limit_train_batches"] = grid.limit_train_batches
    model: dict[str, Any] = {"lr": cell.lr}
    if cell.needs_pretrained:
        model["init_from"] = str(pretrained_checkpoint(grid, cell.seed))
    if cell.method:
        model["pretrained_on"] = "remaining"  # the methods protect what pretraining learned, as an earlier task
    split = {"data_dir": data.data_dir, "download": data.download, "log_eda": False,  # many cells, one data set
             "held_out_classes": grid.held_out_classes,
             "split_seed": cell.seed if grid.split_seed_follows_seed else 0}
    if grid.samples_per_class is not None:
        split["samples_per_class"] = grid.samples_per_class
    split |= grid.data or {}
    if cell.kind == "merge":  # no training: the data and accelerator the merged models are evaluated with
        return {"seed_everything": cell.seed, "trainer": {"accelerator": grid.accelerator}, "data": split}
    config = {"seed_everything": cell.seed, "trainer": trainer, "schedule": {"phases": cell.phases},
              "evaluation": {"log_figures": False},  # figures: the report draws them from all cells at once
              "model": model,
              "data": split}
    if cell.needs_pretrained:
        # Short fine-tuning epochs: last.ckpt and a top-k file after each would be a large share
        # of the cell (docs/speed.md). The phase snapshots alone are kept; run_cell resumes from them.
        config["checkpoint"] = {"save_last": False, "save_top_k": 0}
    return config


def run_cell(grid: Grid, data: Data, cell: Cell, *after: Any) -> dict:
    """Run one cell (``music fit``, or a merge cell's merges, in this process) and store it in the
    database; a cell stored already is not run again, an interrupted one resumes (``resume_point``).
    ``after``: the results this cell waits for (its seed's pretraining; a merge cell: its task cells)."""
    if not gc.get_freeze_count():  # once a worker: what its imports made is never garbage, so the
        gc.freeze()                # collection after each cell need not scan it (0.3 s a cell, docs/speed.md)
    engine = study_db.connect(grid.db_url)
    if study_db.has_cell(engine, cell.seed, cell.name):  # re-run after its worker died: stored once
        return {"cell": cell.label, "ran": False}
    torch.set_num_threads(grid.threads)
    plain_process_malloc()  # undo the Dask nanny's MALLOC_TRIM_THRESHOLD_ (music.speed)
    run_dir = cell_dir(grid, cell)
    run_dir.mkdir(parents=True, exist_ok=True)
    delta = run_dir / "cell.yaml"
    delta.write_text(yaml.safe_dump(cell_config(grid, data, cell), sort_keys=False))
    start = time.perf_counter()
    if cell.kind == "merge":  # in this process, no training: nothing to resume
        resumed = False
        with output_to(run_dir / "cell.log"):
            run_merge_cell(grid, cell, delta, run_dir)
    else:
        method = ["--config", cell.method] if cell.method else []
        args = ["fit", "--config", cell.config, *method, "--config", str(delta), "--run_dir", str(run_dir)]
        last = resume_point(run_dir)
        resumed = last is not None
        if resumed:
            args += ["--ckpt_path", str(last)]
        with output_to(run_dir / "cell.log"):
            lightning(args)
    seconds = time.perf_counter() - start
    stored = study_db.record_cell(engine, *read_cell(grid, cell, run_dir, seconds, resumed))
    # A finished run's trainer, model and data module refer to each other: only the cycle
    # collector frees them, and a warm worker that waits for it grows by the cell's data
    # (~250 MB a cell of domain tasks) until Dask pauses it at its memory limit.
    gc.collect()
    return {"cell": cell.label, "ran": stored, "seconds": seconds}


def resume_point(run_dir: Path) -> Path | None:
    """Where an interrupted cell goes on from: its ``last.ckpt`` (pretraining and joint cells
    save one every epoch), else its newest phase snapshot (fine-tuning cells save only those),
    else nowhere: it starts again."""
    checkpoints = run_dir / "checkpoints"
    if (checkpoints / "last.ckpt").exists():
        return checkpoints / "last.ckpt"
    snapshots = {int(p.name.split("-")[1]): p for p in checkpoints.glob("phase-*.ckpt")}
    return snapshots[max(snapshots)] if snapshots else None


def read_cell(grid: Grid, cell: Cell, run_dir: Path, seconds: float, resumed: bool) -> tuple[dict, list, list]:
    """The database rows of a finished cell, from the files its run wrote."""
    metrics = json.loads((run_dir / "continual_metrics.json").read_text())
    phase_metrics = json.loads((run_dir / "phase_metrics.json").read_text())
    costs = json.loads((run_dir / "phase_costs.json").read_text())
    with open(run_dir / "accuracy_matrix.csv") as f:
        matrix = list(csv.DictReader(f))
    final = max(phase_metrics.values(), key=lambda p: p["index"])["confusion_matrix"]
    # the same class sets for every cell, pretrained and joint included (they have no tasks)
    metrics["held_out_acc"] = accuracy_on(final, grid.held_out_classes)
    metrics["untouched_acc"] = accuracy_on(final, [c for c in range(len(final)) if c not in grid.held_out_classes])
    row = {"seed": cell.seed, "name": cell.name, "kind": cell.kind, "method": cell.method, "lr": cell.lr,
           "ordering": "-".join(map(str, cell.ordering)) if cell.ordering else None,
           "fingerprint": fingerprint(grid, cell), "settings": study_db.dumps(determinants(grid, cell)),
           **{m: metrics.get(m) for m in study_db.METRICS}, "continual_metrics": study_db.dumps(metrics),
           "wall_seconds": seconds, "host": socket.gethostname(),
           "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "run_dir": str(run_dir.resolve()), "resumed": resumed}
    phase_rows, class_rows = [], []
    classes = [k.removeprefix("acc_") for k in matrix[0] if k.startswith("acc_")]
    for line in matrix:
        trained = phase_metrics.get(line["phase"]) if line["phase"] != START else None
        split = trained["split"] if trained else ("test" if line["phase"] == START else None)
        phase_rows.append({"row": int(line["row"]), "phase": line["phase"], "split": split, "acc": float(line["acc"]),
                           **{k: trained.get(k) if trained else None for k in ("loss", "precision", "recall", "f1")},
                           "train_seconds": costs.get(line["phase"], {}).get("train_seconds")})
        for c in classes:
            confusion = trained["confusion_matrix"][int(c)] if trained else None
            class_rows.append({"row": int(line["row"]), "phase": line["phase"], "class": int(c),
                               "acc": float(line[f"acc_{c}"]), "confusion": None if confusion is None else json.dumps(confusion)})
    return row, phase_rows, class_rows


# -- the grid on Dask ------------------------------------------------------------------------

def check_stored(grid: Grid, cells: list[Cell], engine) -> set[tuple[int, str]]:
    """The finished cells; a stored cell whose fingerprint differs from the grid's is refused."""
    stored = study_db.fingerprints(engine)
    for cell in cells:
        recorded = stored.get((cell.seed, cell.name))
        if recorded is not None and recorded != fingerprint(grid, cell):
            raise ValueError(f"{cell.label} in {grid.db_url} was finished with other settings (fingerprint {recorded}, "
                             f"this grid's {fingerprint(grid, cell)}): use another output.root/output.name/study.db, or "
                             "delete that cell's rows to re-run it.")
    return {key for key in stored if key in {(c.seed, c.name) for c in cells}}


def priority(cell: Cell) -> int:
    """Fine-tuning cells of lower seeds first (a grid stopped early tends to keep complete
    seeds), then pretraining, the costly joint runs last. Dask prefers higher priorities among
    the tasks it can start, and weighs data locality too."""
    return 1000 * (2 - {"pretrain": 1, "joint": 2}.get(cell.kind, 0)) - cell.seed


def run_grid(grid: Grid, data: Data) -> dict:
    """Run every unfinished cell on Dask and return ``{"ran", "skipped", "failed", "seconds"}``.
    Bad settings, database or scheduler fail before any cell runs."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    grid = grid.placed(Path(grid.runs_dir).resolve(), grid.out, grid.threads)
    data = replace(data, data_dir=str(Path(data.data_dir).resolve()))  # every worker reads it at this path
    cells = plan(grid)
    if grid.db is None:
        Path(grid.runs_dir).mkdir(parents=True, exist_ok=True)
    engine = study_db.connect(grid.db_url)
    done = check_stored(grid, cells, engine)
    todo = [c for c in cells if (c.seed, c.name) not in done]
    ran, failed = [], {}
    with dask_client(grid.scheduler, grid.workers, grid.threads, grid.accelerator, "study.scheduler") as client:
        Path(grid.runs_dir).mkdir(parents=True, exist_ok=True)
        (Path(grid.runs_dir) / "grid.json").write_text(
            json.dumps({"settings": asdict(grid), "data": asdict(data), "cells": [asdict(c) for c in cells]}, indent=1))
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        print(f"{len(cells)} cells, {len(done)} already done, {len(todo)} to run on {workers} Dask workers "
              f"({grid.scheduler or 'local cluster'}); results in {grid.db_url}")
        resources = {"GPU": 1} if grid.accelerator in ("gpu", "cuda") else None
        pretrained: dict[int, Any] = {}
        tasks: dict[tuple[int, float], list] = {}  # (seed, lr) -> the futures of its task cells
        futures = {}
        for cell in todo:
            after = [pretrained[cell.seed]] if cell.needs_pretrained and cell.seed in pretrained else []
            if cell.kind == "merge":
                after += tasks.get((cell.seed, cell.lr), [])
            future = client.submit(run_cell, grid, data, cell, *after, key=f"{cell.label}-{fingerprint(grid, cell)}",
                                   priority=priority(cell), resources=resources, pure=False)
            if cell.kind == "pretrain":
                pretrained[cell.seed] = future
            if cell.kind == "task":
                tasks.setdefault((cell.seed, cell.lr), []).append(future)
            futures[future] = cell
        for future in as_completed(list(futures)):
            cell = futures[future]
            if future.status == "finished":
                ran.append(cell.label)
            else:
                error = future.exception()
                failed[cell.label] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            print(f"[{time.perf_counter() - start:6.0f} s] {'done' if cell.label in ran else 'FAILED'} {cell.label}"
                  f" ({len(ran) + len(failed)}/{len(todo)})" + (f": {failed[cell.label]}" if cell.label in failed else ""))
    seconds = time.perf_counter() - start
    study_db.record_grid_run(engine, started_at=started, seconds=seconds, workers=workers,
                             scheduler=grid.scheduler or "local", ran=len(ran), skipped=len(done), failed=len(failed),
                             host=socket.gethostname())
    return {"ran": ran, "skipped": sorted(f"seed_{s}/{n}" for s, n in done), "failed": failed, "seconds": seconds}


class Study:
    """The multi-seed study grid (``music study``): sequential vs merged fine-tuning over
    seeds × orderings × learning rates, with continual-learning methods and a joint reference, on
    Dask, results in a database, and the report generated from it.

    Args:
        study: the grid, its cluster and its database.
        data: where MNIST is (``--data.data_dir``; downloaded if missing and ``download``): a
            path every worker can read.
        output: the study folder ``<root>/<name>`` (run directories, ``study.db``, the report
            unless ``results`` is set; a shared directory for a multi-machine cluster), torch
            threads per cell, and ``quick``: a smoke version of the grid in ``<study folder>/quick``
            (see ``Grid.quick``). ``trainer_args`` are not used: a cell is its ``cell.yaml``.
        report_only: only (re)write the report from the database.
        query: an SQL query on the study database; its result is printed and nothing runs
            (e.g. ``SELECT ordering, AVG(final_acc) FROM cells WHERE kind='seq' AND lr=1e-4
            GROUP BY ordering``).
    """

    def __init__(self, study: Grid, data: Data = Data(), output: Output = Output(), report_only: bool = False,
                 query: str | None = None) -> None:
        if output.trainer_args:
            raise ValueError(f"output.trainer_args={output.trainer_args} is not allowed for music study: a cell's settings "
                             "are its cell.yaml; set them under study: (e.g. study.accelerator).")
        grid = study.placed(output.folder("study"), output.tables("study"), output.threads)
        self.grid = grid.quick() if output.quick else grid
        self.data = data
        self.report_only = report_only
        self.query = query

    def run(self) -> dict:
        if self.query is not None:
            columns, rows = study_db.query(study_db.connect(self.grid.db_url, read_only=True), self.query)
            print("\t".join(columns))
            for row in rows:
                print("\t".join("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
            return {"columns": columns, "rows": rows}
        result = {"ran": [], "skipped": [], "failed": {}, "seconds": None}
        if not self.report_only:
            result = run_grid(self.grid, self.data)
        print(f"report: {write_report(self.grid, self.data)}")
        if self.grid.merges:
            print(f"merge report: {write_merge_report(self.grid)}")
        if result["failed"]:
            print(f"{len(result['failed'])} cells failed:\n" + "\n".join(f"  {k}: {v}" for k, v in result["failed"].items()),
                  file=sys.stderr)
        return result
