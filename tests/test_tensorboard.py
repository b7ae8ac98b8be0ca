"""What TensorBoard shows, read back from the event files: tags, steps, layout, HParams, figures."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import merged_config, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from music import dashboard
from music.figures import accuracy_matrix_figure, confusion_matrix_figure, phase_figure, save_run_figures
from music.module import training_progress

FINE_TUNING = ["class_3", "class_4", "class_7"]
HEADLINE = {"test/acc", "test/loss", "test/f1_macro", "test/precision_macro", "test/recall_macro"}


def events(log_dir) -> EventAccumulator:
    return EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def hparams(acc: EventAccumulator) -> tuple[dict, list[str]]:
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, [m.name.tag for m in experiment.metric_infos]


@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir):
    """A tiny Table I study in one logdir, run once for this module's tests: pretrain (1 epoch
    of at most 2 blocks), then sequential fine-tuning 3 -> 4 -> 7 (1 epoch each) from the
    pretrained snapshot. The shipped configs, shrunk as ``conftest.shrink`` does."""
    root = tmp_path_factory.mktemp("study")

    def config(name: str) -> Path:
        merged = merged_config(name)
        merged["data"] |= {"data_dir": data_dir, "download": False, "log_eda": False}
        merged["trainer"]["logger"]["init_args"]["save_dir"] = str(root / "logs")
        merged["trainer"] |= {"enable_progress_bar": False, "enable_model_summary": False}
        merged["schedule"]["phases"] = [p | {"epochs": 1} for p in merged["schedule"]["phases"]]
        (root / f"{name}.yaml").write_text(yaml.safe_dump(merged))
        return root / f"{name}.yaml"

    pretrain = run("fit", "--config", config("pretrain"), "--trainer.limit_train_batches", 2)
    snapshot = Path(pretrain.trainer.log_dir) / "checkpoints" / "phase-0-pretrain.ckpt"
    seq = run("fit", "--config", config("seq_finetune"), "--trainer.limit_train_batches", 2,
              "--model.init_from", snapshot)
    return pretrain, seq


@pytest.mark.mnist
def test_event_files_hold_one_curve_per_quantity_on_one_axis(study):
    pretrain, seq = study
    pretrained = pretrain.trainer.global_step
    per_phase = seq.trainer.global_step // len(FINE_TUNING)  # equal-sized splits; Lightning counts from 0
    assert pretrained > 0 and per_phase > 0 and seq.trainer.global_step == per_phase * len(FINE_TUNING)
    first, second = events(pretrain.trainer.log_dir), events(seq.trainer.log_dir)

    # one test/acc series, one point per evaluation, at the phase-boundary steps; the
    # fine-tuning run continues the pretrained run's steps and starts from its final point
    assert steps(first, "test/acc") == [0, pretrained]
    boundaries = [pretrained + per_phase * i for i in range(len(FINE_TUNING) + 1)]
    assert steps(second, "test/acc") == boundaries
    assert second.Scalars("test/acc")[0].value == pytest.approx(first.Scalars("test/acc")[-1].value)
    assert [e.step for e in second.Scalars("train/phase")] == boundaries[:-1]
    assert [e.value for e in second.Scalars("train/epoch")] == [1, 2, 3]  # pretrain trained epoch 0
    assert steps(second, "train/loss") == boundaries[1:]
    assert min(steps(second, "train/loss_step")) >= pretrained

    # the headline group is small; per-class values are a group of their own, one tag per class
    scalars = set(second.Tags()["scalars"])
    assert HEADLINE <= scalars
    assert {t for t in scalars if t.startswith("test/") and not t.startswith("test/continual/")} == HEADLINE
    assert {f"test_per_class/f1/class_{c}" for c in range(10)} <= scalars
    assert not [t for t in scalars if re.search(r"class_\d+/", t)]  # no phase names inside tags
    for tag in scalars - {"train/loss_step"}:
        logged = steps(second, tag)
        assert len(logged) == len(set(logged)), tag  # one point per step

    # the phase axis: the headline metrics at the evaluation's row (0 = start), the same values
    evaluations = len(FINE_TUNING) + 1
    for tag, headline in [("by_phase/test_acc", "test/acc"), ("by_phase/test_loss", "test/loss"),
                          ("by_phase/f1_macro", "test/f1_macro")]:
        assert steps(second, tag) == list(range(evaluations)), tag
        assert [e.value for e in second.Scalars(tag)] == [e.value for e in second.Scalars(headline)], tag
    for c in range(10):
        tag = f"by_phase_per_class/f1/class_{c}"
        assert steps(second, tag) == list(range(evaluations))
        assert [e.value for e in second.Scalars(tag)] == [e.value for e in second.Scalars(f"test_per_class/f1/class_{c}")]
    assert {t.split("/")[0] for t in scalars} == {"by_phase", "by_phase_per_class", "test", "test_per_class", "train"}
    assert sorted({t.split("/")[0] for t in scalars})[0] == "by_phase"  # TensorBoard shows it first

    # forgetting per class: no curve with a gap or of one point; a class trained later has none
    # (class 4 and 7 would start again after their task), the untouched ones one point per phase
    forgetting = {int(t.rsplit("_", 1)[1]): steps(second, t) for t in scalars
                  if t.startswith("test_per_class/forgetting/")}
    assert forgetting == {c: boundaries[1:] if c not in (3, 4, 7) else boundaries[2:]
                          for c in range(10) if c not in (4, 7)}
    assert {int(t.rsplit("_", 1)[1]): steps(second, t) for t in scalars
            if t.startswith("by_phase_per_class/forgetting/")} == {
        c: [1, 2, 3] if c != 3 else [2, 3] for c in range(10) if c not in (4, 7)}

    # Custom Scalars: the phase axis first, then one chart per class (a chart colours by run)
    layout = layout_pb2.Layout.FromString(second.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    categories = {category.title: {c.title: list(c.multiline.tag) for c in category.chart}
                  for category in layout.category}
    first_category = layout.category[0]
    assert {t for c in first_category.chart for t in scalars if re.search(c.multiline.tag[0], t)} == {
        "by_phase/test_acc", "by_phase/test_loss", "by_phase/f1_macro"}
    for title, metric in [("F1 per class", "f1"), ("forgetting per class", "forgetting")]:
        assert list(categories[title]) == [f"class {c}" for c in range(10)]
        for c in range(10):
            (regex,) = categories[title][f"class {c}"]
            assert {t for t in scalars if re.search(regex, t)} <= {f"by_phase_per_class/{metric}/class_{c}"}
    assert all(len(chart) == 1 for charts in categories.values() for chart in charts.values())
    assert layout == layout_pb2.Layout.FromString(first.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])

    # HParams: the run's settings and its final metrics' tags
    settings, metrics = hparams(second)
    assert settings["schedule.phases"] == " → ".join(FINE_TUNING)
    assert settings["model.init_from"].endswith("phase-0-pretrain.ckpt") and settings["seed"] == 0
    assert settings["model.lr"] == pytest.approx(0.001) and settings["model.finetune"] == "none"
    assert {"test/acc", "test/continual/average_accuracy"} <= set(metrics)
    assert hparams(first)[0]["schedule.phases"] == "pretrain" and hparams(first)[0]["model.init_from"] == "none"

    # one confusion-matrix tag with one figure per evaluation; the accuracy matrix at the end
    assert [i.step for i in second.Images("test/confusion_matrix")] == boundaries
    assert [i.step for i in second.Images("test/accuracy_matrix")] == boundaries[-1:]
    # the phase axis as an image (not smoothed) and as a table, at the evaluation's row
    assert [i.step for i in second.Images("by_phase/acc_chart")] == list(range(evaluations))
    texts = second.Tensors("by_phase/evaluations/text_summary")
    assert [t.step for t in texts] == list(range(evaluations))
    text = texts[-1].tensor_proto.string_val[0].decode()
    assert all(f"| {i} | {name} |" in text for i, name in enumerate(["start", *FINE_TUNING]))


@pytest.mark.mnist
def test_progress_offsets_chain_through_checkpoints(study):
    pretrain, seq = study
    pretrained, total = pretrain.trainer.global_step, seq.trainer.global_step
    snapshots = Path(seq.trainer.log_dir) / "checkpoints"
    assert training_progress(snapshots / "phase-0-class_3.ckpt") == (pretrained + total // 3, 2)  # 1 + 1 epochs
    assert training_progress(snapshots / "phase-2-class_7.ckpt") == (pretrained + total, 4)
    state = torch.load(snapshots / "phase-2-class_7.ckpt", weights_only=True)["state_dict"]
    torch.save(state, snapshots / "plain.pt")
    assert training_progress(snapshots / "plain.pt") == (0, 0)  # no counters in a plain weights file


@pytest.mark.mnist
def test_run_figures_as_pngs(study, tmp_path):
    _, seq = study
    paths = save_run_figures(seq.trainer.log_dir, tmp_path / "figures", name="seq")
    assert sorted(Path(p).name for p in paths) == sorted(
        [f"seq_confusion_{p}.png" for p in FINE_TUNING] + ["seq_accuracy_matrix.png"])
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in paths)
    with pytest.raises(FileNotFoundError, match="phase_metrics.json"):
        save_run_figures(tmp_path, tmp_path / "none")


def test_metric_tags_name_macro_and_per_class_values():
    tags = dashboard.metric_scalars("test", {"acc": 0.9, "f1": 0.8, "f1/3": 0.5, "loss": 0.1, "recall/10": 1.0})
    assert tags == {"test/acc": 0.9, "test/f1_macro": 0.8, "test_per_class/f1/class_3": 0.5, "test/loss": 0.1,
                    "test_per_class/recall/class_10": 1.0}


def test_continual_tags_leave_out_undefined_values():
    summary = {"average_accuracy": 0.5, "backward_transfer": None, "collapse_share": math.nan, "rows": 3,
               "forgetting_per_class": {"3": 0.25, "4": None}}
    assert dashboard.continual_scalars(summary) == {"test/continual/average_accuracy": 0.5,
                                                    "test_per_class/forgetting/class_3": 0.25}


def test_forgetting_curves_have_neither_gaps_nor_single_points():
    summary = {"forgetting_per_class": {"0": 0.1, "3": 0.2, "4": 0.3, "7": None}}
    tags = lambda out: sorted(int(t.rsplit("_", 1)[1]) for t in out if "forgetting" in t)  # noqa: E731
    assert tags(dashboard.continual_scalars(summary)) == [0, 3, 4]
    assert tags(dashboard.continual_scalars(summary, later_classes=[4, 7])) == [0, 3]  # 4 is trained later
    earlier = {"forgetting_per_class": {"0": 0.1, "3": None, "4": 0.0}}
    assert tags(dashboard.continual_scalars(summary, earlier, last=True)) == [0, 4]  # 3: its only point


def test_custom_scalars_chart_each_class_apart():
    layout = dashboard.layout(3)
    assert list(layout)[0].startswith("Test set after each evaluation")
    assert layout["F1 per class"] == {f"class {c}": ["Multiline", [f"^by_phase_per_class/f1/class_{c}$"]]
                                      for c in range(3)}


def test_phase_axis_tags():
    scalars = {"test/acc": 0.9, "test/loss": 0.3, "test/f1_macro": 0.8, "test/recall_macro": 0.7,
               "test_per_class/f1/class_3": 0.5, "test/continual/average_accuracy": 0.6}
    assert dashboard.phase_scalars(scalars) == {"by_phase/test_acc": 0.9, "by_phase/test_loss": 0.3,
                                                "by_phase/f1_macro": 0.8, "by_phase_per_class/f1/class_3": 0.5}


def test_phase_chart_writes_every_value():
    fig = phase_figure(["start", "class_3"], [0.974, 0.5], "seq/version_0\ntest accuracy")
    axes = fig.axes[0]
    assert [t.get_text() for t in axes.texts] == ["97.4", "50.0"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["0\nstart", "1\nclass_3"]


def test_settings_are_flat_with_the_same_keys_whatever_the_values():
    with_lora = dashboard.flat_settings("model", {"lr": 0.01, "finetune": {"mode": "lora", "rank": 4},
                                                  "init_from": "a.ckpt", "_instantiator": "x"})
    without = dashboard.flat_settings("model", {"lr": 0.01, "finetune": None, "init_from": None, "_instantiator": "x"})
    assert with_lora == {"model.lr": 0.01, "model.finetune": "mode=lora, rank=4", "model.init_from": "a.ckpt"}
    assert list(without) == list(with_lora) and without["model.finetune"] == "none"


def test_figures_are_titled_with_a_colour_bar_and_counts():
    confusion = [[8, 2, 0], [0, 10, 0], [1, 0, 9]]
    fig = confusion_matrix_figure(confusion, "seq/version_0\nafter class_3")
    axes, bar = fig.axes
    assert axes.get_title() == "seq/version_0\nafter class_3" and bar.get_ylabel() == "share of the true class"
    assert sorted(t.get_text() for t in axes.texts) == sorted(["8", "2", "10", "1", "9"])  # empty cells stay blank
    assert axes.images[0].get_array()[0, 0] == pytest.approx(0.8)  # coloured by the true class's share
    fig = accuracy_matrix_figure(["start", "class_3"], [[0.9, 0.8, math.nan], [0.1, 1.0, 0.5]], "seq: accuracy")
    axes = fig.axes[0]
    assert [t.get_text() for t in axes.texts] == ["90", "80", "10", "100", "50"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["start", "class_3"]
