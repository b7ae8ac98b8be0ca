"""Tasks of several classes, truly new classes, the task-incremental scenario and the methods
inside Lightning's training loop (blocks of batches included)."""

import json

import pytest
import torch
import yaml
from conftest import CONFIG_DIR, merged_config, run

from music.callbacks import Phase, SequentialFineTuning
from music.evaluation import PhaseEvaluation
from music.data import MusicDataModule, task_split_classes
from music.experiments import study_db
from music.methods import Method


def test_a_phase_of_classes_is_the_split_of_those_classes():
    assert Phase("t", classes=[2, 3], epochs=1).split == "classes_2_3"
    assert task_split_classes("classes_2_3") == [2, 3] and task_split_classes("class_3") is None


@pytest.mark.parametrize("build, match", [
    (lambda: SequentialFineTuning([Phase("a", classes=[0, 1], epochs=1), Phase("b", classes=[1, 2], epochs=1)]),
     r"'a' \(classes \[0, 1\]\) and 'b' \(classes \[1, 2\]\) overlap in classes \[1\]"),
    (lambda: Phase("a", split="remaining", classes=[0, 1], epochs=1), "names both split='remaining' and classes"),
    (lambda: Phase("a", epochs=1), "names neither a split nor classes"),
    (lambda: Phase("a", classes=[], epochs=1), "classes=\\[\\]"),
    (lambda: task_split_classes("classes_2_2"), "repeats a class"),
    (lambda: MusicDataModule(samples_per_class="most"), "samples_per_class='most'.*'all'"),
    (lambda: MusicDataModule(iterations_per_epoch=0), "iterations_per_epoch=0.*>= 1"),
], ids=["overlapping tasks", "split and classes", "neither", "empty classes", "repeated class", "samples_per_class",
        "iterations"])
def test_bad_task_settings_fail_with_one_line(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.mnist
def test_tasks_of_classes_and_truly_new_classes(data_dir):
    split_mnist = MusicDataModule(data_dir=data_dir, download=False, held_out_classes=[])
    split_mnist.setup()
    labels = split_mnist.dataset("classes_2_3").labels
    assert set(labels.tolist()) == {2, 3} and len(labels) == int(((split_mnist.train_labels == 2)
                                                                  | (split_mnist.train_labels == 3)).sum())
    assert split_mnist.task_classes("classes_2_3") == [2, 3]
    new = MusicDataModule(data_dir=data_dir, download=False, samples_per_class="all")
    new.setup()
    remaining = new.train_labels[new.splits["remaining"]]
    assert not torch.isin(remaining, torch.tensor([3, 4, 7])).any()
    assert len(new.splits["class_3"]) == int((new.train_labels == 3).sum())
    with pytest.raises(ValueError, match=r"classes_3_5.*samples_per_class=all holds out every sample of them"):
        new.check_split("classes_3_5")
    with pytest.raises(ValueError, match=r"names classes \[10\].*allowed are 0..9"):
        new.check_split("classes_9_10")
    with pytest.raises(ValueError, match="Split 'merged' is empty"):
        split_mnist.dataloader("merged", shuffle=True)


def fit_split_mnist(shrink, tmp_path, name, *args, blocks=32):
    phases = [{"name": "t1", "classes": [0, 1], "epochs": 1}, {"name": "t2", "classes": [2, 3], "epochs": 1}]
    config = shrink("split_mnist", phases=phases, iterations_per_epoch=10, batches_per_block=blocks)
    cli = run("fit", "--config", config, "--trainer.logger.init_args.version", name, *args)
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, PhaseEvaluation))
    return evaluation.rows, cli


@pytest.mark.mnist
def test_replay_in_lightning_is_naive_at_budget_zero_and_the_same_with_or_without_blocks(shrink, tmp_path):
    replay = "[{class_path: music.methods.Replay, init_args: {budget_per_class: %d}}]"
    naive, _ = fit_split_mnist(shrink, tmp_path, "naive")
    empty, _ = fit_split_mnist(shrink, tmp_path, "empty", "--model.methods", replay % 0)
    assert empty == naive
    blocks, cli = fit_split_mnist(shrink, tmp_path, "blocks", "--model.methods", replay % 20)
    batches, _ = fit_split_mnist(shrink, tmp_path, "batches", "--model.methods", replay % 20, blocks=1)
    assert blocks == batches and blocks != naive
    assert torch.bincount(cli.model.methods[0].labels).tolist() == [20, 20]  # task 1's classes, before task 2


