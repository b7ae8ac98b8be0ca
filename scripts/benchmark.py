"""How much does the framework cost? ``music fit --config pretrain`` against a plain PyTorch script.

Each run is a fresh process, timed from its start to its exit: the framework side is the
shipped command (``python -m music fit --config pretrain``, its phases cut to ``--epochs``,
logs in a temporary folder, everything else as shipped: EDA figures, TensorBoard, test
evaluations with confusion matrices, checkpoints, progress bar), the plain side is
``scripts/plain_pretrain.py`` (the loop a user would write: same split, model, optimizer, batch
size, steps, and a test evaluation). The sides alternate (A B A B ...) for ``--rounds`` rounds,
so a burst of load from other processes hits both alike, and medians are reported:

- per epoch (steady state): the time between consecutive epoch starts after the first epoch
  (which warms up), so epoch-end work (the framework's logging, ``last.ckpt``, loader rebuild)
  counts and once-per-run work does not;
- whole run, and its fixed cost: whole run minus ``epochs`` x the run's steady epoch (imports,
  set-up, data loading, figures, test evaluations, first-step warm-up).

Both sides must take the same number of optimizer steps, or the script stops. ``--fused`` adds
a third side, the framework with ``--config fused_adam`` (``torch.optim.Adam(fused=True)``).
``--threads N`` sets ``OMP_NUM_THREADS`` for every run.

    python scripts/benchmark.py --data-dir /path/to/data                  # 3 epochs, 5 rounds
    python scripts/benchmark.py --data-dir D --rounds 4 --threads 1 --fused
    python scripts/benchmark.py --data-dir D --quick                      # smoke run: 2 loader steps
    python scripts/benchmark.py --data-dir D --tricks --threads 1         # what each shortcut pays
    python scripts/benchmark.py --data-dir D -- --trainer.profiler simple # more `music fit` arguments
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from lightning.pytorch import Callback

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
BATCH_SIZE = 32
REMAINING = 57_000  # MNIST's 60,000 training samples minus 1,000 each of 3, 4 and 7


class EpochClock(Callback):
    """Writes the wall-clock time of every training epoch's start, the end of training and
    the optimizer steps taken to ``path`` (JSON), for the benchmark that runs the framework
    in a process of its own. It overrides no step hook, so it leaves the training path alone."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.starts: list[float] = []
        self.cpu_starts: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.starts.append(time.time())
        self.cpu_starts.append(time.process_time())

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps({"epoch_starts": self.starts, "epoch_cpu_starts": self.cpu_starts,
                                               "train_end": time.time(), "train_end_cpu": time.process_time(),
                                               "steps": trainer.global_step}))


def framework_command(args: argparse.Namespace, log_dir: str, clock: str, fused: bool) -> list[str]:
    phases = f"[{{name: pretrain, split: remaining, epochs: {args.epochs}}}]"
    limit = ["--trainer.limit_train_batches", str(args.loader_steps)] if args.loader_steps else []
    return [sys.executable, "-m", "music", "fit", "--config", "pretrain", *(["--config", "fused_adam"] if fused else []),
            "--data.data_dir", args.data_dir, "--data.download", "false", "--schedule.phases", phases,
            "--trainer.logger.init_args.save_dir", log_dir, *limit,
            "--trainer.callbacks+=benchmark.EpochClock", f"--trainer.callbacks.path={clock}", *args.extra]


def plain_command(args: argparse.Namespace, fused: bool) -> list[str]:
    limit = ["--batches", str(args.loader_steps * args.blocks)] if args.loader_steps else []
    return [sys.executable, str(SCRIPTS / "plain_pretrain.py"), "--data-dir", args.data_dir,
            "--epochs", str(args.epochs), *limit, *(["--fused"] if fused else [])]


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Start time, CPU seconds (user + system, all threads) and stdout of one process."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    done = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return start, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, done.stdout


