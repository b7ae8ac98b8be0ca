"""Continual-learning metrics on a hand-made accuracy matrix, and the callback that writes them."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from music import continual

# rows: reference, after task 1 (class 1), after task 2 (class 2), after task 3 (class 3); class 0 untouched
A = np.array([[0.9, 0.0, 0.0, 0.0],
              [0.8, 1.0, 0.0, 0.0],
              [0.6, 0.5, 0.9, 0.0],
              [0.3, 0.2, 0.6, 1.0]])


def confusion(accuracies: np.ndarray, sink: int, per_class: int = 10) -> list[list[int]]:
    """A confusion matrix with these per-class accuracies; every error predicts ``sink``."""
    k = len(accuracies)
    matrix = np.zeros((k, k), dtype=int)
    for c, acc in enumerate(accuracies):
        correct = round(acc * per_class)
        matrix[c, c] = correct
        matrix[c, sink if c != sink else (c + 1) % k] += per_class - correct
    return matrix.tolist()


def test_metrics_on_a_hand_made_matrix():
    assert continual.average_accuracy(A, [1, 2, 3]) == pytest.approx((0.2 + 0.6 + 1.0) / 3)
    forgetting = continual.forgetting(A, {0: 0, 1: 1, 2: 2, 3: 3})
    assert forgetting[0] == pytest.approx(0.9 - 0.3) and forgetting[1] == pytest.approx(1.0 - 0.2)
    assert forgetting[2] == pytest.approx(0.9 - 0.6) and math.isnan(forgetting[3])  # the last task: none yet
    assert continual.backward_transfer(A, {1: 1, 2: 2, 3: 3}) == pytest.approx(((0.2 - 1.0) + (0.6 - 0.9)) / 2)
    assert continual.forgetting_vs_reference(A, 0, [0]) == {0: pytest.approx(0.6)}
    assert math.isnan(continual.backward_transfer(A, {3: 3}))  # one task: no backward transfer


def test_confusion_helpers():
    matrix = [[8, 2], [5, 5]]
    assert continual.per_class_accuracy(matrix).tolist() == [0.8, 0.5]
    assert continual.accuracy_on(matrix, [0, 1]) == pytest.approx(13 / 20)
    assert continual.prediction_share(matrix, 1) == pytest.approx(7 / 20)
    assert math.isnan(continual.per_class_accuracy([[0, 0], [1, 1]])[0])  # class absent from the set


def test_summarise_agrees_with_the_hand_computed_values():
    confusions = [confusion(row, sink=max(i, 1) if i < 3 else 3) for i, row in enumerate(A)]
    result = continual.summarise(confusions, [None, [1], [2], [3]], reference_row=0)
    assert result["trained_classes"] == [1, 2, 3] and result["untouched_classes"] == [0]
    assert result["average_accuracy"] == pytest.approx(0.6)
    assert result["backward_transfer"] == pytest.approx(-0.55)
    assert result["mean_forgetting"] == pytest.approx((0.8 + 0.3) / 2)
    assert result["untouched_forgetting"] == pytest.approx(0.6)
    assert result["final_acc"] == pytest.approx((3 + 2 + 6 + 10) / 40)
    assert result["collapse_class"] == 3 and result["collapse_share"] == pytest.approx((10 + 7 + 8 + 4) / 40)
    assert json.dumps(continual.to_json(result))  # NaN becomes null: valid JSON


def test_summarise_merged_task_and_bad_input():
    confusions = [confusion(A[0], 1), confusion(A[3], 3)]
    result = continual.summarise(confusions, [None, [1, 2, 3]], reference_row=0)
    assert result["average_accuracy"] == pytest.approx((2 + 6 + 10) / 30)  # one task of three classes
    assert math.isnan(result["backward_transfer"]) and math.isnan(result["collapse_share"])
    with pytest.raises(ValueError, match="2 confusion matrices but 1 task"):
        continual.summarise(confusions, [None], reference_row=0)
    with pytest.raises(ValueError, match="first row 7"):
        continual.forgetting(A, {0: 7})


def read_matrix(log_dir: Path) -> list[dict]:
    with open(log_dir / "accuracy_matrix.csv") as f:
        return list(csv.DictReader(f))


def test_callback_writes_the_accuracy_matrix_and_metrics_and_resumes_them(shrink):
    config = shrink("seq")
    whole = run("fit", "--config", config, "--trainer.limit_train_batches", 2)
    log_dir = Path(whole.trainer.log_dir)
    rows = read_matrix(log_dir)
    assert [r["phase"] for r in rows] == ["start", "pretrain", "class_3", "class_4", "class_7"]
    phases = json.loads((log_dir / "phase_metrics.json").read_text())
    for row in rows[1:]:  # the matrix agrees with the confusion matrices of phase_metrics.json
        expected = continual.per_class_accuracy(phases[row["phase"]]["confusion_matrix"])
        assert [float(row[f"acc_{c}"]) for c in range(10)] == pytest.approx(expected.tolist(), abs=1e-6)
        assert float(row["acc"]) == pytest.approx(phases[row["phase"]]["acc"], abs=1e-6)
    metrics = json.loads((log_dir / "continual_metrics.json").read_text())
    assert metrics["reference_row"] == 1 and metrics["trained_classes"] == [3, 4, 7]  # row before class_3
    assert metrics["collapse_class"] == 7
    tags = set(EventAccumulator(str(log_dir)).Reload().Tags()["scalars"])
    assert {"test/continual/average_accuracy", "test/continual/collapse_share", "test_per_class/forgetting/class_0"} <= tags
    # resumed from the class_3 snapshot into a new run directory: the earlier rows come from the state
    resumed = run("fit", "--config", config, "--trainer.limit_train_batches", 2,
                  "--ckpt_path", log_dir / "checkpoints" / "phase-1-class_3.ckpt")
    assert Path(resumed.trainer.log_dir) != log_dir
    assert read_matrix(Path(resumed.trainer.log_dir)) == rows
    assert json.loads((Path(resumed.trainer.log_dir) / "continual_metrics.json").read_text()) == metrics


def test_start_evaluation_leaves_training_unchanged(shrink):
    phases = [{"name": "pretrain", "split": "remaining", "epochs": 1}, {"name": "merged", "split": "merged", "epochs": 1}]
    config = shrink("merged", phases=phases)
    with_initial = run("fit", "--config", config, "--trainer.limit_train_batches", 2)
    data = yaml.safe_load(config.read_text())
    data.setdefault("evaluation", {})["evaluate_initial"] = False
    without_path = config.with_name("no_initial.yaml")
    without_path.write_text(yaml.safe_dump(data))
    without = run("fit", "--config", without_path, "--trainer.limit_train_batches", 2)
    assert [r["phase"] for r in read_matrix(Path(without.trainer.log_dir))] == ["pretrain", "merged"]
    for name, value in with_initial.model.state_dict().items():
        assert torch.equal(without.model.state_dict()[name], value), name


def test_forward_transfer_and_average_incremental_accuracy_on_a_hand_made_matrix():
    # columns: tasks 1..3 (A's classes 1..3); rows: reference, after task 1, 2, 3
    tasks = A[:, 1:]
    learned = {0: 1, 1: 2, 2: 3}
    # FWT: accuracy on task j in the row before it was trained, minus the reference row's
    assert continual.forward_transfer(tasks, learned, 0) == pytest.approx(((0.0 - 0.0) + (0.0 - 0.0)) / 2)
    shifted = tasks.copy()
    shifted[1, 1], shifted[2, 2] = 0.4, 0.2
    assert continual.forward_transfer(shifted, learned, 0) == pytest.approx((0.4 + 0.2) / 2)
    # AIA: mean over t of the mean accuracy on tasks 1..t right after t
    expected = np.mean([1.0, (0.5 + 0.9) / 2, (0.2 + 0.6 + 1.0) / 3])
    assert continual.average_incremental_accuracy(tasks, learned) == pytest.approx(expected)
    assert math.isnan(continual.forward_transfer(tasks, {0: 1}, 0))  # one task: nothing to transfer to


def test_summarise_reports_forward_transfer_against_the_reference_row():
    rows = [confusion(row, sink=0) for row in A]
    summary = continual.summarise(rows, [None, [1], [2], [3]], reference_row=0)
    assert summary["forward_transfer"] == pytest.approx(0.0)
    assert summary["average_incremental_accuracy"] == pytest.approx(np.mean([1.0, 0.7, 0.6]))


# -- domain tasks: each task scored on its own test set ----------------------------------------

def test_summarise_takes_a_task_accuracy_matrix_for_domain_tasks():
    """Domain tasks share every class: their accuracies come as a matrix, and forgetting is
    per task (Chaudhry et al.), not per class."""
    rows = [confusion(row, sink=0) for row in A]
    tasks = A[:, 1:]  # as if each column were a domain task's own test set
    summary = continual.summarise(rows, [None, *[[0, 1, 2, 3]] * 3], reference_row=0, task_accuracy=tasks)
    assert summary["average_accuracy"] == pytest.approx((0.2 + 0.6 + 1.0) / 3)
    assert summary["backward_transfer"] == pytest.approx(((0.2 - 1.0) + (0.6 - 0.9)) / 2)
    assert summary["forgetting_per_task"][:2] == pytest.approx([1.0 - 0.2, 0.9 - 0.6])
    assert math.isnan(summary["forgetting_per_task"][2])  # the last task: none yet
    assert summary["mean_forgetting"] == pytest.approx((0.8 + 0.3) / 2)
    assert summary["average_incremental_accuracy"] == pytest.approx(np.mean([1.0, 0.7, 0.6]))
    assert "forgetting_per_task" not in continual.summarise(rows, [None, [1], [2], [3]], reference_row=0)
    with pytest.raises(ValueError, match=r"task_accuracy has shape \(4, 2\), but the run has 4 rows and 3 tasks"):
        continual.summarise(rows, [None, [1], [2], [3]], reference_row=0, task_accuracy=tasks[:, :2])


PERMUTED = [{"name": "perm_1", "split": "train@perm_1", "epochs": 1}, {"name": "perm_2", "split": "train@perm_2", "epochs": 1}]


def test_a_domain_run_scores_each_task_on_its_own_test_set_and_resumes_them(shrink):
    config = shrink("permuted_mnist", phases=PERMUTED, iterations_per_epoch=None)
    args = ["--config", config, "--trainer.limit_train_batches", 2, "--model.backbone.init_args.hidden", "[64, 32]"]
    whole = run("fit", *args)
    log_dir = Path(whole.trainer.log_dir)
    rows = read_matrix(log_dir)
    assert list(rows[0]) == ["row", "phase", *(f"acc_{c}" for c in range(10)), "task_perm_1", "task_perm_2", "acc"]
    assert [r["phase"] for r in rows] == ["start", "perm_1", "perm_2"]
    datamodule, model = whole.datamodule, whole.model
    for column, split in (("task_perm_1", "train@perm_1"), ("task_perm_2", "train@perm_2")):
        # the final row: the model as it ended, on that task's permuted test set
        acc = model.evaluate(datamodule.dataloader(split, test=True))[0]["acc"]
        assert float(rows[-1][column]) == pytest.approx(acc, abs=1e-6)
    phases = json.loads((log_dir / "phase_metrics.json").read_text())
    assert float(rows[-1]["acc"]) == pytest.approx(phases["perm_2"]["acc"], abs=1e-6)  # acc: the plain test set
    assert phases["perm_2"]["acc"] == pytest.approx(model.evaluate(datamodule.dataloader("test"))[0]["acc"], abs=1e-6)
    metrics = json.loads((log_dir / "continual_metrics.json").read_text())
    final = [float(rows[-1][c]) for c in ("task_perm_1", "task_perm_2")]
    assert metrics["average_accuracy"] == pytest.approx(np.mean(final), abs=1e-6)
    assert metrics["backward_transfer"] == pytest.approx(final[0] - float(rows[1]["task_perm_1"]), abs=1e-6)
    assert metrics["task_columns"] == ["task_perm_1", "task_perm_2"] and metrics["reference_row"] == 0
    resumed = run("fit", *args, "--ckpt_path", log_dir / "checkpoints" / "phase-0-perm_1.ckpt")
    assert read_matrix(Path(resumed.trainer.log_dir)) == rows  # the earlier rows' task accuracies come from the state
    assert json.loads((Path(resumed.trainer.log_dir) / "continual_metrics.json").read_text()) == metrics


def test_domain_incremental_split_mnist_labels_each_digit_by_its_position_in_the_task(shrink):
    phases = [{"name": "task_1", "classes": [0, 1], "epochs": 1}, {"name": "task_2", "classes": [2, 3], "epochs": 1}]
    config = shrink("split_mnist", "split_mnist_domain", phases=phases, held_out_classes=[], iterations_per_epoch=None)
    cli = run("fit", "--config", config, "--trainer.limit_train_batches", 2)
    assert cli.model.num_classes == 2 and cli.model.backbone.fc3.out_features == 2
    datamodule = cli.datamodule
    assert torch.equal(datamodule.dataset("classes_2_3").labels, datamodule.train_labels[
        (datamodule.train_labels == 2) | (datamodule.train_labels == 3)] - 2)
    rows = read_matrix(Path(cli.trainer.log_dir))
    assert list(rows[0]) == ["row", "phase", "acc_0", "acc_1", "task_task_1", "task_task_2", "acc"]
    acc = cli.model.evaluate(datamodule.dataloader("classes_2_3", test=True))[0]["acc"]
    assert float(rows[-1]["task_task_2"]) == pytest.approx(acc, abs=1e-6)


@pytest.mark.mnist
def test_permuted_mnist_two_tasks_on_real_mnist(shrink_mnist):
    """The shipped Permuted MNIST protocol, two tasks, a few batches each: every row scores
    both permuted test sets (10,000 digits each), and the tasks are really different inputs."""
    config = shrink_mnist("permuted_mnist", phases=PERMUTED, iterations_per_epoch=None)
    cli = run("fit", "--config", config, "--trainer.limit_train_batches", 3, "--model.backbone.init_args.hidden", "[100, 100]")
    rows = read_matrix(Path(cli.trainer.log_dir))
    assert [r["phase"] for r in rows] == ["start", "perm_1", "perm_2"]
    assert all(0 <= float(r[c]) <= 1 for r in rows for c in ("task_perm_1", "task_perm_2"))
    datamodule = cli.datamodule
    assert len(datamodule.dataset("train@perm_2", test=True)) == 10_000
    assert torch.equal(datamodule.dataset("train@perm_1").labels, datamodule.train_labels)  # labels unchanged
    assert not torch.equal(datamodule.dataset("train@perm_1").images, datamodule.dataset("train@perm_2").images)
