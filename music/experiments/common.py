"""What the experiments share: where data and outputs go, fitting a shipped config, the results
store with its one reuse rule, the one spread statistic, the one paired comparison, and the
table writer.

Every experiment trains through ``music fit`` with the shipped configs (the same entry point a
user runs), so an experiment is a plan of runs plus a table, never a second training loop; and
every experiment states its spread the same way, so tables compare.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import socket
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
from dask.distributed import Client, LocalCluster
from lightning.pytorch import Callback
from scipy import stats
from sqlalchemy.engine import Engine

from music.checkpoint import write_atomically
from music.dashboard import markdown_table
from music.experiments import study_db
from music.runner import RunResult, phase_metrics, run


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
    """Where an experiment writes, and how its runs train. Every experiment writes under
    ``<root>/<name>/`` (run directories, its database, tables and figures); the committed
    ``results/`` folder changes only when ``results`` names it.

    Args:
        root: the folder of every experiment's outputs, one subfolder each.
        name: this experiment's subfolder of ``root`` (and a continual study's table name);
            null: the command's name (``table1``, ``study``, ``continual``, ...).
        results: publish the tables and figures to this folder instead of ``<root>/<name>``,
            e.g. ``results`` to regenerate the committed ones; null: keep them under ``root``.
        threads: torch CPU threads (a study grid: per cell). Results are bitwise reproducible
            only at the same seed, thread count and CPU; the committed results use 1.
        quick: a smoke run: 5 loader steps an epoch (numbers meaningless, plumbing exercised).
        trainer_args: extra ``music fit`` arguments for every run, e.g. ``["--trainer.accelerator", "cpu"]``.
    """

    root: str = "lightning_logs"
    name: str | None = None
    results: str | None = None
    threads: int = 1
    quick: bool = False
    trainer_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"output.threads={self.threads} is not allowed: it must be an integer >= 1.")
        if self.name is not None and (not self.name or Path(self.name).is_absolute() or ".." in Path(self.name).parts):
            raise ValueError(f"output.name={self.name!r} is not allowed: give a folder name relative to output.root.")

    def folder(self, experiment: str) -> Path:
        """``<root>/<name>``: the experiment's runs, database, and (unpublished) tables."""
        return Path(self.root) / (self.name or experiment)

    def tables(self, experiment: str) -> Path:
        """Where the tables and figures go: ``results`` if set, else the experiment's folder."""
        return Path(self.results) if self.results else self.folder(experiment)


def results_db(output: Output, experiment: str) -> Engine:
    """The experiment's results store: the study database's schema, in ``<folder>/results.db``
    (``music study`` keeps its grid in ``<folder>/study.db``)."""
    folder = output.folder(experiment).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return study_db.connect(f"sqlite:///{folder / 'results.db'}")


