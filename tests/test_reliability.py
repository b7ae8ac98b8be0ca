"""Crash safety, safe loading and multi-process training, on real (tiny) runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run
from faults import evil_checkpoint
from synthetic import TEST_PER_CLASS

from music.module import Classifier

TESTS = Path(__file__).parent


def python_m_music(*args, check=True) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        # bitwise comparisons with in-process runs hold only at the same thread count
                        "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run([sys.executable, "-m", "music", *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def with_callback(config: Path, callback: dict) -> Path:
    data = yaml.safe_load(config.read_text())
    data["trainer"].setdefault("callbacks", []).append(callback)
    path = config.with_name(f"{config.stem}-faulty.yaml")
    path.write_text(yaml.safe_dump(data))
    return path


def snapshots(log_dir: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=True)["state_dict"]
            for p in sorted((log_dir / "checkpoints").glob("phase-*.ckpt"))}


@pytest.fixture
def reference(shrink, tmp_path):
    """An uninterrupted run of the sequential study: 4 phases x 2 epochs x 3 batches."""
    config = shrink("seq", epochs=2)
    cli = run("fit", "--config", config, "--trainer.limit_train_batches", 3,
              "--trainer.logger.init_args.save_dir", tmp_path / "reference")
    return config, Path(cli.trainer.log_dir)


@pytest.mark.parametrize(
    "kill",
    [
        {"point": "batch", "epoch": 1, "batch": 1},  # mid-epoch (class_3's epochs are one block)
        {"point": "epoch_end", "epoch": 3},  # phase boundary: snapshot written, last.ckpt not yet
        {"point": "save", "epoch": 5},  # while the class_4 snapshot is being written
    ],
    ids=lambda k: k["point"],
)
def test_killed_run_resumes_to_the_same_result(reference, kill):
    config, reference_dir = reference
    killed = python_m_music("fit", "--config", with_callback(config, {"class_path": "faults.KillAt", "init_args": kill}),
                            "--trainer.limit_train_batches", 3, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    python_m_music("fit", "--config", config, "--trainer.limit_train_batches", 3, "--ckpt_path", "last")
    log_dir = reference_dir.parent / "../../logs/seq/version_0"
    resumed, expected = snapshots(log_dir.resolve()), snapshots(reference_dir)
    assert list(resumed) == list(expected) and len(expected) == 4
    for name in expected:
        for key, value in expected[name].items():
            assert torch.equal(resumed[name][key], value), (name, key)
    assert json.loads((log_dir / "phase_metrics.json").read_text()) == \
        json.loads((reference_dir / "phase_metrics.json").read_text())
    assert not list(log_dir.resolve().glob("checkpoints/*.tmp")) or kill["point"] == "save"


METHODS = [{"class_path": "music.methods.EWC", "init_args": {"lambda_": 100.0}},
           {"class_path": "music.methods.SI", "init_args": {"c": 0.1}},
           {"class_path": "music.methods.LwF", "init_args": {"weight": 1.0}},
           {"class_path": "music.methods.Replay", "init_args": {"budget_per_class": 5}},
           {"class_path": "music.methods.MAS", "init_args": {"lambda_": 1.0}},
           {"class_path": "music.methods.DERPP", "init_args": {"budget": 40}},
           {"class_path": "music.methods.ERACE", "init_args": {"budget": 40}},
           {"class_path": "music.methods.AGEM", "init_args": {"budget": 40, "batch_size": 16}}]


def test_a_run_with_methods_killed_mid_task_resumes_to_the_same_result(shrink, tmp_path):
    """Every method's state (EWC's Fisher, SI's path integral of the task under way, LwF's
    teacher, MAS's importance, the rehearsal memories, DER++'s stored logits included, and
    their generators) survives ``last.ckpt``: killed after class_4's first epoch
    (``last.ckpt`` mid-task), the resumed run's snapshots equal an uninterrupted run's."""
    config = shrink("seq", epochs=2)
    data = yaml.safe_load(config.read_text())
    data["model"]["methods"] = METHODS
    config.write_text(yaml.safe_dump(data))
    dirs = {name: tmp_path / name for name in ("reference", "resumed")}
    python_m_music("fit", "--config", config, "--trainer.limit_train_batches", 3, "--run_dir", dirs["reference"])
    killed = python_m_music("fit", "--config", with_callback(config, {"class_path": "faults.KillAt", "init_args": {
        "point": "epoch_end", "epoch": 5}}), "--trainer.limit_train_batches", 3, "--run_dir", dirs["resumed"], check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (dirs["resumed"] / "checkpoints").glob("phase-*.ckpt")) == \
        ["phase-0-pretrain.ckpt", "phase-1-class_3.ckpt"]  # class_4 was under way
    python_m_music("fit", "--config", config, "--trainer.limit_train_batches", 3, "--run_dir", dirs["resumed"],
                   "--ckpt_path", "last")
    resumed, expected = snapshots(dirs["resumed"]), snapshots(dirs["reference"])
    assert list(resumed) == list(expected) and len(expected) == 4
    for name in expected:
        for key, value in expected[name].items():
            assert torch.equal(resumed[name][key], value), (name, key)
    assert json.loads((dirs["resumed"] / "phase_metrics.json").read_text()) == \
        json.loads((dirs["reference"] / "phase_metrics.json").read_text())


def test_non_finite_loss_stops_naming_the_step_and_keeps_earlier_snapshots(shrink):
    config = shrink("seq")
    pretrain_steps = 3 * yaml.safe_load(config.read_text())["data"]["batches_per_block"]  # 3 blocks
    nan_step = pretrain_steps + 1  # in the class_3 phase (2 batches)
    with pytest.raises(FloatingPointError, match=f"global step {nan_step} "):
        run("fit", "--config", config, "--trainer.limit_train_batches", 3,
            "--model.backbone.class_path", "faults.NaNAfter", "--model.backbone.init_args.steps", nan_step)
    log_dir = next(config.parent.glob("logs/seq/version_*"))
    names = sorted(p.name for p in (log_dir / "checkpoints").glob("*.ckpt"))
    assert names == [f"epoch=0-step={pretrain_steps}.ckpt", "last.ckpt", "phase-0-pretrain.ckpt"]
    for name in names:
        state = torch.load(log_dir / "checkpoints" / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_phase_stopped_by_a_non_finite_loss_resumes_with_a_lower_learning_rate(shrink):
    config = shrink("seq")
    pretrain_steps = 3 * yaml.safe_load(config.read_text())["data"]["batches_per_block"]  # 3 blocks
    phases = yaml.safe_load(config.read_text())["schedule"]["phases"]
    with pytest.raises(FloatingPointError, match="Try a lower learning rate"):
        run("fit", "--config", config, "--trainer.limit_train_batches", 3,
            "--model.backbone.class_path", "faults.NaNAfter", "--model.backbone.init_args.steps", pretrain_steps + 1)
    # class_3 (phase 1) failed in its first epoch: it may be resumed with other settings; the
    # finished pretrain phase may not
    lower = [p | {"lr": 1e-5} if p["name"] == "class_3" else p for p in phases]
    changed = [p | {"epochs": 2} if p["name"] == "pretrain" else p for p in phases]
    resume = ["fit", "--config", config, "--trainer.limit_train_batches", 3, "--ckpt_path", "last",
              "--model.backbone.class_path", "faults.NaNAfter", "--model.backbone.init_args.steps", 10**9]
    with pytest.raises(ValueError, match=r"in the 1 phase\(s\) already finished"):
        run(*resume, "--schedule.phases", json.dumps(changed))
    cli = run(*resume, "--schedule.phases", json.dumps(lower))
    log_dir = Path(cli.trainer.log_dir)
    assert cli.trainer.current_epoch == len(phases) and len(list(log_dir.parent.glob("version_*"))) == 1
    # class_3 trained at 1e-5: Adam moves a weight by about the learning rate a step (1e-3 at the
    # model's lr, whose first step alone would move many weights by 1e-3)
    before, after = (snapshots(log_dir)[f"phase-{i}-{n}.ckpt"] for i, n in [(0, "pretrain"), (1, "class_3")])
    moved = max((after[k] - before[k]).abs().max().item() for k in before if before[k].is_floating_point())
    assert 0 < moved < 1e-4
    metrics = json.loads((log_dir / "phase_metrics.json").read_text())
    assert list(metrics) == [p["name"] for p in phases] and metrics["class_3"]["lr"] == pytest.approx(1e-5)


def test_init_from_refuses_a_checkpoint_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    model = Classifier(init_from=evil_checkpoint(str(tmp_path / "evil.ckpt"), str(marker)))
    with pytest.raises(Exception, match="(?i)weights_only|refused"):
        model.setup("fit")
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_ckpt_path_refuses_a_checkpoint_that_runs_code(shrink, tmp_path, subcommand):
    marker = tmp_path / "pwned"
    evil = evil_checkpoint(str(tmp_path / "evil.ckpt"), str(marker))
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        run(subcommand, "--config", shrink("pretrain"), "--ckpt_path", evil)
    assert not marker.exists()


def test_no_leakage_held_out_and_test_samples_never_in_training_splits(mnist):
    held_out = set(mnist.splits["merged"].tolist())
    assert not held_out & set(mnist.splits["remaining"].tolist())
    # every training split indexes the training set; the test set is served only as "test"
    train_images = mnist.train_images.flatten(1)
    for name, index in mnist.splits.items():
        dataset = mnist.dataset(name)
        assert torch.equal(dataset.images.flatten(1), train_images[index]), name
    assert "test" not in mnist.split_names


def test_ddp_two_processes_run_the_sequential_study(shrink):
    config = shrink("seq")
    python_m_music("fit", "--config", config, "--trainer.accelerator", "cpu", "--trainer.devices", 2,
                   "--trainer.strategy", "ddp", "--trainer.limit_train_batches", 2)
    log_dir = next(config.parent.glob("logs/seq/version_*"))
    assert len(list(config.parent.glob("logs/seq/version_*"))) == 1  # one run directory, from rank zero
    assert sorted(p.name for p in (log_dir / "checkpoints").glob("phase-*.ckpt")) == [
        "phase-0-pretrain.ckpt", "phase-1-class_3.ckpt", "phase-2-class_4.ckpt", "phase-3-class_7.ckpt"]
    metrics = json.loads((log_dir / "phase_metrics.json").read_text())
    for phase in metrics.values():  # synced over both ranks: every test image counted once
        assert sum(map(sum, phase["confusion_matrix"])) == 10 * TEST_PER_CLASS


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_exits_non_zero_and_resumes(shrink, tmp_path, signum, code):
    """Stopped once its first ``last.ckpt`` is on disk, the run must not exit 0 (``music fit
    ... && music test ...`` would go on), and ``--ckpt_path last`` must finish it."""
    config = shrink("pretrain", epochs=8)  # epochs enough for the signal to arrive mid-run
    last = tmp_path / "logs" / "pretrain" / "version_0" / "checkpoints" / "last.ckpt"
    env = os.environ | {"PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, "-m", "music", "fit", "--config", str(config),
                                "--trainer.limit_train_batches", "1"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored as in `&`
    try:
        while not last.exists() and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == code, err[-2000:]
    assert "before it finished. Resume with --ckpt_path last" in err
    assert torch.load(last, weights_only=True)["epoch"] < 7
    cli = run("fit", "--config", config, "--trainer.limit_train_batches", 1, "--ckpt_path", "last")
    assert cli.trainer.ckpt_path == str(last) and cli.trainer.current_epoch == 8  # finished from the checkpoint
    assert sorted(p.name for p in last.parents[2].iterdir()) == ["version_0"]
