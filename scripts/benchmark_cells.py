"""How many study cells an hour? The study's fine-tuning cells in a warm process against a plain script.

``music study`` runs its cells in warm Dask worker processes (``music.experiments.study.run_cell``
-> ``music.runner.lightning``). This benchmark times that path against the loop a user would
write, on the same work:

1. **Cells in a warm process.** One pretrained checkpoint is made first (the study's own
   pretraining cell, ``--pretrain-epochs``). Then, per round, two fresh processes take turns:
   the framework side runs ``--cells`` sequential cells of one seed (``seq_<order>_lr<lr>``:
   orderings of the held-out classes, ``--epochs`` per phase, test evaluations before and after
   each phase) through ``run_cell``, with each cell's config exactly as the study builds it (its
   ``cell.yaml``, database row included); the plain side runs the same cells through
   ``scripts/plain_finetune.py`` (same pretrained weights, held-out samples, epochs, batch size,
   optimizer, test evaluations; torch and torchvision only). The first cell of a process warms it
   up (its lazy imports, the dataset read); the cells after it are the steady state a grid worker
   lives in, and give cells/hour. Both sides must take the same optimizer steps. The framework
   side's time is broken down per cell by timers around its parts (set-up, data set-up, training
   steps, evaluation, checkpoint I/O, logging, the fit loop, ``run_cell``'s own work); each timer
   counts its time minus the timers inside it, so the parts add up to the cell.
2. **Fresh processes**: one cell as ``python -m music fit`` of its ``cell.yaml``
   against ``plain_finetune.py`` of one cell, each its own process, interleaved; and what importing
   costs (``python -X importtime``: ``import music.cli`` against ``import torch, torchvision``).
3. **Dask** (up to ``--workers N``): the round trip of a task that does nothing on the study's local
   cluster (``dask_client``), i.e. the scheduler's cost per cell, and cells/hour with 1 .. N warm
   workers (each worker runs one cell first, untimed), and what that predicts for more workers.

``--compare PATH`` adds a side: the framework as another checkout at PATH has it (e.g. the code
before a change), run by this script with PATH's ``music`` on the path.
``--threads N`` sets ``OMP_NUM_THREADS`` and torch's threads for every run; ``--parts`` picks
among ``cells``, ``fresh`` and ``dask`` (default: all three).

    python scripts/benchmark_cells.py --data-dir D --rounds 3 --threads 1             # ~10 min on 2 cores
    python scripts/benchmark_cells.py --data-dir D --rounds 3 --threads 1 --compare ../main
    python scripts/benchmark_cells.py --data-dir D --quick                             # smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))

HELD_OUT = (3, 4, 7)
PARTS_OF_THE_RUN = ("cells", "fresh", "dask")
# The framework's parts, as the timers below name them, in the order a cell meets them.
PARTS = ("set-up (parse, build)", "config.yaml", "data set-up", "model set-up (init_from)", "training steps",
         "evaluation", "checkpoint I/O", "logging", "fit loop, loaders, other", "run_cell (database, files)")


# -- the framework side, in its own process --------------------------------------------------

class Timers:
    """Exclusive wall time per part: a timed call's time minus the timed calls inside it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []

    def wrap(self, owner: object, name: str, part: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.totals[part] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        setattr(owner, name, timed_call)


def install_timers(study) -> Timers:
    """Timers around the framework's parts (this process only; MUSIC's code is not changed)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import SaveConfigCallback
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter

    from music.data import MusicDataModule
    from music.evaluation import PhaseEvaluation
    from music.module import Classifier
    from music.speed import BlockSteps

    timers = Timers()
    timers.wrap(study, "run_cell", "run_cell (database, files)")
    timers.wrap(study, "lightning", "set-up (parse, build)")  # its time outside Trainer.fit
    timers.wrap(Trainer, "fit", "fit loop, loaders, other")
    timers.wrap(MusicDataModule, "setup", "data set-up")
    timers.wrap(Classifier, "setup", "model set-up (init_from)")
    timers.wrap(BlockSteps, "train", "training steps")
    timers.wrap(PhaseEvaluation, "_evaluate", "evaluation")
    timers.wrap(Trainer, "save_checkpoint", "checkpoint I/O")
    for name in ("log_metrics", "log_hyperparams", "save", "finalize"):
        timers.wrap(TensorBoardLogger, name, "logging")
    for name in ("add_scalar", "add_custom_scalars", "add_text", "add_figure", "add_image", "flush"):
        timers.wrap(SummaryWriter, name, "logging")
    timers.wrap(SaveConfigCallback, "setup", "config.yaml")
    return timers


def fine_tuning_grid(args: argparse.Namespace, root: Path, lrs: list[float] | None = None, **changes):
    from music.experiments.study_grid import Grid

    return Grid(seeds=[args.seed], held_out_classes=list(HELD_OUT), lrs=lrs or [args.lr], finetune_epochs=args.epochs,
                methods=[], **changes).placed(root, root, args.threads)


def seq_cells(grid) -> list:
    from music.experiments.study_grid import plan

    return [c for c in plan(grid) if c.kind == "seq"]


def place_pretrained(grid, pretrained: str) -> None:
    """The one pretrained checkpoint, where the grid's cells look for their seed's."""
    from music.experiments.study_grid import pretrained_checkpoint

    path = pretrained_checkpoint(grid, grid.seeds[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.symlink(os.path.abspath(pretrained), path)


def pretrain_side(args: argparse.Namespace) -> None:
    """The study's pretraining cell, once: prints the path of its phase snapshot."""
    from music.experiments import study
    from music.experiments.common import Data
    from music.experiments.study_grid import plan, pretrained_checkpoint

    root = Path(args.root)
    grid = fine_tuning_grid(args, root, pretrain_epochs=args.pretrain_epochs, limit_train_batches=args.pretrain_blocks)
    study.run_cell(grid, Data(os.path.abspath(args.data_dir), False), next(c for c in plan(grid) if c.kind == "pretrain"))
    print(json.dumps({"pretrained": str(pretrained_checkpoint(grid, args.seed))}))


def framework_side(args: argparse.Namespace) -> None:
    """``args.cells`` sequential cells through ``run_cell`` in this process; one JSON line."""
    import torch

    from music.experiments import study
    from music.experiments.common import Data

    timers = install_timers(study)
    grid = fine_tuning_grid(args, Path(args.root))
    place_pretrained(grid, args.pretrained)
    data = Data(os.path.abspath(args.data_dir), False)
    cells = []
    for cell in seq_cells(grid)[: args.cells]:
        before, start, cpu = dict(timers.totals), time.perf_counter(), time.process_time()
        result = study.run_cell(grid, data, cell)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        run_dir = Path(grid.runs_dir) / f"seed_{cell.seed}" / cell.name
        last = max(run_dir.glob("checkpoints/phase-*.ckpt"), key=lambda p: int(p.name.split("-")[1]))
        with open(run_dir / "accuracy_matrix.csv") as f:
            final = float(f.read().strip().splitlines()[-1].split(",")[-1])
        cells.append({"cell": cell.name, "wall": wall, "cpu": cpu, "ran": result["ran"], "final_acc": final,
                      "steps": torch.load(last, weights_only=True)["global_step"],
                      "parts": {k: v - before.get(k, 0.0) for k, v in timers.totals.items()}})
    print(json.dumps({"cells": cells}))


# -- the parent: rounds of fresh processes ---------------------------------------------------

def child(side: str, args: argparse.Namespace, root: str, extra: list[str] = ()) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--side", side, "--data-dir", args.data_dir, "--root", root,
            "--seed", str(args.seed), "--lr", str(args.lr), "--epochs", str(args.epochs), "--cells", str(args.cells),
            "--threads", str(args.threads), *extra]