def reuse_or_run(engine: Engine, experiment: str, name: str, settings: dict[str, Any],
                 work: Callable[[], tuple[dict[str, Any], Path, float]]) -> dict[str, Any]:
    """The one "reuse if done" rule: a run is done when its result is in the database (written
    in one transaction once it finished); a done run with the same ``settings`` is read back,
    one with other settings is refused, and anything else runs (``work`` returns its result,
    run directory and seconds) and is stored. The result comes back with ``wall_seconds``, the
    run's own time, so a table of reused runs still states what they cost."""
    stored = study_db.stored_run(engine, experiment, name)
    if stored is not None:
        if stored["fingerprint"] != study_db.fingerprint(settings):
            raise ValueError(f"{experiment} run {name!r} in {engine.url} was finished with other settings "
                             f"({stored['settings']}): use another output.root/output.name, or delete its row to re-run it.")
        return json.loads(stored["result"]) | {"wall_seconds": stored["wall_seconds"]}
    result, folder, seconds = work()
    study_db.record_run(engine, {"experiment": experiment, "name": name, "fingerprint": study_db.fingerprint(settings),
                                 "settings": study_db.dumps(settings), "result": study_db.dumps(result),
                                 "wall_seconds": seconds, "host": socket.gethostname(),
                                 "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "run_dir": str(Path(folder).resolve())})
    return result | {"wall_seconds": seconds}


def fit(configs: Sequence[str], name: str, data: Data, output: Output, experiment: str,
        overrides: dict[str, Any] | None = None, callbacks: Sequence[Callback] = ()) -> RunResult:
    """``music fit --config <configs...>`` logged as ``name`` under the experiment's folder
    (``<root>/<experiment>/<name>/version_N``), quietly; ``callbacks`` join the trainer's."""
    torch.set_num_threads(output.threads)
    settings = {"data.data_dir": data.data_dir, "data.download": data.download,
                "trainer.logger.init_args.save_dir": str(output.folder(experiment)),
                "trainer.logger.init_args.name": name,
                "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}
    if output.quick:
        settings["trainer.limit_train_batches"] = 5
    return run("fit", list(configs), settings | (overrides or {}), output.trainer_args, callbacks)


def final_phase(run_dir: Path) -> tuple[str, dict, Path]:
    """Name, test metrics and snapshot of a run's last phase."""
    name, record = list(phase_metrics(run_dir).items())[-1]
    return name, record, Path(run_dir) / "checkpoints" / f"phase-{record['index']}-{name}.ckpt"


def machine(threads: int | None = None) -> str:
    """The machine a result was measured on, for the notes under every table."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    threads = torch.get_num_threads() if threads is None else threads
    return f"{os.cpu_count()} CPU cores ({cpu}), {threads} torch thread{'s' if threads > 1 else ''}, torch {torch.__version__}"


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1) and count of the values that are not NaN: the
    one spread every table and error bar reports. The deviation of fewer than two values is NaN."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values)


def mean_std_columns(rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and sample standard deviation (ddof=1; 0 for a single row, drawn as no
    error bar) of a 2-D array of runs × points, for curves and error bars."""
    rows = np.asarray(rows, dtype=float)
    std = rows.std(0, ddof=1) if len(rows) > 1 else np.zeros(rows.shape[1:])
    return rows.mean(0), std


def fmt_mean_std(values: Iterable[float], digits: int = 3, scale: float = 1.0) -> str:
    """``mean ± std`` (sample std), the mean alone for one value, ``–`` for none."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    return f"{scale * mean:.{digits}f}" + ("" if n == 1 else f" ± {scale * std:.{digits}f}")


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """How much ``a`` beats ``b`` when the two were measured in pairs (the same seed, the same
    checkpoint): the differences ``a - b`` pair by pair, their mean, sample std (ddof=1), the 95 %
    Student-t interval of the mean difference, and the two-sided Wilcoxon signed-rank p-value.

    Pairs, not two samples, because a seed's own luck (its pretrained model, its held-out
    samples) moves both members of a pair together; comparing two means ± stds would count that
    luck as noise twice. A pair with a NaN or None on either side is left out (a metric that is
    undefined for one of them). The Wilcoxon test drops zero differences (Wilcoxon's rule) and
    is exact for small n: the exact null distribution without ties (n <= 50), the full
    enumeration of the 2^n sign flips when differences tie (n <= 13), the normal approximation
    beyond. With fewer than two pairs, or no nonzero difference, there is nothing to test:
    ``p_wilcoxon`` is None (and the interval NaN with fewer than two pairs).
    """
    if len(a) != len(b):
        raise ValueError(f"paired_comparison needs as many values on each side: got {len(a)} and {len(b)}.")
    pairs = [(float(x), float(y)) for x, y in zip(a, b)
             if x is not None and y is not None and not math.isnan(x) and not math.isnan(y)]
    # rounded so that float noise (0.6 - 0.5 != 0.5 - 0.4) makes no false win, tie or rank
    d = np.round(np.array([x - y for x, y in pairs], dtype=float), 12)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    low = high = math.nan
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    p = None
    nonzero = d[d != 0]
    if n > 1 and len(nonzero):
        tied = len(np.unique(np.abs(nonzero))) < len(nonzero)
        method = "exact" if not tied and len(nonzero) <= 50 else "auto"
        p = float(stats.wilcoxon(nonzero, alternative="two-sided", method=method).pvalue)
    return {"n": n, "mean_diff": mean, "std_diff": std, "ci_low": low, "ci_high": high, "p_wilcoxon": p,
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}


def fmt_value(value: Any) -> str:
    """A setting or table value: floats to 4 significant digits, missing as –."""
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def fmt_settings(values: dict[str, Any]) -> str:
    """``key = value, ...``: chosen hyperparameters, as the tune and continual tables show them."""
    return ", ".join(f"{k} = {fmt_value(v)}" for k, v in values.items())


def fmt_p(p: float | None) -> str:
    """``p = 0.031``, ``p < 0.001``, or ``p n/a`` when nothing could be tested."""
    if p is None or math.isnan(p):
        return "p n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def fmt_paired(result: dict[str, Any], scale: float = 100.0, digits: int = 1, unit: str = "pp",
               count: str = "seeds") -> str:
    """A paired comparison in one cell: ``+3.1 [+1.2, +5.0] pp, p = 0.031 (5 seeds)`` — the mean
    difference, its 95 % interval and the Wilcoxon p (accuracies in percentage points by default);
    ``n/a`` without pairs, no interval for a single pair."""
    n = result["n"]
    if n == 0:
        return "n/a"
    noun = count.removesuffix("s") if n == 1 else count
    unit = f" {unit}" if unit else ""
    mean = f"{scale * result['mean_diff']:+.{digits}f}"
    if n == 1:
        return f"{mean}{unit} (1 {noun}: no interval, {fmt_p(None)})"
    interval = f"[{scale * result['ci_low']:+.{digits}f}, {scale * result['ci_high']:+.{digits}f}]"
    return f"{mean} {interval}{unit}, {fmt_p(result['p_wilcoxon'])} ({n} {noun})"


PAIRED_NOTE = ("Paired differences: mean [95 % Student-t interval of the mean difference] and the two-sided "
               "Wilcoxon signed-rank p (exact for small n; zero differences dropped) over the pairs named. With n "
               "pairs the exact test cannot go below p = 2/2^n (0.0625 for 5 seeds): a p above 0.05 with 5 seeds is "
               "no evidence of no difference.")


def spread_note(counts: Iterable[int], unit: str = "seeds") -> str:
    """The sentence every table states its spread with: ``mean ± sample std (ddof=1) over 5 seeds``."""
    counts = sorted(set(counts))
    if len(counts) == 1:
        return f"mean ± sample std (ddof=1) over {counts[0]} {unit.removesuffix('s') if counts[0] == 1 else unit}"
    return f"mean ± sample std (ddof=1) over {counts[0]}–{counts[-1]} {unit}"


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]] | Sequence[Sequence[Any]],
              header: Sequence[str] | None = None) -> None:
    """One CSV file, written atomically: dict rows (their keys are the header) or plain rows under ``header``."""
    out = io.StringIO(newline="")
    if rows and isinstance(rows[0], dict):
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
    else:
        writer = csv.writer(out)
        if header is not None:
            writer.writerow(header)
    writer.writerows(rows)
    write_atomically(Path(path), out.getvalue())


def write_table(out_dir: str | Path, name: str, title: str, notes: str, header: Sequence[str],
                rows: Sequence[Sequence[Any]], csv_rows: Sequence[dict[str, Any]] | None = None) -> str:
    """``<out_dir>/<name>.md`` (title, notes, then a Markdown table of the display ``rows``) and
    ``<out_dir>/<name>.csv`` (``csv_rows`` at full precision, or the display rows); returns the
    Markdown."""
    markdown = f"# {title}\n\n{notes}\n\n" + markdown_table(header, rows) + "\n"
    write_atomically(Path(out_dir) / f"{name}.md", markdown)
    write_csv(Path(out_dir) / f"{name}.csv", csv_rows or rows, None if csv_rows else header)
    return markdown


# -- running many runs ---------------------------------------------------------------------------

@contextlib.contextmanager
def output_to(path: Path):
    """The cell's stdout and stderr (Python's and C's) into its ``cell.log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (log, *saved):
            os.close(fd)


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int | None, threads: int, accelerator: str = "cpu",
                option: str = "scheduler") -> Iterator[Client]:
    """A client of ``scheduler``, or of a ``LocalCluster`` of single-threaded worker processes
    started (and stopped) here: how ``music study`` runs its cells and ``music tune`` its trials.
    An unreachable scheduler is a ``ValueError`` naming ``option``. With a GPU ``accelerator``
    the local workers offer the resource ``GPU=1``."""
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="5s")
        except (OSError, TimeoutError) as err:
            raise ValueError(f"{option}={scheduler!r}: no Dask scheduler answers there ({type(err).__name__}). "
                             "Start one with `dask scheduler` or leave it null for a local cluster.") from None
        with client:
            yield client
        return
    # The nanny sets MKL/OPENBLAS_NUM_THREADS, MALLOC_TRIM_THRESHOLD_, ... in this process's
    # environment for its workers: put it back afterwards, or later subprocesses inherit them.
    saved = dict(os.environ)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # inherited by the worker processes
    resources = {"GPU": 1} if accelerator in ("gpu", "cuda") else None
    try:
        # Dask's statistical profiler samples the running thread every 10 ms, which slows a run
        # markedly (measured in docs/study.md). The workers take this config from here.
        with dask.config.set({"distributed.worker.profile.enabled": False}), \
                LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                             # the scheduler's HTTP endpoints (health, metrics) on a free port: 8787 may be taken
                             dashboard_address=":0", resources=resources) as cluster, Client(cluster) as client:
            yield client
    finally:
        os.environ.clear()
        os.environ.update(saved)
