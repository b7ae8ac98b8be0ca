"""A ``merge`` cell of the study grid: each seed's task vectors merged into its pretrained model,
in-process, written as the same run files a fine-tuning cell writes.

The cell's task vectors are τ_t = θ(task cell t) − θ(pretrained), one ``task`` cell per task
(same seed, same learning rate). All at once: one merged model, the row ``merged``, as the
``merged`` cell's. Sequentially in an ordering: one model per absorbed task
(``music.merging.sequential_merge``), the rows named as a sequential cell's phases. At every
row λ is chosen from ``merge_lambdas`` by accuracy on ``val`` alone (``music merge``'s rule
and its ``Evaluator``, which refuses the test set while choosing); the test set is evaluated
only at the chosen λ. The rows go to ``accuracy_matrix.csv``, ``continual_metrics.json``
(``music.continual`` over the task-accuracy matrix, plus the chosen λ per row and the
validation curve), ``phase_metrics.json`` and ``phase_costs.json``, so the study stores and
reports a merge cell like any other.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from music.checkpoint import load_state_dict, write_atomically
from music.continual import (accuracy_on, average_accuracy, average_incremental_accuracy, backward_transfer,
                             forgetting, forward_transfer, per_class_accuracy, summarise, to_json)
from music.data import split_classes
from music.evaluation import START
from music.experiments.merge import Evaluation, Evaluator, best_lambda
from music.experiments.study_grid import (Cell, Grid, merge_method, phase_name, pretrained_checkpoint, task_cells,
                                          task_checkpoint)
from music.merging import Entry, Merger, StateDictReader, compute_statistics, sequential_merge
from music.merging.recipe import COMPUTE_DTYPE


def domain_of(split: str) -> str | None:
    """``train@rot_45`` -> ``rot_45``; None for a split of the plain data."""
    return split.partition("@")[2] or None


def task_accuracy(evaluator: Evaluator, state: Mapping, split: str, plain: dict, held_out: list[int]) -> float:
    """Accuracy on a task's test set: the test samples of its classes, under its domain."""
    base, domain = split.partition("@")[0], domain_of(split)
    confusion = plain["confusion"] if domain is None else evaluator.evaluate(state, f"test@{domain}")["confusion"]
    classes = split_classes(base, held_out) or range(len(confusion))
    return accuracy_on(confusion, classes)


def val_score(evaluator: Evaluator, state: Mapping, splits: list[str]) -> float:
    """What λ is chosen by: accuracy on ``val``, averaged over the absorbed tasks' domains
    (``val@<domain>``) when they have domains."""
    domains = sorted({d for d in map(domain_of, splits) if d is not None})
    if not domains:
        return evaluator.evaluate(state, "val")["acc"]
    return float(np.mean([evaluator.evaluate(state, f"val@{d}")["acc"] for d in domains]))


def run_merge_cell(grid: Grid, cell: Cell, delta: Path, run_dir: Path) -> dict[str, Any]:
    """Merge, choose λ on ``val`` per row, evaluate on the test set and write the run files;
    returns what was chosen. ``delta``: the cell's data settings, a config over ``cell.config``."""
    tasks = task_cells(grid, cell)
    base = pretrained_checkpoint(grid, cell.seed)
    absorbed = [p["split"] for p in cell.phases]
    entries = [Entry(split, task_checkpoint(grid, tasks[split]), 1.0, base) for split in absorbed]
    readers = {p: StateDictReader(load_state_dict(p), p) for p in [base, *(e.path for e in entries)]}
    method = merge_method(cell.method)
    evaluator = Evaluator(Evaluation(configs=[cell.config, str(delta)], select_on="val"))
    held_out = grid.held_out_classes
    statistics = entry_statistics(evaluator, method.needs, entries, readers) if method.needs else None
    merged_row = cell.ordering is None
    columns = (["merged"] if merged_row and grid.tasks is None else absorbed)  # the task columns, as splits
    names = ["merged"] if merged_row else [p["name"] for p in cell.phases]

    def steps():
        if merged_row:
            if statistics is not None:
                method.provide(statistics)
            with Merger(base, entries, method, readers=readers, compute_dtype=COMPUTE_DTYPE) as merger:
                yield entries, (lambda lam, m=merger, u=merger.updates(): m.state(lam, u))
        else:
            for step in sequential_merge(base, entries, method, readers=readers, compute_dtype=COMPUTE_DTYPE,
                                         statistics=statistics):
                yield step.absorbed, step.state

    rows = [(START, "test", None, readers[base].entries, 0.0)]  # (name, split, λ, state, seconds)
    curves = []
    for (done, state_at), name in zip(steps(), names):
        start = time.perf_counter()
        splits = [e.name for e in done]
        with evaluator.selecting():
            scores = {lam: val_score(evaluator, state_at(lam), splits) for lam in grid.merge_lambdas}
        lam = best_lambda(scores)
        curves.append({"row": name, "val": [{"lambda": x, "score": s} for x, s in scores.items()]})
        split = ("merged" if grid.tasks is None else "all") if merged_row else splits[-1]
        rows.append((name, split, lam, state_at(lam), time.perf_counter() - start))
    evaluated = []
    for name, split, lam, state, seconds in rows:
        plain = evaluator.evaluate(state, "test")
        tasks_acc = [task_accuracy(evaluator, state, s, plain, held_out) if s != "merged"
                     else accuracy_on(plain["confusion"], held_out) for s in columns]
        evaluated.append({"name": name, "split": split, "lambda": lam, "seconds": seconds, "test": plain,
                          "tasks": tasks_acc})
    write_run_files(run_dir, evaluated, columns, held_out, grid.tasks is None, merged_row, curves)
    return {"lambdas": {r["name"]: r["lambda"] for r in evaluated[1:]}}


