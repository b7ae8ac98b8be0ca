"""``music continual``: scoring from each run's own task accuracies (class, task and domain
scenarios alike), settings taken from ``music tune`` outputs, and bad input."""

import csv
import math

import numpy as np
import pytest

from conftest import run

from music.callbacks import Phase
from music.continual import accuracy_on
from music.evaluation import PhaseEvaluation
from music.experiments.common import Data, Output
from music.experiments.continual import ContinualStudy, Tuned, score, task_record
from music.experiments.tune import validation_score


def conf(per_class_correct):  # 10 test samples per class of 4; errors go to class 0
    return [[10 if i == j == 0 else (c if i == j else (10 - c if j == 0 else 0)) for j in range(4)]
            for i, c in enumerate(per_class_correct)]


def record_of(rows, tasks, names):
    """What the evaluation writes for a class-incremental run: task columns read off the confusion matrices."""
    return {"row_names": names, "task_columns": [f"task_{n}" for n in names[1:]],
            "task_matrix": [[accuracy_on(c, t) for t in tasks] for c in rows],
            "acc": [accuracy_on(c, range(len(c))) for c in rows]}


def test_score_of_a_sequence_and_of_joint_training():
    tasks = [[0, 1], [2, 3]]
    rows = [conf([10, 0, 0, 0]), conf([10, 10, 0, 0]), conf([10, 5, 10, 10])]
    s = score(record_of(rows, tasks, ["start", "t1", "t2"]), "class")
    assert s["average_accuracy"] == pytest.approx((0.75 + 1.0) / 2) and s["final_accuracy"] == pytest.approx(35 / 40)
    assert s["backward_transfer"] == pytest.approx(0.75 - 1.0) and s["forgetting"] == pytest.approx(0.25)
    assert s["forward_transfer"] == pytest.approx(0.0)  # task 2 before training: 0, as in row 0
    assert s["accuracy_after_task"] == [pytest.approx(1.0), pytest.approx(0.875)]
    joint_record = {"row_names": ["start", "joint"], "task_columns": ["task_joint"], "task_matrix": [[0.25], [0.875]],
                    "acc": [0.25, 0.875]}
    joint = score(joint_record, "class", tasks, [rows[0], rows[-1]])
    assert joint["average_accuracy"] == s["average_accuracy"] and math.isnan(joint["backward_transfer"])


def test_a_domain_run_is_scored_on_its_task_columns_not_its_plain_test_set():
    # Permuted-MNIST-like: the plain test set (acc) is no task's; three tasks on their own test sets
    record = {"row_names": ["start", "p1", "p2", "p3"], "task_columns": ["task_p1", "task_p2", "task_p3"],
              "task_matrix": [[0.1, 0.1, 0.1], [0.9, 0.2, 0.1], [0.7, 0.9, 0.3], [0.6, 0.8, 0.95]],
              "acc": [0.1, 0.9, 0.5, 0.4]}
    s = score(record, "domain")
    assert s["final_accuracy"] == s["average_accuracy"] == pytest.approx((0.6 + 0.8 + 0.95) / 3)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.9 - 0.8)) / 2)
    assert s["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.8 - 0.9)) / 2)
    assert s["forward_transfer"] == pytest.approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)
    assert s["accuracy_after_task"] == pytest.approx([0.9, 0.8, (0.6 + 0.8 + 0.95) / 3])
    assert score(record, "class")["final_accuracy"] == 0.4  # elsewhere the plain test set is every task's
    with pytest.raises(ValueError, match="no task columns"):
        score(record | {"task_columns": [], "task_matrix": [[]] * 4}, "domain")


def write_tune_output(folder, configs="split_mnist, methods/ewc", key="model.methods[0].init_args.lambda_"):
    """A music tune output as ``tune._report`` writes it: best.yaml, tune.csv, tune.md."""
    folder.mkdir(parents=True)
    (folder / "best.yaml").write_text("# music tune: trial 1, val score 0.9100 (tune in sqlite:///x)\nmodel:\n  methods:\n"
                                      "  - class_path: music.methods.EWC\n    init_args:\n      lambda_: 1234.5\n")
    with open(folder / "tune.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["trial", "state", "value", "last_reported", key, "epochs", "seconds", "run_dir",
                                    "error"])
        writer.writeheader()
        for trial, state, value, lam in ((0, "complete", 0.8, 10.0), (1, "complete", 0.91, 1234.5), (2, "pruned", "", 1.0)):
            writer.writerow({"trial": trial, "state": state, "value": value, "last_reported": value or 0.5, key: lam,
                             "epochs": 2, "seconds": 60.0, "run_dir": "", "error": ""})
    (folder / "tune.md").write_text(f"# Hyperparameter search\n\nRun configs: {configs}; overrides: none; validation "
                                    "split: 5000 samples.\n\nBudget: 3 trials; ended 3 (2 complete, 1 pruned, 0 failed)\n")
    return folder


