"""A merge recipe as data: what is merged into what, by which method, written where.

Every check of a recipe is written here once and runs when the recipe is built, before any
file is opened for writing: a bad recipe fails in one line naming the entry and what is
allowed. Loading a recipe never runs code from it; its ``method`` is built from a class path
that must name a ``MergeMethod`` subclass.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from music.merging.checks import finite
from music.merging.engine import Entry, Merger
from music.merging.methods import MergeMethod, TaskArithmetic
from music.merging.statistics import load_statistics

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}
COMPUTE_DTYPE = torch.float64  # one model with weight 1 and λ = 1 reproduces its float32 weights bit for bit


@dataclass
class Source:
    """A fine-tuned model or a saved task vector, and how much of it goes into the edit.

    Args:
        path: a fine-tuned checkpoint (``.safetensors``, ``.pt``/``.pth``, Lightning ``.ckpt``)
            under ``models``; a file written by ``TaskVector.save`` under ``vectors``.
        weight: the coefficient of its task vector; negative subtracts it (negation).
        base: models only: the checkpoint this model was fine-tuned from, when that is not the
            recipe's ``base`` (transfer: τ = θ(A fine-tuned) − θ(A), added to another model B).
        name: its name in the tables (default: the file name without suffix).
        statistics: a file of this model's data statistics (``music.merging.statistics``), for
            methods that weight models by them (``Fisher``, ``RegMean``); read only by those.
    """

    path: str
    weight: float = 1.0
    base: str | None = None
    name: str | None = None
    statistics: str | None = None


@dataclass
class Recipe:
    """Edit ``base`` with the task vectors of ``models`` and ``vectors``, combined by ``method``.

    Args:
        base: the model to edit (``.safetensors``, ``.pt``/``.pth`` or Lightning ``.ckpt``).
        output: the edited model, a ``.safetensors`` file.
        models: fine-tuned checkpoints; τ = θ_model − θ_base (or − θ of the entry's ``base``).
        vectors: saved task vectors (``TaskVector.save``); applied to ``base`` even if computed
            from other weights (the provenance says so).
        method: how the entries' task vectors combine (a ``MergeMethod``; None: task arithmetic).
        include: glob patterns of the keys that are edited; the others are copied from the base.
        exclude: glob patterns of keys left unedited (e.g. ``fc3.*`` leaves a head out).
        dtype: the dtype of the output's floating tensors (None: each base tensor's).
        stream: promise to hold about one tensor per input in memory: refuses inputs that must
            be loaded whole (``.pt``, ``.ckpt``) and methods that rank the whole model at once.
        overwrite: replace an existing ``output`` (refused otherwise).
        root: the folder relative paths are resolved against (None: the working directory).
    """

    base: str
    output: str
    models: list[Source] = field(default_factory=list)
    vectors: list[Source] = field(default_factory=list)
    method: MergeMethod | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    stream: bool = False
    overwrite: bool = False
    root: str | None = None

    def __post_init__(self) -> None:
        self.models = [m if isinstance(m, Source) else Source(**dict(m)) for m in self.models]
        self.vectors = [v if isinstance(v, Source) else Source(**dict(v)) for v in self.vectors]
        self.method = self.method if self.method is not None else TaskArithmetic()
        self.include = list(self.include) if self.include is not None else ["*"]
        self.exclude = list(self.exclude or [])
        if not isinstance(self.method, MergeMethod):
            raise ValueError(f"method={self.method!r} is not allowed: give a MergeMethod, e.g. "
                             "{class_path: music.merging.TIES, init_args: {density: 0.2}}.")
        if not self.models and not self.vectors:
            raise ValueError("the recipe has no models and no vectors: give at least one entry under `models` or `vectors`.")
        for name, entry in self.named():
            finite(f"{name}.weight", entry.weight)
            if entry.base is not None and name.startswith("vectors"):
                raise ValueError(f"{name}.base is not allowed: a saved vector already is a difference; "
                                 "`base` belongs to `models` entries.")
        self.method.check_entries(len(self.models) + len(self.vectors))
        if self.method.needs and (missing := [name for name, e in self.named() if e.statistics is None]):
            raise ValueError(f"{', '.join(missing)} without `statistics` is not allowed with method {self.method!r}: "
                             f"it weights every model by its {'/'.join(sorted(self.method.needs))} statistics; give "
                             "each entry a `statistics` file (music.merging.save_statistics).")
        if self.dtype is not None and self.dtype not in OUTPUT_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not allowed: choose one of {sorted(OUTPUT_DTYPES)} or null.")
        if self.stream:
            if self.method.observes:
                raise ValueError(f"stream: true with method {self.method!r} is not allowed: it ranks every tensor at "
                                 "once, which streaming never holds (for TIES use scope: per_tensor or density 1, "
                                 "or set stream: false).")
            for name, path in self.files():
                if path.suffix != ".safetensors":
                    raise ValueError(f"{name}={str(path)!r} is not allowed with stream: true: streaming reads "
                                     ".safetensors files only (convert it, or set stream: false).")
        if self.output_path.suffix != ".safetensors":
            raise ValueError(f"output={self.output!r} is not allowed: the edited model is written as a .safetensors file.")
        self.check_output()
        for name, path in self.files():
            if not path.is_file():
                raise FileNotFoundError(f"{name}: no file at {str(path)!r}.")

    # -- paths and entries --------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        return Path(path) if os.path.isabs(path) else Path(self.root or Path.cwd()) / path

    @property
    def base_path(self) -> Path:
        return self.resolve(self.base)

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output)

    def side_path(self, suffix: str) -> Path:
        """A file beside the output: ``<stem><suffix>``."""
        return self.output_path.with_name(self.output_path.name.removesuffix(".safetensors") + suffix)

    def named(self) -> list[tuple[str, Source]]:
        return ([(f"models[{i}]", m) for i, m in enumerate(self.models)]
                + [(f"vectors[{i}]", v) for i, v in enumerate(self.vectors)])

    def names(self) -> list[str]:
        """Each entry's name in the tables."""
        return [e.name or Path(e.path).name.split(".")[0] for _, e in self.named()]

    def files(self) -> list[tuple[str, Path]]:
        files = [("base", self.base_path)]
        for name, entry in self.named():
            files.append((f"{name}.path", self.resolve(entry.path)))
            if entry.base is not None:
                files.append((f"{name}.base", self.resolve(entry.base)))
            if entry.statistics is not None and self.method.needs:
                files.append((f"{name}.statistics", self.resolve(entry.statistics)))
        return files

    def entries(self) -> list[Entry]:
        return [Entry(name, self.resolve(s.path), s.weight,
                      None if name.startswith("vectors") else self.resolve(s.base) if s.base else self.base_path)
                for name, s in self.named()]

    def check_output(self) -> None:
        if self.output_path.exists() and not self.overwrite:  # checked again before writing: it may have appeared
            raise ValueError(f"output {str(self.output_path)!r} exists: choose another path or set overwrite: true "
                             "(--overwrite true).")

    # -- running ------------------------------------------------------------------------------

    def open(self) -> Merger:
        """The recipe's inputs, opened and checked against each other (see ``Merger``), and the
        entries' statistics given to a method that needs them."""
        if self.method.needs:
            self.method.provide([load_statistics(self.resolve(e.statistics)) for _, e in self.named()])
        return Merger(self.base_path, self.entries(), self.method, include=self.include, exclude=self.exclude,
                      dtype=OUTPUT_DTYPES[self.dtype] if self.dtype else None, compute_dtype=COMPUTE_DTYPE)

    def settings(self) -> dict[str, Any]:
        """The recipe as data (the method as its class path and arguments), for provenance."""
        return {"base": self.base, "output": self.output, "models": [asdict(m) for m in self.models],
                "vectors": [asdict(v) for v in self.vectors], "method": self.method.config(),
                "include": self.include, "exclude": self.exclude, "dtype": self.dtype}

    def write(self, merger: Merger, coef: float, updates: Mapping | None = None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write the edit at ``coef``; returns the apply report and every input's provenance.
        The output's metadata holds the recipe (and ``extra``), whichever path wrote it."""
        coef = finite("lambda_", coef)
        self.check_output()
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        recipe = {k: v for k, v in self.settings().items() if k != "output"} | dict(extra or {})
        metadata = {"format": "pt", "music_merge": json.dumps(plain(recipe), sort_keys=True)}
        report = merger.write(self.output_path, coef, metadata, updates)
        base_fingerprint = report.fingerprints[self.base_path]
        sources = merger.sources(report.fingerprints)
        for source in sources:
            source["base_matches"] = (None if source.get("base_fingerprint") is None
                                      else source["base_fingerprint"] == base_fingerprint)
            if source.get("base") is not None:  # a model with its own base: τ is moved to another model
                source["base_matches"] = (source["base"] == str(self.base_path)
                                          or source["base_fingerprint"] == base_fingerprint)
        return {"output": str(self.output_path), "lambda": coef,
                "report": {"applied": list(report.applied), "skipped": list(report.skipped), "cast": list(report.cast)},
                "base": str(self.base_path), "base_fingerprint": base_fingerprint, "sources": sources}

    def run(self, coef: float = 1.0) -> dict[str, Any]:
        """Merge at one λ and write the output (no evaluation: that is ``music merge``'s)."""
        with self.open() as merger:
            return self.write(merger, coef)


def plain(value: Any) -> Any:
    """JSON/YAML-safe: paths as strings, NaN as null, tuples as lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
