"""What only the merge axis of a study has to report: ``<out>/MERGE_REPORT.md`` and
``<out>/study_merge.csv``, from the study database.

The cells themselves (final accuracy, average accuracy, BWT, forgetting) are in the main
report's tables beside every other kind; here, per merge method and learning rate: the λ chosen
on ``val`` (per cell, and per absorbed task for the sequential cells) and, on a grid of domain
tasks, the normalised accuracy — per task, the merged model's accuracy on that task divided by
the accuracy of the model fine-tuned on that task alone (its ``task`` cell, same seed and
learning rate), averaged over the tasks (Ilharco et al. 2023; FusionBench's normalised
accuracy) — mean ± sample std over seeds.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from music.checkpoint import load_state_dict, write_atomically
from music.dashboard import markdown_table
from music.experiments import study_db
from music.experiments.common import fmt_mean_std, spread_note, write_csv
from music.experiments.study_grid import (Grid, method_name, phase_name, plan, pretrained_checkpoint,
                                          task_checkpoint)
from music.experiments.task_vector_report import write_analysis_section
from music.task_vector import TaskVector

COLUMNS = ["seed", "merge", "lr", "ordering", "lambda", "lambdas", "final_acc", "average_accuracy", "backward_transfer",
           "normalised_accuracy"]


def normalised_accuracy(merged: dict[str, float], individual: dict[str, float]) -> float:
    """Mean over the tasks of merged / individual task accuracy; NaN when a task is missing."""
    ratios = [merged[t] / individual[t] if individual.get(t) and merged.get(t) is not None else math.nan
              for t in individual]
    return float(np.mean(ratios)) if ratios else math.nan


def merge_rows(grid: Grid) -> list[dict]:
    """One row per finished merge cell: its settings, chosen λ and metrics, and (domain tasks)
    its normalised accuracy against that seed's task cells."""
    cells, _, _, _ = study_db.load(study_db.connect(grid.db_url, read_only=True))
    stored = {(c["seed"], c["name"]): c for c in cells}
    planned = plan(grid)
    individual: dict[tuple[int, float], dict[str, float]] = defaultdict(dict)
    for cell in planned:
        row = stored.get((cell.seed, cell.name))
        if cell.kind == "task" and row is not None:  # a one-task cell's average accuracy is its task's accuracy
            individual[(cell.seed, cell.lr)][cell.phases[0]["split"]] = row["average_accuracy"]
    rows = []
    for cell in planned:
        row = stored.get((cell.seed, cell.name))
        if cell.kind != "merge" or row is None:
            continue
        metrics = json.loads(row["continual_metrics"] or "{}")
        tasks = metrics.get("task_accuracies") or {}
        rows.append({"seed": cell.seed, "merge": method_name(cell.method), "lr": cell.lr,
                     "ordering": "all at once" if cell.ordering is None else "-".join(map(str, cell.ordering)),
                     "lambda": metrics.get("merge_lambda"),
                     "lambdas": " ".join(f"{v:g}" for v in (metrics.get("merge_lambdas") or {}).values()),
                     "final_acc": row["final_acc"], "average_accuracy": row["average_accuracy"],
                     "backward_transfer": row["backward_transfer"],
                     "normalised_accuracy": (normalised_accuracy(tasks, individual[(cell.seed, cell.lr)])
                                             if grid.tasks is not None else None)})
    return rows


def _values(rows: list[dict], key: str) -> list[float]:
    return [math.nan if r[key] is None else float(r[key]) for r in rows]


def write_merge_report(grid: Grid) -> Path:
    out = Path(grid.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = merge_rows(grid)
    write_csv(out / "study_merge.csv", rows, header=COLUMNS)
    domain = grid.tasks is not None
    header = ["lr", "merge", "cells", "λ (val)", "test acc", "avg acc (tasks)", "BWT",
              *(["normalised acc"] if domain else [])]
    table = []
    for lr in grid.lrs:
        for merge in grid.merges:
            for label, of in (("all at once", lambda r: r["ordering"] == "all at once"),
                              ("sequential, all orderings", lambda r: r["ordering"] != "all at once")):
                rs = [r for r in rows if r["lr"] == lr and r["merge"] == method_name(merge) and of(r)]
                table.append([f"{lr:g}", f"{method_name(merge)}, {label}", len(rs), fmt_mean_std(_values(rs, "lambda"), 2),
                              fmt_mean_std(_values(rs, "final_acc")), fmt_mean_std(_values(rs, "average_accuracy")),
                              fmt_mean_std(_values(rs, "backward_transfer")),
                              *([fmt_mean_std(_values(rs, "normalised_accuracy"))] if domain else [])])
    seeds = sorted({r["seed"] for r in rows})
    text = ["# Merge axis: task vectors added all at once and one at a time", "",
            "Generated by `music study` (`music/experiments/study_merge_report.py`) from the study database. "
            "Each task is fine-tuned alone from each seed's pretrained model (`task` cells); its task vector is "
            "merged into that model by each method, all at once or absorbed in each ordering "
            "(θ_k = θ_0 + λ_k · merge(τ_1..τ_k)), λ chosen per row from "
            f"{grid.merge_lambdas} by accuracy on `val` (never the test set).", "",
            f"{spread_note([len(seeds)])}; sequential rows pool every ordering. λ (val): the chosen λ of the "
            "final model.", "", markdown_table(header, table), ""]
    if domain:
        text += ["Normalised accuracy: per task, the merged model's test accuracy on the task divided by that of "
                 "the model fine-tuned on the task alone (same seed and learning rate), averaged over the tasks.", ""]
    text += ["Per cell (λ per absorbed task for the sequential cells): `study_merge.csv`.", ""]
    text += geometry(grid, out)
    write_atomically(out / "MERGE_REPORT.md", "\n".join(text))
    return out / "MERGE_REPORT.md"


def geometry(grid: Grid, out: Path) -> list[str]:
    """The task vectors' geometry (``music.task_vector_analysis``) of the first seed at the first
    learning rate: why a method that trims, elects signs or whitens keeps more or less of them.
    Read from the run directories (not the database): absent, the section says so."""
    seed, lr = grid.seeds[0], grid.lrs[0]
    tasks = [c for c in plan(grid) if c.kind == "task" and c.seed == seed and c.lr == lr]
    base = pretrained_checkpoint(grid, seed)
    paths = {phase_name(c.phases[0]["split"]): task_checkpoint(grid, c) for c in tasks}
    if not tasks or not base.exists() or not all(p.exists() for p in paths.values()):
        return ["## Task-vector geometry", "", f"Not drawn: the run directories of seed {seed} are not in "
                f"{grid.runs_dir} (the report reads the task models from them).", ""]
    pretrained = load_state_dict(base)
    vectors = {name: TaskVector.from_state_dicts(pretrained, load_state_dict(path)) for name, path in paths.items()}
    section = write_analysis_section(vectors, out, stem="merge_task_vectors")
    return [section, "", f"Task vectors of seed {seed} at learning rate {lr:g}: τ_t = θ(task cell t) − θ(pretrained).",
            ""]