def orderings(args: argparse.Namespace) -> list[str]:
    import itertools

    every = ["-".join(map(str, p)) for p in itertools.permutations(HELD_OUT)]
    return [every[i % len(every)] for i in range(args.cells)]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """``scripts/benchmark.py``'s: one way to time a process. Imported when called, so that the
    sides' processes, which run this file too, import MUSIC before Lightning, as ``music`` does."""
    from benchmark import timed as timed_process

    return timed_process(command, env)


def one_round(side: str, args: argparse.Namespace, env: dict[str, str], pretrained: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if side == "plain":
            command = [sys.executable, str(SCRIPTS / "plain_finetune.py"), "--data-dir", args.data_dir, "--pretrained",
                       pretrained, "--orderings", *orderings(args), "--epochs", str(args.epochs), "--lr", str(args.lr),
                       "--seed", str(args.seed), "--threads", str(args.threads)]
        else:
            command = child("framework", args, tmp, ["--pretrained", pretrained])
        side_env = dict(env, PYTHONPATH=os.pathsep.join([args.compare, env["PYTHONPATH"]])) if side == "compare" else env
        start, cpu, out = timed(command, side_env)
    record = last_json(out)
    record |= {"process_wall": time.time() - start, "process_cpu": cpu}
    return record


def cells_summary(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, float]:
    """Medians over rounds of each process's steady cells (all but its first)."""
    median = statistics.median
    result: dict[str, float] = {}
    steady = {side: [median(c["wall"] for c in r["cells"][1:] or r["cells"]) for r in records]
              for side, records in runs.items()}
    print(f"\nCells in a warm process: {args.cells} sequential cells a process ({args.epochs} epochs a phase, "
          f"{runs['plain'][0]['cells'][0]['steps']} optimizer steps a cell), {args.rounds} interleaved round(s); "
          "the first cell of each process warms it up, the others are the steady state:")
    print(f"  {'side':10} {'steady cell':>12} {'cells/hour':>11} {'first cell':>11} {'process':>9} {'final acc':>10}")
    for side, records in runs.items():
        cell = median(steady[side])
        first = median(r["cells"][0]["wall"] for r in records)
        accuracy = median(c["final_acc"] for r in records for c in r["cells"])
        result |= {f"{side}_cell_s": cell, f"{side}_cells_per_hour": 3600 / cell, f"{side}_first_cell_s": first}
        print(f"  {side:10} {cell:10.2f} s {3600 / cell:11.0f} {first:9.2f} s "
              f"{median(r['process_wall'] for r in records):7.1f} s {accuracy:10.4f}")
    for side in [s for s in runs if s != "plain"]:
        ratios = [a / b for a, b in zip(steady[side], steady["plain"])]
        result[f"{side}/plain"] = median(ratios)
        print(f"  {side}/plain, steady cell: {median(ratios):.2f}x (rounds {[round(r, 2) for r in ratios]})")
    if "compare" in runs:
        ratios = [a / b for a, b in zip(steady["compare"], steady["framework"])]
        result["compare/framework"] = median(ratios)
        print(f"  compare/framework (the --compare checkout over this one): {median(ratios):.2f}x "
              f"(rounds {[round(r, 2) for r in ratios]})")
    for side in [s for s in runs if s != "plain"]:
        cells = [c for r in runs[side] for c in r["cells"][1:] or r["cells"]]
        print(f"  {side}: a steady cell's time by part (median s; the parts add up to the cell):")
        for part in PARTS:
            seconds = median(c["parts"].get(part, 0.0) for c in cells)
            result[f"{side}_part_{part}"] = seconds
            print(f"    {part:28} {seconds:6.2f} s {100 * seconds / result[f'{side}_cell_s']:5.1f}%")
    return result


# -- fresh processes and imports -------------------------------------------------------------

IMPORTS = ("music.cli", "torch", "torchvision", "lightning", "torchmetrics", "torchmetrics.functional.text.bert",
           "transformers", "jsonargparse", "matplotlib.pyplot", "tensorboard", "sqlalchemy", "distributed")


def import_times(code: str, env: dict[str, str]) -> dict[str, float]:
    """Cumulative seconds per module of ``python -X importtime -c code`` (first import only), and the total."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, cwd=REPO, stderr=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, text=True, check=True).stderr
    found: dict[str, float] = {}
    total = 0.0
    for line in err.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            found.setdefault(match.group(4), int(match.group(2)) / 1e6)
            if not match.group(3).strip() and len(match.group(3)) == 1:  # a top-level import
                total += int(match.group(2)) / 1e6
    return found | {"total": total}


def fresh(args: argparse.Namespace, env: dict[str, str], pretrained: str) -> dict[str, float]:
    from music.experiments.common import Data
    from music.experiments.study import cell_config

    median = statistics.median
    walls: dict[str, list[float]] = {"music fit": [], "plain": []}
    imports: dict[str, list[dict]] = {"music": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        grid = fine_tuning_grid(args, Path(tmp))
        place_pretrained(grid, pretrained)
        cell = seq_cells(grid)[0]
        delta = Path(tmp) / "cell.yaml"
        import yaml

        delta.write_text(yaml.safe_dump(cell_config(grid, Data(os.path.abspath(args.data_dir), False), cell)))
        for round_ in range(args.rounds):
            run_dir = Path(tmp) / f"run_{round_}"
            start, _, _ = timed([sys.executable, "-m", "music", "fit", "--config", cell.config, "--config", str(delta),
                                 "--run_dir", str(run_dir)], env)
            walls["music fit"].append(time.time() - start)
            start, _, _ = timed([sys.executable, str(SCRIPTS / "plain_finetune.py"), "--data-dir", args.data_dir,
                                 "--pretrained", pretrained, "--orderings", orderings(args)[0], "--epochs",
                                 str(args.epochs), "--lr", str(args.lr), "--seed", str(args.seed), "--threads",
                                 str(args.threads)], env)
            walls["plain"].append(time.time() - start)
            imports["music"].append(import_times("import music.cli", env))
            imports["plain"].append(import_times("import torch, torchvision", env))
    result = {f"fresh_{side}_s": median(values) for side, values in walls.items()}
    ratios = [a / b for a, b in zip(walls["music fit"], walls["plain"])]
    result["fresh_ratio"] = median(ratios)
    print(f"\nOne cell as a fresh process, {args.rounds} interleaved round(s), median wall: `music fit` of its "
          f"cell.yaml {result['fresh_music fit_s']:.2f} s, plain_finetune.py {result['fresh_plain_s']:.2f} s: "
          f"{result['fresh_ratio']:.2f}x (rounds {[round(r, 2) for r in ratios]})")
    print("  python -X importtime (cumulative s, median; '-': not imported):")
    print(f"    {'module':36} {'import music.cli':>17} {'import torch, torchvision':>26}")
    for module in ("total", *IMPORTS):
        cells = []
        for side in ("music", "plain"):
            values = [i[module] for i in imports[side] if module in i]
            cells.append(f"{median(values):.2f}" if values else "-")
            if values:
                result[f"import_{side}_{module}_s"] = median(values)
        print(f"    {module:36} {cells[0]:>17} {cells[1]:>26}")
    return result


# -- Dask ------------------------------------------------------------------------------------

def dask_overhead(args: argparse.Namespace, pretrained: str) -> dict[str, float]:
    """No-op round trips on the study's local cluster, and cells/hour with 1 .. ``workers`` warm workers."""
    from distributed import wait

    from music.experiments import study
    from music.experiments.common import Data, dask_client

    median = statistics.median
    result: dict[str, float] = {}
    data = Data(os.path.abspath(args.data_dir), False)
    print(f"\nDask (the study's local cluster, music.experiments.common.dask_client; {args.cells} cells per measurement):")
    for workers in range(1, args.workers + 1):
        with tempfile.TemporaryDirectory() as tmp:
            # the warm-up cells run at a second learning rate: names of their own, the same work
            grid = fine_tuning_grid(args, Path(tmp), lrs=[args.lr, args.lr / 10], workers=workers)
            place_pretrained(grid, pretrained)
            cells = seq_cells(grid)
            timed_cells = [c for c in cells if c.lr == args.lr][: args.cells]
            warm_up = [c for c in cells if c.lr != args.lr][:workers]
            with dask_client(grid.scheduler, grid.workers, grid.threads, grid.accelerator, "study.scheduler") as client:
                addresses = list(client.scheduler_info(n_workers=-1)["workers"])
                if workers == 1:  # a task that does nothing: int() (a builtin, so no code travels)
                    client.submit(int, pure=False).result()
                    trips = []
                    for _ in range(args.noops):
                        start = time.perf_counter()
                        client.submit(int, pure=False).result()
                        trips.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    wait([client.submit(int, pure=False) for _ in range(args.noops * 4)])
                    batch = (time.perf_counter() - start) / (args.noops * 4)
                    result |= {"dask_roundtrip_s": median(trips), "dask_batched_task_s": batch}
                    print(f"  no-op task: {median(trips) * 1e3:.1f} ms a round trip (median of {args.noops}), "
                          f"{batch * 1e3:.2f} ms a task when {args.noops * 4} are submitted at once")
                wait([client.submit(study.run_cell, grid, data, cell, pure=False, workers=[address])
                      for cell, address in zip(warm_up, addresses)])
                start = time.perf_counter()
                wait([client.submit(study.run_cell, grid, data, cell, pure=False) for cell in timed_cells])
                seconds = time.perf_counter() - start
            result[f"dask_{workers}_workers_cells_per_hour"] = 3600 * len(timed_cells) / seconds
            print(f"  {workers} warm worker(s): {len(timed_cells)} cells in {seconds:.1f} s, "
                  f"{3600 * len(timed_cells) / seconds:.0f} cells/hour")
    one = result["dask_1_workers_cells_per_hour"]
    if args.workers >= 2:
        efficiency = result["dask_2_workers_cells_per_hour"] / (2 * one)
        result["dask_2_worker_efficiency"] = efficiency
        cores = os.cpu_count() or 1
        print(f"  2 workers give {efficiency:.2f} of twice 1 worker's rate on this {cores}-core machine. Predicted "
              f"cells/hour with N workers, one core each, if that efficiency holds: "
              + ", ".join(f"N={n}: {n * one * efficiency:.0f}" for n in (1, 2, 4, 8, 16, 32)))
    return result


# -- entry -----------------------------------------------------------------------------------

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="MNIST root (torchvision layout), already downloaded")
    parser.add_argument("--cells", type=int, default=4, help="sequential cells per process (the first warms it up)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per fine-tuning phase (the study's: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS and torch threads for every run")
    parser.add_argument("--seed", type=int, default=0, help="the cells' seed (and split seed)")
    parser.add_argument("--lr", type=float, default=1e-3, help="the cells' learning rate")
    parser.add_argument("--pretrain-epochs", type=int, default=1, help="epochs of the one pretraining run")
    parser.add_argument("--pretrain-blocks", type=int, default=None, help="loop steps per pretraining epoch (null: all)")
    parser.add_argument("--workers", type=int, default=2, help="Dask: cells/hour with 1 .. this many workers")
    parser.add_argument("--noops", type=int, default=50, help="Dask: no-op round trips measured")
    parser.add_argument("--parts", nargs="+", choices=PARTS_OF_THE_RUN, default=list(PARTS_OF_THE_RUN),
                        help="what to measure: cells in a warm process, fresh processes and imports, Dask")
    parser.add_argument("--compare", default=None, help="another checkout: its framework as a side of its own")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round of 2 cells, 1 epoch a phase, pretraining of 2 loop steps, 10 no-ops")
    parser.add_argument("--side", choices=("pretrain", "framework"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("cells", "epochs", "rounds", "threads", "pretrain_epochs", "noops"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: it must be an integer >= 1.")
    if "dask" in args.parts and args.workers < 1:
        parser.error(f"--workers={args.workers} is not allowed with the dask part: it must be an integer >= 1.")
    if args.workers < 0:
        parser.error(f"--workers={args.workers} is not allowed: it must be an integer >= 0 (0: no Dask measurement).")
    if args.compare is not None and not (Path(args.compare) / "music" / "__init__.py").is_file():
        parser.error(f"--compare={args.compare!r} is not allowed: give a checkout of MUSIC (a folder holding music/).")
    if args.quick:
        args.rounds, args.cells, args.epochs, args.pretrain_blocks, args.noops = 1, 2, 1, 2, 10
    return args


def run(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    if args.side is not None:
        import torch

        torch.set_num_threads(args.threads)
        {"pretrain": pretrain_side, "framework": framework_side}[args.side](args)
        return {}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(REPO), str(SCRIPTS), os.environ.get("PYTHONPATH", "")]))
    sys.path.insert(0, str(REPO))  # this checkout's MUSIC here and in the Dask workers, whatever is installed
    # The environment as it was, afterwards: Dask's nanny leaves its workers' settings in this
    # process's (MKL_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_, ...), which a caller's next
    # subprocess would inherit.
    saved = dict(os.environ)
    os.environ.update(OMP_NUM_THREADS=env["OMP_NUM_THREADS"], PYTHONPATH=env["PYTHONPATH"])  # workers inherit them
    try:
        return measure(args, env)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def measure(args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    from benchmark import machine

    print(machine(env))
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        pretrained = last_json(timed(child("pretrain", args, tmp, ["--pretrain-epochs", str(args.pretrain_epochs),
                                                                   *(["--pretrain-blocks", str(args.pretrain_blocks)]
                                                                     if args.pretrain_blocks else [])]), env)[2])["pretrained"]
        print(f"pretrained once ({args.pretrain_epochs} epoch(s)) in {time.perf_counter() - start:.1f} s")
        if "cells" in args.parts:
            sides = ["framework", "plain"] + (["compare"] if args.compare else [])
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for round_ in range(args.rounds):  # interleaved: A B A B ...
                for side in sides:
                    runs[side].append(one_round(side, args, env, pretrained))
                steps = {side: [c["steps"] for c in records[-1]["cells"]] for side, records in runs.items()}
                if len({tuple(s) for s in steps.values()}) != 1:
                    raise RuntimeError(f"The sides took different numbers of optimizer steps {steps}: not the same work.")
                print(f"round {round_ + 1}: " + json.dumps({s: [round(c["wall"], 2) for c in r[-1]["cells"]]
                                                            for s, r in runs.items()}), flush=True)
            result |= cells_summary(runs, args)
        if "fresh" in args.parts:
            result |= fresh(args, env, pretrained)
        if "dask" in args.parts:
            result |= dask_overhead(args, pretrained)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return result


if __name__ == "__main__":
    run()