def test_a_tune_output_gives_the_values_and_the_budget(tmp_path):
    tuned = Tuned.read(str(write_tune_output(tmp_path / "t")), "EWC", ["ewc"])
    assert tuned.values == {"lambda_": 1234.5} and tuned.describe() == "lambda_ = 1234"
    assert tuned.budget.startswith("3 trials planned, 3 ended (2 complete, 1 pruned, 0 failed), 3 min of training")
    assert "best: trial 1, val score 0.9100" in tuned.budget and tuned.path == str((tmp_path / "t" / "best.yaml").resolve())


@pytest.mark.parametrize("change, match", [
    (lambda d: {"tuned": {"domain": {"EWC": str(d)}}}, r"tuned: 'domain' is not allowed: name one of the scenarios"),
    (lambda d: {"tuned": {"class": {"SI": str(d)}}}, r"tuned: class: 'SI' is not allowed: name one of the methods"),
    (lambda d: {"tuned": {"class": {"EWC": str(d / "nowhere")}}}, r"is neither a music tune best.yaml nor a folder"),
    (lambda d: {"tuned": {"class": {"EWC": str(d / "tune.md")}}}, r"is not a best.yaml written by music tune"),
    (lambda d: (d / "tune.csv").unlink() or {"tuned": {"class": {"EWC": str(d)}}}, r"no tune.csv beside best.yaml"),
    (lambda d: {"tuned": {"class": {"EWC": str(write_tune_output(d.parent / "si", "split_mnist, methods/si"))}}},
     r"was tuned with the configs split_mnist, methods/si, which lack the method's \['ewc'\]"),
    (lambda d: {"scenarios": ["class", "domains"]}, r"scenarios=\['class', 'domains'\] is not allowed: choose from"),
    (lambda d: {"domain_configs": ["split_mnist_domainn"]}, r"'split_mnist_domainn' is neither a file nor a shipped"),
    (lambda d: {"seeds": []}, "seeds and methods must each name at least one entry"),
], ids=["scenario", "method", "missing", "not best.yaml", "no tune.csv", "other method's search", "bad scenario",
        "bad domain config", "no seeds"])
def test_bad_continual_settings_are_refused_in_one_line(tmp_path, change, match):
    folder = write_tune_output(tmp_path / "tune_ewc")
    settings = {"methods": {"None": [], "EWC": ["ewc"]}, "scenarios": ["class"],
                "data": Data(data_dir=str(tmp_path), download=False), "output": Output(root=str(tmp_path))}
    with pytest.raises((ValueError, FileNotFoundError), match=match) as error:
        ContinualStudy(**(settings | change(folder)))
    assert "\n" not in str(error.value)


PHASES = [{"name": "t1", "classes": [0, 1], "epochs": 1}, {"name": "t2", "classes": [2, 3], "epochs": 1}]


