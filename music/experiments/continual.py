"""``music continual``: continual-learning methods × scenarios × seeds on one protocol.

Every run is an ordinary ``music fit`` of shipped configs: the protocol (e.g. ``split_mnist``),
the scenario (``--model.scenario class`` or ``task``; ``domain``: the protocol's domain deltas,
e.g. ``split_mnist_domain``), one method delta (``ewc``, ``si``, ...; none for naive fine-tuning)
and, for a method tuned by ``music tune``, that search's ``best.yaml``. The run's own evaluation
(``PhaseEvaluation``: the task columns of its ``accuracy_matrix.csv``, each task scored on its
own test set) is what is scored, so class-, task- and domain-incremental runs are scored alike.
The experiment stores each run's task-accuracy matrix and test confusion matrices in its results
database (``common.reuse_or_run``) and writes one table (Markdown + CSV) of mean ± sample std
over seeds, paired comparisons with naive fine-tuning, and a plot of the average accuracy over
the tasks so far.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from sqlalchemy.engine import Engine

from music.callbacks import SequentialFineTuning
from music.checkpoint import write_atomically
from music.config import config_path
from music.continual import accuracy_on, average_incremental_accuracy, backward_transfer, forward_transfer
from music.dashboard import markdown_table
from music.experiments import study_db
from music.experiments.common import (PAIRED_NOTE, Data, Output, fit, fmt_mean_std, fmt_paired, fmt_settings, machine,
                                      mean_std, mean_std_columns, paired_comparison, results_db, reuse_or_run,
                                      spread_note, write_csv)
from music.module import SCENARIOS
from music.plots import pyplot, save_figure
from music.runner import RunResult
from music.evaluation import PhaseEvaluation

DOMAIN = "domain"  # the scenario made by the protocol's domain deltas (a shared head, no task identity)
SCENARIO_NAMES = {"class": "Class-incremental", "task": "Task-incremental", DOMAIN: "Domain-incremental"}
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


def task_record(run_dir: str | Path) -> dict[str, list]:
    """What a run's evaluation wrote in ``accuracy_matrix.csv``: its rows (the model before the
    first phase and after each), the task columns (``task_<phase>``: each task's accuracy on its
    own test set) and ``acc`` (the whole plain test set)."""
    path = Path(run_dir) / "accuracy_matrix.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run's evaluation (evaluation.evaluate_test) wrote no "
                                "accuracy matrix to score.")
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    columns = [c for c in (table[0] if table else {}) if c.startswith("task_")]
    return {"row_names": [r["phase"] for r in table], "task_columns": columns,
            "task_matrix": [[float(r[c]) for c in columns] for r in table], "acc": [float(r["acc"]) for r in table]}


def score(record: dict[str, list], scenario: str, tasks: list[list[int]] = (),
          rows: list[list[list[int]]] | None = None) -> dict[str, float | list[float]]:
    """The metrics of one run from its task-accuracy matrix (``task_record``): row ``i``, column
    ``j`` is task ``j``'s accuracy after row ``i``. A task's row is the phase it names; the
    reference row (forward transfer's baseline) is the one before the first task's.

    Test accuracy is the final ``acc`` (the whole test set), except in the domain scenario, where
    the plain test set is no task's (an unpermuted one, say): there it is the average accuracy.
    A run with one task column trained the tasks at once (joint, merged): only its final
    accuracies count; its average accuracy is the mean over ``tasks`` (class sets) of its final
    confusion matrix ``rows[-1]`` when given, else its task column (the pooled test sets)."""
    columns, names = record["task_columns"], record["row_names"]
    if not columns:
        raise ValueError(f"the run's accuracy matrix has no task columns (rows {names}): nothing to score.")
    matrix = np.asarray(record["task_matrix"], dtype=float)
    last = float(matrix[-1].mean())
    overall = last if scenario == DOMAIN else float(record["acc"][-1])
    if len(columns) == 1:
        average = (float(np.mean([accuracy_on(rows[-1], classes) for classes in tasks]))
                   if tasks and rows and scenario != DOMAIN else last)
        return {"final_accuracy": last if scenario == DOMAIN else overall, "average_accuracy": average,
                "backward_transfer": math.nan, "forgetting": math.nan, "forward_transfer": math.nan,
                "average_incremental_accuracy": math.nan, "accuracy_after_task": [average]}
    rows_of = [names.index(c.removeprefix("task_")) for c in columns]
    reference = rows_of[0] - 1
    matrix = matrix[reference:]
    learned = {j: row - reference for j, row in enumerate(rows_of)}
    forgetting = [float(matrix[learned[j]:-1, j].max(initial=matrix[learned[j], j]) - matrix[-1, j])
                  for j in range(len(columns) - 1)]
    return {"final_accuracy": overall, "average_accuracy": last, "backward_transfer": backward_transfer(matrix, learned),
            "forgetting": float(np.mean(forgetting)), "forward_transfer": forward_transfer(matrix, learned, 0),
            "average_incremental_accuracy": average_incremental_accuracy(matrix, learned),
            "accuracy_after_task": [float(matrix[learned[t], : t + 1].mean()) for t in range(len(columns))]}


@dataclass
class Tuned:
    """A method's settings chosen by ``music tune``: its ``best.yaml`` (a config delta), the
    values chosen and the budget spent, read from the search's ``tune.csv`` and ``tune.md``.
    ``shown`` is the ``best.yaml`` as given (the table prints it); runs read ``path``."""

    shown: str
    values: dict[str, Any]
    budget: str

    @property
    def path(self) -> str:
        """Absolute, so a run's settings (and fingerprint) do not depend on where it was given from."""
        return str(Path(self.shown).resolve())

    @classmethod
    def read(cls, where: str, method: str, deltas: list[str]) -> "Tuned":
        label = f"tuned: {method}: {where!r}"
        path = Path(where) / "best.yaml" if Path(where).is_dir() else Path(where)
        if not path.is_file():
            raise ValueError(f"{label} is neither a music tune best.yaml nor a folder holding one.")
        trials = path.parent / "tune.csv"
        if not trials.is_file():
            raise ValueError(f"{label}: no tune.csv beside {path.name}: give the output of music tune, whose budget "
                             "the table states.")
        header = path.read_text().splitlines()[0] if path.read_text() else ""
        best = re.match(r"# music tune: trial (\d+)", header)
        if best is None or not isinstance(yaml.safe_load(path.read_text()), dict):
            raise ValueError(f"{label}: {path} is not a best.yaml written by music tune (its first line names the trial).")
        notes = (path.parent / "tune.md").read_text() if (path.parent / "tune.md").is_file() else ""
        tuned_with = re.search(r"Run configs: ([^;]*);", notes)
        if tuned_with is not None and deltas:
            stems = {Path(c.strip()).stem for c in tuned_with.group(1).split(",")}
            missing = [d for d in deltas if Path(d).stem not in stems]
            if missing:
                raise ValueError(f"{label} was tuned with the configs {tuned_with.group(1)}, which lack the method's "
                                 f"{missing}: give the search of this method.")
        with open(trials, newline="") as f:
            table = list(csv.DictReader(f))
        fixed = {"trial", "state", "value", "last_reported", "epochs", "seconds", "run_dir", "error"}
        keys = [k for k in (table[0] if table else {}) if k not in fixed]
        row = next((r for r in table if r["trial"] == best.group(1)), None)
        if row is None:
            raise ValueError(f"{label}: trial {best.group(1)} of best.yaml is not in {trials}.")
        counted = [r for r in table if r["state"] in ("complete", "pruned", "fail")]
        states = {s: sum(r["state"] == s for r in counted) for s in ("complete", "pruned", "fail")}
        seconds = sum(float(r["seconds"]) for r in table if r["seconds"])
        planned = re.search(r"Budget: (\d+) trials", notes)
        budget = (f"{planned.group(1) + ' trials planned, ' if planned else ''}{len(counted)} ended ({states['complete']} "
                  f"complete, {states['pruned']} pruned, {states['fail']} failed), {seconds / 60:.0f} min of training; "
                  f"best: trial {best.group(1)}, val score {float(row['value']):.4f}")
        return cls(str(path), {k.rsplit(".", 1)[-1]: _number(row[k]) for k in keys}, budget)

    def describe(self) -> str:
        return fmt_settings(self.values)


class ContinualStudy:
    """Continual-learning methods compared on one protocol, in one or both scenarios, over seeds.

    Args:
        methods: table label -> config deltas of the method (``[]``: naive fine-tuning, the
            baseline of the paired comparisons). A method whose schedule has one task (joint,
            merged) trains all tasks at once. The list is the experiment config's
            (``configs/experiments/continual.yaml``).
        protocol: shipped configs (or paths) that define the protocol, applied over base.yaml.
        scenarios: ``class`` (class-incremental), ``task`` (task-incremental: ``model.scenario
            task``) and/or ``domain`` (domain-incremental: ``domain_configs`` added).
        domain_configs: the config deltas that make the protocol domain-incremental
            (``split_mnist_domain``); ``[]`` for a protocol that is already (``permuted_mnist``).
        tuned: scenario -> method -> a ``music tune`` output (its folder, or its ``best.yaml``):
            that method's runs in that scenario add the best settings as a config delta, and the
            table states them and the search's budget; a method not named keeps its shipped
            default (also stated).
        seeds: seeds of the runs (``seed_everything``: initialisation, shuffling, method draws).
        tasks: the protocol's tasks as class sets, for the average accuracy of a run that trains
            them at once (joint) in the class and task scenarios; ``[]``: its task column.
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

    def __init__(self, methods: dict[str, list[str]], protocol: list[str] = ["split_mnist"],
                 scenarios: list[str] = ["class", "task"], domain_configs: list[str] = [],
                 tuned: dict[str, dict[str, str]] = {}, seeds: list[int] = [0, 1, 2, 3, 4],
                 tasks: list[list[int]] = [], overrides: dict[str, Any] = {},
                 data: Data = Data(), output: Output = Output(), title: str = "Split-MNIST",
                 keep_checkpoints: bool = False, pretrain: list[str] = [], pretrained_on: str = "remaining",
                 pretrain_overrides: dict[str, Any] = {}, report_only: bool = False) -> None:
        allowed = [*SCENARIOS, DOMAIN]
        bad = [s for s in scenarios if s not in allowed]
        if bad or not scenarios:
            raise ValueError(f"scenarios={scenarios} is not allowed: choose from {allowed}.")
        if not seeds or not methods:
            raise ValueError("seeds and methods must each name at least one entry.")
        for deltas in [protocol, pretrain, domain_configs, *methods.values()]:
            for name in deltas:
                config_path(name)  # an unknown method or protocol config fails here, before any run
        self.tuned: dict[tuple[str, str], Tuned] = {}
        for scenario, chosen in tuned.items():
            if scenario not in scenarios:
                raise ValueError(f"tuned: {scenario!r} is not allowed: name one of the scenarios {scenarios}.")
            for method, where in chosen.items():
                if method not in methods:
                    raise ValueError(f"tuned: {scenario}: {method!r} is not allowed: name one of the methods "
                                     f"{list(methods)}.")
                self.tuned[(scenario, method)] = Tuned.read(where, method, methods[method])
        if not data.download and not os.path.isdir(data.data_dir):
            raise FileNotFoundError(f"data.data_dir={os.path.abspath(data.data_dir)!r} does not exist (and data.download "
                                    "is false).")
        self.protocol, self.methods, self.scenarios, self.seeds = list(protocol), dict(methods), list(scenarios), list(seeds)
        self.domain_configs = list(domain_configs)
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

    def configs(self, run: Run) -> list[str]:
        """The run's ``--config`` list: protocol, scenario deltas, method deltas, tuned settings."""
        tuned = self.tuned.get((run.scenario, run.method))
        return [*self.protocol, *(self.domain_configs if run.scenario == DOMAIN else []), *self.methods[run.method],
                *([tuned.path] if tuned else [])]

    def settings(self, run: Run) -> dict[str, Any]:
        """What determines a run's result (not where files go), for the results store: a tuned
        run by the settings it was given, not by where its best.yaml lies."""
        tuned = self.tuned.get((run.scenario, run.method))
        configs = self.configs(run)[:-1] if tuned else self.configs(run)
        return {"configs": configs, "scenario": run.scenario, "seed": run.seed,
                "overrides": self.overrides, "quick": self.output.quick, "trainer_args": self.output.trainer_args,
                "pretrain": {"configs": self.pretrain, "overrides": self.pretrain_overrides,
                             "on": self.pretrained_on} if self.pretrain else None,
                **({"tuned": yaml.safe_load(Path(tuned.path).read_text())} if tuned else {})}

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
            fitted = self.fit(self.configs(run), run.name, run.seed,
                              {"model.scenario": "class" if run.scenario == DOMAIN else run.scenario, **init})
            seconds = time.perf_counter() - start
            schedule = next(c for c in fitted.trainer.callbacks if isinstance(c, SequentialFineTuning))
            evaluation = next(c for c in fitted.trainer.callbacks if isinstance(c, PhaseEvaluation))
            if schedule.epoch != schedule.ends[-1]:  # e.g. stopped by a signal: never record a cut-short run
                raise RuntimeError(f"{run.name} stopped at epoch {schedule.epoch} of {schedule.ends[-1]}; not recorded.")
            if not self.keep_checkpoints:
                shutil.rmtree(fitted.run_dir / "checkpoints", ignore_errors=True)
            return ({"method": run.method, "scenario": run.scenario, "seed": run.seed, "seconds": seconds,
                     "rows": list(evaluation.rows.values()), **task_record(fitted.run_dir)}, fitted.run_dir, seconds)

        result = reuse_or_run(engine, "continual", run.name, self.settings(run), train)
        if "task_matrix" not in result:  # stored without it: the run's own files, if they are still there
            folder = Path(self.runs_dir) / run.name / "version_0"
            try:
                result |= task_record(folder)
            except FileNotFoundError:
                raise ValueError(f"continual run {run.name!r} is stored without its task accuracies and {folder} "
                                 "is gone: delete its row of results.db to re-run it.") from None
        return result | score(result, run.scenario, self.tasks, result["rows"])

    # -- the table and the plot ------------------------------------------------------------------

    def write(self, results: list[dict], seconds: float) -> dict:
        header = ["scenario", "method", "seeds", *(f"{m}_mean" for m in METRICS), *(f"{m}_std" for m in METRICS),
                  "seconds_per_run", "settings", "chosen_by"]
        table, summary = [], {}
        for scenario in self.scenarios:
            for method in self.methods:
                runs = [r for r in results if r["method"] == method and r["scenario"] == scenario]
                if not runs:
                    continue
                spread = {m: mean_std(r[m] for r in runs) for m in METRICS}
                summary[(scenario, method)] = {"values": {m: [r[m] for r in runs] for m in METRICS}, "runs": runs}
                table.append([scenario, method, len(runs), *(spread[m][0] for m in METRICS),
                              *(spread[m][1] for m in METRICS), float(np.median([r["seconds"] for r in runs])),
                              *self.setting(scenario, method)])
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

    def setting(self, scenario: str, method: str) -> tuple[str, str]:
        """The method's settings in this scenario and what chose them: the values ``music tune``
        found and its budget, or the shipped default."""
        tuned = self.tuned.get((scenario, method))
        if tuned is None:
            return "shipped default", "–"
        return tuned.describe(), f"music tune ({tuned.budget}; {tuned.shown})"

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
        run_seconds = [r["seconds"] for r in results]
        lines = [f"# {self.title}", "",
                 f"Protocol: `music fit` with `{' '.join('--config ' + c for c in self.protocol)}`"
                 + (f" (domain-incremental: also `{' '.join('--config ' + c for c in self.domain_configs)}`)"
                    if DOMAIN in self.scenarios and self.domain_configs else "")
                 + (f" and overrides `{_flags(self.overrides)}`" if self.overrides else "")
                 + (f", starting from a model pretrained once per seed with `{' '.join('--config ' + c for c in self.pretrain)}"
                    f"{' ' + _flags(self.pretrain_overrides) if self.pretrain_overrides else ''}` (the methods take "
                    f"its split `{self.pretrained_on}` as task 0)" if self.pretrain else "")
                 + (f"; tasks {self.tasks}" if self.tasks else "") + ". Each method adds its config delta "
                 + ", ".join(f"{m}: `{' '.join(d) or '(none)'}`" for m, d in self.methods.items()) + ".",
                 "",
                 f"Seeds {self.seeds}; {spread_note(len(e['runs']) for e in summary.values())}, in % "
                 "(accuracy points for BWT, forgetting and "
                 "FWT), from each run's task accuracies (the task columns of its accuracy_matrix.csv: every task "
                 "scored on its own test set). Test accuracy: the final model on the whole test set (every class, in "
                 "the task scenario with each sample's task known; in the domain scenario, whose plain test set is no "
                 "task's, the average accuracy). Average accuracy: final test accuracy averaged over the tasks; BWT and forgetting "
                 "over the tasks before the last (negative BWT is forgetting); FWT: accuracy on a task just "
                 "before it is trained minus that of the model before the first task (untrained, or pretrained); average incremental accuracy: the mean over "
                 "tasks of the average accuracy on the tasks so far. Joint (and merged) train on all tasks at "
                 "once, so only their final accuracies are defined (in the domain scenario its average accuracy "
                 "is that on the tasks' test sets pooled).", ""]
        missing = len(self.runs()) - len(results)
        if missing:
            lines += [f"**Incomplete:** {missing} of the {len(self.runs())} configured runs were not run; the "
                      "`seeds` column gives each row's number of seeds (the first seeds of the list).", ""]
        versus = self.versus_baseline(summary)
        for scenario in self.scenarios:
            rows = [[method, len(entry["runs"]), *(fmt_mean_std(entry["values"][m], 1, 100) for m in METRICS),
                     f"{np.median([r['seconds'] for r in entry['runs']]):.0f}"]
                    for method in self.methods if (entry := summary.get((scenario, method)))]
            settings = [[method, *self.setting(scenario, method)] for method in self.methods
                        if (scenario, method) in summary]
            lines += [f"## {SCENARIO_NAMES[scenario]}", "",
                      markdown_table(["method", "seeds", "test accuracy (all classes)", "average accuracy", "BWT",
                                      "forgetting", "FWT", "average incremental accuracy", "s / run"], rows), "",
                      "Hyperparameters of each method in this scenario (`music tune`: chosen on the validation split, "
                      "never the test set):", "",
                      markdown_table(["method", "settings", "chosen by"], settings), ""]
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
                  "", "Generated by `music continual`; per-run results (task accuracies and confusion matrices per evaluation) are in "
                  f"`{self.runs_dir}/results.db` (table `experiment_runs`) on the machine that ran them, every run's "
                  f"metrics in `{self.name}_runs.csv`, the paired comparisons in `{self.name}_paired.csv`.", ""]
        return "\n".join(lines)

    def plot(self, summary: dict) -> None:
        plt = pyplot()
        fig, axes = plt.subplots(1, len(self.scenarios), figsize=(5.5 * len(self.scenarios), 4), squeeze=False)
        for ax, scenario in zip(axes[0], self.scenarios):
            x = np.arange(1, max((len(r["accuracy_after_task"]) for entry in summary.values() for r in entry["runs"]),
                                 default=1) + 1)
            for method in self.methods:
                if (scenario, method) not in summary:
                    continue
                curves = np.array([r["accuracy_after_task"] for r in summary[(scenario, method)]["runs"]], dtype=float)
                mean, std = mean_std_columns(curves)
                if len(mean) == 1:  # joint: one final value, drawn as a line
                    ax.axhline(100 * mean[-1], color="grey", linestyle="--", label=method)
                    continue
                ax.errorbar(x, 100 * mean, 100 * std, marker="o", capsize=3, label=method)
            ax.set(title=f"{scenario}-incremental", xlabel="tasks learned",
                   ylabel="average accuracy on them (%, mean ± sample std)",
                   xticks=x, ylim=(0, 101))
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8, loc="lower left")
        save_figure(fig, self.table + ".png", 120)


def _number(text: str) -> Any:
    """A value of tune.csv as the number (or text) it is."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _cell(value: Any) -> Any:
    """A CSV cell: undefined (None, NaN) as empty."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _flags(overrides: dict[str, Any]) -> str:
    """Settings as the command-line flags they stand for, for the table's protocol line."""
    return " ".join(f"--{key} {value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items())
