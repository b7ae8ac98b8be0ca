"""Model editing from a recipe: ``music merge --config recipe.yaml``.

A recipe names a ``base`` checkpoint, fine-tuned ``models`` and/or saved task ``vectors``
(each with a ``weight``; negative subtracts), a ``method`` that combines their task vectors,
and ``lambda_``, the coefficient of the combination added to the base: a number, or a grid
chosen on a validation split (``evaluate``), never on the test set. The output is a plain
``.safetensors`` state_dict, so ``music test|fit --model.init_from <output>`` takes it like
any other model; beside it go the resolved recipe, the apply report with fingerprints, the
λ curve (CSV + PNG) and the per-class table of every model involved.

Methods, on task vectors τ_i = θ_i − θ_base (or a saved vector), weights w_i:

- ``task_arithmetic``: Σ w_i τ_i (Ilharco et al.).
- ``ties``: TIES-merging (Yadav et al.) of the w_i τ_i: each trimmed to its ``density``,
  signs elected, disjoint mean (``music.task_vector.ties_merge``; ``scope`` global or per tensor).
- ``dare_linear``: Σ w_i DARE(τ_i) (Yu et al.): entries dropped with ``drop_rate`` and the
  survivors rescaled; entry i's masks are seeded by ``seed + i``.
- ``dare_ties``: DARE, then TIES (default density 1: DARE has already sparsified).

Differences are computed in float64 and cast back to each base tensor's dtype (or ``dtype``),
so one model with weight 1 and λ = 1 reproduces that model's float32 weights exactly.
``stream: true`` computes the same per-tensor arithmetic one tensor at a time from mmap'd
safetensors files, for models larger than memory: its output is byte-identical.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import platform
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor

from music.checkpoint import load_state_dict, write_atomically
from music.task_vector import (
    BaseMismatchWarning,
    Hasher,
    hashing_beside,
    SafetensorsReader,
    TaskVector,
    TaskVectorError,
    ApplyReport,
    _check_keys,
    dare,
    fingerprint,
    ties_merge,
    write_safetensors,
)

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}
COMPUTE_DTYPE = torch.float64
StateDict = dict[str, Tensor]


@dataclass
class Source:
    """A fine-tuned model or a saved task vector, and how much of it goes into the edit.

    Args:
        path: a fine-tuned checkpoint (``.safetensors``, ``.pt``/``.pth``, Lightning ``.ckpt``)
            under ``models``; a file written by ``TaskVector.save`` under ``vectors``.
        weight: the coefficient of its task vector; negative subtracts it (negation).
        density: TIES: the fraction of its largest-magnitude entries kept (default: the recipe's).
        drop_rate: DARE: the probability that each of its entries is dropped (default: the recipe's).
        base: models only: the checkpoint this model was fine-tuned from, when that is not the
            recipe's ``base`` (transfer: τ = θ(A fine-tuned) − θ(A), added to another model B).
        name: its name in the tables (default: the file name without suffix).
    """

    path: str
    weight: float = 1.0
    density: float | None = None
    drop_rate: float | None = None
    base: str | None = None
    name: str | None = None


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


class SelectionError(RuntimeError):
    """The test set was requested while λ was being chosen."""


class Evaluator:
    """Loads weights into the configured network and evaluates them on a named split.

    Inside ``selecting()`` only the selection split may be evaluated, so no code path can
    choose λ on the test set; ``log`` holds ``(split, selecting)`` for every evaluation.
    """

    def __init__(self, evaluation: Evaluation) -> None:
        from music.cli import BASE_CONFIG, lightning

        args = ["--config", str(BASE_CONFIG)]
        for config in evaluation.configs:
            args += ["--config", config]
        args += [*map(str, evaluation.args), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
        cli = lightning(args, run=False)
        self.model, self.datamodule = cli.model, cli.datamodule
        self.datamodule.setup()
        self.split = evaluation.select_on
        if self.split == "test":
            raise ValueError("evaluate.select_on='test' is not allowed: λ is never chosen on the test set; "
                             "use 'val' (with --data.val_size > 0).")
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
        from music.continual import per_class_accuracy

        if self._selecting and split != self.split:
            raise SelectionError(f"split {split!r} requested while choosing λ: only {self.split!r} may be used.")
        self.log.append((split, self._selecting))
        self.model.backbone.load_state_dict(dict(state))
        metrics, confusion = self.model.evaluate(self.datamodule.dataloader(split))
        return {"acc": metrics["acc"], "loss": metrics["loss"], "per_class": per_class_accuracy(confusion).tolist(),
                "confusion": confusion.tolist()}


class Merge:
    """Edit a base model with task vectors from fine-tuned models or saved vectors (a recipe).

    Args:
        base: the model to edit (``.safetensors``, ``.pt``/``.pth`` or Lightning ``.ckpt``).
        output: the edited model, a ``.safetensors`` file; the provenance files go beside it
            (``<stem>.recipe.yaml``, ``.report.json``, ``.lambda.csv/.png``, ``.md``, ``.classes.csv``).
        models: fine-tuned checkpoints; τ = θ_model − θ_base (or − θ of the entry's ``base``).
        vectors: saved task vectors (``TaskVector.save``); applied to ``base`` even if computed
            from other weights (reported: ``base_matches`` in the report).
        method: ``task_arithmetic``, ``ties``, ``dare_linear`` or ``dare_ties`` (see the module).
        lambda_: the coefficient of the combined vector: a number, or a grid of numbers chosen
            on ``evaluate.select_on`` (needs ``evaluate``).
        density: TIES trimming density for entries that give none (default 0.2 for ``ties``,
            1 for ``dare_ties``).
        drop_rate: DARE drop rate for entries that give none.
        scope: TIES trimming ``global`` (over the whole model, as the paper) or ``per_tensor``.
        seed: DARE's seed (entry i uses ``seed + i``).
        include: glob patterns of the keys that are edited; the others are copied from the base.
        exclude: glob patterns of keys left unedited (e.g. ``fc3.*`` leaves a head out).
        dtype: the dtype of the output's floating tensors (default: each base tensor's).
        evaluate: how models are evaluated and λ chosen; ``null``: no evaluation.
        stream: compute and write tensor by tensor from mmap'd ``.safetensors`` inputs, holding
            about one tensor per input in memory (for models larger than RAM); takes one λ.
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
        method: Literal["task_arithmetic", "ties", "dare_linear", "dare_ties"] = "task_arithmetic",
        lambda_: float | list[float] = 1.0,
        density: float | None = None,
        drop_rate: float = 0.5,
        scope: Literal["global", "per_tensor"] = "global",
        seed: int = 0,
        include: list[str] = ["*"],
        exclude: list[str] = [],
        dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None,
        evaluate: Evaluation | None = None,
        stream: bool = False,
        overwrite: bool = False,
        root: str | None = None,
    ) -> None:
        self.root = Path(root) if root else Path.cwd()
        self.base_path = self.resolve(base)
        self.models = [_source(m) for m in models]
        self.vectors = [_source(v) for v in vectors]
        self.evaluation = _evaluation(evaluate)
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not allowed: choose one of {', '.join(METHODS)}.")
        if scope not in ("global", "per_tensor"):
            raise ValueError(f"scope={scope!r} is not allowed: choose 'global' or 'per_tensor'.")
        if not self.models and not self.vectors:
            raise ValueError("the recipe has no models and no vectors: give at least one entry under `models` or `vectors`.")
        self.method, self.scope, self.seed = method, scope, seed
        self.density = density if density is not None else (0.2 if method == "ties" else 1.0)
        self.drop_rate = drop_rate
        _check_fraction("density", self.density, low_open=True)
        _check_fraction("drop_rate", drop_rate, low_open=False)
        for name, entry in self.entries():
            _finite_setting(f"{name}.weight", entry.weight)
            if entry.density is not None:
                _check_fraction(f"{name}.density", entry.density, low_open=True)
            if entry.drop_rate is not None:
                _check_fraction(f"{name}.drop_rate", entry.drop_rate, low_open=False)
            if entry.base is not None and name.startswith("vectors"):
                raise ValueError(f"{name}.base is not allowed: a saved vector already is a difference; "
                                 "`base` belongs to `models` entries.")
        grid = lambda_ if isinstance(lambda_, (list, tuple)) else [lambda_]
        if not grid:
            raise ValueError("lambda_=[] is not allowed: give a number or a non-empty list of numbers.")
        self.lambdas = [_finite_setting("lambda_", x) for x in grid]
        if len(set(self.lambdas)) < len(self.lambdas):
            raise ValueError(f"lambda_={grid} repeats a value: give distinct values.")
        self.is_grid = isinstance(lambda_, (list, tuple)) and len(self.lambdas) > 1
        if self.is_grid and self.evaluation is None:
            raise ValueError(f"lambda_={grid} is a grid but the recipe has no `evaluate` section: a grid is chosen "
                             "on a validation split; give `evaluate` or a single lambda_.")
        if self.evaluation is not None:
            if self.evaluation.select_on == "test":
                raise ValueError("evaluate.select_on='test' is not allowed: λ is never chosen on the test set; "
                                 "use 'val' (with --data.val_size > 0).")
            if self.evaluation.objective == "forget" and not self.evaluation.forget:
                raise ValueError("evaluate.objective='forget' needs evaluate.forget: the classes to forget.")
            if not 0 < self.evaluation.keep <= 1:
                raise ValueError(f"evaluate.keep={self.evaluation.keep} is not allowed: it must be in (0, 1].")
        self.include, self.exclude = list(include), list(exclude)
        self.dtype = OUTPUT_DTYPES[dtype] if dtype is not None else None
        if dtype is not None and dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype={dtype!r} is not allowed: choose one of {sorted(OUTPUT_DTYPES)} or null.")
        self.stream = stream
        if stream:
            if self.is_grid:
                raise ValueError(f"stream: true takes one lambda_, not the grid {self.lambdas}: choosing λ evaluates "
                                 "every candidate in memory; choose it without stream, then stream the chosen value.")
            if method in ("ties", "dare_ties") and scope == "global" and self._trims():
                raise ValueError(f"stream: true with method {method!r} needs scope: per_tensor (or density 1): global "
                                 "trimming ranks every tensor at once, which streaming never holds.")
            for name, path in self.files():
                if path.suffix != ".safetensors":
                    raise ValueError(f"{name}={str(path)!r} is not allowed with stream: true: streaming reads "
                                     ".safetensors files only (convert it, or set stream: false).")
        self.output = self.resolve(output)
        if self.output.suffix != ".safetensors":
            raise ValueError(f"output={output!r} is not allowed: the edited model is written as a .safetensors file.")
        if self.output.exists() and not overwrite:
            raise ValueError(f"output {str(self.output)!r} exists: choose another path or set overwrite: true "
                                  "(--overwrite true).")
        for name, path in self.files():
            if not path.is_file():
                raise FileNotFoundError(f"{name}: no file at {str(path)!r}.")
        self.overwrite = overwrite
        self.settings = {"base": base, "output": output, "models": [asdict(m) for m in self.models],
                         "vectors": [asdict(v) for v in self.vectors], "method": method, "lambda_": lambda_,
                         "density": self.density, "drop_rate": drop_rate, "scope": scope, "seed": seed,
                         "include": self.include, "exclude": self.exclude, "dtype": dtype,
                         "evaluate": asdict(self.evaluation) if self.evaluation else None}
        self.evaluator: Evaluator | None = None

    # -- the recipe ---------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        return Path(path) if os.path.isabs(path) else self.root / path

    def entries(self) -> Iterator[tuple[str, Source]]:
        yield from ((f"models[{i}]", m) for i, m in enumerate(self.models))
        yield from ((f"vectors[{i}]", v) for i, v in enumerate(self.vectors))

    def files(self) -> Iterator[tuple[str, Path]]:
        yield "base", self.base_path
        for name, entry in self.entries():
            yield f"{name}.path", self.resolve(entry.path)
            if entry.base is not None:
                yield f"{name}.base", self.resolve(entry.base)

    def _trims(self) -> bool:
        return any((e.density if e.density is not None else self.density) < 1 for _, e in self.entries())

    def selected(self, key: str) -> bool:
        return (any(fnmatch.fnmatchcase(key, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(key, p) for p in self.exclude))

    def names(self) -> list[str]:
        return [e.name or Path(e.path).name.split(".")[0] for _, e in self.entries()]

    # -- combining ----------------------------------------------------------------------------

    def combine(self, taus: Sequence[TaskVector]) -> TaskVector:
        """The method's combination of the entries' task vectors (before λ)."""
        entries = [e for _, e in self.entries()]
        if self.method in ("dare_linear", "dare_ties"):
            taus = [dare(t, drop_rate=e.drop_rate if e.drop_rate is not None else self.drop_rate, seed=self.seed + i)
                    for i, (t, e) in enumerate(zip(taus, entries))]
        weighted = [t * e.weight for t, e in zip(taus, entries)]
        if self.method in ("task_arithmetic", "dare_linear"):
            return sum(weighted[1:], weighted[0])
        densities = [e.density if e.density is not None else self.density for e in entries]
        return ties_merge(weighted, density=densities, scope=self.scope)

    def _vectors(self, base: StateDict, loaded: dict[Path, StateDict]) -> tuple[list[TaskVector], list[dict]]:
        """Every entry's task vector over the selected keys, and its provenance."""
        base_shapes = {k: tuple(v.shape) for k, v in base.items()}
        taus, sources = [], []
        for name, entry in self.entries():
            path = self.resolve(entry.path)
            if name.startswith("models"):
                pre_path = self.resolve(entry.base) if entry.base else self.base_path
                pre, ft = loaded[pre_path], loaded[path]
                _architecture(name, pre_path, pre, path, ft)
                tau = TaskVector.from_state_dicts(pre, ft, dtype=COMPUTE_DTYPE)
                source = {"entry": name, "path": str(path), "fingerprint": fingerprint(ft),
                          "base": str(pre_path), "base_fingerprint": tau.base_fingerprint,
                          "dtypes": {k: ft[k].dtype for k in tau.tensors}}
            else:
                tau = TaskVector.load(path)
                source = {"entry": name, "path": str(path), "base_fingerprint": tau.base_fingerprint,
                          "sources": dict(tau.sources), "dtypes": {k: t.dtype for k, t in tau.tensors.items()}}
                tau = TaskVector({k: t.to(COMPUTE_DTYPE) for k, t in tau.tensors.items()}, tau.base_fingerprint,
                                 tau.skipped, tau.sources)
            _fits_base(name, path, {k: tuple(t.shape) for k, t in tau.tensors.items()}, base_shapes, self.base_path)
            kept = {k: t for k, t in tau.tensors.items() if self.selected(k)}
            skipped = dict(tau.skipped) | {k: "excluded by the recipe" for k in tau.tensors if k not in kept}
            taus.append(TaskVector(kept, tau.base_fingerprint, skipped, tau.sources))
            sources.append(source)
        _same_architecture([(name, {k: tuple(t.shape) for k, t in tau.tensors.items()})
                            for (name, _), tau in zip(self.entries(), taus)])
        return taus, sources

    def edit(self, base: StateDict, combined: TaskVector, lam: float) -> tuple[StateDict, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BaseMismatchWarning)  # reported in the report instead
            state, report = combined.apply_to(base, lam, report=True)
        if self.dtype is not None:
            state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        return state, report

    # -- running ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        if self.evaluation is not None:
            self.evaluator = Evaluator(self.evaluation)
        if self.stream:
            result = self._run_streaming()
        else:
            result = self._run_in_memory()
        result["seconds"] = time.perf_counter() - start
        self._write_provenance(result)
        return result

    def _run_in_memory(self) -> dict[str, Any]:
        paths = {self.base_path, *(p for _, p in self.files())}
        loaded = {p: load_state_dict(p) for p in paths}
        base = loaded[self.base_path]
        taus, sources = self._vectors(base, loaded)
        combined = self.combine(taus)
        base_fingerprint = fingerprint(base)
        curve, lam = [], self.lambdas[0]
        if self.is_grid:
            lam, curve = self.choose(base, combined)
        state, report = self.edit(base, combined, lam)
        cast = _cast_keys(list(report.applied), lambda k: base[k].dtype, self.dtype,
                          [lambda k, d=d: d[k] for d in (s.pop("dtypes") for s in sources)])
        report = ApplyReport(report.applied, report.skipped, tuple(cast), None)
        layout = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
        self._check_output()
        write_safetensors(self.output, layout, ((k, state[k].contiguous()) for k in sorted(state)), self.metadata())
        tables = self.tables(base, loaded, state) if self.evaluator is not None else {}
        return self._result(lam, curve, report, base_fingerprint, sources, combined, tables)

    def _run_streaming(self) -> dict[str, Any]:
        """The in-memory arithmetic, applied to one key at a time (the per-key operations are
        the same calls on one-key vectors), so the output is byte-identical."""
        lam = self.lambdas[0]
        with ExitStack() as stack:
            stack.enter_context(hashing_beside())
            readers = {p: stack.enter_context(SafetensorsReader(p)) for p in {self.base_path, *(p for _, p in self.files())}}
            base = readers[self.base_path]
            shapes = base.shapes()
            entry_paths, layouts = [], []
            for name, entry in self.entries():
                path = self.resolve(entry.path)
                reader = readers[path]
                if name.startswith("models"):
                    pre_path = self.resolve(entry.base) if entry.base else self.base_path
                    pre = readers[pre_path]
                    _architecture_shapes(name, pre_path, pre.shapes(), path, reader.shapes())
                    tau_shapes = {k: s for k, s in reader.shapes().items()
                                  if pre.dtype(k).is_floating_point and reader.dtype(k).is_floating_point}
                else:
                    pre_path, tau_shapes = None, _floating_shapes(reader)
                _fits_base(name, path, tau_shapes, shapes, self.base_path)
                entry_paths.append((name, path, pre_path))
                layouts.append((name, tau_shapes))
            _same_architecture(layouts)
            hashers = {p: Hasher() for p in {self.base_path, *(p for n, p, _ in entry_paths if n.startswith("models")),
                                             *(q for _, _, q in entry_paths if q is not None)}}
            edited_keys = {k for k in layouts[0][1] if self.selected(k)}
            layout = {k: (self.dtype if self.dtype is not None and base.dtype(k).is_floating_point else base.dtype(k),
                          shapes[k]) for k in shapes}
            cast = _cast_keys(sorted(edited_keys), lambda k: base.dtype(k), self.dtype,
                              [lambda k, r=readers[p]: r.dtype(k) for _, p, _ in entry_paths])
            applied = []

            def tensors() -> Iterator[tuple[str, Tensor]]:
                for key in sorted(shapes):
                    views = {p: r.tensor(key) for p, r in readers.items() if key in r.entries}
                    futures = [h.update(key, views[p]) for p, h in hashers.items()]
                    t = views[self.base_path]
                    if key in edited_keys:
                        taus = []
                        for name, path, pre_path in entry_paths:
                            # the arithmetic of TaskVector.load + widening / from_state_dicts, on one key
                            tau = (views[path].to(COMPUTE_DTYPE) if pre_path is None
                                   else views[path].to(COMPUTE_DTYPE) - views[pre_path].to(COMPUTE_DTYPE))
                            taus.append(TaskVector({key: tau}))
                        state, report = self.edit({key: t}, self.combine(taus), lam)
                        applied.extend(report.applied)
                        out = state[key]
                    else:
                        out = t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t
                    yield key, out
                    for f in futures:
                        f.result()
                    del views, t, out
                    for r in readers.values():
                        if key in r.entries:
                            r.release(key)

            self._check_output()
            write_safetensors(self.output, layout, tensors(), self.metadata())
            fingerprints = {p: h.hexdigest() for p, h in hashers.items()}
            sources = []
            for name, path, pre_path in entry_paths:
                if pre_path is None:
                    meta = readers[path].metadata
                    sources.append({"entry": name, "path": str(path),
                                    "base_fingerprint": json.loads(meta.get("base_fingerprint", "null")),
                                    "sources": json.loads(meta.get("sources", "{}"))})
                else:
                    sources.append({"entry": name, "path": str(path), "fingerprint": fingerprints[path],
                                    "base": str(pre_path), "base_fingerprint": fingerprints[pre_path]})
        base_fingerprint = fingerprints[self.base_path]
        report = ApplyReport(applied=tuple(applied), skipped=tuple(k for k in sorted(shapes) if k not in applied),
                             cast=tuple(cast), base_matches=None)
        tables = {}
        if self.evaluator is not None:
            loaded = {p: load_state_dict(p) for p in {self.base_path, *(p for _, p in self.files())}}
            tables = self.tables(loaded[self.base_path], loaded, load_state_dict(self.output))
        return self._result(lam, [], report, base_fingerprint, sources, None, tables)

    def _check_output(self) -> None:
        if self.output.exists() and not self.overwrite:  # it may have appeared since the recipe was read
            raise ValueError(f"output {str(self.output)!r} exists: choose another path or set overwrite: true.")
        self.output.parent.mkdir(parents=True, exist_ok=True)

    def metadata(self) -> dict[str, str]:
        """What the output file says about itself: the same whichever path wrote it."""
        recipe = {k: v for k, v in self.settings.items() if k not in ("output", "evaluate")}
        return {"format": "pt", "music_merge": json.dumps(_plain(recipe), sort_keys=True)}

    # -- choosing λ ---------------------------------------------------------------------------

    def choose(self, base: StateDict, combined: TaskVector) -> tuple[float, list[dict[str, Any]]]:
        """λ from the grid on the selection split; the test curve is computed after the
        choice, for the record only."""
        evaluator, evaluation = self.evaluator, self.evaluation
        assert evaluator is not None and evaluation is not None
        split = evaluation.select_on
        with evaluator.selecting():
            values = {lam: evaluator.evaluate(self.edit(base, combined, lam)[0], split) for lam in self.lambdas}
            reference = evaluator.evaluate(base, split) if evaluation.objective == "forget" else None
        if evaluation.objective == "accuracy":
            chosen = max(self.lambdas, key=lambda lam: (values[lam]["acc"], -abs(lam)))
        else:
            n = len(reference["per_class"])
            others = [c for c in range(n) if c not in evaluation.forget]
            floor = evaluation.keep * _mean_of(reference, others)
            allowed = [lam for lam in self.lambdas if _mean_of(values[lam], others) >= floor]
            chosen = (min(allowed, key=lambda lam: (_mean_of(values[lam], evaluation.forget), abs(lam))) if allowed
                      else max(self.lambdas, key=lambda lam: _mean_of(values[lam], others)))
        curve = [{"lambda": lam, "split": split, "chosen": lam == chosen, **_summary(values[lam])} for lam in self.lambdas]
        for lam in self.lambdas:  # after the choice: reported, never used to choose
            curve.append({"lambda": lam, "split": "test", "chosen": lam == chosen,
                          **_summary(evaluator.evaluate(self.edit(base, combined, lam)[0], "test"))})
        return chosen, curve

    # -- output -------------------------------------------------------------------------------

    def tables(self, base: StateDict, loaded: Mapping[Path, StateDict], edited: StateDict) -> dict[str, dict]:
        """Per-class results on the selection split and the test set of every model involved:
        the base, each fine-tuned model, the references and the edit; with entries of their own
        base (transfer), those bases and models first: pretrained | fine-tuned | base | edited."""
        evaluator = self.evaluator
        assert evaluator is not None
        own_bases: dict[str, StateDict] = {}  # transfer: the model each vector was computed from comes first
        fine_tuned: dict[str, StateDict] = {}
        for (name, entry), label in zip(self.entries(), self.names()):
            if name.startswith("models"):
                if entry.base is not None:
                    own_bases.setdefault(Path(entry.base).name.split(".")[0], loaded[self.resolve(entry.base)])
                fine_tuned[label] = loaded[self.resolve(entry.path)]
        recipe_base = {f"base ({Path(self.base_path).name.split('.')[0]})": base}
        models = ({**own_bases, **fine_tuned, **recipe_base} if own_bases else {**recipe_base, **fine_tuned})
        for ref in self.evaluation.references:
            models[ref.name] = load_state_dict(self.resolve(ref.path))
        models["edited"] = edited
        splits = [self.evaluation.select_on, "test"]
        return {name: {split: evaluator.evaluate(state, split) for split in splits} for name, state in models.items()}

    def _result(self, lam, curve, report, base_fingerprint, sources, combined, tables) -> dict[str, Any]:
        for source in sources:
            source["base_matches"] = (None if source.get("base_fingerprint") is None
                                      else source["base_fingerprint"] == base_fingerprint)
            if source.get("base") is not None:  # a model with its own base: τ is moved to another model
                source["base_matches"] = source["base"] == str(self.base_path) or source["base_fingerprint"] == base_fingerprint
        return {"output": str(self.output), "lambda": lam, "grid": self.lambdas if self.is_grid else None,
                "curve": curve, "tables": tables, "method": self.method, "stream": self.stream,
                "report": {"applied": list(report.applied), "skipped": list(report.skipped), "cast": list(report.cast)},
                "base": str(self.base_path), "base_fingerprint": base_fingerprint, "sources": sources,
                "vector_norm": combined.norm() if combined is not None else None,
                "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"}

    def side_path(self, suffix: str) -> Path:
        return self.output.with_name(self.output.name.removesuffix(".safetensors") + suffix)

    def _write_provenance(self, result: dict[str, Any]) -> None:
        recipe = self.settings | {"chosen_lambda": result["lambda"]}
        write_atomically(self.side_path(".recipe.yaml"),
                         "# The recipe as resolved by `music merge`; chosen_lambda is the λ it used.\n"
                         + yaml.safe_dump(_plain(recipe), sort_keys=False))
        report = {k: v for k, v in result.items() if k not in ("tables", "curve")}
        if any(s["base_matches"] is False for s in result["sources"]):
            mismatched = [s["entry"] for s in result["sources"] if s["base_matches"] is False]
            report["note"] = (f"{', '.join(mismatched)} were computed from other weights than the base "
                              "(transfer, or a wrong checkpoint)")
        report["tables"] = {name: {split: {k: v for k, v in values.items() if k != "confusion"}
                                   for split, values in splits.items()} for name, splits in result["tables"].items()}
        write_atomically(self.side_path(".report.json"), json.dumps(_plain(report), indent=1))
        if result["curve"]:
            write_atomically(self.side_path(".lambda.csv"), _csv(curve_rows(result["curve"])))
            self._plot_curve(result["curve"])
        if result["tables"]:
            write_atomically(self.side_path(".classes.csv"), _csv(class_rows(result["tables"])))
        write_atomically(self.side_path(".md"), self.markdown(result))

    def _plot_curve(self, curve: list[dict[str, Any]]) -> None:
        from music.plots import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in dict.fromkeys(r["split"] for r in curve):
            points = [r for r in curve if r["split"] == split]
            ax.plot([r["lambda"] for r in points], [100 * r["acc"] for r in points], marker="o", label=f"{split} accuracy")
            if self.evaluation.objective == "forget":
                ax.plot([r["lambda"] for r in points], [100 * _mean_of(r, self.evaluation.forget) for r in points],
                        marker="x", linestyle="--", label=f"{split}: classes {self.evaluation.forget}")
        chosen = next(r["lambda"] for r in curve if r["chosen"])
        ax.axvline(chosen, color="grey", linestyle=":", label=f"chosen λ = {chosen:g}")
        ax.set(xlabel="λ", ylabel="accuracy [%]", title=self.output.name)
        ax.legend()
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        write_atomically(self.side_path(".lambda.png"), buffer.getvalue())

    def markdown(self, result: dict[str, Any]) -> str:
        pct = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"  # noqa: E731
        entries = ", ".join(f"{n} (weight {e.weight:g})" for n, (_, e) in zip(self.names(), self.entries()))
        lam = (f"λ = {result['lambda']:g}, chosen on `{self.evaluation.select_on}` from {self.lambdas} "
               f"({self.evaluation.objective})" if self.is_grid else f"λ = {result['lambda']:g}")
        lines = [f"# {self.output.name}", "",
                 f"`{self.method}` of {entries} added to `{self.base_path.name}`; {lam}. "
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
                    cells += [pct(_mean_of(r, forget)) for r in points] + [pct(_mean_of(r, others)) for r in points]
                mark = " (chosen)" if lam == result["lambda"] else ""
                lines.append(f"| {lam:g}{mark} | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines)


# -- helpers ------------------------------------------------------------------------------------

def _source(value: Source | Mapping[str, Any]) -> Source:
    return value if isinstance(value, Source) else Source(**dict(value))


def _evaluation(value: Evaluation | Mapping[str, Any] | None) -> Evaluation | None:
    if value is None or isinstance(value, Evaluation):
        return value
    value = dict(value)
    value["references"] = [r if isinstance(r, Reference) else Reference(**dict(r)) for r in value.get("references", [])]
    return Evaluation(**value)


def _finite_setting(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not allowed: it must be a finite number.")
    return float(value)


def _check_fraction(name: str, value: object, *, low_open: bool) -> None:
    number = _finite_setting(name, value)
    if low_open and not 0 < number <= 1:
        raise ValueError(f"{name}={value!r} is not allowed: it must be in (0, 1].")
    if not low_open and not 0 <= number < 1:
        raise ValueError(f"{name}={value!r} is not allowed: it must be in [0, 1).")


def _architecture(name: str, pre_path: Path, pre: StateDict, path: Path, ft: StateDict) -> None:
    _architecture_shapes(name, pre_path, {k: tuple(v.shape) for k, v in pre.items()}, path,
                         {k: tuple(v.shape) for k, v in ft.items()})


def _architecture_shapes(name: str, pre_path: Path, pre: Mapping[str, tuple], path: Path, ft: Mapping[str, tuple]) -> None:
    try:
        _check_keys(pre, ft, pre_path.name, path.name)
    except TaskVectorError as err:
        raise TaskVectorError(f"{name} ({path}) is another architecture than {pre_path}: {err}") from None


def _fits_base(name: str, path: Path, tau: Mapping[str, tuple], base: Mapping[str, tuple], base_path: Path) -> None:
    try:
        _check_keys(tau, base, name, "base", allow_extra_b=True)
    except TaskVectorError as err:
        raise TaskVectorError(f"{name} ({path}) does not fit the base {base_path}: {err}") from None


def _same_architecture(layouts: Sequence[tuple[str, Mapping[str, tuple]]]) -> None:
    """Every entry's task vector covers the same keys with the same shapes."""
    first, shapes = layouts[0]
    for name, other in layouts[1:]:
        try:
            _check_keys(shapes, other, first, name)
        except TaskVectorError as err:
            raise TaskVectorError(f"{name} is another architecture than {first}: {err}") from None


def _cast_keys(keys, base_dtype, out_dtype, source_dtypes) -> list[str]:
    """Edited keys whose sources' or output's dtype differ from the base's (computed in float64,
    then cast to the output dtype)."""
    return [k for k in keys if (out_dtype is not None and out_dtype != base_dtype(k))
            or any(dtype(k) != base_dtype(k) for dtype in source_dtypes)]


def _floating_shapes(reader: SafetensorsReader) -> dict[str, tuple]:
    return {k: s for k, s in reader.shapes().items() if reader.dtype(k).is_floating_point}


def _mean_of(values: Mapping[str, Any], classes: Sequence[int]) -> float:
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


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