def one_run(side: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    """One fresh process of ``side`` (``framework``, ``plain``, ``framework_fused``; the plain script also takes ``--fused``)."""
    fused = side.endswith("_fused")
    with tempfile.TemporaryDirectory() as tmp:
        if side.startswith("framework"):
            clock = os.path.join(tmp, "clock.json")
            start, cpu, _ = timed(framework_command(args, tmp, clock, fused), env)
            record = json.loads(Path(clock).read_text())
        else:
            start, cpu, out = timed(plain_command(args, fused), env)
            record = json.loads(out.strip().splitlines()[-1])
    wall = time.time() - start
    result = {"wall": wall, "cpu": cpu, "steps": record["steps"]}
    for kind, starts, total, end in (("", record["epoch_starts"], wall, record["train_end"]),
                                     ("cpu_", record["epoch_cpu_starts"], cpu, record["train_end_cpu"])):
        epochs = [b - a for a, b in zip(starts, starts[1:])][1:]  # the first epoch warms up
        # under 3 epochs: no steady state; the last epoch then runs to the end of training
        epoch = statistics.median(epochs) if epochs else end - starts[-1]
        result |= {f"{kind}epoch": epoch, f"{kind}fixed": total - len(starts) * epoch}
    return result


def machine(env: dict[str, str]) -> str:
    cpu = platform.processor() or "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                             stdout=subprocess.PIPE, text=True).stdout.strip()
    return (f"{cpu}, {os.cpu_count()} cores, {threads} torch threads per run; Python {platform.python_version()}, "
            f"torch {version('torch')}, lightning {version('lightning')}, torchmetrics {version('torchmetrics')}; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def summarise(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, float]:
    """Medians per side, and framework/plain ratios as the median of the rounds' ratios (paired:
    a round's two runs share its load). CPU time (user + system) moves less with outside load
    than wall time, so both are printed."""
    median = statistics.median
    result: dict[str, float] = {"steps": runs["plain"][0]["steps"]}
    samples = args.loader_steps * args.blocks * BATCH_SIZE if args.loader_steps else REMAINING
    print(f"\nPretraining, {args.epochs} epoch(s) of {result['steps'] // args.epochs} steps, "
          f"{args.rounds} interleaved round(s), medians (wall | CPU):")
    print(f"  {'side':16} {'per epoch':>17} {'samples/s':>10} {'whole run':>17} {'fixed cost':>17}")
    for side, records in runs.items():
        values = {key: median(r[key] for r in records) for key in ("epoch", "cpu_epoch", "wall", "cpu", "fixed", "cpu_fixed")}
        result |= {f"{side}_{key}_s": value for key, value in values.items()}
        print(f"  {side:16} {values['epoch']:7.3f} | {values['cpu_epoch']:6.3f} s {samples / values['epoch']:10,.0f} "
              f"{values['wall']:7.2f} | {values['cpu']:6.2f} s {values['fixed']:7.2f} | {values['cpu_fixed']:6.2f} s")

    def ratios(a: str, b: str, key: str) -> list[float]:
        return [x[key] / y[key] for x, y in zip(runs[a], runs[b])]

    pairs = [("framework", "plain")] + ([("framework_fused", "framework")] if "framework_fused" in runs else [])
    for a, b in pairs:
        for key, name in (("epoch", "per epoch"), ("cpu_epoch", "per epoch CPU"), ("wall", "whole run"), ("cpu", "whole run CPU")):
            values = ratios(a, b, key)
            result[f"{a}/{b}_{key}"] = median(values)
            print(f"  {a}/{b}, {name}: {median(values):.3f}x (rounds {[round(v, 3) for v in values]})")
    for key, name in (("fixed", "wall"), ("cpu_fixed", "CPU")):
        values = [x[key] - y[key] for x, y in zip(runs["framework"], runs["plain"])]
        result[f"{key}_extra_s"] = median(values)
        print(f"  fixed cost above the plain script, {name}: {median(values):.2f} s (rounds {[round(v, 2) for v in values]})")
    return result


# -- the training path's shortcuts, one at a time ------------------------------------------------

TRICKS = ("direct_steps", "runtime_cuda_check", "setattr_override", "null_profiler")


class TrickSwitch(Callback):
    """Turns ``trick`` on before every other block (loop step) and off before the rest, and
    times each block: both variants run in the same process and minutes, so outside load hits
    them alike. ``setattr_override`` and ``null_profiler`` are shortcuts MUSIC does not ship
    (an ``nn.Module.__setattr__`` bypass for ``_current_fx_name``; a profiler returning one
    shared ``nullcontext``), measured here to show they do not pay; swapping the profiler per
    block sets the Trainer's private ``_profiler`` (this script only)."""

    def __init__(self, trick: str) -> None:
        import contextlib

        from lightning.pytorch.profilers import PassThroughProfiler

        class NullProfiler(PassThroughProfiler):
            null = contextlib.nullcontext()

            def profile(self, action_name: str) -> contextlib.nullcontext:
                return self.null

        self.trick, self.profilers = trick, {True: NullProfiler(), False: PassThroughProfiler()}
        self.times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        self.on, self.start = False, (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from music.module import Classifier

        self.on = not self.on
        if self.trick == "direct_steps":
            pl_module.blocks.direct = self.on
        elif self.trick == "runtime_cuda_check":
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0" if self.on else "1"
        elif self.trick == "setattr_override":
            if self.on:
                Classifier.__setattr__ = _set_fx_name_directly
            elif "__setattr__" in Classifier.__dict__:
                del Classifier.__setattr__
        elif self.trick == "null_profiler":
            trainer._profiler = self.profilers[self.on]
        self.start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times[self.on].append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))

    def on_train_end(self, trainer, pl_module) -> None:
        from music.module import Classifier

        if "__setattr__" in Classifier.__dict__:
            del Classifier.__setattr__


def _set_fx_name_directly(self, name, value) -> None:
    if name == "_current_fx_name":
        object.__setattr__(self, name, value)
    else:
        super(type(self), self).__setattr__(name, value)


def tricks(args: argparse.Namespace) -> dict[str, float]:
    """Per trick, the median block time without it over with it (wall and CPU), in this process."""
    import torch

    from music.runner import lightning

    if args.threads:
        torch.set_num_threads(args.threads)
    phases = f"[{{name: pretrain, split: remaining, epochs: {args.epochs}}}]"
    print(f"\nShortcuts, each toggled block by block inside one {args.epochs}-epoch pretraining fit "
          "(median block time; > 1 means the shortcut pays):")
    result = {}
    for trick in TRICKS:
        switch = TrickSwitch(trick)
        with tempfile.TemporaryDirectory() as tmp:
            cli = lightning(["--config", "base", "--config", "pretrain", "--data.data_dir", args.data_dir,
                             "--data.download", "false", "--data.log_eda", "false", "--schedule.phases", phases,
                             "--evaluation.evaluate_test", "false", "--trainer.logger.init_args.save_dir", tmp,
                             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                             *(["--trainer.limit_train_batches", str(args.loader_steps)] if args.loader_steps else [])],
                            run=False)
            cli.trainer.callbacks.append(switch)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        for i, kind in enumerate(("wall", "cpu")):
            on, off = (statistics.median(t[i] for t in switch.times[v]) for v in (True, False))
            result[f"{trick}_{kind}"] = off / on
            print(f"  {trick:20} {kind:4}: block {on * 1e3:6.2f} ms with it, {off * 1e3:6.2f} ms without: "
                  f"{off / on:.3f}x (n={len(switch.times[True])}+{len(switch.times[False])})")
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="MNIST root (torchvision layout), already downloaded")
    parser.add_argument("--epochs", type=int, default=3, help="pretraining epochs per run (>= 3 for a steady epoch)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run (default: torch's)")
    parser.add_argument("--fused", action="store_true", help="add the framework with --config fused_adam")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 1 epoch of 2 loader steps")
    parser.add_argument("--tricks", action="store_true",
                        help="instead: measure each training-path shortcut, toggled block by block in one process")
    parser.add_argument("extra", nargs="*", help="arguments after -- go to `music fit`")
    args = parser.parse_args(argv)
    for name in ("epochs", "rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value} is not allowed: it must be an integer >= 1.")
    import yaml

    # batches the shipped config hands over per loader step (limit_train_batches counts those)
    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    args.blocks = base["data"].get("batches_per_block", 1)
    args.loader_steps = None
    if args.quick:
        args.epochs, args.rounds, args.loader_steps = 1, 1, 2
    return args


def run(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    if args.tricks:
        print(machine(dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))))
        return tricks(args)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(SCRIPTS), os.environ.get("PYTHONPATH", "")]))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(machine(env))
    sides = ["framework", "plain"] + (["framework_fused"] if args.fused else [])
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_ in range(args.rounds):  # interleaved: A B A B ...
        for side in sides:
            runs[side].append(one_run(side, args, env))
        steps = {side: records[-1]["steps"] for side, records in runs.items()}
        if len(set(steps.values())) != 1:
            raise RuntimeError(f"The sides took different numbers of optimizer steps {steps}: not the same work.")
        print(f"round {round_ + 1}: " + json.dumps({s: r[-1] for s, r in runs.items()}), flush=True)
    result = summarise(runs, args)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return result


if __name__ == "__main__":
    run()
