"""How much does the framework cost? The same training, through MUSIC and through a plain loop.

Both sides do the same work in one process, interleaved, so load from other processes hits
both alike: SimpleNN, Adam (lr 1e-3), batch 32, the same in-memory tensors (the 57,000-sample
``remaining`` split), the same number of optimizer steps, and a test-set evaluation at the end
of every phase. The framework side is ``configs/seq.yaml`` as shipped (its Trainer, callbacks,
TensorBoard logger, checkpoints and progress bar), only with its phases replaced; the plain side
is the hand-written loop one would write without a framework. Loading MNIST from disk is done
before the clock starts on both sides. Two pretraining ratios are printed: the whole fit (with
the framework's once-per-fit work: Trainer set-up, initial and final test evaluation with
confusion-matrix figures) and the steady-state epoch (epoch k against epoch k; needs >= 2).

    python scripts/benchmark.py                      # 3 pretraining epochs, median of 3
    python scripts/benchmark.py --epochs 3 --repeats 5 --threads 1
    python scripts/benchmark.py --study              # also the whole Table I study, once each
    python scripts/benchmark.py --quick              # smoke run: a few loader steps
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import Callback

from music.cli import main
from music.data import MusicDataModule
from music.models import SimpleNN

REPO = Path(__file__).resolve().parents[1]
# The Table I study: pretrain, then class 3 -> 4 -> 7 from it (seq.yaml), and merged from the
# pretrained snapshot (merged_finetune.yaml).
SEQ_PHASES = [("pretrain", "remaining", 50), ("class_3", "class_3", 10), ("class_4", "class_4", 10),
              ("class_7", "class_7", 10)]
MERGED_PHASES = [("merged", "merged", 10)]


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """Wall and CPU seconds since ``start``. CPU time (this process, all its threads) barely
    moves when other processes load the machine, so its ratio is the steadier of the two."""
    return tuple(now - then for now, then in zip(clock(), start))


# -- framework ---------------------------------------------------------------------------------

class EpochClock(Callback):
    """Marks the start of every training epoch, so epoch-to-epoch intervals give the
    framework's steady-state epoch: with its per-epoch work (epoch-end logging, ``last.ckpt``,
    the loader rebuilt for the next epoch), without its once-per-fit work (Trainer set-up, the
    initial and final test evaluations with their confusion-matrix figures)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.steps = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.steps = trainer.global_step  # optimizer steps, whatever the loader's blocks

    @property
    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def framework_fit(config: str, phases: list[tuple[str, str, int]], args: argparse.Namespace, log_dir: str,
                  *extra: str, epoch_clock: EpochClock | None = None) -> tuple[tuple[float, float], str]:
    """Seconds for one ``trainer.fit`` of a shipped config with ``phases``, and its log dir."""
    data = yaml.safe_load((REPO / "configs" / config).read_text())
    for callback in data["trainer"]["callbacks"]:
        if "phases" in callback.get("init_args", {}):
            callback["init_args"]["phases"] = [{"name": n, "split": s, "epochs": e} for n, s, e in phases]
    path = Path(log_dir) / f"bench-{config}"
    path.write_text(yaml.safe_dump(data))
    limit = ["--trainer.limit_train_batches", str(args.batches)] if args.batches else []
    # EDA figures are a one-off per run (~1.8 s of matplotlib), not part of training speed
    cli = main(["--config", str(path), "--data.data_dir", args.data_dir, "--data.download", "true", "--data.log_eda", "false",
                "--trainer.logger.init_args.save_dir", log_dir, *limit, *extra, *args.extra], run=False)
    cli.datamodule.setup()  # read MNIST before the clock starts (the plain side gets it loaded too)
    if epoch_clock is not None:
        cli.trainer.callbacks.append(epoch_clock)
    start = clock()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return since(start), cli.trainer.log_dir


# -- plain PyTorch -------------------------------------------------------------------------------

