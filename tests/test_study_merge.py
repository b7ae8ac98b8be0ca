"""The merge axis of ``music study``: sequential merging in the library, the planned task and
merge cells, λ chosen on ``val`` only, a merge cell's rows, and a tiny grid on a local Dask
cluster that stores them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_study import placed, stored, study_args

from music.cli import main
from music.experiments import study_db, study_merge
from music.experiments.merge import Evaluator
from music.experiments.common import Data
from music.experiments.study import read_cell, run_cell
from music.experiments.study_grid import (Grid, cell_dir, fingerprint, plan, pretrained_checkpoint, task_cells,
                                          task_checkpoint)
from music.merging import TIES, Entry, Fisher, Merger, StateDictReader, TaskArithmetic, sequential_merge

MERGE = {"merges": ["addition_sum", "addition_ties"], "data": {"val_size": 500}}


# -- sequential merging (library) -------------------------------------------------------------

def states():
    torch.manual_seed(0)
    base = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    tuned = [{k: v + torch.randn_like(v) * (i + 1) for k, v in base.items()} for i in range(3)]
    readers = {Path("base"): StateDictReader(base)} | {Path(f"t{i}"): StateDictReader(t) for i, t in enumerate(tuned)}
    entries = [Entry(f"t{i}", Path(f"t{i}"), 1.0, Path("base")) for i in range(3)]
    return base, tuned, readers, entries


def test_sequential_merge_absorbs_one_task_per_step_in_the_order_given():
    base, tuned, readers, entries = states()
    steps = [(s.absorbed, s.state(0.5)) for s in sequential_merge(Path("base"), entries, TaskArithmetic(), [2, 0, 1],
                                                                   readers=readers, compute_dtype=torch.float64)]
    assert [[e.name for e in absorbed] for absorbed, _ in steps] == [["t2"], ["t2", "t0"], ["t2", "t0", "t1"]]
    for (absorbed, state), k in zip(steps, range(1, 4)):  # task arithmetic: θ_k = θ_{k-1} + λ τ_{order[k]}
        expected = {key: base[key] + 0.5 * sum(tuned[int(e.name[1])][key] - base[key] for e in absorbed) for key in base}
        assert all(torch.allclose(state[key], expected[key], atol=1e-6) for key in base)


def test_one_task_at_lambda_one_is_that_task_bit_for_bit():
    base, tuned, readers, entries = states()
    first = next(sequential_merge(Path("base"), entries, TaskArithmetic(), [1, 0, 2], readers=readers,
                                  compute_dtype=torch.float64))
    assert all(torch.equal(first.state(1.0)[k], tuned[1][k]) for k in base)


def test_the_last_step_of_a_sequential_ties_merge_is_the_all_at_once_merge():
    base, tuned, readers, entries = states()
    *_, last = sequential_merge(Path("base"), entries, TIES(density=0.5), readers=readers, compute_dtype=torch.float64)
    with Merger(Path("base"), entries, TIES(density=0.5), readers=readers, compute_dtype=torch.float64) as merger:
        at_once = merger.state(0.7, merger.updates())
    assert all(torch.equal(last.state(0.7)[k], at_once[k]) for k in base)


def test_a_sequential_fisher_merge_weights_each_step_by_the_absorbed_tasks_fishers():
    base, tuned, readers, entries = states()
    fishers = [{f"fisher/{k}": torch.rand_like(v) + 0.1 for k, v in base.items()} for _ in entries]
    steps = list(sequential_merge(Path("base"), entries, Fisher(), [2, 0, 1], statistics=fishers, readers=readers,
                                  compute_dtype=torch.float64))
    first, second = steps[0].state(1.0), steps[1].state(1.0)
    assert all(torch.allclose(first[k], tuned[2][k], atol=1e-6) for k in base)  # one task: itself
    for k in base:  # two tasks: the Fisher-weighted mean of exactly those two
        f2, f0 = fishers[2][f"fisher/{k}"].double(), fishers[0][f"fisher/{k}"].double()
        expected = (f2 * tuned[2][k].double() + f0 * tuned[0][k].double()) / (f2 + f0)
        assert torch.allclose(second[k].double(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs statistics"):
        next(sequential_merge(Path("base"), entries, Fisher(), readers=readers))


def test_an_order_that_is_not_a_permutation_is_refused():
    _, _, readers, entries = states()
    with pytest.raises(ValueError, match=r"order=\[0, 0, 1\] is not a permutation"):
        next(sequential_merge(Path("base"), entries, TaskArithmetic(), [0, 0, 1], readers=readers))


# -- the planned cells -----------------------------------------------------------------------

def test_merges_add_task_and_merge_cells_and_leave_the_other_cells_fingerprints_alone():
    plain = Grid(seeds=[0, 1], lrs=[1e-3, 1e-4], data={"val_size": 500})
    merging = Grid(seeds=[0, 1], lrs=[1e-3, 1e-4], **MERGE)
    cells = plan(merging)
    added = [c for c in cells if c.kind in ("task", "merge")]
    assert len(cells) == len(plan(plain)) + len(added)
    # per seed and lr: 3 task cells; per merge method: all at once + one per ordering (6)
    assert len(added) == 2 * 2 * (3 + 2 * (1 + 6))
    assert {c.name: fingerprint(plain, c) for c in plan(plain)} == \
        {c.name: fingerprint(merging, c) for c in cells if c.kind not in ("task", "merge")}
    assert {c.name: fingerprint(Grid(seeds=[0]), c) for c in plan(Grid(seeds=[0]))} == \
        {c.name: fingerprint(Grid(seeds=[0], tasks=None, merges=[]), c) for c in plan(Grid(seeds=[0]))}
    names = [c.name for c in cells if c.seed == 0 and c.lr == 1e-3 and c.kind in ("task", "merge")]
    assert names[:5] == ["task_class_3_lr1e-3", "task_class_4_lr1e-3", "task_class_7_lr1e-3",
                         "merge_addition_sum_all_lr1e-3", "merge_addition_sum_3-4-7_lr1e-3"]
    merge = next(c for c in cells if c.name == "merge_addition_ties_7-3-4_lr1e-4" and c.seed == 1)
    assert [p["split"] for p in merge.phases] == ["class_7", "class_3", "class_4"] and merge.needs_pretrained
    assert {s: c.name for s, c in task_cells(merging, merge).items()} == {
        f"class_{k}": f"task_class_{k}_lr1e-4" for k in (3, 4, 7)}
    other = Grid(seeds=[0], lrs=[1e-3], **(MERGE | {"merge_lambdas": [0.0, 0.5, 1.0]}))
    same = {c.name: c for c in plan(Grid(seeds=[0], lrs=[1e-3], **MERGE))}
    for cell in plan(other):  # λ grid changes merge cells only
        assert (fingerprint(other, cell) == fingerprint(Grid(seeds=[0], lrs=[1e-3], **MERGE), same[cell.name])) == \
            (cell.kind != "merge")


def test_domain_tasks_replace_the_classes_and_have_no_merged_cells():
    grid = Grid(seeds=[0], lrs=[1e-3], tasks=["train@rot_0", "train@rot_45"], **MERGE)
    cells = plan(grid)
    assert grid.orderings == [["train@rot_0", "train@rot_45"], ["train@rot_45", "train@rot_0"]]
    assert "merged" not in {c.kind for c in cells}
    seq = next(c for c in cells if c.kind == "seq")
    assert seq.name == "seq_rot_0-rot_45_lr1e-3" and seq.phases[0] == {"name": "rot_0", "split": "train@rot_0", "epochs": 10}
    assert [c.name for c in cells if c.kind == "task"] == ["task_rot_0_lr1e-3", "task_rot_45_lr1e-3"]


@pytest.mark.parametrize("bad, message", [
    ({"merges": ["no_such_merge"], "data": {"val_size": 10}}, "no_such_merge"),
    ({"merges": ["addition_sum"]}, "val_size=0 is not allowed"),
    ({"merges": ["addition_sum"], "data": {"val_size": 0}}, "val_size=0 is not allowed"),
    ({"merges": ["addition_sum", "addition_sum"], "data": {"val_size": 10}}, "repeats a merge method"),
    ({"merges": ["pretrain"], "data": {"val_size": 10}}, "names no merge method"),
    ({"merges": ["{class_path: music.merging.TIES, init_args: {density: 2}}"], "data": {"val_size": 10}},
     "does not build a MergeMethod"),
    ({"merge_lambdas": []}, "merge_lambdas=\\[\\] is not allowed"),
    ({"tasks": ["rot_45"]}, "task 'rot_45' is not allowed"),
    ({"tasks": ["train@a", "merged@a"]}, "phases of one name"),
    ({"tasks": ["train@a", "train@b"], "orderings": [[3, 4, 7]]}, "is not a permutation of tasks"),
    ({"data": {"held_out_classes": [1]}}, "data.held_out_classes is not allowed")])
def test_bad_merge_settings_fail_early(bad, message):
    with pytest.raises(ValueError, match=message):
        Grid(**bad)


# -- one merge cell, λ on val ------------------------------------------------------------------

class ScoredEvaluator(Evaluator):
    """``Evaluator``'s own guard and log, over a model whose accuracy is a function of its one
    weight ``w``: on ``val`` best at w = 0.3, on the test set best at w = 0.9."""

    made: list = []

    def __init__(self, evaluation) -> None:  # noqa: D107 - no network, no data
        self.split, self.log, self._selecting = evaluation.select_on, [], False
        evaluator, loaded = self, {}

        class Model:
            class backbone:
                @staticmethod
                def load_state_dict(state):
                    loaded.update(state)

            @staticmethod
            def evaluate(split):
                best = 0.3 if split == "val" else 0.9
                correct = round(100 * max(0.0, 1 - abs(float(loaded["w"].mean()) - best)))
                confusion = torch.zeros(10, 10, dtype=torch.long)
                for c in range(10):
                    confusion[c, c], confusion[c, (c + 1) % 10] = correct, 100 - correct
                return {"acc": correct / 100, "loss": 1 - correct / 100}, confusion

        class Data:
            @staticmethod
            def dataloader(split):
                return split

        self.model, self.datamodule = Model, Data
        ScoredEvaluator.made.append(evaluator)


def test_lambda_is_chosen_on_val_and_the_test_set_is_evaluated_only_at_it(tmp_path, monkeypatch):
    grid = Grid(seeds=[0], lrs=[1e-3], held_out_classes=[3, 4], orderings=[[3, 4]], merges=["addition_sum"],
                data={"val_size": 10}).placed(tmp_path, tmp_path)
    cells = plan(grid)
    (base := pretrained_checkpoint(grid, 0)).parent.mkdir(parents=True)
    torch.save({"w": torch.zeros(3)}, base)
    for task in [c for c in cells if c.kind == "task"]:
        task_checkpoint(grid, task).parent.mkdir(parents=True)
        torch.save({"w": torch.full((3,), 0.5)}, task_checkpoint(grid, task))  # τ = 0.5 each
    monkeypatch.setattr(study_merge, "Evaluator", ScoredEvaluator)
    chosen = {}
    for cell in [c for c in cells if c.kind == "merge"]:
        run_dir = cell_dir(grid, cell)
        run_dir.mkdir(parents=True)
        chosen[cell.name] = study_merge.run_merge_cell(grid, cell, run_dir / "cell.yaml", run_dir)["lambdas"]
        evaluator = ScoredEvaluator.made[-1]
        assert ("test", True) not in evaluator.log  # never the test set while choosing
        assert [s for s, _ in evaluator.log].count("test") == 1 + len(chosen[cell.name])  # start + each row, at its λ
        row, phases, classes = read_cell(grid, cell, run_dir, 1.0, False)
        assert row["kind"] == "merge" and row["method"] == "addition_sum" and len(classes) == 10 * len(phases)
        metrics = json.loads(row["continual_metrics"])
        assert metrics["merge_lambdas"] == chosen[cell.name]
        assert row["final_acc"] == pytest.approx(1 - abs(0.3 - 0.9))  # w = 0.3 chosen, scored on test
    # w = λ (τ_3 + τ_4) = λ all at once; w = 0.5 λ after absorbing one task: val prefers w = 0.3, test w = 0.9
    assert chosen == {"merge_addition_sum_all_lr1e-3": {"merged": 0.3},
                      "merge_addition_sum_3-4_lr1e-3": {"class_3": 0.6, "class_4": 0.3}}
    matrix = (cell_dir(grid, cells[-1]) / "accuracy_matrix.csv").read_text().splitlines()
    assert matrix[0].endswith("task_class_3,task_class_4,acc") and [r.split(",")[1] for r in matrix[1:]] == \
        ["start", "class_3", "class_4"]


def test_domain_task_metrics_come_from_the_task_accuracy_matrix():
    sequential = study_merge.task_matrix_metrics(np.array([[0.5, 0.5], [0.9, 0.4], [0.8, 0.9]]), merged_row=False)
    assert sequential["average_accuracy"] == pytest.approx(0.85) and sequential["backward_transfer"] == pytest.approx(-0.1)
    assert sequential["mean_forgetting"] == pytest.approx(0.1)
    at_once = study_merge.task_matrix_metrics(np.array([[0.5, 0.5], [0.7, 0.6]]), merged_row=True)
    assert at_once["average_accuracy"] == pytest.approx(0.65) and np.isnan(at_once["backward_transfer"])


def test_normalised_accuracy_divides_by_each_task_fine_tuned_alone():
    from music.experiments.study_merge_report import normalised_accuracy

    assert normalised_accuracy({"a": 0.8, "b": 0.45}, {"a": 0.8, "b": 0.9}) == pytest.approx(0.75)
    assert np.isnan(normalised_accuracy({"a": 0.8}, {"a": 0.8, "b": 0.9}))


# -- a tiny grid on a local Dask cluster -------------------------------------------------------

@pytest.mark.mnist
def test_a_tiny_merge_grid_runs_on_dask_and_stores_merge_cells_once(tmp_path, data_dir):
    settings = {"seeds": [0], "orderings": [[3, 4, 7]], "lrs": [1e-3], "pretrain_epochs": 1, "finetune_epochs": 1,
                "joint_epochs": 1, "limit_train_batches": 2, "methods": [],
                "merges": ["addition_ties"], "data": {"val_size": 200}, "workers": 2}
    main(study_args(data_dir, tmp_path, **settings))
    grid = placed(settings, tmp_path)
    cells = plan(grid)
    assert set(stored(grid)) == {(c.seed, c.name) for c in cells} and len(cells) == 9
    rows, phases, _, _ = study_db.load(study_db.connect(grid.db_url))
    merges = {r["name"]: r for r in rows if r["kind"] == "merge"}
    assert set(merges) == {"merge_addition_ties_all_lr1e-3", "merge_addition_ties_3-4-7_lr1e-3"}
    sequential = merges["merge_addition_ties_3-4-7_lr1e-3"]
    assert [p["phase"] for p in phases[sequential["id"]]] == ["start", "class_3", "class_4", "class_7"]
    assert sequential["fingerprint"] == fingerprint(grid, next(c for c in cells if c.name == sequential["name"]))
    assert json.loads(sequential["continual_metrics"])["merge_lambda"] in grid.merge_lambdas
    assert "addition_ties, sequential" in (Path(grid.out) / "MERGE_REPORT.md").read_text()
    again = run_cell(grid, Data(data_dir=data_dir, download=False), next(c for c in cells if c.kind == "merge"))
    assert again == {"cell": "seed_0/merge_addition_ties_all_lr1e-3", "ran": False}  # stored once, never re-run
