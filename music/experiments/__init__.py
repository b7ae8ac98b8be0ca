"""Experiments: the studies MUSIC ships, each a ``music <name>`` subcommand.

An experiment is a class whose constructor arguments (typed, documented in its docstring) are
its settings and whose ``run()`` does the work; ``music <name>`` parses them with jsonargparse
from ``--config`` files (a shipped config by name, e.g. ``--config study``, or a path) and
dotted overrides, exactly as the Lightning subcommands parse theirs. Experiments may know
datasets, class counts and the paper's protocol; the library (``music/*.py``) does not.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from music import speed  # noqa: F401  (first: it imports torchmetrics before Lightning does, music.speed)
from music.config import shipped_config
from music.runner import UsageError


@dataclass(frozen=True)
class Experiment:
    target: str  # "module:Class"
    summary: str
    default_config: str | None = None  # a shipped config read before any --config: experiments/<command>

    def load(self) -> type:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


EXPERIMENTS: dict[str, Experiment] = {
    "table1": Experiment("music.experiments.table1:Table1",
                         "the paper's Table I: pretrain, then sequential and merged fine-tuning, per seed",
                         "experiments/table1"),
    "finetune-compare": Experiment("music.experiments.finetune_compare:FineTuneCompare",
                                   "full vs LoRA vs head-only fine-tuning of one pretrained model",
                                   "experiments/finetune_compare"),
    "attention": Experiment("music.experiments.attention:AttentionMaps",
                            "ViT: pretrain, fine-tune full and LoRA, draw last-block CLS attention maps",
                            "experiments/attention"),
    "continual": Experiment("music.experiments.continual:ContinualStudy",
                            "continual-learning methods x scenarios x seeds on a protocol (Split-MNIST, MUSIC)",
                            "experiments/continual"),
    "study": Experiment("music.experiments.study:Study",
                        "the multi-seed grid (seeds x orderings x lrs, merged, replay, joint) on Dask, results in SQL",
                        "experiments/study"),
    "eda": Experiment("music.experiments.eda:EDA", "class counts and sample grids of every split, as PNGs", "experiments/eda"),
    "merge": Experiment("music.experiments.merge:Merge",
                        "edit a model with task vectors from a recipe (task arithmetic, TIES, DARE; λ chosen on val)"),
    "taskvectors": Experiment("music.experiments.taskvectors:TaskVectors",
                              "train the task-vector studies' models, then run their merge recipes", "experiments/taskvectors"),
    "tune": Experiment("music.experiments.tune:Tune",
                       "hyperparameter search (Optuna) of a run config on its validation split, pruned per phase, on Dask",
                       "experiments/tune"),
}


def parser_for(name: str):
    """The jsonargparse parser of ``music <name>``: the experiment's constructor arguments."""
    experiment = EXPERIMENTS[name]
    cls = experiment.load()
    defaults = [str(shipped_config(experiment.default_config))] if experiment.default_config else []
    parser = ArgumentParser(prog=f"music {name}", description=_description(cls), default_config_files=defaults,
                            exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (repeatable; a shipped name or a path)")
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=True, sub_configs=True)
    return parser, cls


def _description(cls: type) -> str:
    """The class docstring without its ``Args:`` section (each argument's help shows that)."""
    return (cls.__doc__ or "").split("Args:")[0].strip()


def run_experiment(name: str, args: list[str]) -> Any:
    """Parse ``args`` for experiment ``name``, build it and ``run()`` it; returns what it returns."""
    parser, cls = parser_for(name)
    try:
        config = parser.parse_args(args)
    except ArgumentError as err:
        raise UsageError(f"music {name}: {err}") from err
    return cls(**instantiate(parser, config)).run()


def instantiate(parser, config) -> dict[str, Any]:
    """The experiment's constructor arguments from a parsed config (classes built, the
    parser's own keys dropped)."""
    # jsonargparse >= 4.49 names it ``instantiate``; older releases only ``instantiate_classes``
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes
    init = build(config).as_dict()
    for key in ("config", "print_config", "__path__", "__default_config__"):
        init.pop(key, None)
    return init
