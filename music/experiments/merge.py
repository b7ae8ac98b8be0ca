"""``music merge --config recipe.yaml``: a merge recipe run as an experiment.

The recipe (``music.merging.Recipe``: ``base``, ``models``, ``vectors``, ``method`` by class
path, ``include``/``exclude``, ``dtype``, ``output``) says what is merged; this command adds what
only an experiment can: ``lambda_`` as a grid chosen on a validation split (``evaluate``), never
on the test set, and the record of the run beside the output: the resolved recipe, the apply
report with fingerprints, the λ curve (CSV + PNG) and the per-class table of every model
involved, on the selection split and the test set.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from jsonargparse import lazy_instance
from torch import Tensor

from music.checkpoint import load_state_dict, write_atomically
from music.runner import lightning
from music.config import BASE_CONFIG
from music.continual import per_class_accuracy
from music.merging import MergeMethod, Recipe, Source, TaskArithmetic
from music.merging.checks import finite
from music.merging.recipe import plain
from music.plots import pyplot, save_figure

StateDict = dict[str, Tensor]


@dataclass
class Reference:
    """Another model evaluated beside the edit, for comparison (e.g. merged fine-tuning)."""

    name: str
    path: str


@dataclass
class Evaluation:
    """How the base, the sources and the edit are evaluated, and how λ is chosen.

    Args:
        configs: Lightning configs (shipped names or paths, over ``base.yaml``) whose ``model``
            (the network the weights load into) and ``data`` are used.
        args: further overrides in command-line form, e.g. ``[--data.data_dir, /data]``.
        select_on: the split λ is chosen on; it must be a split the data serves other than the
            test set (e.g. ``val``, which needs ``--data.val_size`` > 0).
        objective: ``accuracy``: the λ with the best accuracy on ``select_on`` (ties: the
            smallest |λ|). ``forget``: the λ with the lowest accuracy on the ``forget`` classes
            among those keeping the other classes' accuracy >= ``keep`` x the base's
            (Ilharco et al.'s negation protocol).
        forget: the classes to forget (``objective: forget``).
        keep: the share of the base's accuracy on the other classes that must be kept.
        references: more models evaluated beside the edit (not merged).
    """

    configs: list[str] = field(default_factory=lambda: ["pretrain"])
    args: list[str] = field(default_factory=list)
    select_on: str = "val"
    objective: Literal["accuracy", "forget"] = "accuracy"
    forget: list[int] = field(default_factory=list)
    keep: float = 0.95
    references: list[Reference] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.references = [r if isinstance(r, Reference) else Reference(**dict(r)) for r in self.references]

    def check(self) -> None:
        """Refuse settings that would choose λ on the test set or cannot choose at all."""
        if self.select_on == "test":
            raise ValueError("evaluate.select_on='test' is not allowed: λ is never chosen on the test set; "
                             "use 'val' (with --data.val_size > 0).")
        if self.objective == "forget" and not self.forget:
            raise ValueError("evaluate.objective='forget' needs evaluate.forget: the classes to forget.")
        if not 0 < self.keep <= 1:
            raise ValueError(f"evaluate.keep={self.keep} is not allowed: it must be in (0, 1].")


class SelectionError(RuntimeError):
    """The test set was requested while λ was being chosen."""


class Evaluator:
    """Loads weights into the configured network and evaluates them on a named split.

    Inside ``selecting()`` only the selection split (also under a domain: ``val@rot_45``) may
    be evaluated, so no code path can choose λ on the test set; ``log`` holds
    ``(split, selecting)`` for every evaluation.
    """

    def __init__(self, evaluation: Evaluation) -> None:
        args = ["--config", str(BASE_CONFIG)]
        for config in evaluation.configs:
            args += ["--config", config]
        args += [*map(str, evaluation.args), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
        evaluation.check()
        cli = lightning(args, run=False)
        self.model, self.datamodule = cli.model, cli.datamodule
        self.datamodule.setup()
        self.split = evaluation.select_on
        self.datamodule.check_split(self.split)
        self.model.to(cli.trainer.strategy.root_device)
        self.log: list[tuple[str, bool]] = []
        self._selecting = False

    def release(self) -> None:
        """Drop the network and the data (the log stays)."""
        self.model = self.datamodule = None

    @contextmanager
    def selecting(self) -> Iterator[None]:
        self._selecting = True
        try:
            yield
        finally:
            self._selecting = False

    def evaluate(self, state: Mapping[str, Tensor], split: str) -> dict[str, Any]:
        """Accuracy, loss and per-class accuracy (recall) of ``state`` on ``split``."""
        if self._selecting and split.partition("@")[0] != self.split:  # `val@<domain>`: val under a domain
            raise SelectionError(f"split {split!r} requested while choosing λ: only {self.split!r} may be used.")
        self.log.append((split, self._selecting))
        self.model.backbone.load_state_dict(dict(state))
        metrics, confusion = self.model.evaluate(self.datamodule.dataloader(split))
        return {"acc": metrics["acc"], "loss": metrics["loss"], "per_class": per_class_accuracy(confusion).tolist(),
                "confusion": confusion.tolist()}


class Merge:
    """Edit a base model with task vectors from fine-tuned models or saved vectors (a recipe).

    The output is a plain ``.safetensors`` state_dict, so ``music test|fit --model.init_from
    <output>`` takes it like any other model. Differences are computed in float64 and cast back
    to each base tensor's dtype (or ``dtype``), so one model with weight 1 and λ = 1 reproduces
    that model's float32 weights exactly; an edit that is not finite is refused.

    Args:
        base: the model to edit (``.safetensors``, ``.pt``/``.pth`` or Lightning ``.ckpt``).
        output: the edited model, a ``.safetensors`` file; the provenance files go beside it
            (``<stem>.recipe.yaml``, ``.report.json``, ``.lambda.csv/.png``, ``.md``, ``.classes.csv``).
        models: fine-tuned checkpoints; τ = θ_model − θ_base (or − θ of the entry's ``base``).
        vectors: saved task vectors (``TaskVector.save``); applied to ``base`` even if computed
            from other weights (reported: ``base_matches`` in the report).
        method: how the task vectors combine, by class path: ``music.merging.TaskArithmetic``
            (the default), ``music.merging.TIES``, ``music.merging.DARE`` (its ``combine`` a
            TaskArithmetic or TIES), or any ``music.merging.MergeMethod`` subclass.
        lambda_: the coefficient of the combined vector: a number, or a grid of numbers chosen
            on ``evaluate.select_on`` (needs ``evaluate``).
        include: glob patterns of the keys that are edited; the others are copied from the base.
        exclude: glob patterns of keys left unedited (e.g. ``fc3.*`` leaves a head out).
        dtype: the dtype of the output's floating tensors (default: each base tensor's).
        evaluate: how models are evaluated and λ chosen; ``null``: no evaluation.
        stream: hold about one tensor per input in memory (for models larger than RAM): takes
            ``.safetensors`` inputs, one λ and methods that need no whole-model statistics.
        overwrite: replace an existing ``output`` (refused otherwise).
        root: the folder relative paths in the recipe are resolved against (default: the
            working directory).
    """

    def __init__(
        self,
        base: str,
        output: str,
        models: list[Source] = [],
        vectors: list[Source] = [],
        method: MergeMethod = lazy_instance(TaskArithmetic),
        lambda_: float | list[float] = 1.0,
        include: list[str] = ["*"],
        exclude: list[str] = [],
        dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None,
        evaluate: Evaluation | None = None,
        stream: bool = False,
        overwrite: bool = False,
        root: str | None = None,
    ) -> None:
        grid = list(lambda_) if isinstance(lambda_, (list, tuple)) else [lambda_]
        if not grid:
            raise ValueError("lambda_=[] is not allowed: give a number or a non-empty list of numbers.")
        self.lambdas = [finite("lambda_", x) for x in grid]
        if len(set(self.lambdas)) < len(self.lambdas):
            raise ValueError(f"lambda_={grid} repeats a value: give distinct values.")
        self.is_grid = len(self.lambdas) > 1
        self.evaluation = evaluate if evaluate is None or isinstance(evaluate, Evaluation) else Evaluation(**dict(evaluate))
        if self.evaluation is not None:
            self.evaluation.check()
        if self.is_grid and self.evaluation is None:
            raise ValueError(f"lambda_={grid} is a grid but the recipe has no `evaluate` section: a grid is chosen "
                             "on a validation split; give `evaluate` or a single lambda_.")
        if stream and self.is_grid:
            raise ValueError(f"stream: true takes one lambda_, not the grid {self.lambdas}: choosing λ evaluates "
                             "every candidate in memory; choose it without stream, then stream the chosen value.")
        self.recipe = Recipe(base=base, output=output, models=list(models), vectors=list(vectors), method=method,
                             include=include, exclude=exclude, dtype=dtype, stream=stream, overwrite=overwrite, root=root)
        self.lambda_ = lambda_
        self.evaluator: Evaluator | None = None

    @property
    def output(self) -> Path:
        return self.recipe.output_path

    def side_path(self, suffix: str) -> Path:
        return self.recipe.side_path(suffix)

    def settings(self) -> dict[str, Any]:
        """The recipe as resolved: what ``<stem>.recipe.yaml`` holds."""
        return self.recipe.settings() | {"lambda_": self.lambda_,
                                         "evaluate": asdict(self.evaluation) if self.evaluation else None}

    # -- running ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        if self.evaluation is not None:
            self.evaluator = Evaluator(self.evaluation)
        curve, lam, updates = [], self.lambdas[0], None
        with self.recipe.open() as merger:
            if self.is_grid:
                updates = merger.updates()
                base = merger.base_state()
                lam, curve = self.choose(base, lambda x: merger.state(x, updates))
            written = self.recipe.write(merger, lam, updates, extra={"lambda_": self.lambda_})
        tables = self.tables() if self.evaluator is not None else {}
        result = written | {"grid": self.lambdas if self.is_grid else None, "curve": curve, "tables": tables,
                            "method": repr(self.recipe.method), "stream": self.recipe.stream,
                            "torch_threads": torch.get_num_threads(),
                            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}
        result["seconds"] = time.perf_counter() - start
        self._write_provenance(result)
        return result

    def choose(self, base: StateDict, edit) -> tuple[float, list[dict[str, Any]]]:
        """λ from the grid on the selection split (``edit(λ)`` is the edited state); the test
        curve is computed after the choice, for the record only."""
        evaluator, evaluation = self.evaluator, self.evaluation
        assert evaluator is not None and evaluation is not None
        split = evaluation.select_on
        with evaluator.selecting():
            values = {lam: evaluator.evaluate(edit(lam), split) for lam in self.lambdas}
            reference = evaluator.evaluate(base, split) if evaluation.objective == "forget" else None
        if evaluation.objective == "accuracy":
            chosen = best_lambda({lam: values[lam]["acc"] for lam in self.lambdas})
        else:
            n = len(reference["per_class"])
            others = [c for c in range(n) if c not in evaluation.forget]
            floor = evaluation.keep * mean_of(reference, others)
            allowed = [lam for lam in self.lambdas if mean_of(values[lam], others) >= floor]
            chosen = (min(allowed, key=lambda lam: (mean_of(values[lam], evaluation.forget), abs(lam))) if allowed
                      else max(self.lambdas, key=lambda lam: mean_of(values[lam], others)))
        curve = [{"lambda": lam, "split": split, "chosen": lam == chosen, **_summary(values[lam])} for lam in self.lambdas]
        for lam in self.lambdas:  # after the choice: reported, never used to choose
            curve.append({"lambda": lam, "split": "test", "chosen": lam == chosen,
                          **_summary(evaluator.evaluate(edit(lam), "test"))})
        return chosen, curve

    def tables(self) -> dict[str, dict]:
        """Per-class results on the selection split and the test set of every model involved:
        the base, each fine-tuned model, the references and the edit; with entries of their own
        base (transfer), those bases and models first: pretrained | fine-tuned | base | edited."""
        evaluator, recipe = self.evaluator, self.recipe
        assert evaluator is not None and self.evaluation is not None
        loaded: dict[Path, StateDict] = {}
        load = lambda path: loaded.setdefault(path, load_state_dict(path))  # noqa: E731
        own_bases: dict[str, StateDict] = {}  # transfer: the model each vector was computed from comes first
        fine_tuned: dict[str, StateDict] = {}
        for (name, entry), label in zip(recipe.named(), recipe.names()):
            if name.startswith("models"):
                if entry.base is not None:
                    own_bases.setdefault(Path(entry.base).name.split(".")[0], load(recipe.resolve(entry.base)))
                fine_tuned[label] = load(recipe.resolve(entry.path))
        recipe_base = {f"base ({recipe.base_path.name.split('.')[0]})": load(recipe.base_path)}
        models = ({**own_bases, **fine_tuned, **recipe_base} if own_bases else {**recipe_base, **fine_tuned})
        for ref in self.evaluation.references:
            models[ref.name] = load_state_dict(recipe.resolve(ref.path))
        models["edited"] = load_state_dict(self.output)
        splits = [self.evaluation.select_on, "test"]
        return {name: {split: evaluator.evaluate(state, split) for split in splits} for name, state in models.items()}

    # -- output -------------------------------------------------------------------------------

    def _write_provenance(self, result: dict[str, Any]) -> None:
        recipe = self.settings() | {"chosen_lambda": result["lambda"]}
        write_atomically(self.side_path(".recipe.yaml"),
                         "# The recipe as resolved by `music merge`; chosen_lambda is the λ it used.\n"
                         + yaml.safe_dump(plain(recipe), sort_keys=False))
        report = {k: v for k, v in result.items() if k not in ("tables", "curve")}
        if any(s["base_matches"] is False for s in result["sources"]):
            mismatched = [s["entry"] for s in result["sources"] if s["base_matches"] is False]
            report["note"] = (f"{', '.join(mismatched)} were computed from other weights than the base "
                              "(transfer, or a wrong checkpoint)")
        report["tables"] = {name: {split: {k: v for k, v in values.items() if k != "confusion"}
                                   for split, values in splits.items()} for name, splits in result["tables"].items()}
        write_atomically(self.side_path(".report.json"), json.dumps(plain(report), indent=1))
        if result["curve"]:
            write_atomically(self.side_path(".lambda.csv"), _csv(curve_rows(result["curve"])))
            self._plot_curve(result["curve"])
        if result["tables"]:
            write_atomically(self.side_path(".classes.csv"), _csv(class_rows(result["tables"])))
        write_atomically(self.side_path(".md"), self.markdown(result))

    def _plot_curve(self, curve: list[dict[str, Any]]) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in dict.fromkeys(r["split"] for r in curve):
            points = [r for r in curve if r["split"] == split]
            ax.plot([r["lambda"] for r in points], [100 * r["acc"] for r in points], marker="o", label=f"{split} accuracy")
            if self.evaluation.objective == "forget":
                ax.plot([r["lambda"] for r in points], [100 * mean_of(r, self.evaluation.forget) for r in points],
                        marker="x", linestyle="--", label=f"{split}: classes {self.evaluation.forget}")
        chosen = next(r["lambda"] for r in curve if r["chosen"])
        ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen λ = {chosen:g}")
        ax.set(xlabel="λ", ylabel="accuracy [%]", title=self.output.name)
        ax.legend()
        buffer = io.BytesIO()
        save_figure(fig, buffer, 100)
        write_atomically(self.side_path(".lambda.png"), buffer.getvalue())

    def markdown(self, result: dict[str, Any]) -> str:
        pct = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"  # noqa: E731
        recipe = self.recipe
        entries = ", ".join(f"{n} (weight {e.weight:g})" for n, (_, e) in zip(recipe.names(), recipe.named()))
        lam = (f"λ = {result['lambda']:g}, chosen on `{self.evaluation.select_on}` from {self.lambdas} "
               f"({self.evaluation.objective})" if self.is_grid else f"λ = {result['lambda']:g}")
        lines = [f"# {self.output.name}", "",
                 f"`{result['method']}` of {entries} added to `{recipe.base_path.name}`; {lam}. "
                 f"{len(result['report']['applied'])} tensors edited, {len(result['report']['skipped'])} copied. "
                 f"Torch threads {result['torch_threads']}, {result['machine']}, {result['seconds']:.1f} s.", ""]
        for source in result["sources"]:
            if source["base_matches"] is False:
                lines += [f"Note: {source['entry']} ({Path(source['path']).name}) was computed from other weights than "
                          "the base (its base fingerprint differs).", ""]
        if result["tables"]:
            names = list(result["tables"])
            classes = len(next(iter(result["tables"].values()))["test"]["per_class"])
            for split in (self.evaluation.select_on, "test"):
                lines += [f"Per-class accuracy on `{split}` (%):", "", "| class | " + " | ".join(names) + " |",
                          "|---" * (len(names) + 1) + "|"]
                for c in range(classes):
                    lines.append(f"| {c} | " + " | ".join(pct(result["tables"][n][split]["per_class"][c]) for n in names) + " |")
                lines += ["| overall | " + " | ".join(pct(result["tables"][n][split]["acc"]) for n in names) + " |", ""]
        if result["curve"]:
            forget = self.evaluation.forget if self.evaluation.objective == "forget" else []
            splits = list(dict.fromkeys(r["split"] for r in result["curve"]))
            header = [f"{split} all" for split in splits]
            if forget:
                n = len(result["curve"][0]["per_class"])
                others = [c for c in range(n) if c not in forget]
                header += [f"{split} class {','.join(map(str, forget))}" for split in splits]
                header += [f"{split} others" for split in splits]
            lines += ["λ curve (accuracy %; the test values are computed after the choice):", "",
                      "| λ | " + " | ".join(header) + " |", "|---" * (1 + len(header)) + "|"]
            for lam in self.lambdas:
                points = [r for split in splits for r in result["curve"] if r["lambda"] == lam and r["split"] == split]
                cells = [pct(r["acc"]) for r in points]
                if forget:
                    cells += [pct(mean_of(r, forget)) for r in points] + [pct(mean_of(r, others)) for r in points]
                mark = " (chosen)" if lam == result["lambda"] else ""
                lines.append(f"| {lam:g}{mark} | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)


def best_lambda(scores: Mapping[float, float]) -> float:
    """The λ of the best selection score; ties go to the smallest |λ| (the least edit)."""
    return max(scores, key=lambda lam: (scores[lam], -abs(lam)))


def mean_of(values: Mapping[str, Any], classes: Sequence[int]) -> float:
    """Mean per-class accuracy over ``classes`` (classes absent from the split left out)."""
    accs = [values["per_class"][c] for c in classes if not math.isnan(values["per_class"][c])]
    return sum(accs) / len(accs) if accs else float("nan")


def _summary(values: Mapping[str, Any]) -> dict[str, Any]:
    return {"acc": values["acc"], "loss": values["loss"], "per_class": values["per_class"]}


def curve_rows(curve: list[dict[str, Any]]) -> list[list[Any]]:
    classes = len(curve[0]["per_class"])
    rows = [["lambda", "split", "chosen", "acc", "loss", *(f"acc_{c}" for c in range(classes))]]
    return rows + [[r["lambda"], r["split"], r["chosen"], f"{r['acc']:.6f}", f"{r['loss']:.6f}",
                    *(f"{v:.6f}" for v in r["per_class"])] for r in curve]


def class_rows(tables: dict[str, dict]) -> list[list[Any]]:
    classes = len(next(iter(tables.values()))["test"]["per_class"])
    rows = [["model", "split", "acc", "loss", *(f"acc_{c}" for c in range(classes))]]
    return rows + [[name, split, f"{v['acc']:.6f}", f"{v['loss']:.6f}", *(f"{x:.6f}" for x in v["per_class"])]
                   for name, splits in tables.items() for split, v in splits.items()]


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()
