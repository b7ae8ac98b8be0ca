"""The task-vector studies of issue 3: transfer to a similar model, addition, negation.

1. *Transfer*: tau_A = theta(A fine-tuned on the held-out samples) - theta(A), applied to a
   similar pretrained model B: does B + lambda * tau_A gain what A gained, without training?
2. *Addition*: per-class vectors tau_c (A fine-tuned on class_c alone), combined by plain sum,
   TIES or DARE and added to A, against sequential and merged fine-tuning of A.
3. *Negation*: A - lambda * tau_c, across lambda: does class c's accuracy fall while the other
   classes' stays?

Every model is trained through the framework (``Classifier`` + ``Trainer`` on a
``MusicDataModule`` split) and stored as ``<work_dir>/checkpoints/<stage>.safetensors`` with the
settings that made it; a stage whose file exists with the same settings is reused, with other
settings it is refused (a stale model must not silently feed a new study).

Lambda for transfer and addition is chosen on the ``val`` split (carved from the training
data, ``data.val_size``), never on the test set: evaluations run through ``Evaluator``, which
refuses the test split while a selection is open, and the test curves are computed only after
the choice is made (reported, never used). Negation chooses nothing; its curve is reported.

Entry point: ``python scripts/task_vectors.py --config configs/taskvector.yaml`` (``--quick``
for a smoke run). Not a LightningCLI subcommand: the study drives many short fits itself.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from music.continual import accuracy_on
from music.data import MusicDataModule
from music.models import SimpleNN
from music.module import Classifier
from music.task_vector import BaseMismatchWarning, TaskVector, dare, load_state_dict, ties_merge

StateDict = dict[str, Tensor]


@dataclass
class SimilarModel:
    """How the similar model B differs from A.

    ``mode: seed``: B is pretrained like A (same split, epochs and learning rate) from another
    ``seed``, so another initialisation and data order. ``mode: further``: B is A trained
    ``epochs`` more epochs on ``split`` (learning rate ``lr``, default the pretraining one) with
    ``seed``: a close relative of A, sharing its initialisation. ``epochs`` defaults to the
    pretraining epochs in ``seed`` mode and must be given in ``further`` mode.
    """

    mode: Literal["seed", "further"] = "seed"
    seed: int = 1
    epochs: int | None = None
    split: str = "remaining"
    lr: float | None = None


class SelectionError(RuntimeError):
    """The test set was requested while a hyperparameter was being chosen."""


class Evaluator:
    """Evaluates weights on a named split and keeps a log of every evaluation.

    Inside ``selecting()`` only ``val`` may be evaluated, so no code path can choose lambda on
    the test set; ``log`` holds ``(split, selecting)`` for every call so a test can check it.
    """

    def __init__(self, datamodule: MusicDataModule, model: Classifier) -> None:
        self.datamodule, self.model = datamodule, model
        self.log: list[tuple[str, bool]] = []
        self._selecting = False

    @contextmanager
    def selecting(self) -> Iterator[None]:
        self._selecting = True
        try:
            yield
        finally:
            self._selecting = False

    def confusion(self, state: StateDict, split: str) -> Tensor:
        if self._selecting and split != "val":
            raise SelectionError(f"split {split!r} requested while choosing lambda: only 'val' may be used.")
        self.log.append((split, self._selecting))
        self.model.backbone.load_state_dict(state)
        return self.model.evaluate(self.datamodule.dataloader(split))[1]


def accuracies(confusion: Tensor, held_out: Sequence[int]) -> dict[str, float]:
    """Per-class accuracy (recall), overall, and accuracy on the held-out / other classes' images
    (``music.continual.accuracy_on``; NaN for classes with no images in the evaluated split)."""
    n = len(confusion)
    others = [c for c in range(n) if c not in held_out]
    values = {str(c): accuracy_on(confusion, [c]) for c in range(n)}
    return values | {"overall": accuracy_on(confusion, range(n)), "held_out": accuracy_on(confusion, held_out),
                     "others": accuracy_on(confusion, others)}


class TaskVectorStudy:
    """Runs the three studies and writes ``<out_dir>/task_vectors.md`` plus CSVs.

    Args:
        datamodule: the data; needs ``val_size > 0`` (lambda is chosen on ``val``).
        pretrain_epochs: epochs of pretraining A (and B in ``seed`` mode) on ``remaining``.
        lr: pretraining learning rate (Adam).
        seed: seed of A's pretraining and of every fine-tuning.
        similar: how B differs from A (``SimilarModel``).
        finetune_epochs: epochs of each fine-tuning (merged, each class, each sequential step).
        finetune_lr: fine-tuning learning rate (Adam, fresh per stage).
        lambdas: grid for transfer and addition, chosen on ``val``; include 0 so "no edit"
            can win.
        negation_lambdas: grid for A - lambda * tau_c (reported, nothing chosen).
        ties_density: fraction of each vector TIES keeps (global trimming, as the paper).
        dare_drop_rate: DARE's drop probability; its masks are seeded by ``seed``.
        work_dir: checkpoints (reused), training logs and the TensorBoard lambda curves.
        out_dir: the markdown and CSV results.
        trainer_args: extra ``Trainer`` arguments (e.g. ``limit_train_batches`` for a smoke run).
    """

    def __init__(
        self,
        datamodule: MusicDataModule,
        pretrain_epochs: int = 50,
        lr: float = 1e-3,
        seed: int = 0,
        similar: SimilarModel = SimilarModel(),
        finetune_epochs: int = 10,
        finetune_lr: float = 1e-3,
        lambdas: list[float] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
        negation_lambdas: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
        ties_density: float = 0.2,
        dare_drop_rate: float = 0.5,
        work_dir: str = "lightning_logs/taskvector",
        out_dir: str = "results",
        trainer_args: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(similar, dict):
            similar = SimilarModel(**similar)
        if datamodule.val_size < 1:
            raise ValueError(f"data.val_size={datamodule.val_size} is not allowed: lambda is chosen on the "
                             "'val' split, so it needs val_size > 0 (the test set is never used to choose).")
        for name, value in (("pretrain_epochs", pretrain_epochs), ("finetune_epochs", finetune_epochs)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value} is not allowed: it must be an integer >= 1.")
        for name, value in (("lr", lr), ("finetune_lr", finetune_lr)):
            if not value > 0:
                raise ValueError(f"{name}={value} is not allowed: a learning rate must be > 0.")
        for name, grid in (("lambdas", lambdas), ("negation_lambdas", negation_lambdas)):
            if not grid or any(not math.isfinite(x) or x < 0 for x in grid) or len(set(grid)) < len(grid):
                raise ValueError(f"{name}={grid} is not allowed: give a non-empty list of distinct, finite "
                                 "values >= 0 (negation subtracts, so its lambdas are >= 0 too).")
        if similar.mode not in ("seed", "further"):
            raise ValueError(f"similar.mode={similar.mode!r} is not allowed: use 'seed' or 'further'.")
        if similar.mode == "further" and not similar.epochs:
            raise ValueError("similar.epochs is required (>= 1) when similar.mode is 'further'.")
        if similar.epochs is not None and similar.epochs < 1:
            raise ValueError(f"similar.epochs={similar.epochs} is not allowed: it must be >= 1.")
        datamodule.check_split(similar.split)
        if not 0 < ties_density <= 1:
            raise ValueError(f"ties_density={ties_density} is not allowed: it must be in (0, 1].")
        if not 0 <= dare_drop_rate < 1:
            raise ValueError(f"dare_drop_rate={dare_drop_rate} is not allowed: it must be in [0, 1).")
        self.datamodule = datamodule
        self.pretrain_epochs, self.lr, self.seed, self.similar = pretrain_epochs, lr, seed, similar
        self.finetune_epochs, self.finetune_lr = finetune_epochs, finetune_lr
        self.lambdas, self.negation_lambdas = sorted(lambdas), sorted(negation_lambdas)
        self.ties_density, self.dare_drop_rate = ties_density, dare_drop_rate
        self.work_dir, self.out_dir = Path(work_dir), Path(out_dir)
        self.trainer_args = dict(trainer_args or {})
        self.trained: list[str] = []  # stages trained by this run (the others were reused)
        self.curves: list[dict[str, Any]] = []
        self.evaluator: Evaluator | None = None

    # -- training ------------------------------------------------------------------------------

    @property
    def held_out(self) -> list[int]:
        return self.datamodule.held_out_classes

    def _backbone(self) -> SimpleNN:
        return SimpleNN(num_classes=self.datamodule.num_classes)

    def stage(self, name: str, split: str, epochs: int, lr: float, seed: int,
              init: tuple[str, StateDict] | None = None) -> StateDict:
        """Train (or reuse) one model: ``epochs`` on ``split`` from ``init`` (or from scratch)."""
        spec = {"split": split, "epochs": epochs, "lr": lr, "seed": seed, "init": init[0] if init else None,
                "data": self.datamodule.manifest()["splits"][split]["sha256"],
                "trainer_args": self.trainer_args}
        path = self.work_dir / "checkpoints" / f"{name}.safetensors"
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                saved = json.loads((f.metadata() or {}).get("spec", "null"))
            if saved != spec:
                raise ValueError(f"{path} was trained with {saved}, not the configured {spec}: delete it or "
                                 "choose another work_dir (a stale model would silently feed the study).")
            return load_state_dict(path)
        seed_everything(seed, workers=True)
        model = Classifier(backbone=self._backbone(), num_classes=self.datamodule.num_classes, lr=lr)
        if init is not None:
            model.backbone.load_state_dict(init[1])
        self.datamodule.train_split = split
        trainer = Trainer(**{
            "max_epochs": epochs, "deterministic": True, "accelerator": "cpu",
            "logger": TensorBoardLogger(str(self.work_dir), name=name, default_hp_metric=False),
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, **self.trainer_args})
        start = time.perf_counter()
        trainer.fit(model, datamodule=self.datamodule)
        print(f"[taskvector] trained {name} ({epochs} epochs on {split}) in {time.perf_counter() - start:.0f} s")
        state = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path) + ".tmp", metadata={"spec": json.dumps(spec)})
        os.replace(str(path) + ".tmp", path)  # a killed run leaves no half-written stage behind
        self.trained.append(name)
        return state

    def train_all(self) -> dict[str, StateDict]:
        self.datamodule.setup()
        ft = dict(epochs=self.finetune_epochs, lr=self.finetune_lr, seed=self.seed)
        models = {"A": self.stage("pretrained_A", "remaining", self.pretrain_epochs, self.lr, self.seed)}
        s = self.similar
        if s.mode == "seed":
            models["B"] = self.stage("similar_B_seed", "remaining", s.epochs or self.pretrain_epochs, self.lr, s.seed)
        else:
            models["B"] = self.stage("similar_B_further", s.split, s.epochs, s.lr or self.lr, s.seed, ("pretrained_A", models["A"]))
        models["merged"] = self.stage("finetuned_A_merged", "merged", init=("pretrained_A", models["A"]), **ft)
        for c in self.held_out:
            models[f"class_{c}"] = self.stage(f"finetuned_A_class_{c}", f"class_{c}", init=("pretrained_A", models["A"]), **ft)
        previous = (f"finetuned_A_class_{self.held_out[0]}", models[f"class_{self.held_out[0]}"])
        for c in self.held_out[1:]:  # sequential: the first step is the class_<first> model
            name = f"sequential_A_after_{c}"
            models[name] = self.stage(name, f"class_{c}", init=previous, **ft)
            previous = (name, models[name])
        models["sequential"] = previous[1]
        return models

    # -- lambda ------------------------------------------------------------------------------

    def choose(self, study: str, method: str, edit: Callable[[float], StateDict]) -> tuple[float, dict[str, float]]:
        """Lambda with the best val accuracy (ties: the smallest), then the test curve for the record."""
        assert self.evaluator is not None
        val = {}
        with self.evaluator.selecting():
            for lam in self.lambdas:
                val[lam] = accuracies(self.evaluator.confusion(edit(lam), "val"), self.held_out)
        best = max(self.lambdas, key=lambda lam: (val[lam]["overall"], -lam))
        for lam in self.lambdas:  # after the choice: reported, never used to choose
            test = accuracies(self.evaluator.confusion(edit(lam), "test"), self.held_out)
            for split, values in (("val", val[lam]), ("test", test)):
                self.curves.append({"study": study, "method": method, "split": split, "lambda": lam,
                                    "chosen": lam == best, **values})
        return best, accuracies(self.evaluator.confusion(edit(best), "test"), self.held_out)

    # -- the studies -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        models = self.train_all()
        train_seconds = time.perf_counter() - start
        self.evaluator = Evaluator(self.datamodule, Classifier(backbone=self._backbone(), num_classes=self.datamodule.num_classes))
        test = lambda state: accuracies(self.evaluator.confusion(state, "test"), self.held_out)  # noqa: E731
        A, B = models["A"], models["B"]

        # 1. transfer
        tau_A = TaskVector.from_state_dicts(A, models["merged"], sources={"pretrained": "pretrained_A", "finetuned": "finetuned_A_merged"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BaseMismatchWarning)  # applying to B is the point
            _, report = tau_A.apply_to(B, 0.0, report=True)
            lam, transferred = self.choose("transfer", "B+tau_A", lambda x: tau_A.apply_to(B, x))
            at_one = test(tau_A.apply_to(B, 1.0))
        transfer = {"lambda": lam, "base_matches": report.base_matches, "tau_norm": tau_A.norm(),
                    "distance_A_B": TaskVector.from_state_dicts(A, B).norm(),
                    "columns": {"pretrained A": test(A), "fine-tuned A": test(models["merged"]), "similar B": test(B),
                                f"B + {lam:g}·τ_A (λ on val)": transferred, "B + 1·τ_A (not chosen)": at_one}}

        # 2. addition
        taus = {c: TaskVector.from_state_dicts(A, models[f"class_{c}"]) for c in self.held_out}
        merges = {"sum": sum(taus.values()), "TIES": ties_merge(list(taus.values()), density=self.ties_density),
                  "DARE": sum(dare(t, drop_rate=self.dare_drop_rate, seed=self.seed + c) for c, t in taus.items())}
        addition = {"pretrained A": (None, test(A)), "sequential fine-tuning": (None, test(models["sequential"])),
                    "merged fine-tuning": (None, test(models["merged"]))}
        for method, vector in merges.items():
            addition[f"A + λ·{method}(τ)"] = self.choose("addition", method, lambda x, v=vector: v.apply_to(A, x))
        cosines = {f"{a},{b}": taus[a].cosine(taus[b]) for i, a in enumerate(self.held_out) for b in self.held_out[i + 1:]}

        # 3. negation (nothing chosen: the whole curve is the result)
        negation = []
        for c, tau in taus.items():
            for lam in self.negation_lambdas:
                state = tau.apply_to(A, -lam)
                for split in ("val", "test"):
                    values = accuracies(self.evaluator.confusion(state, split), [c])
                    negation.append({"class": c, "lambda": lam, "split": split, "target": values["held_out"],
                                     "others": values["others"], "overall": values["overall"]})

        results = {"transfer": transfer, "addition": addition, "cosines": cosines, "negation": negation,
                   "curves": self.curves, "trained": self.trained, "train_seconds": train_seconds,
                   "seconds": time.perf_counter() - start}
        self.write(results)
        return results

    # -- output ------------------------------------------------------------------------------

    def write(self, results: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir.mkdir(parents=True, exist_ok=True)
        classes = [str(c) for c in range(self.datamodule.num_classes)]
        columns = results["transfer"]["columns"]
        _csv(self.out_dir / "task_vectors_transfer.csv", ["class", *columns],
             [[row, *(f"{col[row]:.4f}" for col in columns.values())] for row in [*classes, "overall"]])
        addition = results["addition"]
        _csv(self.out_dir / "task_vectors_addition.csv", ["method", "lambda", *classes, "held_out", "others", "overall"],
             [[m, "" if lam is None else lam, *(f"{v[k]:.4f}" for k in [*classes, "held_out", "others", "overall"])]
              for m, (lam, v) in addition.items()])
        _csv(self.out_dir / "task_vectors_negation.csv", list(results["negation"][0]),
             [[f"{v:.4f}" if isinstance(v, float) and k != "lambda" else v for k, v in r.items()] for r in results["negation"]])
        curve_keys = ["study", "method", "split", "lambda", "chosen", "overall", "held_out", "others", *classes]
        _csv(self.out_dir / "task_vectors_curves.csv", curve_keys,
             [[f"{r[k]:.4f}" if isinstance(r[k], float) and k != "lambda" else r[k] for k in curve_keys] for r in results["curves"]])

        writer = SummaryWriter(str(self.work_dir / "lambda_curves"))  # x axis: step = round(100 * lambda)
        for r in results["curves"]:
            for metric in ("overall", "held_out", "others"):
                writer.add_scalar(f"{r['study']}/{r['method']}/{r['split']}/{metric}", r[metric], round(100 * r["lambda"]))
        for r in results["negation"]:
            for metric in ("target", "others"):
                writer.add_scalar(f"negation/class_{r['class']}/{r['split']}/{metric}", r[metric], round(100 * r["lambda"]))
        writer.close()
        (self.out_dir / "task_vectors.md").write_text(self.markdown(results))

    def markdown(self, results: dict[str, Any]) -> str:
        dm, t = self.datamodule, results["transfer"]
        classes = [str(c) for c in range(dm.num_classes)]
        held = ", ".join(map(str, self.held_out))
        s = self.similar
        how_b = (f"pretrained like A from seed {s.seed} ({s.epochs or self.pretrain_epochs} epochs)" if s.mode == "seed"
                 else f"A trained {s.epochs} more epochs on `{s.split}` (seed {s.seed})")
        pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
        lines = [
            "# Task vectors: transfer, addition, negation (as measured)", "",
            f"Data: {dm.hparams.dataset}, held-out classes {held} ({dm.samples_per_class} training samples each, "
            f"split_seed {dm.split_seed}); `val` = {dm.val_size} samples carved from the non-held-out training data; "
            f"`remaining` = {len(dm.splits['remaining'])} samples. A: SimpleNN pretrained {self.pretrain_epochs} epochs on "
            f"`remaining` (Adam, lr {self.lr:g}, seed {self.seed}). B: {how_b}. Fine-tuning: {self.finetune_epochs} epochs, "
            f"lr {self.finetune_lr:g}, fresh Adam. λ grid {self.lambdas}, chosen by overall accuracy on `val` "
            f"(ties → smaller λ); the test set (10,000 images) is used only after the choice. Extra Trainer "
            f"arguments: {self.trainer_args or 'none'}. Trained this run: {results['trained'] or 'nothing (all reused)'}; "
            f"training {results['train_seconds']:.0f} s, total {results['seconds']:.0f} s. Accuracies in %.", "",
            "## 1. Transfer: B + λ·τ_A, τ_A = θ(A fine-tuned on `merged`) − θ(A)", "",
            f"λ chosen on val: **{t['lambda']:g}**. ‖τ_A‖ = {t['tau_norm']:.3f}, ‖θ_A − θ_B‖ = {t['distance_A_B']:.3f}; "
            f"τ_A's base fingerprint matches B: {t['base_matches']}.", "",
            "| class | " + " | ".join(t["columns"]) + " |", "|---" * (len(t["columns"]) + 1) + "|",
        ]
        for row in [*classes, "overall"]:
            name = f"**{row}**" if row in map(str, self.held_out) else row
            lines.append(f"| {name} | " + " | ".join(pct(col[row]) for col in t["columns"].values()) + " |")
        lines += ["", "## 2. Addition: A + λ·merge(τ_c), τ_c = θ(A fine-tuned on `class_c` alone) − θ(A)", "",
                  f"TIES: density {self.ties_density:g}, global trimming; DARE: drop rate {self.dare_drop_rate:g}, "
                  f"then summed. Cosine between per-class vectors: "
                  + ", ".join(f"τ_{k.replace(',', '·τ_')} = {v:.3f}" for k, v in results["cosines"].items()) + ".", "",
                  "| model | λ (val) | " + " | ".join(f"acc {c}" for c in self.held_out) + " | held-out | others | overall |",
                  "|---" * (len(self.held_out) + 5) + "|"]
        for method, (lam, v) in results["addition"].items():
            lines.append(f"| {method} | {'' if lam is None else f'{lam:g}'} | "
                         + " | ".join(pct(v[str(c)]) for c in self.held_out)
                         + f" | {pct(v['held_out'])} | {pct(v['others'])} | {pct(v['overall'])} |")
        lines += ["", "## 3. Negation: A − λ·τ_c (test set; nothing is chosen)", "",
                  "Accuracy on class c's test images / on all other test images.", "",
                  "| λ | " + " | ".join(f"class {c}: c / others" for c in self.held_out) + " |",
                  "|---" * (len(self.held_out) + 1) + "|"]
        neg = {(r["class"], r["lambda"]): r for r in results["negation"] if r["split"] == "test"}
        for lam in self.negation_lambdas:
            lines.append(f"| {lam:g} | " + " | ".join(f"{pct(neg[c, lam]['target'])} / {pct(neg[c, lam]['others'])}"
                                                      for c in self.held_out) + " |")
        lines += ["", "## λ curves (overall accuracy, val / test)", "",
                  "| study | method | " + " | ".join(f"λ={x:g}" for x in self.lambdas) + " |",
                  "|---" * (len(self.lambdas) + 2) + "|"]
        curve = {(r["study"], r["method"], r["split"], r["lambda"]): r for r in results["curves"]}
        for study, method in dict.fromkeys((r["study"], r["method"]) for r in results["curves"]):
            lines.append(f"| {study} | {method} | " + " | ".join(
                f"{pct(curve[study, method, 'val', x]['overall'])} / {pct(curve[study, method, 'test', x]['overall'])}"
                for x in self.lambdas) + " |")
        lines += ["", f"CSVs beside this file; TensorBoard: `tensorboard --logdir {self.work_dir}` "
                      "(`lambda_curves`, x axis = 100·λ; one run per trained stage)."]
        return "\n".join(lines) + "\n"


def _csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# -- entry point -------------------------------------------------------------------------------

QUICK = {"pretrain_epochs": 1, "finetune_epochs": 1, "trainer_args": {"limit_train_batches": 5}}


def parser():
    """YAML → jsonargparse → typed constructor arguments (``data`` and ``study`` groups)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(description="The task-vector studies (transfer, addition, negation).")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 epoch of 5 batches per stage, outputs under <work_dir>-quick")
    p.add_class_arguments(MusicDataModule, "data")
    p.add_class_arguments(TaskVectorStudy, "study", skip={"datamodule"})
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    config = p.parse_args(argv)
    data = MusicDataModule(**config.data.as_dict())
    study = config.study.as_dict()
    study["similar"] = SimilarModel(**study["similar"]) if isinstance(study["similar"], dict) else study["similar"]
    if config.quick:
        quick_dir = study["work_dir"].rstrip("/") + "-quick"
        study |= QUICK | {"work_dir": quick_dir, "out_dir": os.path.join(quick_dir, "results")}
        if study["similar"].mode == "further":
            study["similar"] = SimilarModel(**(asdict(study["similar"]) | {"epochs": 1}))
        else:
            study["similar"] = SimilarModel(**(asdict(study["similar"]) | {"epochs": None}))
    results = TaskVectorStudy(data, **study).run()
    print((Path(study["out_dir"]) / "task_vectors.md").read_text())
    return results
