"""``music study``: the grid runs on Dask (a local cluster, or a real scheduler with workers that
die), every finished cell is one set of rows in the database, restarts skip what is stored, and
bad input stops before any cell runs."""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from sqlalchemy import func, select

from music.cli import main
from music.experiments import study_db
from music.experiments.common import Data
from music.experiments.study import resume_point
from music.experiments.study_grid import Grid, cell_dir, plan
from music.experiments.study_report import load_cells

TINY = {"seeds": [0], "orderings": [[3, 4, 7]], "lrs": [1e-3], "pretrain_epochs": 1, "finetune_epochs": 1,
        "joint_epochs": 1, "limit_train_batches": 2, "methods": ["lwf"]}


def study_args(data_dir: str, root: Path, **settings) -> list[str]:
    args = ["study", "--data.data_dir", data_dir, "--data.download", "false", "--output.root", str(root)]
    for key, value in settings.items():
        if value is None:  # the default
            continue
        args += [f"--study.{key}", value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()]
    return args


def placed(settings: dict, root: Path) -> Grid:
    """The grid ``music study --output.root <root>`` runs: in ``<root>/study``, report included."""
    return Grid(**settings).placed(root / "study", root / "study")


def grid_settings(grid: Grid) -> dict:
    """The ``--study.*`` settings of a grid (not where it writes: that is ``--output``)."""
    return {f.name: getattr(grid, f.name) for f in fields(Grid) if f.init}


def stored(grid: Grid) -> dict[tuple[int, str], list[float]]:
    """(seed, cell) -> final accuracy and every per-class accuracy of every row, from the database."""
    cells, _, classes, _ = study_db.load(study_db.connect(grid.db_url))
    return {(c["seed"], c["name"]): [c["final_acc"], *(r["acc"] for r in classes[c["id"]])] for c in cells}


def cell_count(grid: Grid) -> int:
    with study_db.connect(grid.db_url).connect() as conn:
        return conn.execute(select(func.count()).select_from(study_db.cells)).scalar()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory, data_dir) -> Grid:
    """The tiny grid (pretrain, joint, one sequential ordering, merged, that ordering with LwF) run once by
    ``music study`` on its default local Dask cluster of 2 worker processes."""
    settings, root = TINY | {"workers": 2}, tmp_path_factory.mktemp("local")
    main(study_args(data_dir, root, **settings))
    return placed(settings, root)


def test_plan_covers_the_grid_with_one_pretraining_per_seed():
    cells = plan(Grid(seeds=[0, 1, 2, 3, 4], lrs=[1e-3, 1e-4, 1e-5]))
    kinds = [c.kind for c in cells]
    assert kinds.count("pretrain") == 5 and kinds.count("joint") == 5
    assert kinds.count("seq") == 5 * 3 * 6 and kinds.count("merged") == 5 * 3
    assert set(kinds) == {"pretrain", "joint", "seq", "merged"}  # replay is a method cell (study.methods)
    assert len({(c.seed, c.name) for c in cells}) == len(cells) == 115


def test_a_method_axis_adds_cells_and_leaves_the_other_cells_fingerprints_alone():
    from music.experiments.study import cell_config
    from music.experiments.study_grid import fingerprint

    plain = Grid(seeds=[0, 1], lrs=[1e-3, 1e-4])
    with_methods = Grid(seeds=[0, 1], lrs=[1e-3, 1e-4], methods=["ewc", "replay"])
    added = [c for c in plan(with_methods) if c.kind == "method"]
    assert [c.name for c in added if c.seed == 0] == ["method_ewc_3-4-7_lr1e-3", "method_replay_3-4-7_lr1e-3",
                                                      "method_ewc_3-4-7_lr1e-4", "method_replay_3-4-7_lr1e-4"]
    assert len(plan(with_methods)) == len(plan(plain)) + 2 * 2 * 2
    assert {c.name: fingerprint(plain, c) for c in plan(plain)} == \
        {c.name: fingerprint(with_methods, c) for c in plan(with_methods) if c.kind != "method"}
    delta = cell_config(with_methods, Data(), added[0])
    assert delta["model"]["pretrained_on"] == "remaining" and delta["model"]["init_from"].endswith("phase-0-pretrain.ckpt")
    assert [p["split"] for p in delta["schedule"]["phases"]] == ["class_3", "class_4", "class_7"]
    new = Grid(seeds=[0], samples_per_class="all")
    assert cell_config(new, Data(), plan(new)[0])["data"]["samples_per_class"] == "all"
    assert fingerprint(new, plan(new)[0]) != fingerprint(Grid(seeds=[0]), plan(Grid(seeds=[0]))[0])


def test_shipped_study_config_is_valid():
    from music.experiments import instantiate, parser_for

    parser, _ = parser_for("study")
    grid = instantiate(parser, parser.parse_args([]))["study"]
    assert len(grid.seeds) == 5 and len(grid.orderings) == 6 and grid.scheduler is None and grid.threads == 1