def plain_train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                batches: int | None, batch_size: int = 32, epoch_seconds: list[float] | None = None) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # fresh per phase, as the study does
    model.train()
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(labels), device=images.device)
        steps = range(0, len(labels), batch_size)
        for i in steps[:batches] if batches else steps:  # batches: the framework's limit, in batches
            index = order[i : i + batch_size]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch_seconds is not None:
            epoch_seconds.append(time.perf_counter() - start)


@torch.no_grad()
def plain_evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(images[i : i + 1000]).argmax(1) == labels[i : i + 1000]).sum())
                  for i in range(0, len(labels), 1000))
    return correct / len(labels)


@contextlib.contextmanager
def torch_defaults():
    """Run the plain side as a script that never imported Lightning would: importing Lightning
    sets PYTORCH_NVML_BASED_CUDA_CHECK=1 (then every Adam step asks NVML whether CUDA exists,
    ~0.2 ms on a machine without it) and a ``deterministic: true`` Trainer leaves deterministic
    algorithms switched on for the process."""
    nvml, deterministic = os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None), torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if nvml is not None:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml


@torch_defaults()
def plain_run(data: MusicDataModule, phases: list[tuple[str, str, int]], args: argparse.Namespace,
              model: torch.nn.Module | None = None, epoch_seconds: list[float] | None = None,
              ) -> tuple[tuple[float, float], torch.nn.Module]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    test = [t.to(device) for t in (data.test_images, data.test_labels)]
    splits = {s: [t.to(device) for t in (data.dataset(s).images, data.dataset(s).labels)] for _, s, _ in phases}
    start = clock()
    model = model if model is not None else SimpleNN().to(device)
    for _, split, epochs in phases:
        limit = args.batches and args.batches * args.blocks  # the framework's limit counts loader steps
        plain_train(model, *splits[split], epochs, limit, epoch_seconds=epoch_seconds)
        plain_evaluate(model, *test)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return since(start), model


# -- measurements --------------------------------------------------------------------------------