@pytest.mark.mnist
def test_task_incremental_evaluation_masks_each_sample_to_its_task(shrink_mnist, tmp_path):
    rows, cli = fit_split_mnist(shrink_mnist, tmp_path, "task", "--model.scenario", "task", "--model.tasks", "null")
    final = torch.tensor(rows["t2"])
    # a sample of 0 or 1 is predicted as 0 or 1 only, one of 2 or 3 as 2 or 3
    assert final[:2, 2:].sum() == 0 and final[2:4, :2].sum() == 0 and final[2:4, 4:].sum() == 0
    assert final[:2].sum() > 0 and final[:4].trace() > 0.9 * final[:4].sum()
    with open(f"{cli.trainer.log_dir}/continual_metrics.json") as f:
        metrics = json.load(f)
    assert metrics["forward_transfer"] is not None and metrics["average_incremental_accuracy"] is not None


@pytest.mark.mnist
@pytest.mark.parametrize("args, match", [
    (["--model.scenario", "domain"], "scenario"),
    (["--model.methods", "[{class_path: music.methods.Distill}]"], "methods"),
], ids=["unknown scenario", "unknown method"])
def test_unknown_scenario_or_method_is_refused_before_training(shrink, tmp_path, args, match):
    from music.cli import main

    config = shrink("split_mnist", iterations_per_epoch=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *args])
    assert exit_info.value.code == 2
    assert not list(tmp_path.glob("logs/*/*/checkpoints/*.ckpt"))


def test_method_configs_are_pure_deltas():
    for name, cls in (("ewc", "EWC"), ("online_ewc", "OnlineEWC"), ("si", "SI"), ("lwf", "LwF"), ("replay", "Replay"),
                      ("mas", "MAS"), ("derpp", "DERPP"), ("er_ace", "ERACE"), ("agem", "AGEM")):
        config = merged_config("seq_finetune", name)
        assert set(yaml.safe_load((CONFIG_DIR / "methods" / f"{name}.yaml").read_text())) == {"model"}
        assert config["model"]["methods"][0]["class_path"] == f"music.methods.{cls}"


@pytest.mark.mnist
def test_music_continual_writes_the_table_and_reads_finished_runs_back(data_dir, tmp_path):
    from music.experiments import run_experiment

    args = ["--data.data_dir", data_dir, "--seeds", "[0]", "--scenarios", "[task]", "--methods", "{None: [], EWC: [ewc]}",
            "--overrides", "{data.iterations_per_epoch: 2}", "--output.root", str(tmp_path), "--output.name", "out"]
    run_experiment("continual", args)
    out = tmp_path / "out"
    table = (out / "out.md").read_text()
    assert "| EWC | 1 |" in table and "--data.iterations_per_epoch 2" in table and (out / "out.png").exists()
    assert "mean ± sample std (ddof=1) over 1 seed" in table
    runs = (out / "out_runs.csv").read_text().splitlines()
    assert runs[0].startswith("scenario,method,seed,final_accuracy") and len(runs) == 1 + 2
    assert not list(out.glob("*/*/checkpoints"))  # deleted once scored
    engine = study_db.connect(f"sqlite:///{out / 'results.db'}")
    stored = study_db.stored_run(engine, "continual", "ewc-task-seed0")
    assert json.loads(stored["settings"])["configs"] == ["split_mnist", "ewc"] and len(json.loads(stored["result"])["rows"]) == 6
    csv_before = (out / "out.csv").read_text()
    run_experiment("continual", [*args, "--report_only", "true"])
    assert (out / "out.csv").read_text().splitlines()[1:] == csv_before.splitlines()[1:]
    with pytest.raises(ValueError, match="'none-task-seed0' .* was finished with other settings"):
        run_experiment("continual", [*args[:-4], "--overrides", "{data.iterations_per_epoch: 3}", *args[-4:]])


