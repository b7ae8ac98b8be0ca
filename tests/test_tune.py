"""``music tune``: the search space and its checks, the per-phase report and pruning, and a
small search on a local Dask cluster that is killed and resumed."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import REPO, SYNTHETIC

from music.cli import main
from music.experiments.common import Data, Output
from music.experiments.tune import (Param, ReportPhases, Tune, overrides_for, parse_space, tally,
                                    validation_score)
from music.callbacks import Phase
from music.runner import lightning

# Split-MNIST's run configs, two phases of one step each, on the synthetic digits
TINY = {"data.dataset": SYNTHETIC["dataset"], "data.iterations_per_epoch": 1, "data.batches_per_block": 1,
        "data.eval_batch_size": 200, "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
        "checkpoint.save_last": False,
        "schedule.phases": [{"name": "task_1", "classes": [0, 1], "epochs": 1},
                            {"name": "task_2", "classes": [2, 3], "epochs": 1}]}
SPACE = {"model.methods[0].init_args.lambda_": {"low": 1.0, "high": 1.0e4, "log": True},
         "model.lr": {"choices": [0.001, 0.002]}}


@pytest.mark.parametrize(("space", "message"), [
    ({}, "space={} is not allowed: give a mapping"),
    ({"model lr": {"low": 1, "high": 2}}, "space: model lr is not a setting"),
    ({"model.lr": 0.1}, r"space: model.lr: 0.1 is not a distribution"),
    ({"model.lr": {"low": 0.1}}, "give low and high"),
    ({"model.lr": {"low": 0.1, "high": 1, "scale": 2}}, r"unknown fields \['scale'\]"),
    ({"model.lr": {"low": 1.0, "high": 0.1}}, "low=1.0, high=0.1 is not allowed: low must be < high"),
    ({"model.lr": {"low": 0.0, "high": 0.1, "log": True}}, "low=0.0 is not allowed with log: true"),
    ({"model.lr": {"low": "a", "high": 0.1}}, "low='a' is not allowed: it must be a finite number"),
    ({"model.lr": {"low": 0.1, "high": 1.0, "step": 0.1, "log": True}}, "not combined with log"),
    ({"model.lr": {"choices": []}}, r"choices=\[\] is not allowed"),
    ({"model.lr": {"choices": [0.1], "low": 0.1}}, "mixes choices with"),
])
def test_a_bad_search_space_is_refused_in_one_line(space, message):
    with pytest.raises(ValueError, match=message):
        parse_space(space)


def test_the_space_becomes_overrides_and_suggestions():
    params = parse_space({"model.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "data.batch_size": {"low": 16, "high": 64, "step": 16},
                          "model.methods[0].init_args.lambda_": {"choices": [1.0, 10.0]}})
    assert params[1] == Param("data.batch_size", low=16, high=64, step=16)
    lists = {"model.methods": [{"class_path": "music.methods.EWC", "init_args": {"lambda_": 5000.0}}]}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = {p.key: p.suggest(trial) for p in params}
    assert isinstance(values["data.batch_size"], int) and values["data.batch_size"] % 16 == 0
    assert 1e-4 <= values["model.lr"] <= 1e-2
    overrides = overrides_for(values, lists)
    assert overrides["model.methods"] == [{"class_path": "music.methods.EWC",
                                           "init_args": {"lambda_": values["model.methods[0].init_args.lambda_"]}}]
    assert lists["model.methods"][0]["init_args"]["lambda_"] == 5000.0  # the configs' value is left as it was


def test_the_score_is_the_mean_validation_accuracy_over_the_tasks_so_far():
    confusion = [[8, 2, 0, 0], [0, 10, 0, 0], [0, 0, 5, 5], [0, 0, 0, 10]]
    phases = [Phase("a", classes=[0, 1], epochs=1), Phase("b", classes=[2, 3], epochs=1)]
    rows = {"a": confusion, "b": confusion}
    assert validation_score(rows, phases[:1], []) == pytest.approx(0.9)
    assert validation_score(rows, phases, []) == pytest.approx((0.9 + 0.75) / 2)
    assert validation_score(rows, [Phase("b", split="remaining", epochs=1)], []) == pytest.approx(33 / 40)
    # tasks with validation sets of their own (domains, a label map): the mean of their accuracies
    own = {"classes_0_1": 0.5, "classes_2_3": 1.0}
    assert validation_score(rows, phases[:1], [], own) == pytest.approx(0.5)
    assert validation_score(rows, phases, [], own) == pytest.approx(0.75)


class AlwaysPrune:
    def __init__(self) -> None:
        self.reported: list[tuple[float, int]] = []

    def report(self, value: float, step: int) -> None:
        self.reported.append((value, step))

    def should_prune(self) -> bool:
        return True


def test_a_pruned_trial_stops_its_run_at_the_end_of_a_phase(shrink):
    phases = [{"name": f"t{i}", "classes": [2 * i, 2 * i + 1], "epochs": 2} for i in range(3)]
    config = shrink("split_mnist", phases=phases, val_size=200, held_out_classes=[])
    cli = lightning(["--config", str(config), "--trainer.limit_train_batches", "1", "--data.iterations_per_epoch", "2",
                     "--evaluation.evaluate_val", "true"], run=False)
    listener = ReportPhases(AlwaysPrune())
    cli.trainer.callbacks.append(listener)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert listener.pruned and cli.trainer.current_epoch == 2  # the first phase's two epochs, then the run ends
    assert [step for _, step in listener.trial.reported] == [0] and 0 <= listener.scores[0] <= 1


def test_bad_settings_of_music_tune_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="trials=0 is not allowed: it must be an integer >= 1"):
        Tune(["split_mnist"], SPACE, trials=0)
    with pytest.raises(ValueError, match="space='nope.yaml' is neither a mapping nor a YAML file"):
        Tune(["split_mnist"], "nope.yaml")
    with pytest.raises(ValueError, match=r"is not valid YAML: .*Quote a key with brackets"):
        Tune(["split_mnist"], "{model.methods[0].init_args.lambda_: {low: 1, high: 2}}")
    assert Tune(["split_mnist"], '{"model.methods[0].init_args.lambda_": {low: 1, high: 2}}').params == [
        Param("model.methods[0].init_args.lambda_", low=1, high=2)]
    with pytest.raises(SystemExit) as exit_:  # through the command line: one line, exit code 2
        main(["tune", "--trials", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ") and "trials=0" in err


@pytest.mark.parametrize(("space", "message"), [
    ({"model.nope": {"low": 0.1, "high": 1.0}}, r"does not fit the run configs \['split_mnist', 'methods/ewc'\]:.*model.nope"),
    ({"model.methods[3].init_args.lambda_": {"low": 1.0, "high": 2.0}}, "model.methods has 1 entries.*index 3 is out of range"),
    ({"model.methods[0].init_args.lambda": {"low": 1.0, "high": 2.0}},
     r"model.methods\[0\].init_args.lambda is not a setting .* 'lambda' is not set there \(it has lambda_, "),
    ({"model.methods[0].init_args.lambda_": {"choices": ["many"]}}, r"the search space does not fit .*lambda_"),
])
def test_a_space_key_the_run_configs_do_not_have_is_refused_before_any_trial(space, message, tmp_path):
    tune = Tune(["split_mnist", "methods/ewc"], space, trials=1, overrides=TINY,
                data=Data(str(tmp_path), download=False), output=Output(str(tmp_path / "logs")))
    with pytest.raises(ValueError, match=message):
        tune.run()
    assert not (tmp_path / "logs" / "tune" / "tune.db").exists()  # nothing started


def test_tally_counts_what_ended_and_waits_for_others_running():
    states = optuna.trial.TrialState
    trials = [optuna.trial.create_trial(state=states.COMPLETE, value=0.5),
              optuna.trial.create_trial(state=states.PRUNED),
              optuna.trial.create_trial(state=states.FAIL),  # killed, then queued again as the WAITING one
              optuna.trial.create_trial(state=states.WAITING, system_attrs={"retry_history": [2]}),
              optuna.trial.create_trial(state=states.FAIL, user_attrs={"error": "ValueError: x"}),  # its run failed
              optuna.trial.create_trial(state=states.RUNNING, user_attrs={"session": "mine"}),
              optuna.trial.create_trial(state=states.RUNNING, user_attrs={"session": "killed"})]
    for number, trial in enumerate(trials):
        trial.number = number
    assert tally(trials, "mine") == (3, 1)


def ended(db: Path) -> list[tuple]:
    """(number, state) of every trial in the study database, read with plain SQL."""
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        try:
            return conn.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
        except sqlite3.OperationalError:  # the tables are not made yet
            return []


def test_music_tune_resumes_after_its_process_is_killed(tmp_path):
    """A search of 3 trials on a local cluster of one worker, killed (SIGKILL) once a trial has
    finished, then run again: it ends with exactly 3 trials ended, none lost or run twice."""
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    command = [sys.executable, "-m", "music", "tune", "--configs", "[split_mnist,methods/ewc]", "--space",
               str(tmp_path / "space.yaml"), "--trials", "3", "--workers", "1", "--val_size", "200", "--pruner", "none",
               "--heartbeat", "1", "--overrides", yaml.safe_dump(TINY, default_flow_style=True).strip(),
               "--data.data_dir", str(tmp_path / "data"), "--data.download", "false",
               "--output.root", str(tmp_path / "logs")]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    db = tmp_path / "logs" / "tune" / "tune.db"
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not {"COMPLETE", "RUNNING"} <= {state for _, state in ended(db)}:  # one finished, the next under way
            assert first.poll() is None, "music tune ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished in 240 s"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        before = {n: s for n, s in ended(db)}
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        try:  # whatever the killed process left (its worker, had it outlived it)
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 3  # the budget, exactly
    for number, state in before.items():  # a trial that had finished is kept as it was
        if state == "COMPLETE":
            assert trials[number].state == optuna.trial.TrialState.COMPLETE
    killed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in killed] == [n for n, s in before.items() if s == "RUNNING"]  # the one cut off failed ...
    retries = [t for t in trials if "retry_history" in t.system_attrs]
    assert sorted(r.system_attrs["failed_trial"] for r in retries) == sorted(t.number for t in killed)
    for retry in retries:  # ... and ran again, with its parameters
        assert retry.params == trials[retry.system_attrs["failed_trial"]].params
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    table = (tmp_path / "logs" / "tune" / "tune.md").read_text()
    assert "Budget: 3 trials; ended 3 (3 complete, 0 pruned, 0 failed)" in table
    best = yaml.safe_load((tmp_path / "logs" / "tune" / "best.yaml").read_text())
    assert best["model"]["methods"][0]["class_path"] == "music.methods.EWC"
    assert best["model"]["methods"][0]["init_args"]["lambda_"] == study.best_params["model.methods[0].init_args.lambda_"]
    assert best["model"]["lr"] == study.best_params["model.lr"]


def test_a_study_started_with_other_settings_is_refused(tmp_path):
    folder = tmp_path / "logs" / "tune"
    folder.mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    stored = optuna.create_study(storage=f"sqlite:///{folder / 'tune.db'}", study_name="tune", direction="maximize")
    stored.set_user_attr("music_settings", {"configs": ["split_mnist", "methods/si"]})
    tune = Tune(["split_mnist", "methods/ewc"], SPACE, trials=1, overrides=TINY,
                data=Data(str(tmp_path), download=False), output=Output(str(tmp_path / "logs")))
    with pytest.raises(ValueError, match=r"the study 'tune' in sqlite:///.*tune.db was started with other settings"):
        tune.run()
    assert len(stored.get_trials()) == 0