def entry_statistics(evaluator: Evaluator, kinds: frozenset[str], entries: list[Entry],
                     readers: Mapping[Path, StateDictReader]) -> list[dict]:
    """Each task model's data statistics (Fisher, input Grams) on its own training split:
    what a data-using merge method weights its task vector by. Never the validation or test
    data, so choosing λ on ``val`` stays a fair selection."""
    model = evaluator.model.backbone
    out = []
    for entry in entries:
        model.load_state_dict(dict(readers[entry.path].entries))
        out.append(compute_statistics(model, evaluator.datamodule.dataloader(entry.name), set(kinds)))
    return out


def task_matrix_metrics(matrix: np.ndarray, merged_row: bool) -> dict[str, float]:
    """``music.continual``'s metrics over the task-accuracy matrix (rows: start, then each
    absorbed task; all at once: every task learned at row 1)."""
    tasks = matrix.shape[1]
    learned = {j: 1 if merged_row else j + 1 for j in range(tasks)}
    drops = [v for v in forgetting(matrix, learned).values() if not math.isnan(v)]
    return {"average_accuracy": average_accuracy(matrix, range(tasks)),
            "backward_transfer": backward_transfer(matrix, learned),
            "mean_forgetting": float(np.mean(drops)) if drops else math.nan,
            "average_incremental_accuracy": average_incremental_accuracy(matrix, learned),
            "forward_transfer": forward_transfer(matrix, learned, 0)}


def write_run_files(run_dir: Path, rows: list[dict], columns: list[str], held_out: list[int], class_tasks: bool,
                    merged_row: bool, curves: list[dict]) -> None:
    """The files ``music fit``'s phase evaluation writes, for a merge cell's rows."""
    confusions = [r["test"]["confusion"] for r in rows]
    names = [r["name"] for r in rows]
    if class_tasks:  # exactly what a fine-tuning cell's evaluation computes
        task_classes = [None] + [split_classes(r["split"], held_out) for r in rows[1:]]
        summary = summarise(confusions, task_classes, 0)
    else:  # domain tasks: the metrics of the task-accuracy matrix
        summary = summarise(confusions, [None] * len(rows), 0)
        summary |= task_matrix_metrics(np.array([r["tasks"] for r in rows]), merged_row)
    summary |= {"row_names": names, "reference_row": 0, "merge_lambdas": {r["name"]: r["lambda"] for r in rows[1:]},
                "merge_lambda": rows[-1]["lambda"], "task_accuracies": dict(zip(columns, rows[-1]["tasks"])),
                "merge_val_curves": curves}
    task_names = ["merged"] if merged_row and class_tasks else [phase_name(s) for s in columns]
    header = ["row", "phase", *(f"acc_{c}" for c in range(len(confusions[0]))), *(f"task_{n}" for n in task_names), "acc"]
    table = [[i, r["name"], *per_class_accuracy(r["test"]["confusion"]).tolist(), *r["tasks"],
              accuracy_on(r["test"]["confusion"], range(len(r["test"]["confusion"])))] for i, r in enumerate(rows)]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([[f"{v:.6f}" if isinstance(v, float) else v for v in line] for line in table])
    write_atomically(run_dir / "accuracy_matrix.csv", buffer.getvalue())
    write_atomically(run_dir / "continual_metrics.json", json.dumps(to_json(summary), indent=1))
    phases = {r["name"]: {"index": i, "split": r["split"], "epochs": 0, "lr": None, "lambda": r["lambda"],
                          "acc": r["test"]["acc"], "loss": r["test"]["loss"], "confusion_matrix": r["test"]["confusion"]}
              for i, r in enumerate(rows[1:])}
    write_atomically(run_dir / "phase_metrics.json", json.dumps(phases, indent=1))
    costs = {r["name"]: {"index": i, "train_seconds": r["seconds"]} for i, r in enumerate(rows[1:])}
    write_atomically(run_dir / "phase_costs.json", json.dumps(costs, indent=1))