class AnchorToTaskStart(Method):
    """A method that is not shipped: an L2 pull towards the weights each task started from,
    keeping a log of what the schedule and the model told it."""

    _state = ("starts", "terms")

    def __init__(self, strength: float = 1.0) -> None:
        self.strength = strength
        self.starts: list[str] = []  # the split of every task started
        self.terms = 0  # batches the term was added to
        self._anchor: dict[str, torch.Tensor] = {}

    def start_task(self, model, task) -> None:
        self.starts.append(task.split)
        self._anchor = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}

    def loss(self, model, x, y, logits):
        if not model.training:
            return None
        self.terms += 1
        return self.strength * sum((p - self._anchor[n]).pow(2).sum() for n, p in model.backbone.named_parameters())


def test_a_new_method_is_one_class_and_one_config(shrink, tmp_path):
    """A method defined here, switched on by a config delta of its own, trains through
    ``music fit``: it hears each task start and adds its term to every batch."""
    delta = tmp_path / "anchor.yaml"
    delta.write_text(yaml.safe_dump({"model": {"methods": [
        {"class_path": f"{__name__}.AnchorToTaskStart", "init_args": {"strength": 10.0}}]}}))
    phases = [{"name": "t1", "classes": [0, 1], "epochs": 1}, {"name": "t2", "classes": [2, 3], "epochs": 1}]
    config = shrink("split_mnist", phases=phases, iterations_per_epoch=10)
    cli = run("fit", "--config", config, "--config", delta)
    (method,) = cli.model.methods
    assert isinstance(method, AnchorToTaskStart) and method.strength == 10.0
    assert method.starts == ["classes_0_1", "classes_2_3"]
    assert method.terms == cli.trainer.global_step == 20
    naive = run("fit", "--config", config, "--trainer.logger.init_args.version", "naive")
    t1 = torch.load(f"{naive.trainer.log_dir}/checkpoints/phase-0-t1.ckpt", weights_only=True)["state_dict"]

    def moved(model, start):  # how far task 2 took the weights
        return sum((p - start[n]).pow(2).sum().item() for n, p in model.backbone.named_parameters())

    assert moved(cli.model, method._anchor) < 0.5 * moved(naive.model, {k.removeprefix("backbone."): v for k, v in t1.items()})


class CountLabels(Method):
    """Learns from the stream alone (no start_task / end_task): counts the labels it trains on."""

    def __init__(self) -> None:
        self.seen = torch.zeros(10, dtype=torch.long)

    def loss(self, model, x, y, logits):
        if model.training:
            self.seen += torch.bincount(y, minlength=10)
        return None


def test_an_online_stream_shows_every_sample_once_and_tells_no_task_boundaries(shrink, tmp_path):
    phases = [{"name": "t1", "classes": [0, 1], "epochs": 1}, {"name": "t2", "classes": [2, 3], "epochs": 1}]
    config = shrink("split_mnist", "online", phases=phases)
    counter = "[{class_path: %s.CountLabels}]" % __name__
    cli = run("fit", "--config", config, "--model.methods", counter)
    schedule = next(c for c in cli.trainer.callbacks if isinstance(c, SequentialFineTuning))
    assert schedule.online and not schedule.reset_optimizer
    datamodule = cli.trainer.datamodule
    in_tasks = torch.cat([datamodule.dataset(p.split).labels for p in schedule.phases])
    assert cli.model.methods[0].seen.tolist() == torch.bincount(in_tasks, minlength=10).tolist()  # each sample once
    steps = sum(-(-len(datamodule.dataset(p.split)) // 10) for p in schedule.phases)  # batches of 10
    assert cli.trainer.global_step == steps
    state = next(iter(cli.trainer.optimizers[0].state_dict()["state"].values()))
    assert int(state["step"]) == steps  # one optimizer across both tasks: Adam's step count never restarted
    assert cli.model._active is None  # no active outputs: the classes seen so far are a task boundary
