import json
from pathlib import Path

import pytest
import torch
from conftest import run
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from music.callbacks import Phase, SequentialFineTuning
from music.cli import lightning

PHASES = ["pretrain", "class_3", "class_4", "class_7"]


def fit(config: Path, *extra: str):
    return run("fit", "--config", config, "--trainer.limit_train_batches", 3, *extra)


def phase_metrics(log_dir: str) -> dict:
    return json.loads((Path(log_dir) / "phase_metrics.json").read_text())


def test_seq_run_snapshots_and_evaluates_every_phase(shrink):
    cli = fit(shrink("seq"))
    log_dir = Path(cli.trainer.log_dir)
    snapshots = sorted(p.name for p in (log_dir / "checkpoints").glob("phase-*.ckpt"))
    assert snapshots == [f"phase-{i}-{name}.ckpt" for i, name in enumerate(PHASES)]
    assert not list((log_dir / "checkpoints").glob("*.tmp"))
    assert list(phase_metrics(log_dir)) == PHASES
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0}).Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert {"test/acc", "test/loss", "test/f1_macro", "test_per_class/recall/class_7"} <= scalars
    assert "test/confusion_matrix" in images
    assert {"train/loss", "train/acc", "train/phase"} <= scalars
    # one x-axis: epoch metrics, like the phases' test metrics, at optimizer steps (not blocks)
    steps = [e.step for e in events.Scalars("train/phase")]
    assert [e.step for e in events.Scalars("train/loss")] == steps[1:] + [cli.trainer.global_step]
    assert [e.step for e in events.Scalars("test/acc")] == [0, *steps[1:], cli.trainer.global_step]  # start + phases
    assert [e.value for e in events.Scalars("train/epoch")] == list(range(len(steps)))
    assert (log_dir / "split_manifest.json").exists()


def test_snapshot_reloads_with_load_from_checkpoint(shrink):
    from music.module import Classifier

    cli = fit(shrink("pretrain"))
    path = Path(cli.trainer.log_dir) / "checkpoints" / "phase-0-pretrain.ckpt"
    model = Classifier.load_from_checkpoint(path, weights_only=True)
    for key, value in cli.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_resume_from_a_mid_sequence_snapshot_continues_in_the_next_phase(shrink):
    config = shrink("seq", epochs=2)
    whole = fit(config)
    snapshot = Path(whole.trainer.log_dir) / "checkpoints" / "phase-1-class_3.ckpt"
    resumed = fit(config, "--ckpt_path", snapshot)
    assert list(phase_metrics(resumed.trainer.log_dir)) == ["class_4", "class_7"]
    assert resumed.trainer.current_epoch == whole.trainer.current_epoch == 8
    for key, value in whole.model.state_dict().items():  # bitwise: deterministic + RNG kept
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_ckpt_path_last_resumes_in_the_same_run_directory(shrink):
    config = shrink("seq")
    with pytest.warns(UserWarning, match=r"trainer.max_epochs=2 is ignored: the phases define the run \(4 epochs"):
        first = fit(config, "--trainer.max_epochs", 2)  # overridden by the phases: runs all 4
    again = fit(config, "--ckpt_path", "last")
    assert again.trainer.log_dir == first.trainer.log_dir
    assert again.trainer.current_epoch == 4  # nothing left to run, nothing re-run


def test_same_seed_same_metrics(shrink):
    config = shrink("merged")
    first, second = fit(config), fit(config)
    assert phase_metrics(first.trainer.log_dir) == phase_metrics(second.trainer.log_dir)