def pretraining_ratio(data: MusicDataModule, args: argparse.Namespace) -> dict[str, float]:
    phases = [("pretrain", "remaining", args.epochs)]
    framework, plain, epoch_ratios = [], [], []
    for _ in range(args.repeats):  # interleaved, so a burst of outside load hits both sides
        epoch_clock, plain_epochs = EpochClock(), []
        with tempfile.TemporaryDirectory() as log_dir:
            framework.append(framework_fit("seq.yaml", phases, args, log_dir, epoch_clock=epoch_clock)[0])
        plain.append(plain_run(data, phases, args, epoch_seconds=plain_epochs)[0])
        # epoch k of one side against epoch k of the other: both exclude once-per-fit work
        epoch_ratios += [f / p for f, p in zip(epoch_clock.epochs, plain_epochs)]
    batches = -(-len(data.splits["remaining"]) // 32)
    steps = args.epochs * min(args.batches * args.blocks, batches) if args.batches else args.epochs * batches
    if epoch_clock.steps != steps:
        raise RuntimeError(f"The framework took {epoch_clock.steps} optimizer steps, the plain loop {steps}: not the same work.")
    samples = steps * 32 if args.batches else args.epochs * len(data.splits["remaining"])
    print(f"\nPretraining, {args.epochs} epoch(s) x {steps // args.epochs} steps, median of {args.repeats}:")
    result = {"steps": steps}
    for i, kind in enumerate(("wall", "cpu")):
        f, p = [t[i] for t in framework], [t[i] for t in plain]
        ratios = [a / b for a, b in zip(f, p)]
        result |= {f"framework_{kind}_s": statistics.median(f), f"plain_{kind}_s": statistics.median(p),
                   f"{kind}_ratio": statistics.median(ratios)}
        print(f"  whole fit, {kind:4}: framework {statistics.median(f):.2f} s ({samples / statistics.median(f):,.0f} samples/s), "
              f"plain {statistics.median(p):.2f} s ({samples / statistics.median(p):,.0f} samples/s); "
              f"ratio framework/plain {statistics.median(ratios):.3f} (runs {[round(r, 3) for r in ratios]})")
    result["ratio"] = result["wall_ratio"]
    if epoch_ratios:  # needs >= 2 epochs: an epoch's end is the next one's start
        result["epoch_ratio"] = statistics.median(epoch_ratios)
        print(f"  per epoch (steady state, wall; once-per-fit work left out): ratio framework/plain "
              f"{result['epoch_ratio']:.3f} (epochs {[round(r, 3) for r in epoch_ratios]})")
    return result


def study(data: MusicDataModule, args: argparse.Namespace) -> dict[str, float]:
    """The whole Table I study once each way: seq.yaml's four phases, then merged from the
    pretrained snapshot (as scripts/reproduce_table1.py chains them)."""
    scale = (lambda p: [(n, s, 1) for n, s, _ in p]) if args.quick else (lambda p: p)
    with tempfile.TemporaryDirectory() as log_dir:
        seq_s, seq_dir = framework_fit("seq.yaml", scale(SEQ_PHASES), args, log_dir)
        snapshot = Path(seq_dir) / "checkpoints" / "phase-0-pretrain.ckpt"
        merged_s, _ = framework_fit("merged_finetune.yaml", scale(MERGED_PHASES), args, log_dir,
                                    "--model.init_from", str(snapshot))
    plain_seq_s, pretrained = plain_run(data, scale(SEQ_PHASES[:1]), args)
    plain_rest_s, _ = plain_run(data, scale(SEQ_PHASES[1:]), args, model=copy.deepcopy(pretrained))
    plain_merged_s, _ = plain_run(data, scale(MERGED_PHASES), args, model=pretrained)
    epochs = sum(e for _, _, e in scale(SEQ_PHASES + MERGED_PHASES))
    print(f"\nTable I study ({epochs} epochs, 5 test evaluations), once each way:")
    result = {}
    for i, kind in enumerate(("wall", "cpu")):
        framework_s, plain_s = seq_s[i] + merged_s[i], plain_seq_s[i] + plain_rest_s[i] + plain_merged_s[i]
        print(f"  {kind:4}: framework {framework_s:.1f} s (seq.yaml {seq_s[i]:.1f} s + merged_finetune.yaml "
              f"{merged_s[i]:.1f} s), plain {plain_s:.1f} s, ratio {framework_s / plain_s:.3f}")
        result |= {f"study_framework_{kind}_s": framework_s, f"study_plain_{kind}_s": plain_s,
                   f"study_{kind}_ratio": framework_s / plain_s}
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="pretraining epochs per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--study", action="store_true", help="also time the whole Table I study, once each way")
    parser.add_argument("--data-dir", default="data", help="MNIST root (torchvision layout); downloaded there if missing")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch of 5 loader steps, 1 repeat")
    parser.add_argument("extra", nargs="*", help="arguments after -- go to `python -m music fit`")
    args = parser.parse_args(argv)
    for name in ("epochs", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value} is not allowed: it must be an integer >= 1.")
    args.batches = None
    # batches the shipped config hands over per loader step (limit_train_batches counts those)
    args.blocks = yaml.safe_load((REPO / "configs" / "seq.yaml").read_text())["data"].get("batches_per_block", 1)
    if args.quick:
        args.epochs, args.repeats, args.batches = 1, 1, 5
    return args


def run(argv: list[str] | None = None) -> dict[str, float]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda (data and model on the GPU)" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cpus, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    data = MusicDataModule(data_dir=args.data_dir, download=True)
    data.setup()
    result = pretraining_ratio(data, args)
    if args.study or args.quick:
        result |= study(data, args)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return result


if __name__ == "__main__":
    run()
