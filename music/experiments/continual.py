"""``music continual``: continual-learning methods × scenarios × seeds on one protocol.

Every run is an ordinary ``music fit`` of shipped configs: the protocol (e.g. ``split_mnist``),
one method delta (``ewc``, ``si``, ...; none for naive fine-tuning) and ``--model.scenario``.
The experiment stores each run's test confusion matrices (one per phase, plus the initial
evaluation) in its results database (``common.reuse_or_run``), scores them on the protocol's tasks and writes one table (Markdown + CSV) of
mean ± sample std over seeds and a plot of the average accuracy over the tasks so far.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.engine import Engine

from music.callbacks import SequentialFineTuning
from music.checkpoint import write_atomically
from music.config import config_path
from music.continual import accuracy_on, average_incremental_accuracy, backward_transfer, forward_transfer
from music.dashboard import markdown_table
from music.experiments import study_db
from music.experiments.common import (PAIRED_NOTE, Data, Output, fit, fmt_mean_std, fmt_paired, machine, mean_std,
                                      mean_std_columns, paired_comparison, results_db, reuse_or_run, spread_note,
                                      write_csv)
from music.module import SCENARIOS
from music.plots import pyplot, save_figure
from music.runner import RunResult
from music.evaluation import PhaseEvaluation

SPLIT_MNIST_METHODS = {"None": [], "Joint": ["split_mnist_joint"], "EWC": ["ewc"], "Online EWC": ["online_ewc"],
                       "SI": ["si"], "LwF": ["lwf"], "MAS": ["mas"], "Replay (100/class)": ["replay"],
                       "A-GEM (500)": ["agem"], "DER++ (500)": ["derpp"], "ER-ACE (500)": ["er_ace"]}
METRICS = ("final_accuracy", "average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "average_incremental_accuracy")
PAIRED_METRICS = {"final_accuracy": "test accuracy", "average_accuracy": "average accuracy"}


@dataclass
class Run:
    method: str
    scenario: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method.lower().replace(' ', '_').replace('(', '').replace(')', '').replace('/', '_')}-{self.scenario}-seed{self.seed}"


def score(rows: list[list[list[int]]], tasks: list[list[int]]) -> dict[str, float | list[float]]:
    """The metrics of one run. ``rows``: test confusion matrices in order, the last
    ``len(tasks) + 1`` being the model before the first task (untrained, or pretrained) and
    after each task. A run with fewer rows trained the tasks at once (joint, merged): only its
    final accuracy counts."""
    sequential = len(rows) >= len(tasks) + 1
    rows = rows[-(len(tasks) + 1):]
    matrix = np.array([[accuracy_on(confusion, classes) for classes in tasks] for confusion in rows])
    final = float(matrix[-1].mean())
    overall = accuracy_on(rows[-1], range(len(rows[-1])))
    if not sequential:
        return {"final_accuracy": overall, "average_accuracy": final, "backward_transfer": math.nan, "forgetting": math.nan,
                "forward_transfer": math.nan, "average_incremental_accuracy": math.nan,
                "accuracy_after_task": [math.nan] * (len(tasks) - 1) + [final]}
    learned = {j: j + 1 for j in range(len(tasks))}
    forgetting = [float(matrix[j + 1:-1, j].max(initial=matrix[j + 1, j]) - matrix[-1, j]) for j in range(len(tasks) - 1)]
    return {"final_accuracy": overall, "average_accuracy": final, "backward_transfer": backward_transfer(matrix, learned),
            "forgetting": float(np.mean(forgetting)), "forward_transfer": forward_transfer(matrix, learned, 0),
            "average_incremental_accuracy": average_incremental_accuracy(matrix, learned),
            "accuracy_after_task": [float(matrix[t + 1, : t + 1].mean()) for t in range(len(tasks))]}


class ContinualStudy:
    """Continual-learning methods compared on one protocol, in one or both scenarios, over seeds.

    Args:
        protocol: shipped configs (or paths) that define the protocol, applied over base.yaml.
        methods: table label -> config deltas of the method (``[]``: naive fine-tuning). A
            method whose deltas include ``joint`` in a name trains all tasks at once.
        scenarios: ``class`` (class-incremental) and/or ``task`` (task-incremental).
        seeds: seeds of the runs (``seed_everything``: initialisation, shuffling, method draws).
        tasks: the protocol's tasks (class sets) the runs are scored on, in training order.
        overrides: more ``music fit`` settings for every run (e.g. a shorter protocol:
            ``{data.iterations_per_epoch: 500}``); the table lists them, so a deviation from the
            protocol is stated where it is reported.
        data: where the dataset is (``--data.data_dir``), as for every experiment.
        output: where it writes: the runs in ``<root>/<name>/<run>/`` and their results in
            ``<root>/<name>/results.db`` (a run stored there is read back, not run again), the
            table ``<name>.md``, ``.csv``, ``_runs.csv`` and ``.png`` beside them or in ``results``
            when set; torch threads.
        title: the table's heading.
        keep_checkpoints: keep each run's checkpoints (they are deleted once scored otherwise).
        pretrain: configs of a pretraining run made once per seed; every run then starts from its
            final weights (``--model.init_from``) and its methods take the pretraining split as
            task 0 (``--model.pretrained_on``). ``[]``: the runs start from scratch.
        pretrained_on: the split ``pretrain`` trains on.
        pretrain_overrides: more ``music fit`` settings for the pretraining runs only.
        report_only: run nothing; write the table from the runs already done (each row states
            its number of seeds).
    """

    def __init__(self, protocol: list[str] = ["split_mnist"], methods: dict[str, list[str]] = SPLIT_MNIST_METHODS,
                 scenarios: list[str] = ["class", "task"], seeds: list[int] = [0, 1, 2, 3, 4],
                 tasks: list[list[int]] = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], overrides: dict[str, Any] = {},
                 data: Data = Data(), output: Output = Output(), title: str = "Split-MNIST",
                 keep_checkpoints: bool = False, pretrain: list[str] = [], pretrained_on: str = "remaining",
                 pretrain_overrides: dict[str, Any] = {}, report_only: bool = False) -> None:
        bad = [s for s in scenarios if s not in SCENARIOS]
        if bad or not scenarios:
            raise ValueError(f"scenarios={scenarios} is not allowed: choose from {list(SCENARIOS)}.")
        if not seeds or not methods or not tasks:
            raise ValueError("seeds, methods and tasks must each name at least one entry.")
        for deltas in [protocol, pretrain, *methods.values()]:
            for name in deltas:
                config_path(name)  # an unknown method or protocol config fails here, before any run
        if not data.download and not os.path.isdir(data.data_dir):
            raise FileNotFoundError(f"data.data_dir={os.path.abspath(data.data_dir)!r} does not exist (and data.download "
                                    "is false).")
        self.protocol, self.methods, self.scenarios, self.seeds = list(protocol), dict(methods), list(scenarios), list(seeds)
        self.tasks, self.overrides, self.data, self.output = tasks, dict(overrides), data, output
        self.title, self.keep_checkpoints, self.report_only = title, keep_checkpoints, report_only
        self.pretrain, self.pretrained_on, self.pretrain_overrides = list(pretrain), pretrained_on, dict(pretrain_overrides)
        self.name = output.name or "continual"
        self.runs_dir = str(output.folder("continual"))
        self.table = os.path.join(output.tables("continual"), self.name)  # .md, .csv, .png

    def runs(self) -> list[Run]:
        return [Run(m, s, seed) for seed in self.seeds for s in self.scenarios for m in self.methods]

    def run(self) -> dict:
        torch.set_num_threads(self.output.threads)
        started = time.perf_counter()
        engine = results_db(self.output, "continual")
        results = [self.run_one(engine, run) for run in self.runs()
                   if not self.report_only or study_db.stored_run(engine, "continual", run.name) is not None]
        return self.write(results, time.perf_counter() - started)

    def settings(self, run: Run) -> dict[str, Any]:
        """What determines a run's result (not where files go), for the results store."""
        return {"configs": [*self.protocol, *self.methods[run.method]], "scenario": run.scenario, "seed": run.seed,
                "overrides": self.overrides, "quick": self.output.quick, "trainer_args": self.output.trainer_args,
                "pretrain": {"configs": self.pretrain, "overrides": self.pretrain_overrides,
                             "on": self.pretrained_on} if self.pretrain else None}

    def fit(self, configs: list[str], name: str, seed: int, overrides: dict[str, Any]) -> RunResult:
        print(f"[continual] {name}", flush=True)
        return fit(configs, name, self.data, self.output, "continual",
                   {"seed_everything": seed, "trainer.logger.init_args.version": 0, **self.overrides, **overrides})

    def pretrained(self, seed: int) -> dict[str, str]:
        """``model.init_from`` and ``model.pretrained_on`` of the pretrained model of ``seed``
        (trained on first use), or nothing when there is no pretraining."""
        if not self.pretrain:
            return {}
        path = os.path.join(self.runs_dir, f"pretrain-seed{seed}", "weights.pt")
        if not os.path.exists(path):
            result = self.fit(self.pretrain, f"pretrain-seed{seed}", seed, self.pretrain_overrides)
            torch.save(result.model.backbone.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
            shutil.rmtree(result.run_dir / "checkpoints", ignore_errors=True)
        return {"model.init_from": path, "model.pretrained_on": self.pretrained_on}

    def run_one(self, engine: Engine, run: Run) -> dict:
        """The run's test confusion matrices, from the results store or from training it, scored
        anew on ``tasks``."""
        def train() -> tuple[dict, Path, float]:
            init = self.pretrained(run.seed)
            start = time.perf_counter()
            fitted = self.fit([*self.protocol, *self.methods[run.method]], run.name, run.seed,
                              {"model.scenario": run.scenario, **init})
            seconds = time.perf_counter() - start
            schedule = next(c for c in fitted.trainer.callbacks if isinstance(c, SequentialFineTuning))
            evaluation = next(c for c in fitted.trainer.callbacks if isinstance(c, PhaseEvaluation))
            if schedule.epoch != schedule.ends[-1]:  # e.g. stopped by a signal: never record a cut-short run
                raise RuntimeError(f"{run.name} stopped at epoch {schedule.epoch} of {schedule.ends[-1]}; not recorded.")
            if not self.keep_checkpoints:
                shutil.rmtree(fitted.run_dir / "checkpoints", ignore_errors=True)
            return ({"method": run.method, "scenario": run.scenario, "seed": run.seed, "seconds": seconds,
                     "rows": list(evaluation.rows.values()), "row_names": list(evaluation.rows)}, fitted.run_dir, seconds)

        result = reuse_or_run(engine, "continual", run.name, self.settings(run), train)
        return result | score(result["rows"], self.tasks)

    # -- the table and the plot ------------------------------------------------------------------

    def write(self, results: list[dict], seconds: float) -> dict:
        header = ["scenario", "method", "seeds", *(f"{m}_mean" for m in METRICS), *(f"{m}_std" for m in METRICS),
                  "seconds_per_run"]
        table, summary = [], {}
        for scenario in self.scenarios:
            for method in self.methods:
                runs = [r for r in results if r["method"] == method and r["scenario"] == scenario]
                if not runs:
                    continue
                spread = {m: mean_std(r[m] for r in runs) for m in METRICS}
                summary[(scenario, method)] = {"values": {m: [r[m] for r in runs] for m in METRICS}, "runs": runs}
                table.append([scenario, method, len(runs), *(spread[m][0] for m in METRICS),
                              *(spread[m][1] for m in METRICS), float(np.median([r["seconds"] for r in runs]))])
        write_csv(self.table + ".csv", [[f"{v:.4f}" if isinstance(v, float) else v for v in row] for row in table], header)
        # the runs themselves, so the table can be checked and rebuilt without their folders
        write_csv(self.table + "_runs.csv", [{"scenario": r["scenario"], "method": r["method"], "seed": r["seed"],
                                              **{m: f"{r[m]:.6f}" for m in METRICS}, "seconds": f"{r['seconds']:.1f}"}
                                             for r in results])
        paired = ["n", "mean_diff", "std_diff", "ci_low", "ci_high", "p_wilcoxon", "wins", "losses", "ties"]
        write_csv(self.table + "_paired.csv",
                  [[scenario, method, self.baseline, metric, *(_cell(result[k]) for k in paired)]
                   for (scenario, method, metric), result in self.versus_baseline(summary).items()],
                  ["scenario", "method", "baseline", "metric", *paired])
        write_atomically(self.table + ".md", self.markdown(summary, results, seconds))
        self.plot(summary)
        print(f"[continual] wrote {self.table}.md, .csv, _runs.csv, _paired.csv, .png", flush=True)
        return {"table": table, "seconds": seconds}

    @property
    def baseline(self) -> str | None:
        """Naive fine-tuning, the method every other is paired against: the first with no config delta."""
        return next((method for method, deltas in self.methods.items() if not deltas), None)

    def versus_baseline(self, summary: dict) -> dict[tuple[str, str, str], dict]:
        """``(scenario, method, metric) -> paired_comparison`` of each method with naive
        fine-tuning: the runs of the same seed (same initialisation and shuffling) pair up."""
        out = {}
        for scenario in self.scenarios:
            base = summary.get((scenario, self.baseline))
            if base is None:
                continue
            base_runs = {r["seed"]: r for r in base["runs"]}
            for method in self.methods:
                if method == self.baseline or (scenario, method) not in summary:
                    continue
                runs = [r for r in summary[(scenario, method)]["runs"] if r["seed"] in base_runs]
                for metric in PAIRED_METRICS:
                    out[(scenario, method, metric)] = paired_comparison([r[metric] for r in runs],
                                                                        [base_runs[r["seed"]][metric] for r in runs])
        return out

    def markdown(self, summary: dict, results: list[dict], seconds: float) -> str:
        names = {"class": "Class-incremental", "task": "Task-incremental"}
        run_seconds = [r["seconds"] for r in results]
        lines = [f"# {self.title}", "",
                 f"Protocol: `music fit` with `{' '.join('--config ' + c for c in self.protocol)}`"
                 + (f" and overrides `{_flags(self.overrides)}`" if self.overrides else "")
                 + (f", starting from a model pretrained once per seed with `{' '.join('--config ' + c for c in self.pretrain)}"
                    f"{' ' + _flags(self.pretrain_overrides) if self.pretrain_overrides else ''}` (the methods take "
                    f"its split `{self.pretrained_on}` as task 0)" if self.pretrain else "")
                 + f"; tasks {self.tasks}. Each method adds its config delta "
                 + ", ".join(f"{m}: `{' '.join(d) or '(none)'}`" for m, d in self.methods.items()) + ".",
                 "",
                 f"Seeds {self.seeds}; {spread_note(len(e['runs']) for e in summary.values())}, in % "
                 "(accuracy points for BWT, forgetting and "
                 "FWT). Test accuracy: the final model on the whole test set (every class, in the task scenario "
                 "with each sample's task known). Average accuracy: final test accuracy averaged over the tasks; BWT and forgetting "
                 "over the tasks before the last (negative BWT is forgetting); FWT: accuracy on a task just "
                 "before it is trained minus that of the model before the first task (untrained, or pretrained); average incremental accuracy: the mean over "
                 "tasks of the average accuracy on the tasks so far. Joint (and merged) train on all tasks at "
                 "once, so only their final accuracies are defined.", ""]
        missing = len(self.runs()) - len(results)
        if missing:
            lines += [f"**Incomplete:** {missing} of the {len(self.runs())} configured runs were not run; the "
                      "`seeds` column gives each row's number of seeds (the first seeds of the list).", ""]
        versus = self.versus_baseline(summary)
        for scenario in self.scenarios:
            rows = [[method, len(entry["runs"]), *(fmt_mean_std(entry["values"][m], 1, 100) for m in METRICS),
                     f"{np.median([r['seconds'] for r in entry['runs']]):.0f}"]
                    for method in self.methods if (entry := summary.get((scenario, method)))]
            lines += [f"## {names[scenario]}", "",
                      markdown_table(["method", "seeds", "test accuracy (all classes)", "average accuracy", "BWT",
                                      "forgetting", "FWT", "average incremental accuracy", "s / run"], rows), ""]
            paired = [[method, *(fmt_paired(versus[(scenario, method, m)]) for m in PAIRED_METRICS)]
                      for method in self.methods if (scenario, method, "final_accuracy") in versus]
            if paired:
                lines += [f"Each method minus naive fine-tuning (`{self.baseline}`), paired by seed:", "",
                          markdown_table(["method", *(f"{label} − {self.baseline}'s [95 % CI]"
                                                      for label in PAIRED_METRICS.values())], paired), ""]
        if versus:
            lines += [PAIRED_NOTE, ""]
        lines += [f"![average accuracy on the tasks so far]({self.name}.png)", "",
                  f"Machine: {machine(self.output.threads)}. {len(results)} runs, "
                  f"{sum(run_seconds) / 60:.1f} min of run time in all (median {np.median(run_seconds):.0f} s a run); "
                  f"this invocation took {seconds / 60:.1f} min (runs already done are read back, not re-run).",
                  "s / run is the median wall time of a run: jobs sharing the machine slow it, so it is no speed "
                  "measurement (`docs/speed.md` has those).",
                  "", "Generated by `music continual`; per-run results (confusion matrices per evaluation) are in "
                  f"`{self.runs_dir}/results.db` (table `experiment_runs`) on the machine that ran them, every run's "
                  f"metrics in `{self.name}_runs.csv`, the paired comparisons in `{self.name}_paired.csv`.", ""]
        return "\n".join(lines)

    def plot(self, summary: dict) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(self.scenarios), figsize=(5.5 * len(self.scenarios), 4), squeeze=False)
        x = np.arange(1, len(self.tasks) + 1)
        for ax, scenario in zip(axes[0], self.scenarios):
            for method in self.methods:
                if (scenario, method) not in summary:
                    continue
                curves = np.array([r["accuracy_after_task"] for r in summary[(scenario, method)]["runs"]], dtype=float)
                mean, std = mean_std_columns(curves)
                if np.isnan(mean[:-1]).all():  # joint: one final value, drawn as a line
                    ax.axhline(100 * mean[-1], color="grey", linestyle="--", label=method)
                    continue
                ax.errorbar(x, 100 * mean, 100 * std, marker="o", capsize=3, label=method)
            ax.set(title=f"{scenario}-incremental", xlabel="tasks learned",
                   ylabel="average accuracy on them (%, mean ± sample std)",
                   xticks=x, ylim=(0, 101))
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8, loc="lower left")
        save_figure(fig, self.table + ".png", 120)


def _cell(value: Any) -> Any:
    """A CSV cell: undefined (None, NaN) as empty."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _flags(overrides: dict[str, Any]) -> str:
    """Settings as the command-line flags they stand for, for the table's protocol line."""
    return " ".join(f"--{key} {value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items())
