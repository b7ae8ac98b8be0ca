"""The run directory is MUSIC's, not the logger's: with TensorBoard, CSV and MLflow loggers
every run writes its snapshots, ``phase_metrics.json``, accuracy matrix, manifest and config
into a folder of its own, and resumes from it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import REPO, run
from test_bad_input import fails_in_one_line

from music.rundir import RunLock, run_dir

LOGGERS = {
    "tensorboard": lambda tmp: ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                                "--trainer.logger.save_dir", str(tmp / "tb")],
    "csv": lambda tmp: ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                        "--trainer.logger.save_dir", str(tmp / "csv")],
    "mlflow": lambda tmp: ["--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger",
                           "--trainer.logger.experiment_name", "runs",
                           "--trainer.logger.tracking_uri", f"sqlite:///{tmp / 'mlflow.db'}",
                           "--trainer.logger.artifact_location", str(tmp / "artifacts")],
}
RUN_FILES = ("phase_metrics.json", "accuracy_matrix.csv", "continual_metrics.json", "split_manifest.json",
             "config.yaml", "checkpoints/phase-0-class_3.ckpt", "checkpoints/last.ckpt")


def fit(shrink, tmp_path, logger: str, *extra: str):
    config = shrink("seq_finetune", phases=[{"name": "class_3", "split": "class_3", "epochs": 1}])
    return run("fit", "--config", config, "--trainer.limit_train_batches", "2", "--trainer.default_root_dir",
               str(tmp_path / "root"), *LOGGERS[logger](tmp_path), *extra)


@pytest.mark.parametrize("logger", sorted(LOGGERS))
def test_two_runs_with_one_logger_write_separate_run_directories(shrink, tmp_path, logger):
    first, second = fit(shrink, tmp_path, logger), fit(shrink, tmp_path, logger)
    dirs = {run_dir(first.trainer), run_dir(second.trainer)}
    assert len(dirs) == 2, dirs
    for cli in (first, second):
        folder = run_dir(cli.trainer)
        for name in RUN_FILES:
            assert Path(folder, name).exists(), (logger, folder, name)
        assert cli.trainer.checkpoint_callback.dirpath == f"{folder}/checkpoints"


@pytest.mark.parametrize("logger", sorted(LOGGERS))
def test_run_dir_setting_places_every_file_and_resumes_there(shrink, tmp_path, logger):
    folder = tmp_path / "my_run"
    cli = fit(shrink, tmp_path, logger, "--run_dir", str(folder))
    assert run_dir(cli.trainer) == str(folder)
    for name in RUN_FILES:
        assert (folder / name).exists(), name
    before = json.loads((folder / "phase_metrics.json").read_text())
    # the run is finished: resuming it from its own last.ckpt ("last" looks in <run_dir>/checkpoints) changes nothing
    fit(shrink, tmp_path, logger, "--run_dir", str(folder), "--ckpt_path", "last")
    assert json.loads((folder / "phase_metrics.json").read_text()) == before


def test_mlflow_run_keeps_params_metrics_and_figures(shrink, tmp_path):
    cli = fit(shrink, tmp_path, "mlflow", "--run_dir", str(tmp_path / "run"), "--data.log_eda", "true")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["runs"], output_format="list")
    assert [r.info.run_id for r in runs] == [cli.trainer.logger.run_id]
    data = runs[0].data
    assert float(data.params["lr"]) == cli.model.lr
    phases = json.loads((tmp_path / "run" / "phase_metrics.json").read_text())
    accuracy = max(phases.values(), key=lambda p: p["index"])["acc"]  # test/acc: one curve, the last phase last
    assert data.metrics["test/acc"] == pytest.approx(accuracy)
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "test/confusion_matrix")]
    assert artifacts and all(a.endswith(".png") for a in artifacts)
    client = mlflow.MlflowClient()
    eda = {a.path for a in client.list_artifacts(runs[0].info.run_id, "z_eda")}
    assert eda == {"z_eda/class_counts", "z_eda/samples"}, eda
    assert client.list_artifacts(runs[0].info.run_id, "z_eda/samples/train")


def test_two_runs_started_at_once_get_whole_folders_of_their_own(shrink, tmp_path):
    """Both start before either has a folder; each must end with its own complete run."""
    config = shrink("pretrain")
    env = os.environ | {"PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    runs = [subprocess.Popen([sys.executable, "-m", "music", "fit", "--config", str(config), "--trainer.limit_train_batches",
                              "2", "--seed_everything", str(seed)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
            for seed in (0, 1)]
    for process in runs:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    folders = sorted((tmp_path / "logs" / "pretrain").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1"]
    seeds = set()
    for folder in folders:
        for name in ("phase_metrics.json", "config.yaml", "split_manifest.json", "checkpoints/last.ckpt",
                     "checkpoints/phase-0-pretrain.ckpt"):
            assert (folder / name).exists(), (folder, name)
        assert sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name.startswith("last")) == ["last.ckpt"]
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
        seeds.add(yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"])
    assert seeds == {0, 1}


def test_a_run_directory_held_by_a_live_run_is_refused_in_one_line(shrink, tmp_path, capsys):
    config = shrink("pretrain")
    version = tmp_path / "logs" / "pretrain" / "version_0"
    (version / "checkpoints").mkdir(parents=True)
    (version / "checkpoints" / "last.ckpt").write_bytes(b"a live run's checkpoint")
    held = RunLock(str(version), "test")  # as the live run holds it
    try:
        line = fails_in_one_line(["fit", "--config", config, "--ckpt_path", "last"], capsys)
        assert re.search(r"--ckpt_path last: the run '.*version_0' is in use by another running music process", line), line
        line = fails_in_one_line(["fit", "--config", config, "--run_dir", version], capsys)
        assert "--run_dir" in line and "is in use by another running music process" in line
    finally:
        held.release()
    assert (version / "checkpoints" / "last.ckpt").read_bytes() == b"a live run's checkpoint"
    assert sorted(p.name for p in version.parent.iterdir()) == ["version_0"]


def test_the_lock_goes_with_the_run(shrink, tmp_path):
    """A run in this process releases its folder when it ends, so the next one may take it."""
    folder = tmp_path / "run"
    config = shrink("pretrain")
    run("fit", "--config", config, "--trainer.limit_train_batches", "2", "--run_dir", str(folder))
    RunLock(str(folder), "test").release()
    assert sorted(p.name for p in (tmp_path / "logs" / "pretrain").iterdir()) == ["version_0"]


def test_test_ckpt_path_last_scores_the_newest_run_with_a_last_checkpoint(shrink, tmp_path):
    """As ``fit --ckpt_path last`` finds it; the evaluation logs to a version of its own, so the
    trained run's files (its config.yaml) stay as the run wrote them."""
    config = shrink("pretrain")
    run("fit", "--config", config, "--trainer.limit_train_batches", "2")
    trained = tmp_path / "logs" / "pretrain" / "version_0"
    written = (trained / "config.yaml").read_text()
    tested = run("test", "--config", config, "--ckpt_path", "last")
    assert tested.trainer.ckpt_path == str(trained / "checkpoints" / "last.ckpt")
    assert run_dir(tested.trainer).endswith("version_1") and (trained / "config.yaml").read_text() == written