@pytest.mark.parametrize("bad, message", [
    ({"seeds": []}, "seeds is empty"), ({"lrs": [0.0]}, "lrs=\\[0.0\\]"),
    ({"orderings": [[3, 4]]}, "ordering \\[3, 4\\] is not a permutation"), ({"workers": 0}, "workers=0"),
    ({"finetune_epochs": 0}, "finetune_epochs=0"), ({"scheduler": "localhost"}, "not a Dask scheduler address"),
    ({"logger": {"init_args": {}}}, "has no class_path"), ({"methods": ["ewc", "ewc"]}, "repeats a method"),
    ({"methods": ["no_such_method"]}, "no_such_method"), ({"samples_per_class": 0}, "samples_per_class=0")])
def test_bad_settings_fail_early(bad, message):
    with pytest.raises(ValueError, match=message):
        Grid(**bad)


@pytest.mark.mnist
def test_grid_stores_every_cell_once_and_reports_from_the_database(local_grid):
    cells = plan(local_grid)
    assert len(cells) == 5 and set(stored(local_grid)) == {(c.seed, c.name) for c in cells}
    for cell in cells:
        run = cell_dir(local_grid, cell)
        for name in ("phase_metrics.json", "accuracy_matrix.csv", "config.yaml", "cell.log"):
            assert (run / name).exists(), (cell.name, name)
        # fine-tuning cells checkpoint at phase ends only; pretraining and joint every epoch
        checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
        phases = [f"phase-{i}-{p['name']}.ckpt" for i, p in enumerate(cell.phases)]
        if cell.needs_pretrained:
            assert checkpoints == phases, cell.name
        else:
            assert set(phases) | {"last.ckpt"} <= set(checkpoints) and len(checkpoints) == len(phases) + 2, cell.name
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["run_dir"] == str(run) and config["seed_everything"] == 0
        if cell.needs_pretrained:  # every fine-tuning cell starts from its seed's one pretrained model
            assert config["model"]["init_from"].endswith("seed_0/pretrain/checkpoints/phase-0-pretrain.ckpt")
    records, runs = load_cells(local_grid)
    seq = next(r for r in records if r["cell"].kind == "seq")
    assert [row["phase"] for row in seq["rows"]] == ["start", "class_3", "class_4", "class_7"]
    assert seq["confusion"].shape == (10, 10) and runs[0]["ran"] == 5 and runs[0]["workers"] == 2
    lwf = next(r for r in records if r["cell"].kind == "method")
    assert [row["phase"] for row in lwf["rows"]] == ["start", "class_3", "class_4", "class_7"]
    assert yaml.safe_load((cell_dir(local_grid, lwf["cell"]) / "config.yaml").read_text())["model"]["methods"][0][
        "class_path"] == "music.methods.LwF"
    out = Path(local_grid.out)
    report = (out / "REPORT.md").read_text()
    assert "When does sequential beat merged?" in report and "What keeps forgetting down" in report
    assert "| 0.001 | lwf | 1 |" in report
    for figure in ("accuracy_after_each_phase", "forgetting_per_class", "accuracy_vs_lr", "confusion_matrices"):
        assert (out / "figures" / f"{figure}.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "study_cells.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 and rows[0].startswith("seed,kind,method,cell,lr")


@pytest.mark.mnist
def test_restart_runs_only_what_is_not_stored(local_grid, data_dir, tmp_path, capsys):
    before = stored(local_grid)
    main(study_args(data_dir, Path(local_grid.runs_dir).parent, **grid_settings(local_grid)))  # nothing to run
    assert cell_count(local_grid) == 5 and stored(local_grid) == before
    # a cell whose rows are gone (never stored) runs again, resuming its finished run from last.ckpt
    engine = study_db.connect(local_grid.db_url)
    with engine.begin() as conn:
        cell_id = conn.execute(select(study_db.cells.c.id).where(study_db.cells.c.name == "merged_lr1e-3")).scalar()
        for table in (study_db.class_results, study_db.phases):
            conn.execute(table.delete().where(table.c.cell_id == cell_id))
        conn.execute(study_db.cells.delete().where(study_db.cells.c.id == cell_id))
    main(study_args(data_dir, Path(local_grid.runs_dir).parent, **grid_settings(local_grid)))
    assert stored(local_grid) == before
    runs = study_db.load(engine)[3]
    assert [(r["ran"], r["skipped"]) for r in runs[-2:]] == [(0, 5), (1, 4)]


@pytest.mark.mnist
def test_query_prints_the_answer(local_grid, capsys):
    main(["study", "--output.root", str(Path(local_grid.runs_dir).parent), "--query",
          "SELECT ordering, AVG(final_acc) AS acc FROM cells WHERE kind = 'seq' GROUP BY ordering"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "ordering\tacc" and lines[1].startswith("3-4-7\t0.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.mnist
@pytest.mark.parametrize("bad", ["scheduler", "db", "fingerprint"])
def test_bad_input_is_one_line_before_any_cell_runs(bad, local_grid, data_dir, tmp_path, capsys):
    db = Path(local_grid.runs_dir) / "study.db"
    before = digest(db)
    settings = grid_settings(local_grid) | {"scheduler": {"scheduler": f"tcp://127.0.0.1:{free_port()}"},
                 "db": {"db": f"sqlite:///{tmp_path}/missing/folder/study.db"},
                 "fingerprint": {"finetune_epochs": 2}}[bad]
    with pytest.raises(SystemExit) as exit_:
        main(study_args(data_dir, Path(local_grid.runs_dir).parent, **settings))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert {"scheduler": "no Dask scheduler answers", "db": "cannot be opened",
            "fingerprint": "finished with other settings"}[bad] in err
    assert digest(db) == before


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=log.parent)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.mnist
def test_grid_on_a_dask_cluster_survives_a_worker_killed_mid_cell(local_grid, tmp_path, data_dir):
    """A scheduler and two workers on localhost; the worker running a half-done cell is
    killed. The grid still completes, every cell once, with the local cluster's accuracies."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes = {"scheduler": start(["-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
                                     "--no-dashboard"], tmp_path / "scheduler.log")}
    settings = TINY | {"scheduler": address}
    grid = placed(settings, tmp_path)
    try:
        for name in ("w1", "w2"):
            processes[name] = start(["-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1",
                                     "--name", name, "--no-dashboard", "--local-directory", str(tmp_path / name)],
                                    tmp_path / f"{name}.log")
        deadline = time.monotonic() + 120
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=60)
            processes["study"] = start(["-m", "music", *study_args(data_dir, tmp_path, **settings)], tmp_path / "study.log")
            killed = None
            while killed is None and processes["study"].poll() is None and time.monotonic() < deadline:
                names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
                for address_, keys in client.processing().items():
                    for key in keys:  # a cell with a checkpoint but not stored yet: half done
                        cell = next((c for c in plan(grid) if str(key).startswith(c.label + "-")), None)
                        if cell and resume_point(cell_dir(grid, cell)) is not None and \
                                (cell.seed, cell.name) not in stored(grid):
                            killed = names[address_], cell.label
                            stop(processes[killed[0]])
                            break
                    if killed:
                        break
                time.sleep(0.2)
            assert killed, "no worker was caught in the middle of a cell"
            assert processes["study"].wait(timeout=max(deadline - time.monotonic(), 1) + 180) == 0, \
                (tmp_path / "study.log").read_text()[-3000:]
        assert cell_count(grid) == 5
        assert stored(grid) == stored(local_grid)
        hosts = {r["host"] for r in study_db.load(study_db.connect(grid.db_url))[0]}
        assert hosts == {socket.gethostname()}
    finally:
        for process in processes.values():
            stop(process)


@pytest.mark.mnist
def test_a_fine_tuning_cell_killed_mid_phase_resumes_from_its_phase_snapshot(tmp_path, data_dir):
    """Fine-tuning cells save only phase snapshots. SIGKILLed in class_4's first epoch (its last
    snapshot is class_3's), the cell run again resumes from that snapshot and stores exactly
    what an uninterrupted cell stores."""
    from music.experiments.study import cell_config, run_cell

    settings = {"seeds": [0], "orderings": [[3, 4, 7]], "lrs": [1e-3], "pretrain_epochs": 1, "finetune_epochs": 2,
                "limit_train_batches": 2}
    data = Data(data_dir=data_dir, download=False)
    grids = {name: Grid(**settings).placed(tmp_path / name, tmp_path / name) for name in ("whole", "killed")}
    for name in grids:
        (tmp_path / name).mkdir()
    pretrain, seq = (next(c for c in plan(grids["whole"]) if c.kind == kind) for kind in ("pretrain", "seq"))
    run_cell(grids["whole"], data, pretrain)
    cell_dir(grids["killed"], pretrain).parent.mkdir()
    os.symlink(cell_dir(grids["whole"], pretrain), cell_dir(grids["killed"], pretrain))
    run_cell(grids["whole"], data, seq)

    killed_dir = cell_dir(grids["killed"], seq)
    killed_dir.mkdir(parents=True)
    (killed_dir / "cell.yaml").write_text(yaml.safe_dump(cell_config(grids["killed"], data, seq)))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "music", "fit", "--config", seq.config, "--config",
                             str(killed_dir / "cell.yaml"), "--run_dir", str(killed_dir),
                             "--trainer.callbacks+=faults.KillAt", "--trainer.callbacks.point=epoch_end",
                             "--trainer.callbacks.epoch=2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in (killed_dir / "checkpoints").iterdir()) == ["phase-0-class_3.ckpt"]
    assert resume_point(killed_dir) == killed_dir / "checkpoints" / "phase-0-class_3.ckpt"

    run_cell(grids["killed"], data, seq)
    for name in ("accuracy_matrix.csv", "phase_metrics.json", "continual_metrics.json"):
        assert (killed_dir / name).read_text() == (cell_dir(grids["whole"], seq) / name).read_text(), name
    assert stored(grids["killed"])[(0, seq.name)] == stored(grids["whole"])[(0, seq.name)]
    assert study_db.load(study_db.connect(grids["killed"].db_url))[0][-1]["resumed"]
