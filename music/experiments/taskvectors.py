"""The task-vector studies: transfer to a similar model, addition of per-class vectors, negation.

Every model is a ``music fit`` of a shipped config (``pretrain``, ``merged_finetune``,
``seq_finetune``) and every edit is a shipped merge recipe (``merge_*.yaml``) run by the same
code as ``music merge``: this experiment only trains the stages the recipes name and collects
their tables into ``task_vectors.md`` (``Output.tables``).

Stages (``<output.root>/taskvectors/stages/<name>.safetensors``) follow the experiments' one
reuse rule (``common.reuse_or_run``, the results store ``<output.root>/taskvectors/results.db``):
a stage stored with the same settings is reused, one with other settings is refused, so a stale
model never feeds a new study. A stored stage whose file is gone is refused too, rather than
retrained: the stages fine-tuned from it would no longer match it.

- ``pretrained`` (A): ``pretrain``; ``similar_seed`` (B): ``pretrain`` from ``similar_seed``;
- ``similar_further`` (B'): A trained ``further_epochs`` more on ``remaining`` from ``similar_seed``;
- ``finetuned_merged``: ``merged_finetune`` from A; ``finetuned_class_<c>``: the same on
  ``class_<c>`` alone; ``sequential``: ``seq_finetune`` from A (the last phase's weights).

All of them and every recipe use the same ``val_size``, so ``val`` (where λ is chosen) is
never trained on, and the test set is used only after λ is chosen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from sqlalchemy.engine import Engine

from music.checkpoint import write_atomically
from music.config import BASE_CONFIG, resolve_configs, shipped_config
from music.experiments import instantiate, parser_for
from music.experiments.common import Data, Output, results_db, reuse_or_run
from music.experiments.merge import Evaluation, Merge
from music.experiments.task_vector_report import write_analysis_section
from music.runner import lightning, phase_metrics, run_dir
from music.task_vector import TaskVector

RECIPES = ["merge/addition_sum", "merge/addition_ties", "merge/addition_dare", "merge/negation_3", "merge/negation_4",
           "merge/negation_7", "merge/transfer_further", "merge/transfer_seed"]


class TaskVectors:
    """Trains the models of the task-vector studies, then runs their merge recipes.

    Args:
        data: where the dataset is.
        val_size: samples carved from the training data for ``val``, where λ is chosen; the
            same for every stage and recipe.
        held_out_classes: the classes with a per-class fine-tuning (``finetuned_class_<c>``).
        similar_seed: the random seed of the similar models (B pretrained independently, and B' trained further).
        further_epochs: the epochs B' trains A further on ``remaining``.
        pretrain_epochs: epochs of the pretraining phases (``null``: as the shipped config says).
        finetune_epochs: epochs of every fine-tuning phase (``null``: as the shipped configs say).
        recipes: the merge recipes run after training (shipped names or paths), paths in them
            relative to ``<output.root>/taskvectors``.
        output: runs (stages, their training logs and the merge outputs go to
            ``<root>/taskvectors``), results (``task_vectors.md``, its CSVs and PNGs), torch
            threads, smoke mode, extra ``music fit`` arguments for every stage.
    """

    def __init__(
        self,
        data: Data = Data(),
        val_size: int = 5000,
        held_out_classes: list[int] = [3, 4, 7],
        similar_seed: int = 1,
        further_epochs: int = 10,
        pretrain_epochs: int | None = None,
        finetune_epochs: int | None = None,
        recipes: list[str] = RECIPES,
        output: Output = Output(),
    ) -> None:
        if val_size < 1:
            raise ValueError(f"val_size={val_size} is not allowed: λ is chosen on `val`, so it needs val_size >= 1.")
        for name, value in (("further_epochs", further_epochs), ("pretrain_epochs", pretrain_epochs),
                            ("finetune_epochs", finetune_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} is not allowed: it must be an integer >= 1.")
        if not recipes:
            raise ValueError("recipes is empty: name at least one merge recipe.")
        self.data, self.val_size, self.held_out = data, val_size, list(held_out_classes)
        self.similar_seed, self.further_epochs, self.output = similar_seed, further_epochs, output
        self.pretrain_epochs, self.finetune_epochs = pretrain_epochs, finetune_epochs
        quick = ["--trainer.limit_train_batches", "5"] if output.quick else []
        self.recipes, self.fit_args = list(recipes), [*quick, *(str(a) for a in output.trainer_args)]
        self.work_dir, self.out_dir, self.threads = output.folder("taskvectors"), output.tables("taskvectors"), output.threads
        self.trained: list[str] = []

    # -- stages -------------------------------------------------------------------------------

    def data_args(self) -> list[str]:
        return ["--data.data_dir", self.data.data_dir, "--data.download", str(self.data.download).lower(), "--data.val_size", str(self.val_size),
                "--data.held_out_classes", json.dumps(self.held_out)]

    def phases(self, config: str, epochs: int | None, split: str | None = None, name: str | None = None) -> list[str]:
        """``--schedule.phases`` of a shipped config with its epochs (and split) replaced, if asked."""
        if epochs is None and split is None:
            return []
        phases = [p | ({"epochs": epochs} if epochs is not None else {})
                  | ({"split": split, "name": name or split} if split is not None else {}) for p in _shipped_phases(config)]
        return ["--schedule.phases", json.dumps(phases)]

    def stage(self, engine: Engine, name: str, args: list[str]) -> Path:
        """One stage's network weights as a safetensors file, from the results store or from
        fitting it; what decides the stage (its fit arguments: configs, seed, epochs, the stage
        it starts from; the data; smoke mode; extra arguments) is its settings, so changing any
        of them refuses a stored stage instead of feeding a stale model to the study."""
        path = self.work_dir / "stages" / f"{name}.safetensors"
        settings = {"args": args, "data": self.data_args(), "quick": self.output.quick,
                    "trainer_args": [str(a) for a in self.output.trainer_args]}

        def train() -> tuple[dict[str, Any], Path, float]:
            start = time.perf_counter()
            logs = ["--trainer.logger.init_args.save_dir", str(self.work_dir / "logs"),
                    "--trainer.logger.init_args.name", name, "--trainer.enable_progress_bar", "false",
                    "--trainer.enable_model_summary", "false", "--data.log_eda", "false"]
            cli = lightning(["fit", *args, *self.data_args(), *self.fit_args, *logs])
            state = {k: v.detach().cpu().contiguous() for k, v in cli.model.backbone.state_dict().items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, f"{path}.tmp", metadata={"format": "pt"})
            os.replace(f"{path}.tmp", path)  # a killed run leaves no half-written stage behind
            folder = Path(run_dir(cli.trainer))
            phases = phase_metrics(folder) if (folder / "phase_metrics.json").exists() else {}
            seconds = time.perf_counter() - start
            print(f"[taskvectors] trained {name} in {seconds:.0f} s")
            self.trained.append(name)
            test = list(phases.values())[-1] if phases else {}
            return {"path": str(path.resolve()), "test": test}, folder, seconds

        stored = Path(reuse_or_run(engine, "taskvectors", name, settings, train)["path"])
        if not stored.exists():
            raise ValueError(f"taskvectors stage {name!r} is stored in {engine.url} but its file {stored} is gone: "
                             "delete its row (and the stages trained from it) or choose another output.root to retrain it.")
        return stored

    def stages(self) -> dict[str, list[str]]:
        """Every stage's ``music fit`` arguments (``--model.init_from`` names the stage it starts from)."""
        pretrained = str(self.work_dir / "stages" / "pretrained.safetensors")
        pre, init = ["--config", "pretrain"], ["--model.init_from", pretrained]
        ft = ["--config", "merged_finetune", *init]
        stages = {
            "pretrained": [*pre, *self.phases("pretrain", self.pretrain_epochs)],
            "similar_seed": [*pre, *self.phases("pretrain", self.pretrain_epochs), "--seed_everything", str(self.similar_seed)],
            "similar_further": [*pre, *init, *self.phases("pretrain", self.further_epochs, "remaining", "further"),
                                "--seed_everything", str(self.similar_seed)],
            "finetuned_merged": [*ft, *self.phases("merged_finetune", self.finetune_epochs)],
        }
        for c in self.held_out:
            stages[f"finetuned_class_{c}"] = [*ft, *self.phases("merged_finetune", self.finetune_epochs, f"class_{c}")]
        stages["sequential"] = ["--config", "seq_finetune", *init, *self.phases("seq_finetune", self.finetune_epochs)]
        return stages

    def needed(self, recipes: list[str] | None = None) -> list[str]:
        """The stages ``recipes`` (default: all) read, and the pretrained model the others start
        from, in training order."""
        named = set()
        for recipe in self.recipes if recipes is None else recipes:
            text = Path(resolve_configs(["--config", recipe])[1]).read_text()
            named |= {name for name in self.stages() if f"stages/{name}.safetensors" in text}
        if not named <= {"pretrained", "similar_seed"}:
            named.add("pretrained")
        return [name for name in self.stages() if name in named]

    def train(self, recipes: list[str] | None = None) -> None:
        stages, engine = self.stages(), results_db(self.output, "taskvectors")
        for name in self.needed(recipes):
            self.stage(engine, name, stages[name])

    # -- recipes ------------------------------------------------------------------------------

    def merge(self, recipe: str) -> dict[str, Any]:
        """Run one recipe as ``music merge`` would, its paths under the work dir and its
        evaluation on this study's data."""
        parser, _ = parser_for("merge")
        init = instantiate(parser, parser.parse_path(resolve_configs(["--config", recipe])[1]))
        evaluate = init["evaluate"] or Evaluation()
        init |= {"root": str(self.work_dir), "overwrite": True,
                 "evaluate": dataclasses.replace(evaluate, args=[*evaluate.args, *self.data_args()])}
        merge = Merge(**init)
        result = merge.run()
        merge.evaluator.release()  # the next recipe builds its own; keep only the log
        return {"merge": merge, **result}

    def run(self) -> dict[str, Any]:
        """Recipe by recipe: train the stages it reads (if not done), run it, rewrite the tables
        (so a long run shows its results as they come)."""
        torch.set_num_threads(self.threads)
        start, train_seconds, results = time.perf_counter(), 0.0, {}
        for recipe in self.recipes:
            started = time.perf_counter()
            self.train([recipe])
            train_seconds += time.perf_counter() - started
            results[Path(recipe).name.removesuffix(".yaml")] = self.merge(recipe)
            self.write(results, train_seconds, time.perf_counter() - start)
        return results

    # -- output -------------------------------------------------------------------------------

    def write(self, results: dict[str, dict], train_seconds: float, seconds: float) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pct = lambda v: "" if v is None or v != v else f"{100 * v:.1f}"  # noqa: E731
        held = self.held_out
        lines = ["# Task vectors: transfer, addition, negation (as measured)", "",
                 f"MNIST with classes {', '.join(map(str, held))} partly held out (the shipped `pretrain` data), "
                 f"`val` = {self.val_size} training samples never trained on; λ is chosen on `val`, the test set "
                 "(10,000 images) is evaluated only after the choice. Stages are `music fit` runs of the shipped "
                 f"configs (`pretrain`, `merged_finetune`, `seq_finetune`; pretraining epochs "
                 f"{self.pretrain_epochs or _shipped_epochs('pretrain')}, fine-tuning epochs "
                 f"{self.finetune_epochs or _shipped_epochs('merged_finetune')}), B = pretrained from seed "
                 f"{self.similar_seed}, B' = A trained {self.further_epochs} more epochs on `remaining` (seed "
                 f"{self.similar_seed}); extra fit arguments: {self.fit_args or 'none'}. Every edit is a shipped "
                 "recipe (`music merge --config <recipe>`). Machine: "
                 f"{os.cpu_count()} CPU cores, {self.threads} torch thread(s); trained this run: "
                 f"{self.trained or 'nothing (all stages reused)'}; training {train_seconds:.0f} s, total {seconds:.0f} s. "
                 "Accuracies in %.", "",
                 "## Summary (test set)", "",
                 "Target classes: the held-out classes (transfer, addition) or the negated class (negation); "
                 "base = the model the recipe edits (λ = 0).", "",
                 "| recipe | method | λ (chosen on val) | target classes: base → edited | other classes: base → edited "
                 "| overall: base → edited |", "|---|---|---|---|---|---|"]
        for name, r in results.items():
            base = next(v for k, v in r["tables"].items() if k.startswith("base ("))["test"]
            edited = r["tables"]["edited"]["test"]
            target = r["merge"].evaluation.forget or held
            others = [c for c in range(len(edited["per_class"])) if c not in target]
            lines.append(f"| {name} | {r['method']} | {r['lambda']:g} | {pct(_mean(base, target))} → "
                         f"{pct(_mean(edited, target))} | {pct(_mean(base, others))} → {pct(_mean(edited, others))} | "
                         f"{pct(base['acc'])} → {pct(edited['acc'])} |")
        for name, r in results.items():
            merge = r["merge"]
            stem = f"task_vectors_{name.removeprefix('merge_')}"
            shutil.copyfile(merge.side_path(".classes.csv"), self.out_dir / f"{stem}.csv")
            if r["curve"]:
                shutil.copyfile(merge.side_path(".lambda.csv"), self.out_dir / f"{stem}_lambda.csv")
                shutil.copyfile(merge.side_path(".lambda.png"), self.out_dir / f"{stem}_lambda.png")
            lines += ["", f"## {name}", "", _description(name), ""]
            lines += merge.markdown(r).split("\n")[2:]
            lines += [f"CSVs: `{stem}.csv` (every model, `val` and test), `{stem}_lambda.csv`; "
                      f"curve: `{stem}_lambda.png`."]
        if vectors := self.task_vectors():
            lines += ["", write_analysis_section(vectors, self.out_dir, "task_vectors_analysis")]
        write_atomically(self.out_dir / "task_vectors.md", "\n".join(lines) + "\n")


    def task_vectors(self) -> dict[str, TaskVector]:
        """τ = stage − pretrained of every trained stage that starts from the pretrained model (A)."""
        folder = self.work_dir / "stages"
        pretrained = folder / "pretrained.safetensors"
        starts = {name: args[args.index("--model.init_from") + 1] for name, args in self.stages().items()
                  if "--model.init_from" in args}
        return {name: TaskVector.from_checkpoints(pretrained, folder / f"{name}.safetensors")
                for name, start in starts.items()
                if start == str(pretrained) and pretrained.exists() and (folder / f"{name}.safetensors").exists()}


def _shipped_phases(config: str) -> list[dict[str, Any]]:
    """The phases ``config`` runs: its own ``schedule``, or ``base.yaml``'s it leaves in place."""
    for path in (shipped_config(config), BASE_CONFIG):
        schedule = (yaml.safe_load(path.read_text()) or {}).get("schedule")
        if schedule and "phases" in schedule:
            return schedule["phases"]
    raise ValueError(f"config {config!r} has no schedule.phases")


def _shipped_epochs(config: str) -> int:
    return _shipped_phases(config)[0]["epochs"]


def _mean(values: dict[str, Any], classes: list[int]) -> float:
    accs = [values["per_class"][c] for c in classes]
    return sum(accs) / len(accs)


def _description(name: str) -> str:
    try:
        text = shipped_config(name).read_text()
    except FileNotFoundError:
        return ""
    comment = [line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#")]
    return " ".join(line for line in comment if not line.startswith(("Paths are", "music merge", "`music")))
