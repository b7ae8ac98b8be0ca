"""``music continual``: continual-learning methods × scenarios × seeds on one protocol.

Every run is an ordinary ``music fit`` of shipped configs: the protocol (e.g. ``split_mnist``),
one method delta (``ewc``, ``si``, ...; none for naive fine-tuning) and ``--model.scenario``.
The experiment reads each run's test confusion matrices (one per phase, plus the initial
evaluation), scores them on the protocol's tasks and writes one table (Markdown + CSV) of
mean ± std over seeds and a plot of the average accuracy over the tasks so far.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from music.callbacks import SequentialFineTuning
from music.continual import accuracy_on, average_incremental_accuracy, backward_transfer, forward_transfer
from music.evaluation import PhaseEvaluation
from music.experiments.common import Data, machine

SPLIT_MNIST_METHODS = {"None": [], "Joint": ["split_mnist_joint"], "EWC": ["ewc"], "Online EWC": ["online_ewc"],
                       "SI": ["si"], "LwF": ["lwf"], "Replay (100/class)": ["replay"]}
METRICS = ("final_accuracy", "average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "average_incremental_accuracy")


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
        overrides: more ``music fit`` arguments for every run (e.g. a shorter protocol); the
            table lists them, so a deviation from the protocol is stated where it is reported.
        data: where the dataset is (``--data.data_dir``), as for every experiment.
        runs_dir: where the runs' logs go; a run whose ``result.json`` exists is not run again.
        output: the table's path without suffix (``.md``, ``.csv``, ``.png`` are written).
        title: the table's heading.
        threads: torch threads.
        keep_checkpoints: keep each run's checkpoints (they are deleted once scored otherwise).
        pretrain: configs of a pretraining run made once per seed; every run then starts from its
            final weights (``--model.init_from``) and its methods take the pretraining split as
            task 0 (``--model.pretrained_on``). ``[]``: the runs start from scratch.
        pretrained_on: the split ``pretrain`` trains on.
        pretrain_overrides: more ``music fit`` arguments for the pretraining runs only.
        report_only: run nothing; write the table from the runs already done (each row states
            its number of seeds).
    """

    def __init__(self, protocol: list[str] = ["split_mnist"], methods: dict[str, list[str]] = SPLIT_MNIST_METHODS,
                 scenarios: list[str] = ["class", "task"], seeds: list[int] = [0, 1, 2, 3, 4],
                 tasks: list[list[int]] = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], overrides: list[str] = [],
                 data: Data = Data(), runs_dir: str = "runs/continual", output: str = "results/split_mnist",
                 title: str = "Split-MNIST", threads: int = 1, keep_checkpoints: bool = False,
                 pretrain: list[str] = [], pretrained_on: str = "remaining", pretrain_overrides: list[str] = [],
                 report_only: bool = False) -> None:
        from music.module import SCENARIOS

        bad = [s for s in scenarios if s not in SCENARIOS]
        if bad or not scenarios:
            raise ValueError(f"scenarios={scenarios} is not allowed: choose from {list(SCENARIOS)}.")
        if not seeds or not methods or not tasks:
            raise ValueError("seeds, methods and tasks must each name at least one entry.")
        from music.cli import _config_path

        for deltas in [protocol, pretrain, *methods.values()]:
            for name in deltas:
                _config_path(name)  # an unknown method or protocol config fails here, before any run
        if not data.download and not os.path.isdir(data.data_dir):
            raise FileNotFoundError(f"data.data_dir={os.path.abspath(data.data_dir)!r} does not exist (and data.download "
                                    "is false).")
        self.protocol, self.methods, self.scenarios, self.seeds = list(protocol), dict(methods), list(scenarios), list(seeds)
        self.tasks, self.overrides, self.data, self.runs_dir = tasks, list(overrides), data, runs_dir
        self.output, self.title, self.threads, self.keep_checkpoints = output, title, threads, keep_checkpoints
        self.pretrain, self.pretrained_on, self.pretrain_overrides = list(pretrain), pretrained_on, list(pretrain_overrides)
        self.report_only = report_only

    def runs(self) -> list[Run]:
        return [Run(m, s, seed) for seed in self.seeds for s in self.scenarios for m in self.methods]

    def run(self) -> dict:
        torch.set_num_threads(self.threads)
        started = time.perf_counter()
        results = [self.run_one(run) for run in self.runs()
                   if not self.report_only or os.path.exists(os.path.join(self.runs_dir, run.name, "result.json"))]
        return self.write(results, time.perf_counter() - started)

    def fit(self, configs: list[str], name: str, seed: int, *extra: str):
        from music.cli import lightning

        args = ["fit", *(a for c in configs for a in ("--config", c)), "--seed_everything", str(seed),
                "--data.data_dir", self.data.data_dir, "--data.download", str(self.data.download).lower(),
                "--trainer.logger.init_args.save_dir", self.runs_dir, "--trainer.logger.init_args.name", name,
                "--trainer.logger.init_args.version", "0", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", *self.overrides, *extra]
        print(f"[continual] {name}", flush=True)
        return lightning(args)

    def pretrained(self, seed: int) -> list[str]:
        """``--model.init_from`` and ``--model.pretrained_on`` of the pretrained model of
        ``seed`` (trained on first use), or nothing when there is no pretraining."""
        if not self.pretrain:
            return []
        path = os.path.join(self.runs_dir, f"pretrain-seed{seed}", "weights.pt")
        if not os.path.exists(path):
            cli = self.fit(self.pretrain, f"pretrain-seed{seed}", seed, *self.pretrain_overrides)
            torch.save(cli.model.backbone.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
            shutil.rmtree(os.path.join(cli.trainer.log_dir, "checkpoints"), ignore_errors=True)
        return ["--model.init_from", path, "--model.pretrained_on", self.pretrained_on]

    def run_one(self, run: Run) -> dict:
        path = os.path.join(self.runs_dir, run.name, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
            return result | score(result["rows"], self.tasks)  # scored anew from the stored evaluations
        init = self.pretrained(run.seed)
        start = time.perf_counter()
        cli = self.fit([*self.protocol, *self.methods[run.method]], run.name, run.seed, "--model.scenario", run.scenario,
                       *init)
        seconds = time.perf_counter() - start
        schedule = next(c for c in cli.trainer.callbacks if isinstance(c, SequentialFineTuning))
        evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, PhaseEvaluation))
        if schedule.epoch != schedule.ends[-1]:  # e.g. stopped by a signal: never record a cut-short run
            raise RuntimeError(f"{run.name} stopped at epoch {schedule.epoch} of {schedule.ends[-1]}; not recorded.")
        rows = list(evaluation.rows.values())
        result = {"method": run.method, "scenario": run.scenario, "seed": run.seed, "seconds": seconds,
                  "rows": rows, "row_names": list(evaluation.rows)} | score(rows, self.tasks)
        if not self.keep_checkpoints:
            shutil.rmtree(os.path.join(cli.trainer.log_dir, "checkpoints"), ignore_errors=True)
        from music.checkpoint import write_atomically

        write_atomically(path, json.dumps(result))
        return result

    # -- the table and the plot ------------------------------------------------------------------

    def write(self, results: list[dict], seconds: float) -> dict:
        from music.checkpoint import write_atomically

        os.makedirs(os.path.dirname(self.output) or ".", exist_ok=True)
        header = ["scenario", "method", "seeds", *(f"{m}_mean" for m in METRICS), *(f"{m}_std" for m in METRICS),
                  "seconds_per_run"]
        table, summary = [], {}
        for scenario in self.scenarios:
            for method in self.methods:
                runs = [r for r in results if r["method"] == method and r["scenario"] == scenario]
                if not runs:
                    continue
                values = {m: np.array([r[m] for r in runs], dtype=float) for m in METRICS}
                mean = {m: float(np.mean(v)) if not np.isnan(v).all() else math.nan for m, v in values.items()}
                std = {m: float(np.std(v)) if not np.isnan(v).all() else math.nan for m, v in values.items()}
                summary[(scenario, method)] = {"mean": mean, "std": std, "runs": runs}
                table.append([scenario, method, len(runs), *(mean[m] for m in METRICS), *(std[m] for m in METRICS),
                              float(np.median([r["seconds"] for r in runs]))])
        rows = [header] + [[f"{v:.4f}" if isinstance(v, float) else v for v in row] for row in table]
        text = "\n".join(",".join(str(v) for v in row) for row in rows) + "\n"
        write_atomically(self.output + ".csv", text)
        write_atomically(self.output + ".md", self.markdown(summary, results, seconds))
        self.plot(summary)
        print(f"[continual] wrote {self.output}.md/.csv/.png", flush=True)
        return {"table": table, "seconds": seconds}

    def markdown(self, summary: dict, results: list[dict], seconds: float) -> str:
        def cell(entry: dict, metric: str) -> str:
            mean, std = entry["mean"][metric], entry["std"][metric]
            return "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"

        names = {"class": "Class-incremental", "task": "Task-incremental"}
        run_seconds = [r["seconds"] for r in results]
        lines = [f"# {self.title}", "",
                 f"Protocol: `music fit` with `{' '.join('--config ' + c for c in self.protocol)}`"
                 + (f" and overrides `{' '.join(self.overrides)}`" if self.overrides else "")
                 + (f", starting from a model pretrained once per seed with `{' '.join('--config ' + c for c in self.pretrain)}"
                    f"{' ' + ' '.join(self.pretrain_overrides) if self.pretrain_overrides else ''}` (the methods take "
                    f"its split `{self.pretrained_on}` as task 0)" if self.pretrain else "")
                 + f"; tasks {self.tasks}. Each method adds its config delta "
                 + ", ".join(f"{m}: `{' '.join(d) or '(none)'}`" for m, d in self.methods.items()) + ".",
                 "",
                 f"Seeds {self.seeds}; mean ± std over seeds, in % (accuracy points for BWT, forgetting and "
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
        for scenario in self.scenarios:
            lines += [f"## {names[scenario]}", "",
                      "| method | seeds | test accuracy (all classes) | average accuracy | BWT | forgetting | FWT | "
                      "average incremental accuracy | s / run |", "|---|---|---|---|---|---|---|---|---|"]
            for method in self.methods:
                if (scenario, method) not in summary:
                    continue
                entry = summary[(scenario, method)]
                median = np.median([r["seconds"] for r in entry["runs"]])
                lines.append(f"| {method} | {len(entry['runs'])} | " + " | ".join(cell(entry, m) for m in METRICS) + f" | {median:.0f} |")
            lines.append("")
        lines += [f"![average accuracy on the tasks so far]({os.path.basename(self.output)}.png)", "",
                  f"Machine: {machine(self.threads)}. {len(results)} runs, "
                  f"{sum(run_seconds) / 60:.1f} min of run time in all (median {np.median(run_seconds):.0f} s a run); "
                  f"this invocation took {seconds / 60:.1f} min (runs already done are read back, not re-run).",
                  "s / run is the median wall time of a run: jobs sharing the machine slow it, so it is no speed "
                  "measurement (`docs/speed.md` has those).",
                  "", "Generated by `music continual`; per-run results (confusion matrices per evaluation) go to "
                  f"`{self.runs_dir}/<run>/result.json` on the machine that ran them.", ""]
        return "\n".join(lines)

    def plot(self, summary: dict) -> None:
        from music.plots import pyplot

        plt = pyplot()
        fig, axes = plt.subplots(1, len(self.scenarios), figsize=(5.5 * len(self.scenarios), 4), squeeze=False)
        x = np.arange(1, len(self.tasks) + 1)
        for ax, scenario in zip(axes[0], self.scenarios):
            for method in self.methods:
                if (scenario, method) not in summary:
                    continue
                curves = np.array([r["accuracy_after_task"] for r in summary[(scenario, method)]["runs"]], dtype=float)
                mean, std = curves.mean(0), curves.std(0)
                if np.isnan(mean[:-1]).all():  # joint: one final value, drawn as a line
                    ax.axhline(100 * mean[-1], color="grey", linestyle="--", label=method)
                    continue
                ax.errorbar(x, 100 * mean, 100 * std, marker="o", capsize=3, label=method)
            ax.set(title=f"{scenario}-incremental", xlabel="tasks learned", ylabel="average accuracy on them (%)",
                   xticks=x, ylim=(0, 101))
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        fig.savefig(self.output + ".png", dpi=120)
        plt.close(fig)
