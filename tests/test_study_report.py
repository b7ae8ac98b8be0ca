"""The study report from a database written by hand: ``music study --report_only`` ranks every
strategy and pairs every comparison by seed, with the numbers worked out below."""

import csv
import json
from pathlib import Path

import pytest
from test_study_db import RETIRED_COLUMN, write_with_retired_column

from music.cli import main
from music.experiments import study_db
from music.experiments.study_grid import Cell, Grid, plan
from music.experiments.study_report import NOT_RANKED, load_cells, ranking, strategy

SETTINGS = {"seeds": [0, 1, 2], "held_out_classes": [3, 4, 7], "orderings": [[3, 4, 7], [7, 4, 3]], "lrs": [1e-3, 1e-4],
            "methods": ["ewc", "replay"]}
# final test accuracy of seed k at lr 1e-3: base + slope * k; at lr 1e-4 the fine-tuned cells are 0.1 lower
ACCURACY = {"pretrain": (0.70, 0.01), "joint": (0.98, -0.01), "merged": (0.90, 0.02), "seq_3-4-7": (0.60, 0.01),
            "seq_7-4-3": (0.50, 0.01), "method_replay_3-4-7": (0.80, 0.01), "method_ewc_3-4-7": (0.65, 0.01)}


def final_acc(cell: Cell) -> float:
    base, slope = ACCURACY[strategy(cell)]
    return base + slope * cell.seed - (0.1 if cell.lr == 1e-4 and cell.kind not in ("pretrain", "joint") else 0.0)


def rows(cell: Cell) -> tuple[dict, list[dict], list[dict]]:
    """The database rows of a cell with the accuracies above, as a worker would store them."""
    acc = final_acc(cell)
    phases = ["start", *(p["name"] for p in cell.phases)]
    metrics = {m: 0.5 for m in study_db.METRICS} | {"final_acc": acc, "held_out_acc": acc - 0.2}
    row = {"seed": cell.seed, "name": cell.name, "kind": cell.kind, "method": cell.method, "lr": cell.lr,
           "ordering": "-".join(map(str, cell.ordering)) if cell.ordering else None,
           "fingerprint": "f" * 16, "settings": "{}", "wall_seconds": 1.0, "host": "h", **metrics}
    phase_rows = [{"row": i, "phase": p, "split": p, "acc": acc} for i, p in enumerate(phases)]
    class_rows = [{"row": i, "phase": p, "class": c, "acc": acc, "confusion": json.dumps([10 * (c == k) for k in range(10)])}
                  for i, p in enumerate(phases) for c in range(10)]
    return row, phase_rows, class_rows


def store(grid: Grid) -> None:
    """Every cell of the plan, stored as a worker stores it."""
    Path(grid.runs_dir).mkdir(parents=True)
    engine = study_db.connect(grid.db_url)
    for cell in plan(grid):
        assert study_db.record_cell(engine, *rows(cell))


def report_only(root: Path, settings: dict) -> None:
    """``music study --report_only`` on ``<root>/study``; the data section draws MNIST's splits, the
    rest of the report is what is tested here."""
    patch = pytest.MonkeyPatch()
    patch.setattr("music.experiments.study_report._eda", lambda *a: {"train": [6000] * 10, "test": [1000] * 10})
    args = ["study", "--report_only", "true", "--output.root", str(root), "--data.download", "false"]
    for key, value in settings.items():
        args += [f"--study.{key}", json.dumps(value)]
    try:
        main(args)
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Grid, Path]:
    root = tmp_path_factory.mktemp("report")
    grid = Grid(**SETTINGS).placed(root / "study", root / "study")
    store(grid)
    report_only(root, SETTINGS)
    return grid, root / "study"