def test_phase_learning_rate_and_fresh_optimizer(shrink):
    config = shrink("merged", phases=[{"name": "pretrain", "split": "remaining", "epochs": 1},
                                      {"name": "merged", "split": "merged", "epochs": 1, "lr": 0.0001}])
    cli = run("fit", "--config", config, "--trainer.limit_train_batches", 2)
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == 0.0001
    # a fresh Adam has taken exactly the merged phase's steps: its batches, at most 2 blocks of them
    batches = -(-len(cli.datamodule.splits["merged"]) // cli.datamodule.batch_size)
    steps = min(batches, 2 * cli.datamodule.batches_per_block)
    assert all(s["step"] == steps for s in optimizer.state.values())


class Listener(Callback):
    """Records what the schedule tells it, and what the run looks like at that moment."""

    def __init__(self) -> None:
        self.heard: list[tuple] = []

    def on_phase_start(self, trainer, pl_module, schedule, index) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.heard.append(("start", index, trainer.datamodule.train_split, lr))

    def on_phase_end(self, trainer, pl_module, schedule, index) -> None:
        snapshot = Path(trainer.log_dir) / "checkpoints" / f"phase-{index}-{schedule.phases[index].name}.ckpt"
        self.heard.append(("end", index, snapshot.exists()))


def test_the_schedule_tells_listeners_when_each_phase_starts_and_ends(shrink):
    phases = [{"name": "pretrain", "split": "remaining", "epochs": 2},
              {"name": "class_3", "split": "class_3", "epochs": 1, "lr": 0.01}]
    cli = lightning(["--config", str(shrink("seq", phases=phases)), "--trainer.limit_train_batches", "1"], run=False)
    listener = Listener()
    cli.trainer.callbacks.append(listener)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # each phase starts on its split with its learning rate; it ends before its snapshot is saved
    assert listener.heard == [("start", 0, "remaining", 0.001), ("end", 0, False),
                              ("start", 1, "class_3", 0.01), ("end", 1, False)]
    assert cli.trainer.current_epoch == 3 and cli.trainer.max_epochs == 3  # the phases define the fit


def test_a_resumed_schedule_may_change_only_the_phases_not_yet_finished():
    def schedule(*phases: tuple) -> SequentialFineTuning:
        return SequentialFineTuning([Phase(name, "remaining", epochs, lr) for name, epochs, lr in phases])

    saved = schedule(("a", 1, None), ("b", 2, None), ("c", 1, None))
    saved.epoch = 2  # a finished, b half-way
    state = saved.state_dict()
    same = schedule(("a", 1, None), ("b", 2, None), ("c", 1, None))
    same.load_state_dict(state)
    assert same.epoch == 2 and not same._set_lr_on_resume  # mid-phase: the optimizer keeps its lr
    lower = schedule(("a", 1, None), ("b", 2, 1e-5), ("c", 3, None))  # b and c are not finished
    lower.load_state_dict(state)
    assert lower.epoch == 2 and lower._set_lr_on_resume
    with pytest.raises(ValueError, match=r"in the 1 phase\(s\) already finished"):
        schedule(("a", 2, None), ("b", 2, None), ("c", 1, None)).load_state_dict(state)
    with pytest.raises(ValueError, match="phase 'b', which is configured with epochs=1"):
        schedule(("a", 1, None), ("b", 1, None), ("c", 1, None)).load_state_dict(state)
    saved.epoch = 1  # at b's start: the phase's lr is set again, as when a phase starts
    same.load_state_dict(saved.state_dict())
    assert same._set_lr_on_resume


# -- early stopping of a phase -----------------------------------------------------------------

# min_delta 1.0 on an accuracy: only a phase's first epoch improves, so every phase ends
# after exactly 1 + patience epochs, whatever the numbers.
NEVER_BETTER = ["--schedule.early_stopping.monitor", "val/acc", "--schedule.early_stopping.mode", "max",
                "--schedule.early_stopping.min_delta", "1.0"]
TWO_PHASES = [{"name": "pretrain", "split": "remaining", "epochs": 4}, {"name": "class_3", "split": "class_3", "epochs": 4}]


def test_early_stopping_ends_each_phase_and_the_next_one_starts(shrink):
    config = shrink("seq", phases=TWO_PHASES, val_size=200)
    cli = fit(config, *NEVER_BETTER, "--schedule.early_stopping.patience", 1, "--evaluation.evaluate_val", "true")
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, SequentialFineTuning))
    assert schedule.stopped == {0: 2, 1: 2} and schedule.ends == [2, 4]
    assert cli.trainer.current_epoch == 4  # 2 + 2 of the 8 planned epochs
    log_dir = Path(cli.trainer.log_dir)
    assert sorted(p.name for p in (log_dir / "checkpoints").glob("phase-*.ckpt")) == [
        "phase-0-pretrain.ckpt", "phase-1-class_3.ckpt"]
    assert [r["epochs"] for r in phase_metrics(log_dir).values()] == [2, 2]  # what each phase trained
    val = json.loads((log_dir / "val_metrics.json").read_text())
    assert list(val) == ["pretrain", "class_3"] and all(0 <= r["acc"] <= 1 for r in val.values())


