"""The study grid: cells run through the CLI, finished cells are skipped on restart, the report
is generated from what ran."""

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from music.study import Settings, cell_dir, main, plan, run_study


@pytest.fixture
def tiny(tmp_path, data_dir) -> Settings:
    """The quick grid, smaller still: 2 orderings, one lr, one epoch of 2 batches per phase."""
    return Settings(seeds=[0], orderings=[[3, 4, 7], [7, 4, 3]], lrs=[1e-3], pretrain_epochs=1, finetune_epochs=1,
                    joint_epochs=1, replay_size=50, limit_train_batches=2, data_dir=data_dir,
                    runs_dir=str(tmp_path / "runs"), out=str(tmp_path / "results"), workers=1)


def test_plan_covers_the_grid_with_one_pretraining_per_seed():
    settings = Settings(seeds=[0, 1, 2, 3, 4], lrs=[1e-3, 1e-4, 1e-5], data_dir="unused")
    cells = plan(settings)
    assert len(settings.orderings) == 6
    kinds = [c.kind for c in cells]
    assert kinds.count("pretrain") == 5 and kinds.count("joint") == 5
    assert kinds.count("seq") == 5 * 3 * 6 and kinds.count("merged") == 5 * 3 and kinds.count("replay") == 5 * 3
    assert len({(c.seed, c.name) for c in cells}) == len(cells)


def test_shipped_study_config_is_valid():
    settings = Settings(**yaml.safe_load((REPO / "configs" / "study.yaml").read_text()))
    assert len(settings.seeds) >= 5 and len(settings.orderings) == 6


@pytest.mark.parametrize("bad, message", [
    ({"seeds": []}, "seeds is empty"), ({"lrs": [0.0]}, "lrs=\\[0.0\\]"),
    ({"orderings": [[3, 4]]}, "ordering \\[3, 4\\] is not a permutation"), ({"workers": 0}, "workers=0"),
    ({"finetune_epochs": 0}, "finetune_epochs=0")])
def test_bad_settings_fail_early(bad, message):
    with pytest.raises(ValueError, match=message):
        Settings(**bad)


def test_quick_grid_runs_reports_and_skips_finished_cells_on_restart(tiny):
    args = [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in vars(tiny).items()]
    first = main(args)  # scripts/study.py: the grid, then the report
    assert not first["failed"] and len(first["ran"]) == len(plan(tiny)) == 6
    for cell in plan(tiny):
        run = cell_dir(tiny, cell)
        assert (run / "done").exists() and (run / "continual_metrics.json").exists(), cell.name
        if cell.needs_pretrained:  # every fine-tuning cell starts from its seed's one pretrained model
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["model"]["init_from"].endswith("seed_0/pretrain/checkpoints/phase-0-pretrain.ckpt")
    out = Path(tiny.out)
    report = (out / "REPORT.md").read_text()
    assert "When does sequential beat merged?" in report and "lr 0.001" in report
    for figure in ("accuracy_after_each_phase", "forgetting_per_class", "accuracy_vs_lr", "confusion_matrices"):
        assert (out / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "study_cells.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[0].startswith("seed,kind,cell,lr")
    markers = {c.name: os.stat(cell_dir(tiny, c) / "done").st_mtime_ns for c in plan(tiny)}

    again = run_study(tiny)  # a restart: nothing runs, no marker is rewritten
    assert again["ran"] == [] and len(again["skipped"]) == 6
    assert markers == {c.name: os.stat(cell_dir(tiny, c) / "done").st_mtime_ns for c in plan(tiny)}

    lost = next(c for c in plan(tiny) if c.kind == "merged")
    (cell_dir(tiny, lost) / "done").unlink()  # an unfinished cell: only it runs again
    assert run_study(tiny)["ran"] == [f"seed_0/{lost.name}"]

    # the same directory with other settings is refused instead of mixing results
    with pytest.raises(ValueError, match="finished with other settings"):
        run_study(Settings(**vars(tiny) | {"finetune_epochs": 2}))


@pytest.mark.slow
def test_cells_run_in_worker_processes(tiny):
    parallel = Settings(**vars(tiny) | {"workers": 2})
    result = run_study(parallel)
    assert not result["failed"] and len(result["ran"]) == 6
    logs = list((Path(parallel.runs_dir) / "worker_logs").glob("worker-*.log"))
    assert 1 <= len(logs) <= 2