def test_class_and_domain_runs_are_scored_from_their_own_files_and_tuned_settings_are_applied(shrink, tmp_path):
    protocol = shrink("split_mnist", phases=PHASES, iterations_per_epoch=4)
    (tmp_path / "data").mkdir()  # synthetic: nothing to download
    study = ContinualStudy(methods={"None": [], "EWC": ["ewc"]}, protocol=[str(protocol)], scenarios=["class", "domain"],
                           domain_configs=["split_mnist_domain"], seeds=[0],
                           tuned={"class": {"EWC": str(write_tune_output(tmp_path / "tune_ewc"))}},
                           data=Data(data_dir=str(tmp_path / "data"), download=False),
                           output=Output(root=str(tmp_path), name="cl", quick=True))
    result = study.run()
    runs = {(r[0], r[1]): r for r in result["table"]}
    assert set(runs) == {("class", "None"), ("class", "EWC"), ("domain", "None"), ("domain", "EWC")}
    table = (tmp_path / "cl" / "cl.md").read_text()
    assert "## Domain-incremental" in table and "(domain-incremental: also `--config split_mnist_domain`)" in table
    assert "| EWC | lambda_ = 1234 | music tune (3 trials planned, 3 ended (2 complete, 1 pruned, 0 failed)" in table
    assert "| EWC | shipped default | – |" in table  # untuned in the domain scenario
    assert "Machine: " in table and "min of run time in all" in table
    folder = tmp_path / "cl"
    # the tuned value reached the run
    config = (folder / "ewc-class-seed0" / "version_0" / "config.yaml").read_text()
    assert "lambda_: 1234.5" in config
    # class scenario: the scores from the run's files equal those read off its confusion matrices
    for scenario in ("class", "domain"):
        run_dir = folder / f"none-{scenario}-seed0" / "version_0"
        record = task_record(run_dir)
        assert record["task_columns"] == ["task_t1", "task_t2"] and record["row_names"] == ["start", "t1", "t2"]
        s = score(record, scenario)
        row = runs[(scenario, "None")]
        assert row[3] == pytest.approx(s["final_accuracy"]) and row[4] == pytest.approx(s["average_accuracy"])
    from music.experiments import study_db
    engine = study_db.connect(f"sqlite:///{folder / 'results.db'}")
    import json
    stored = json.loads(study_db.stored_run(engine, "continual", "none-class-seed0")["result"])
    confusions = stored["rows"]
    assert len(confusions[-1]) == 10 and len(json.loads(study_db.stored_run(
        engine, "continual", "none-domain-seed0")["result"])["rows"][-1]) == 2  # the 2-output head
    by_confusion = np.array([[accuracy_on(c, t) for t in ([0, 1], [2, 3])] for c in confusions])
    assert np.asarray(stored["task_matrix"]) == pytest.approx(by_confusion, abs=1e-6)
    assert stored["acc"][-1] == pytest.approx(accuracy_on(confusions[-1], range(10)), abs=1e-6)


@pytest.mark.parametrize("method", ["ewc", "online_ewc", "si", "mas", "lwf", "derpp"])
def test_each_shipped_search_space_fits_its_method(method, tmp_path):
    from music.experiments.tune import Tune, parse_space, resolve_lists

    tune = Tune(["split_mnist", f"methods/{method}"], f"search/{method}", trials=1,
                data=Data(str(tmp_path), download=False), output=Output(str(tmp_path / "logs")))
    assert tune.params == parse_space(tune.space) and tune.params
    lists = resolve_lists(tune.params, tune.configs, {"data.data_dir": str(tmp_path), "data.download": False})
    assert lists["model.methods"][0]["class_path"].lower().replace("_", "").endswith(method.replace("_", ""))


def test_a_domain_protocol_is_scored_on_each_task_s_own_validation_samples(shrink, tmp_path):
    """What ``music tune`` scores a domain-incremental trial by: every task on the validation
    samples of its classes, labelled by the label map, never the test set."""
    phases = [{"name": "t1", "classes": [0, 1], "epochs": 1}, {"name": "t2", "classes": [2, 3], "epochs": 1}]
    config = shrink("split_mnist", "split_mnist_domain", phases=phases, iterations_per_epoch=5, val_size=400)
    cli = run("fit", "--config", config, "--evaluation.evaluate_val", "true")
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, PhaseEvaluation))
    datamodule = cli.trainer.datamodule
    assert list(evaluation.val_task_accuracy) == ["t1", "t2"]
    final = evaluation.val_task_accuracy["t2"]
    assert list(final) == ["classes_0_1", "classes_2_3"]
    val = datamodule.dataset("classes_2_3", val=True)
    val_index = datamodule.splits["val"]
    digits = datamodule.train_labels[val_index]
    assert len(val) == int(((digits == 2) | (digits == 3)).sum()) > 0 and set(val.labels.tolist()) <= {0, 1}
    assert final["classes_2_3"] == pytest.approx(cli.model.evaluate(datamodule.dataloader("classes_2_3", val=True))[0]["acc"])
    score = validation_score(evaluation.val_rows, [Phase(**p) for p in phases], [], final)
    assert score == pytest.approx((final["classes_0_1"] + final["classes_2_3"]) / 2)
