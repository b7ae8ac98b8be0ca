"""``music taskvectors`` on tiny training budgets: it trains only the stages its recipes read,
chooses λ on ``val`` only, reuses stored stages (refusing changed ones and ones whose file is
gone), and its merge output is a model that ``music test --model.init_from`` evaluates to the
accuracy the merge reported."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import run

from music.config import shipped_config
from music.experiments import instantiate, parser_for, study_db
from music.experiments.common import Data, Output, results_db
from music.experiments.taskvectors import RECIPES, TaskVectors
from music.merging import MergeMethod

pytestmark = pytest.mark.mnist
TINY = dict(val_size=500, pretrain_epochs=1, finetune_epochs=1, further_epochs=1)
FIT_ARGS = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]


def study(data_dir, work, **overrides) -> TaskVectors:
    output = Output(root=str(work / "work"), results=str(work / "out"), trainer_args=FIT_ARGS)
    return TaskVectors(**TINY | {"data": Data(data_dir=data_dir, download=False), "output": output,
                                 "recipes": ["merge/negation_3"]} | overrides)


@pytest.fixture(scope="module")
def negation(tmp_path_factory, data_dir):
    work = tmp_path_factory.mktemp("taskvectors")
    s = study(data_dir, work)
    return s, s.run(), work


def test_trains_only_the_stages_its_recipes_read_and_writes_the_tables(negation):
    s, results, work = negation
    assert s.trained == ["pretrained", "finetuned_class_3"]
    text = (work / "out" / "task_vectors.md").read_text()
    assert text.startswith("# Task vectors") and "## negation_3" in text
    # the geometry of the vectors trained (τ_3 alone: cosine 1 with itself, no sign conflict possible)
    assert "## Task-vector geometry" in text and "| finetuned_class_3 | 1.000 |" in text
    assert (work / "out" / "task_vectors_analysis.png").exists() and (work / "out" / "task_vectors_analysis_layers.csv").exists()
    with open(work / "out" / "task_vectors_negation_3.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"base (pretrained)", "τ_3 model", "edited"}
    assert {r["split"] for r in rows} == {"val", "test"}
    r = results["negation_3"]
    assert r["lambda"] in r["grid"] and (work / "out" / "task_vectors_negation_3_lambda.png").exists()


def test_lambda_is_chosen_on_val_and_the_test_set_is_never_evaluated_while_choosing(negation):
    _, results, _ = negation
    log = results["negation_3"]["merge"].evaluator.log
    assert ("test", True) not in log and {split for split, selecting in log if selecting} == {"val"}
    curve = results["negation_3"]["curve"]
    assert [r["split"] for r in curve] == ["val"] * 7 + ["test"] * 7  # test only after the choice


def test_the_merge_output_is_a_model_music_test_evaluates_to_the_reported_accuracy(negation, data_dir, tmp_path):
    _, results, _ = negation
    r = results["negation_3"]
    cli = run("test", "--config", "pretrain", "--model.init_from", r["output"], "--data.data_dir", data_dir,
              "--data.download", "false", "--data.val_size", "500", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", tmp_path)
    assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(r["tables"]["edited"]["test"]["acc"], abs=1e-6)


def test_a_second_run_reuses_the_stored_stages_and_writes_the_same_csvs(negation, data_dir, monkeypatch):
    _, _, work = negation
    before = (work / "out" / "task_vectors_negation_3.csv").read_text()
    monkeypatch.setattr("music.experiments.taskvectors.lightning",
                        lambda *a, **k: pytest.fail("a stage was retrained instead of reused"))
    again = study(data_dir, work)
    again.run()
    assert again.trained == []
    assert (work / "out" / "task_vectors_negation_3.csv").read_text() == before
    assert "nothing (all stages reused)" in (work / "out" / "task_vectors.md").read_text()
    stored = study_db.stored_run(results_db(again.output, "taskvectors"), "taskvectors", "finetuned_class_3")
    assert json.loads(stored["result"])["path"].endswith("stages/finetuned_class_3.safetensors")
    with pytest.raises(ValueError, match="taskvectors run 'finetuned_class_3' .* was finished with other settings"):
        study(data_dir, work, finetune_epochs=2).train()


def test_a_stored_stage_whose_file_is_gone_is_refused_in_one_line(data_dir, monkeypatch, tmp_path):
    study(data_dir, tmp_path).train()
    (tmp_path / "work" / "taskvectors" / "stages" / "finetuned_class_3.safetensors").unlink()
    monkeypatch.setattr("music.experiments.taskvectors.lightning",
                        lambda *a, **k: pytest.fail("a stage whose file is gone was retrained"))
    with pytest.raises(ValueError) as refused:
        study(data_dir, tmp_path).train()
    message = str(refused.value)
    assert "\n" not in message and "'finetuned_class_3'" in message and "is gone" in message


def test_shipped_configs_parse_and_name_their_methods_by_class_path():
    parser, _ = parser_for("taskvectors")
    config = parser.parse_args([])
    assert config.recipes == RECIPES and config.val_size > 0
    merge_parser, _ = parser_for("merge")
    methods = set()
    for recipe in RECIPES:
        recipe_config = merge_parser.parse_args(["--config", str(shipped_config(recipe))])
        assert recipe_config.evaluate.select_on == "val" and len(recipe_config.lambda_) > 1
        method = instantiate(merge_parser, recipe_config)["method"]
        assert isinstance(method, MergeMethod)
        methods.add(repr(method))
    assert methods == {"TaskArithmetic()", "TIES(density=0.2, scope='global')",
                       "DARE(drop_rate=0.5, seed=0, combine=TaskArithmetic())"}
