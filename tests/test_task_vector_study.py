"""The task-vector study end to end on tiny training budgets, and its one hard rule: lambda
is chosen on ``val``, never on the test set."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import REPO
from lightning.pytorch import Trainer

from music.data import MusicDataModule
from music.module import Classifier
from music.task_vector_study import Evaluator, SelectionError, SimilarModel, TaskVectorStudy, parser

TINY = dict(pretrain_epochs=1, finetune_epochs=1, lambdas=[0.0, 1.0], negation_lambdas=[0.0, 1.0],
            trainer_args={"limit_train_batches": 3, "limit_val_batches": 1})


def datamodule(data_dir: str, **overrides) -> MusicDataModule:
    return MusicDataModule(**{"data_dir": data_dir, "download": False, "samples_per_class": 60, "val_size": 500} | overrides)


def study(data_dir: str, work: Path, dm: MusicDataModule | None = None, **overrides) -> TaskVectorStudy:
    args = TINY | {"work_dir": str(work / "work"), "out_dir": str(work / "out")} | overrides
    return TaskVectorStudy(dm or datamodule(data_dir), **args)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, data_dir):
    work = tmp_path_factory.mktemp("taskvector")
    s = study(data_dir, work)
    return s, s.run(), work


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_study_writes_tables_csvs_and_tensorboard(quick):
    s, results, work = quick
    out = work / "out"
    assert (out / "task_vectors.md").read_text().startswith("# Task vectors")
    transfer = read_csv(out / "task_vectors_transfer.csv")
    assert [r["class"] for r in transfer] == [*map(str, range(10)), "overall"]
    assert len(transfer[0]) == 6  # class | pretrained A | fine-tuned A | similar B | B + λτ_A | B + 1·τ_A
    assert all(0 <= float(v) <= 1 for r in transfer for k, v in r.items() if k != "class")
    assert results["transfer"]["lambda"] in s.lambdas
    addition = read_csv(out / "task_vectors_addition.csv")
    assert [r["method"] for r in addition] == ["pretrained A", "sequential fine-tuning", "merged fine-tuning",
                                               "A + λ·sum(τ)", "A + λ·TIES(τ)", "A + λ·DARE(τ)"]
    negation = read_csv(out / "task_vectors_negation.csv")
    assert len(negation) == 3 * 2 * 2  # classes × lambdas × (val, test)
    assert list((work / "work" / "lambda_curves").glob("events.out.tfevents.*"))
    assert s.trained == ["pretrained_A", "similar_B_seed", "finetuned_A_merged", "finetuned_A_class_3",
                         "finetuned_A_class_4", "finetuned_A_class_7", "sequential_A_after_4", "sequential_A_after_7"]


def test_lambda_zero_is_the_unedited_model(quick):
    """θ + 0·τ = θ: the λ = 0 points of every curve equal the model they edit."""
    _, results, _ = quick
    columns = results["transfer"]["columns"]
    curve = {(r["study"], r["method"], r["split"], r["lambda"]): r for r in results["curves"]}
    assert curve["transfer", "B+tau_A", "test", 0.0]["overall"] == columns["similar B"]["overall"]
    for method in ("sum", "TIES", "DARE"):
        assert curve["addition", method, "test", 0.0]["overall"] == columns["pretrained A"]["overall"]
    for r in results["negation"]:
        if r["split"] == "test" and r["lambda"] == 0.0:
            assert r["overall"] == columns["pretrained A"]["overall"]


def test_lambda_is_chosen_on_val_and_the_test_set_is_never_touched_while_choosing(quick):
    s, results, _ = quick
    assert ("test", True) not in s.evaluator.log
    assert {split for split, selecting in s.evaluator.log if selecting} == {"val"}
    chosen = [r for r in results["curves"] if r["chosen"] and r["split"] == "val"]
    assert len(chosen) == 4  # transfer + three addition merges
    for r in chosen:
        val = [c["overall"] for c in results["curves"] if (c["study"], c["method"], c["split"]) == (r["study"], r["method"], "val")]
        assert r["overall"] == max(val)


def test_scrambled_test_labels_change_no_choice_and_checkpoints_are_reused(quick, data_dir, monkeypatch):
    s, results, work = quick
    dm = datamodule(data_dir)
    dm.setup()
    dm.test_labels = dm.test_labels[torch.randperm(len(dm.test_labels), generator=torch.Generator().manual_seed(1))]
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a stage was retrained instead of reused"))
    again = study(data_dir, work, dm, out_dir=str(work / "out2"))
    rerun = again.run()
    assert again.trained == []
    assert rerun["transfer"]["lambda"] == results["transfer"]["lambda"]
    assert [lam for lam, _ in rerun["addition"].values()] == [lam for lam, _ in results["addition"].values()]
    val = lambda res: [r["overall"] for r in res["curves"] if r["split"] == "val"]  # noqa: E731
    assert val(rerun) == val(results)


def test_evaluator_refuses_the_test_set_while_selecting(data_dir):
    dm = datamodule(data_dir)
    dm.setup()
    model = Classifier()
    evaluator = Evaluator(dm, model)
    state = model.backbone.state_dict()
    with evaluator.selecting():
        evaluator.confusion(state, "val")
        with pytest.raises(SelectionError, match="'test'"):
            evaluator.confusion(state, "test")
    evaluator.confusion(state, "test")
    assert evaluator.log == [("val", True), ("test", False)]


def test_similar_model_further_trained_from_a(quick, data_dir):
    """mode 'further': B starts from A (reused) and trains on its own; nothing else is retrained."""
    _, _, work = quick
    s = study(data_dir, work, similar=SimilarModel(mode="further", epochs=1, seed=3))
    models = s.train_all()
    assert s.trained == ["similar_B_further"]
    assert any(not torch.equal(models["A"][k], models["B"][k]) for k in models["A"])


def test_a_stage_trained_with_other_settings_is_refused(quick, data_dir):
    _, _, work = quick
    with pytest.raises(ValueError, match="finetuned_A_merged.safetensors was trained with"):
        study(data_dir, work, finetune_lr=0.5).train_all()


@pytest.mark.parametrize("overrides, message", [
    ({"dm": {"val_size": 0}}, "val_size=0"),
    ({"lambdas": []}, "lambdas=\\[\\]"),
    ({"negation_lambdas": [0.0, -1.0]}, "negation_lambdas"),
    ({"lambdas": [0.0, 0.0]}, "distinct"),
    ({"similar": SimilarModel(mode="further")}, "similar.epochs is required"),
    ({"similar": SimilarModel(mode="other")}, "similar.mode='other'"),
    ({"similar": SimilarModel(split="test")}, "Unknown split 'test'"),
    ({"ties_density": 0.0}, "ties_density=0.0"),
    ({"dare_drop_rate": 1.0}, "dare_drop_rate=1.0"),
    ({"finetune_epochs": 0}, "finetune_epochs=0"),
])
def test_bad_study_settings_fail_early_naming_the_value(data_dir, tmp_path, overrides, message):
    dm = datamodule(data_dir, **overrides.pop("dm", {}))
    with pytest.raises(ValueError, match=message):
        study(data_dir, tmp_path, dm, **overrides)


def test_shipped_config_parses_into_typed_arguments():
    config = parser().parse_args(["--config", str(REPO / "configs" / "taskvector.yaml")])
    assert config.data.val_size > 0 and config.data.held_out_classes == [3, 4, 7]
    assert config.study.pretrain_epochs == 50 and 0.0 in config.study.lambdas
    assert isinstance(config.study.similar, SimilarModel) or config.study.similar["mode"] == "seed"
