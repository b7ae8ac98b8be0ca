"""The experiments through ``music <name>``, as smoke runs (5 loader steps an epoch) on the
synthetic dataset: each writes its table from runs of the shipped configs."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SYNTHETIC
from test_bad_input import fails_in_one_line

from music.cli import main
from music.experiments.common import fmt_mean_std, mean_std, mean_std_columns, spread_note
from music.runner import as_args, run


@pytest.fixture
def synthetic(tmp_path: Path) -> str:
    """A config delta that puts any run on the synthetic dataset."""
    path = tmp_path / "synthetic.yaml"
    path.write_text(yaml.safe_dump({"data": SYNTHETIC | {"data_dir": str(tmp_path / "data"), "download": False}}))
    return str(path)


def outputs(tmp_path: Path) -> list[str]:
    """A smoke run that publishes its tables to ``<tmp_path>/results``, its runs under ``<tmp_path>/logs``."""
    return ["--output.quick", "true", "--output.root", str(tmp_path / "logs"), "--output.results", str(tmp_path / "results")]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_table1_writes_every_stage_from_one_pretrained_model_and_nothing_outside_its_folder(tmp_path, synthetic,
                                                                                            monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the defaults, as on a fresh clone: results/ is not touched
    main(["table1", "--seeds", "[0, 1]", "--pretrain", f"[pretrain, {synthetic}]", "--sequential",
          f"[seq_finetune, {synthetic}]", "--merged", f"[merged_finetune, {synthetic}]", "--output.quick", "true"])
    assert {f.split("/")[0] for f in files_under(cwd)} == {"lightning_logs"}
    out = cwd / "lightning_logs" / "table1"
    assert {f.split("/")[0] for f in files_under(cwd / "lightning_logs")} == {"table1"}
    stages = ["pretrained", "merged", "sequential (after 3)", "sequential (after 4)", "sequential (after 7)"]
    rows = list(csv.DictReader(open(out / "table1.csv")))
    assert [r["stage"] for r in rows] == stages
    for row in rows:
        assert 0.0 <= float(row["acc_mean"]) <= 1.0 and float(row["loss_mean"]) > 0 and "recall/7_mean" in row
        seeds = [float(row["acc_seed0"]), float(row["acc_seed1"])]  # the std is the sample std of the seeds' values
        assert float(row["acc_std"]) == pytest.approx(abs(seeds[0] - seeds[1]) / 2 ** 0.5, abs=1e-4)
    for stage in ("sequential", "merged"):  # both fine-tunes started from the pretrain run's snapshot
        config = yaml.safe_load(next((out / "seed_0" / stage).glob("*/config.yaml")).read_text())
        assert config["model"]["init_from"].endswith("phase-0-pretrain.ckpt")
    figures = sorted(p.name for p in (out / "table1_figures").glob("*.png"))
    assert "seed0_sequential_confusion_class_7.png" in figures and "seed0_merged_accuracy_matrix.png" in figures
    markdown = (out / "table1.md").read_text()
    assert "paper acc / loss (reference)" in markdown and "1 torch thread," in markdown
    assert "mean ± sample std (ddof=1) over 2 seeds" in markdown
    assert torch.get_num_threads() == 1  # reproducible by default
    # done runs are read back from the results store: nothing trains, the same table comes out
    monkeypatch.setattr("music.experiments.table1.fit", lambda *a, **k: pytest.fail("a stored stage was trained again"))
    before = (out / "table1.csv").read_text()
    main(["table1", "--seeds", "[0, 1]", "--pretrain", f"[pretrain, {synthetic}]", "--sequential",
          f"[seq_finetune, {synthetic}]", "--merged", f"[merged_finetune, {synthetic}]", "--output.quick", "true"])
    assert (out / "table1.csv").read_text() == before


def test_finetune_compare_writes_a_row_per_study_and_mode(tmp_path, synthetic):
    main(["finetune-compare", "--pretrain", f"[pretrain, {synthetic}]",
          "--studies", json.dumps({"sequential": ["seq_finetune", synthetic], "merged": ["merged_finetune", synthetic]}),
          "--modes", json.dumps({"lora": ["lora"], "head-only": ["head_only"]}), *outputs(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "results" / "finetuning.csv")))
    assert [(r["study"], r["mode"]) for r in rows] == [("sequential", "lora"), ("sequential", "head-only"),
                                                        ("merged", "lora"), ("merged", "head-only")]
    # rank 8 on fc1, fc2 + the fc3 head / the head alone
    assert [int(r["trainable_params"]) for r in rows] == [9_482, 650, 9_482, 650]
    assert all(float(r["task_vector_norm"]) > 0 for r in rows)


def test_eda_draws_the_splits_a_config_trains_on(tmp_path, synthetic):
    main(["eda", "--configs", f"[seq, {synthetic}]", "--output.root", str(tmp_path)])
    names = sorted(p.name for p in (tmp_path / "eda").glob("*.png"))
    assert names == ["class_counts.png", *(f"samples_{s}.png" for s in
                     ("class_3", "class_4", "class_7", "merged", "remaining", "test", "train"))]
    counts = json.loads((tmp_path / "eda" / "class_counts.json").read_text())
    assert counts["merged"] == [SYNTHETIC["samples_per_class"] if c in (3, 4, 7) else 0 for c in range(10)]


@pytest.mark.parametrize(("args", "message"), [
    (["table1", "--seeds", "[]"], r"seeds=\[\] is not allowed"),
    (["table1", "--output.threads", "0"], r"output.threads=0 is not allowed"),
    (["table1", "--sedes", "[1]"], "sedes"),
    (["finetune-compare", "--pretrained", "/nonexistent.ckpt"], r"pretrained='/nonexistent.ckpt' does not exist"),
    (["tabel1"], r"unknown subcommand 'tabel1'"),
])
def test_bad_experiment_settings_end_in_one_line(args, message, capsys):
    assert re.search(message, fails_in_one_line(args, capsys))


@pytest.mark.slow  # a few minutes on 2 cores: six ViT evaluations of the full 10,000-image test set
def test_attention_pretrains_fine_tunes_both_modes_and_draws(tmp_path, data_dir):
    main(["attention", "--data.data_dir", data_dir, *outputs(tmp_path)])
    assert (tmp_path / "results" / "attention_vit_mnist.png").stat().st_size > 0
    assert list((tmp_path / "logs" / "attention" / "vit_mnist" / "attention").glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(tmp_path / "results" / "vit_vit_mnist.csv")))
    assert {r["model"]: int(r["trainable_params"]) for r in rows} == {
        "pretrained": 5_353_738, "full": 5_353_738, "lora": 177_418}  # LoRA r8 qkv+fc1, LayerNorms, head
    for mode in ("full", "lora"):  # both fine-tunes started from the pretrain snapshot
        config = yaml.safe_load(next((tmp_path / "logs" / "attention" / "vit_mnist" / mode).glob("*/config.yaml")).read_text())
        assert config["model"]["init_from"].endswith("phase-0-pretrain.ckpt")


def test_every_spread_is_the_sample_std_and_says_so():
    mean, std, n = mean_std([1.0, 2.0, 3.0, float("nan")])
    assert (mean, std, n) == (2.0, 1.0, 3)  # ddof=1; the population std would be 0.816
    assert fmt_mean_std([0.1, 0.3]) == "0.200 ± 0.141" and fmt_mean_std([0.5]) == "0.500" and fmt_mean_std([]) == "–"
    means, stds = mean_std_columns([[1.0, 2.0], [3.0, 6.0]])
    assert means.tolist() == [2.0, 4.0] and stds.tolist() == pytest.approx([2 ** 0.5, 2 * 2 ** 0.5])
    assert mean_std_columns([[1.0, 2.0]])[1].tolist() == [0.0, 0.0]  # one run: no error bar
    assert spread_note([5]) == "mean ± sample std (ddof=1) over 5 seeds"
    assert spread_note([1], "cells") == "mean ± sample std (ddof=1) over 1 cell"


def test_runs_take_python_values_as_settings():
    assert as_args(["seq", "lora"], {"data.download": False, "seed_everything": 3, "model.init_from": None,
                                     "data.held_out_classes": [2, 5], "data.data_dir": "/d"}) == [
        "--config", "seq", "--config", "lora", "--data.download", "false", "--seed_everything", "3",
        "--model.init_from", "null", "--data.held_out_classes", "[2, 5]", "--data.data_dir", "/d"]
    with pytest.raises(ValueError, match="override key '--seed' is not allowed"):
        as_args([], {"--seed": 1})
    with pytest.raises(ValueError, match="subcommand='train' is not allowed"):
        run("train", ["seq"])


def test_continual_table_pairs_each_method_with_naive_fine_tuning_by_seed(tmp_path):
    from music.experiments.common import Data, Output
    from music.experiments.continual import METRICS, ContinualStudy

    study = ContinualStudy(methods={"None": [], "EWC": ["ewc"], "Joint": ["split_mnist_joint"]}, scenarios=["class"],
                           seeds=[0, 1, 2], data=Data(data_dir=str(tmp_path), download=False),
                           output=Output(root=str(tmp_path), name="cl"))
    final = {"None": [0.20, 0.21, 0.19], "EWC": [0.25, 0.27, 0.28], "Joint": [0.90, 0.90, 0.90]}
    results = [{"method": m, "scenario": "class", "seed": seed, "seconds": 1.0, "accuracy_after_task": [0.5] * 5,
                **{k: 0.5 for k in METRICS}, "final_accuracy": final[m][seed], "backward_transfer": float("nan")}
               for m in final for seed in range(3)]
    study.write(results, 1.0)
    table = (tmp_path / "cl" / "cl.md").read_text()
    # EWC − None per seed 0.05, 0.06, 0.09: mean 0.0667, sample std 0.0208, ± t(0.975, 2) 0.0208 / sqrt(3) = 0.0517
    assert "| EWC | +6.7 [+1.5, +11.8] pp, p = 0.25 (3 seeds) | +0.0 [+0.0, +0.0] pp, p n/a (3 seeds) |" in table
    assert "| Joint | +70.0 [+67.5, +72.5] pp, p = 0.25 (3 seeds) |" in table and "| None | +" not in table
    assert "minus naive fine-tuning (`None`), paired by seed" in table
    rows = list(csv.DictReader(open(tmp_path / "cl" / "cl_paired.csv")))
    assert [(r["method"], r["metric"]) for r in rows] == [("EWC", "final_accuracy"), ("EWC", "average_accuracy"),
                                                         ("Joint", "final_accuracy"), ("Joint", "average_accuracy")]
    assert float(rows[0]["mean_diff"]) == pytest.approx(0.2 / 3) and rows[1]["p_wilcoxon"] == "" and rows[0]["wins"] == "3"
