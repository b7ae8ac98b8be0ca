"""Continual-learning metrics over an accuracy matrix, as the literature defines them.

The accuracy matrix ``A`` has one row per evaluation (row 0: the model before the first
fine-tuning task — the pretrained reference; row ``i``: after the ``i``-th evaluated phase) and
one column per class (or per task). ``A[i, j]`` is the test accuracy on column ``j`` after row
``i``. Everything here is a pure function of ``A`` (or of confusion matrices), so the metrics
can be checked on a hand-made matrix and recomputed from the CSV files a run writes.

Definitions (``T`` = the last row):
- average accuracy (Lopez-Paz & Ranzato, GEM 2017): mean of ``A[T, j]`` over the task columns;
- forgetting of column ``j`` (Chaudhry et al. 2018): ``max_{l in [first_j, T-1]} A[l, j] - A[T, j]``,
  where ``first_j`` is the row at which ``j`` was learned (or the reference row for a column
  no phase trained);
- backward transfer (GEM): ``mean_{tasks j learned before the last} (A[T, j] - A[r_j, j])``
  with ``r_j`` the row right after task ``j`` was learned; negative means forgetting;
- forgetting against the reference on untouched columns: ``A[ref, j] - A[T, j]``;
- forward transfer (GEM): ``mean_{tasks j after the first} (A[r_j - 1, j] - A[b, j])``: accuracy
  on task ``j`` just before it is trained, against the baseline row ``b`` (the untrained or
  pretrained reference); positive means earlier tasks helped ``j`` before it was seen;
- average incremental accuracy (Rebuffi et al., iCaRL 2017): the mean, over the tasks ``t``, of
  the average accuracy on tasks ``1..t`` right after task ``t``;
- collapse share: the share of test predictions equal to one class (the last phase's) — 1/10
  on a balanced 10-class test set for a healthy model, near 1 for a collapsed one.

A class task's accuracy is read off the test set's confusion matrix (its classes' rows). A
domain task (rotated or permuted inputs, or labels mapped to the position in the task) has a
test set of its own, so its runs give ``summarise`` the task-accuracy matrix directly; the
task metrics (average accuracy, BWT, FWT, average incremental accuracy) are then computed from
it, and forgetting is Chaudhry et al.'s per task, ``forgetting_per_task``, its mean
``mean_forgetting``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def per_class_accuracy(confusion: Sequence[Sequence[int]]) -> np.ndarray:
    """Recall of every class from a confusion matrix (rows: true class); NaN for a class
    absent from the evaluated set."""
    confusion = np.asarray(confusion, dtype=float)
    support = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / support, np.nan)


def accuracy_on(confusion: Sequence[Sequence[int]], classes: Sequence[int]) -> float:
    """Accuracy on the test samples whose true class is in ``classes`` (a task's accuracy)."""
    confusion = np.asarray(confusion, dtype=float)
    classes = list(classes)
    support = confusion[classes].sum()
    return float(confusion[classes, classes].sum() / support) if support else math.nan


def prediction_share(confusion: Sequence[Sequence[int]], cls: int) -> float:
    """Share of all test predictions that are ``cls`` (the collapse check)."""
    confusion = np.asarray(confusion, dtype=float)
    return float(confusion[:, cls].sum() / confusion.sum())


def _check(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] < 1:
        raise ValueError(f"An accuracy matrix must be 2-D with at least one row; got shape {matrix.shape}.")
    return matrix


def average_accuracy(matrix: np.ndarray, columns: Sequence[int]) -> float:
    """Mean final accuracy over ``columns`` (the tasks learned)."""
    matrix = _check(matrix)
    return float(np.mean(matrix[-1, list(columns)]))


def forgetting(matrix: np.ndarray, first_rows: Mapping[int, int]) -> dict[int, float]:
    """Per column ``j`` in ``first_rows``: best accuracy from row ``first_rows[j]`` up to the row
    before the last, minus the final accuracy. NaN when no earlier row exists."""
    matrix = _check(matrix)
    last = len(matrix) - 1
    out = {}
    for column, first in first_rows.items():
        if not 0 <= first <= last:
            raise ValueError(f"first row {first} of column {column} is outside the matrix's rows 0..{last}.")
        earlier = matrix[first:last, column]
        out[column] = float(earlier.max() - matrix[last, column]) if len(earlier) else math.nan
    return out


def backward_transfer(matrix: np.ndarray, learned_rows: Mapping[int, int]) -> float:
    """GEM's BWT over the tasks (columns) learned before the last one; ``learned_rows[j]`` is the
    row right after task ``j`` was trained. NaN with fewer than two tasks."""
    matrix = _check(matrix)
    last = len(matrix) - 1
    earlier = [(column, row) for column, row in learned_rows.items() if row < last]
    if not earlier:
        return math.nan
    return float(np.mean([matrix[last, column] - matrix[row, column] for column, row in earlier]))


def forward_transfer(matrix: np.ndarray, learned_rows: Mapping[int, int], baseline_row: int) -> float:
    """GEM's FWT over the tasks after the first: the accuracy on task ``j`` in the row before it
    was trained, minus the baseline row's. NaN with fewer than two tasks."""
    matrix = _check(matrix)
    later = sorted(learned_rows.items(), key=lambda item: item[1])[1:]
    if not later:
        return math.nan
    return float(np.mean([matrix[row - 1, column] - matrix[baseline_row, column] for column, row in later]))


def average_incremental_accuracy(matrix: np.ndarray, learned_rows: Mapping[int, int]) -> float:
    """Mean over tasks ``t`` (in training order) of the mean accuracy on the tasks learned so
    far, in the row right after ``t``."""
    matrix = _check(matrix)
    order = sorted(learned_rows.items(), key=lambda item: item[1])
    if not order:
        return math.nan
    return float(np.mean([np.mean([matrix[row, c] for c, _ in order[: t + 1]]) for t, (_, row) in enumerate(order)]))


def forgetting_vs_reference(matrix: np.ndarray, reference_row: int, columns: Sequence[int]) -> dict[int, float]:
    """``A[reference, j] - A[T, j]`` for each column: what fine-tuning cost the reference model
    on classes no phase trained."""
    matrix = _check(matrix)
    return {column: float(matrix[reference_row, column] - matrix[-1, column]) for column in columns}


def summarise(confusions: Sequence[Sequence[Sequence[int]]], task_classes: Sequence[Sequence[int] | None],
              reference_row: int | None, task_accuracy: Sequence[Sequence[float]] | None = None) -> dict:
    """All the metrics of one run from its confusion matrices, one per row.

    ``task_classes[i]`` is what row ``i``'s phase trained on (``None``: not a fine-tuning task,
    e.g. the initial evaluation or pretraining). ``reference_row`` is the row before the first
    task (``None`` when there is none). ``task_accuracy[i][j]``: the accuracy after row ``i`` on
    the ``j``-th task's own test set (tasks in row order), for tasks whose accuracy the confusion
    matrices cannot give (domain tasks); ``None``: read off the confusion matrices."""
    if len(confusions) != len(task_classes):
        raise ValueError(f"{len(confusions)} confusion matrices but {len(task_classes)} task entries: one per row.")
    matrix = np.stack([per_class_accuracy(c) for c in confusions])
    num_classes = matrix.shape[1]
    tasks = [(row, list(classes)) for row, classes in enumerate(task_classes) if classes]
    trained = sorted({c for _, classes in tasks for c in classes})
    untouched = [c for c in range(num_classes) if c not in trained]
    if task_accuracy is None:
        task_matrix = np.array([[accuracy_on(conf, classes) for _, classes in tasks] for conf in confusions])
    else:
        task_matrix = np.asarray(task_accuracy, dtype=float).reshape(len(confusions), -1)
        if task_matrix.shape != (len(confusions), len(tasks)):
            raise ValueError(f"task_accuracy has shape {task_matrix.shape}, but the run has {len(confusions)} rows "
                             f"and {len(tasks)} tasks: one accuracy per row and task.")
    learned = {j: row for j, (row, _) in enumerate(tasks)}
    first = {c: max(row for row, classes in tasks if c in classes) for c in trained}  # last time it was trained
    if reference_row is not None:
        first |= {c: reference_row for c in untouched}
    final = confusions[-1]
    last_classes = tasks[-1][1] if tasks else []
    result = {
        "rows": len(confusions),
        "trained_classes": trained,
        "untouched_classes": untouched,
        "final_acc": accuracy_on(final, range(num_classes)),
        "average_accuracy": average_accuracy(task_matrix, range(len(tasks))) if tasks else math.nan,
        "backward_transfer": backward_transfer(task_matrix, learned) if tasks else math.nan,
        "forgetting_per_class": {str(c): v for c, v in forgetting(matrix, first).items()},
        "held_out_acc": accuracy_on(final, trained) if trained else math.nan,
        "untouched_acc": accuracy_on(final, untouched) if untouched else math.nan,
        "collapse_class": last_classes[0] if len(last_classes) == 1 else None,
        "collapse_share": prediction_share(final, last_classes[0]) if len(last_classes) == 1 else math.nan,
    }
    result["average_incremental_accuracy"] = average_incremental_accuracy(task_matrix, learned) if tasks else math.nan
    result["forward_transfer"] = (forward_transfer(task_matrix, learned, reference_row)
                                  if tasks and reference_row is not None else math.nan)
    if reference_row is not None:
        result["reference_acc"] = accuracy_on(confusions[reference_row], range(num_classes))
        vs_reference = forgetting_vs_reference(matrix, reference_row, untouched)
        result["untouched_forgetting_per_class"] = {str(c): v for c, v in vs_reference.items()}
        result["untouched_forgetting"] = float(np.mean(list(vs_reference.values()))) if untouched else math.nan
    # average forgetting over the tasks' classes (Chaudhry et al.); the last task has none yet
    values = [v for c, v in result["forgetting_per_class"].items() if int(c) in trained and not math.isnan(v)]
    if task_accuracy is not None:  # a domain task's classes are every task's: forgetting is per task
        per_task = forgetting(task_matrix, learned) if tasks else {}
        result["forgetting_per_task"] = [per_task[j] for j in range(len(tasks))]
        values = [v for v in per_task.values() if not math.isnan(v)]
    result["mean_forgetting"] = float(np.mean(values)) if values else math.nan
    return result


def to_json(value):
    """NaN → ``None`` (JSON has no NaN), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value