def test_restore_best_puts_back_the_weights_of_the_phases_best_epoch(shrink):
    config = shrink("seq", phases=TWO_PHASES[:1], val_size=200)
    cli = fit(config, *NEVER_BETTER, "--schedule.early_stopping.patience", 2,
              "--schedule.early_stopping.restore_best", "true", "--checkpoint.save_top_k", -1)
    checkpoints = Path(cli.trainer.log_dir) / "checkpoints"
    first = torch.load(next(checkpoints.glob("epoch=0-*.ckpt")), weights_only=True)["state_dict"]
    second = torch.load(next(checkpoints.glob("epoch=1-*.ckpt")), weights_only=True)["state_dict"]
    assert cli.trainer.current_epoch == 3
    assert any(not torch.equal(second[k], v) for k, v in first.items())  # training moved the weights ...
    for key, value in first.items():  # ... and the phase ends with its best epoch's (the first)
        assert torch.equal(cli.model.state_dict()[key], value), key


def test_a_run_resumed_inside_an_early_stopped_schedule_equals_the_uninterrupted_one(shrink):
    config = shrink("seq", phases=TWO_PHASES, val_size=200)
    args = [*NEVER_BETTER, "--schedule.early_stopping.patience", 2, "--schedule.early_stopping.restore_best", "true",
            "--evaluation.evaluate_val", "true", "--checkpoint.save_top_k", -1]
    whole = fit(config, *args)
    assert whole.trainer.current_epoch == 6  # 3 + 3 of the 8 planned epochs
    checkpoints = Path(whole.trainer.log_dir) / "checkpoints"
    for epoch, later in ((1, ["pretrain", "class_3"]), (4, ["class_3"])):  # waiting for improvement, in each phase
        resumed = fit(config, *args, "--ckpt_path", next(checkpoints.glob(f"epoch={epoch}-*.ckpt")))
        assert resumed.trainer.current_epoch == 6
        for key, value in whole.model.state_dict().items():  # bitwise: the same stops, weights and draws
            assert torch.equal(resumed.model.state_dict()[key], value), key
        assert list(phase_metrics(resumed.trainer.log_dir)) == later
        for name in later:
            assert phase_metrics(resumed.trainer.log_dir)[name] == phase_metrics(whole.trainer.log_dir)[name]


def test_early_stopping_settings_are_checked():
    from music.callbacks import EarlyStopping

    for bad, message in (({"patience": 0}, "patience=0"), ({"mode": "up"}, "mode='up'"),
                         ({"min_delta": -1.0}, "min_delta=-1.0")):
        with pytest.raises(ValueError, match=message):
            EarlyStopping(**bad)


def test_early_stopping_on_val_needs_a_validation_split(shrink):
    with pytest.raises(ValueError, match=r"monitor='val/loss' needs a validation split: set data.val_size > 0"):
        fit(shrink("seq", phases=TWO_PHASES[:1]), "--schedule.early_stopping.patience", 1)
    with pytest.raises(ValueError, match=r"monitor='val/nope' is not a metric of this run \(logged: .*val/acc"):
        fit(shrink("seq", phases=TWO_PHASES[:1], val_size=200), "--schedule.early_stopping.monitor", "val/nope")