def test_every_strategy_is_ranked_with_its_paired_difference_to_the_best(report):
    grid, out = report
    rows = ranking(load_cells(grid)[0], grid)
    at_1e3 = [(r["rank"], r["strategy"]) for r in rows if r["lr"] == 1e-3]
    assert at_1e3 == [(1, "joint"), (2, "merged"), (3, "method_replay_3-4-7"), (4, "pretrain"), (5, "method_ewc_3-4-7"),
                      (6, "seq_3-4-7"), (7, "seq_7-4-3")]
    # at lr 1e-4 every fine-tuned strategy is 0.1 lower: replay ties with the pretrained model, and shares its rank
    assert [(r["rank"], r["strategy"]) for r in rows if r["lr"] == 1e-4][1:4] == [
        (2, "merged"), (3, "method_replay_3-4-7"), (3, "pretrain")]
    merged = next(r for r in rows if r["lr"] == 1e-3 and r["strategy"] == "merged")
    # merged − joint per seed: -0.08, -0.05, -0.02 -> mean -0.05, sample std 0.03, CI ± t(0.975, 2) 0.03 / sqrt(3)
    assert merged["vs_best"]["mean_diff"] == pytest.approx(-0.05) and merged["vs_best"]["std_diff"] == pytest.approx(0.03)
    assert merged["vs_best"]["ci_low"] == pytest.approx(-0.05 - 4.302653 * 0.03 / 3 ** 0.5, abs=1e-6)
    assert merged["vs_best"]["p_wilcoxon"] == pytest.approx(0.25) and merged["final_acc_std"] == pytest.approx(0.02)
    text = (out / "REPORT.md").read_text()
    assert "## Ranking of every strategy" in text
    assert "| 0.001 | 2 | `merged` | 3 | 0.920 ± 0.020 | 0.720 ± 0.020 | -5.0 [-12.5, +2.5] pp, p = 0.25 (3 seeds) |" in text
    assert "| 0.001 | 1 | `joint` | 3 | 0.970 ± 0.010 | 0.770 ± 0.010 | best |" in text
    with open(out / "study_ranking.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 7 and table[1]["strategy"] == "merged" and float(table[1]["vs_best_mean_diff"]) == pytest.approx(-0.05)
    assert table[0]["vs_best_p_wilcoxon"] == "" and table[1]["vs_best_wins"] == "0"


def test_a_new_kind_of_cell_is_ranked_without_code_changes(report):
    grid, _ = report
    records = load_cells(grid)[0]
    merge = next(r for r in records if r["cell"].kind == "merged")
    added = [dict(r, cell=Cell(r["cell"].seed, "merge", "merge_ties_lr1e-3", "x", [], 1e-3))
             for r in records if r["cell"].kind == "merged" and r["cell"].lr == 1e-3]
    task = [dict(merge, cell=Cell(0, "task", "task_3_lr1e-3", "x", [], 1e-3))]
    assert "task" in NOT_RANKED
    names = [r["strategy"] for r in ranking(records + added + task, grid) if r["lr"] == 1e-3]
    assert "merge_ties" in names and "task_3" not in names and len(names) == 8


def test_comparisons_are_paired_by_seed_beside_the_win_counts(report):
    _, out = report
    text = (out / "REPORT.md").read_text()
    # sequential (mean of the two orderings per seed: 0.55 + 0.01 k) − merged (0.90 + 0.02 k): -0.35, -0.36, -0.37
    assert ("sequential never beat merged (0/6 seed × ordering cells). Sequential (each seed's mean over its orderings) "
            "minus merged, paired by seed: -36.0 [-38.5, -33.5] pp, p = 0.25 (3 seeds)") in text
    # ordering table: 3→4→7 − merged per seed -0.30, -0.31, -0.32
    assert "| 3→4→7 | 0.610 ± 0.010 | 0.510 ± 0.010 | 0/3 | 0/3 | -31.0 [-33.5, -28.5] pp, p = 0.25 (3 seeds) |" in text
    # methods table: ewc − none (sequential 3→4→7) = +0.05 every seed: no spread, nothing to rank
    assert "+5.0 [+5.0, +5.0] pp, p = 0.25 (3 seeds) |" in text
    # best − worst ordering: 3→4→7 − 7→4→3 = +0.10 every seed; replay − sequential 3→4→7 = +0.20; joint − pretrained
    assert "best − worst paired by seed +10.0 [+10.0, +10.0] pp, p = 0.25 (3 seeds)" in text
    assert "- **Replay** (the `replay` method, `music.methods.Replay`, in 3→4→7;" in text
    assert "replay − sequential in the same ordering (3→4→7), paired by seed: +20.0 [+20.0, +20.0] pp" in text
    assert "joint − pretrained, paired by seed: +26.0 [+21.0, +31.0] pp, p = 0.25 (3 seeds)" in text
    assert "0.0625 for 5 seeds" in text


def test_a_database_whose_cells_have_the_retired_replay_column_gives_the_report(tmp_path):
    """``--report_only`` on a database written while ``cells`` required ``RETIRED_COLUMN`` (0 in
    every row) and held cells of kind ``replay``, which no plan has: the report of the planned cells."""
    settings = {"seeds": [0, 1], "orderings": [[3, 4, 7]], "lrs": [1e-3], "methods": ["replay"]}
    grid = Grid(**settings).placed(tmp_path / "study", tmp_path / "study")
    (tmp_path / "study").mkdir()
    planned = [rows(cell) for cell in plan(grid)]
    retired = [(dict(row, kind="replay", name="replay_3-4-7_lr1e-3"), phases, classes)
               for row, phases, classes in planned if row["kind"] == "seq"]
    write_with_retired_column(grid.db_url, planned + retired)
    database = tmp_path / "study" / "study.db"
    before = database.read_bytes()
    report_only(tmp_path, settings)
    text = (tmp_path / "study" / "REPORT.md").read_text()
    assert f"Cells finished: {len(planned)}/{len(planned)}." in text and len(planned) == 10
    # method_replay (0.80 + 0.01 k) − seq 3→4→7 (0.60 + 0.01 k), seeds 0 and 1
    assert "replay − sequential in the same ordering (3→4→7), paired by seed: +20.0 [+20.0, +20.0] pp" in text
    with open(tmp_path / "study" / "study_cells.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and RETIRED_COLUMN not in table[0] and {r["kind"] for r in table} == {
        "pretrain", "joint", "seq", "merged", "method"}
    assert database.read_bytes() == before
