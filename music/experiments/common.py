"""What the experiments share: where data and outputs go, fitting a shipped config, and tables.

Every experiment trains through ``music fit`` with the shipped configs (the same entry point a
user runs), so an experiment is a plan of runs plus a table, never a second training loop.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from music.checkpoint import write_atomically


@dataclass
class Data:
    """Where the dataset is, for every run of an experiment (``--data.data_dir``).

    Args:
        data_dir: dataset root (torchvision layout, e.g. ``<data_dir>/MNIST/raw``).
        download: fetch the dataset into ``data_dir`` if it is missing (needs internet).
    """

    data_dir: str = "data"
    download: bool = True


@dataclass
class Output:
    """Where an experiment writes.

    Args:
        log_dir: run directories (checkpoints, TensorBoard events, metrics), one per run.
        results: the tables and figures it produces.
        threads: torch CPU threads. Results are bitwise reproducible only at the same seed,
            thread count and CPU; the committed results use 1.
        quick: a smoke run: 5 loader steps an epoch (numbers meaningless, plumbing exercised).
        trainer_args: extra ``music fit`` arguments for every run, e.g. ``["--trainer.accelerator", "cpu"]``.
    """

    log_dir: str = "lightning_logs"
    results: str = "results"
    threads: int = 1
    quick: bool = False
    trainer_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"output.threads={self.threads} is not allowed: it must be an integer >= 1.")


def fit(configs: Sequence[str], name: str, data: Data, output: Output, *overrides: str) -> Path:
    """``music fit --config <configs...>`` into ``<log_dir>/<name>``, quietly; returns the run directory."""
    from music.cli import lightning

    torch.set_num_threads(output.threads)
    args = ["fit", *(a for c in configs for a in ("--config", c)),
            "--data.data_dir", data.data_dir, "--data.download", str(data.download).lower(),
            "--trainer.logger.init_args.save_dir", output.log_dir, "--trainer.logger.init_args.name", name,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if output.quick:
        args += ["--trainer.limit_train_batches", "5"]
    cli = lightning([*args, *overrides, *output.trainer_args])
    return Path(cli.trainer.log_dir)


def phases(run_dir: Path) -> dict[str, dict]:
    """The run's ``phase_metrics.json``, in phase order."""
    records = json.loads((Path(run_dir) / "phase_metrics.json").read_text())
    return dict(sorted(records.items(), key=lambda item: item[1]["index"]))


def final_phase(run_dir: Path) -> tuple[str, dict, Path]:
    """Name, test metrics and snapshot of a run's last phase."""
    name, record = list(phases(run_dir).items())[-1]
    return name, record, Path(run_dir) / "checkpoints" / f"phase-{record['index']}-{name}.ckpt"


def machine(threads: int | None = None) -> str:
    """The machine a result was measured on, for the notes under every table."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    threads = torch.get_num_threads() if threads is None else threads
    return f"{os.cpu_count()} CPU cores ({cpu}), {threads} torch thread{'s' if threads > 1 else ''}, torch {torch.__version__}"


def write_table(out_dir: str | Path, name: str, title: str, notes: str, header: Sequence[str],
                rows: Sequence[Sequence[Any]], csv_rows: Sequence[dict[str, Any]] | None = None) -> str:
    """``<out_dir>/<name>.md`` (title, notes, a Markdown table of the display ``rows``) and
    ``<out_dir>/<name>.csv`` (``csv_rows`` at full precision, or the display rows); returns the Markdown."""
    lines = [f"# {title}", "", notes, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    out = io.StringIO(newline="")
    if csv_rows:
        writer = csv.DictWriter(out, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    else:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    write_atomically(Path(out_dir) / f"{name}.md", markdown)
    write_atomically(Path(out_dir) / f"{name}.csv", out.getvalue())
    return markdown
