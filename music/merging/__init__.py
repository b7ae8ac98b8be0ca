"""Model merging as a library: methods, I/O, the engine and the recipe, one file each.

- ``methods``: ``MergeMethod`` and ``TaskArithmetic``, ``TIES``, ``DARE``: per-tensor maths, as
  plug-ins a recipe names by class path (``music.merging.TIES``); beside it, one file per family
  of later methods: ``spectral`` (``TSVM``, ``IsoC``, ``IsoCTS``), ``masks`` (``Consensus``,
  ``Breadcrumbs``), ``weighted`` (``Fisher``, ``RegMean``).
- ``statistics``: the data statistics (diagonal Fisher, input Gram matrices) that ``Fisher`` and
  ``RegMean`` weight models by, computed from a model and data, saved as safetensors.
- ``io``: safetensors reader / writer / fingerprint hasher, key by key; in-memory state_dicts
  and torch files are read through the same reader interface.
- ``engine``: ``Merger``, the one loop every merge and apply runs.
- ``recipe``: ``Recipe`` and ``Source``, the recipe as checked data.
- ``sequential``: ``sequential_merge``, the task vectors absorbed one at a time in an order.
- ``checks``: the checks they share.

Evaluation, λ selection and reports are the experiment's (``music merge``,
``music/experiments/merge.py``); this package knows no dataset and no command line.
"""

from music.merging.checks import TaskVectorError
from music.merging.engine import Entry, Merger, MergeReport, apply_update
from music.merging.io import (
    Hasher,
    SafetensorsReader,
    StateDictReader,
    fingerprint,
    hashing_beside,
    open_reader,
    write_safetensors,
)
from music.merging.masks import Breadcrumbs, Consensus
from music.merging.methods import DARE, TIES, MergeMethod, TaskArithmetic
from music.merging.recipe import Recipe, Source
from music.merging.sequential import Step, sequential_merge
from music.merging.spectral import TSVM, IsoC, IsoCTS
from music.merging.statistics import compute_statistics, load_statistics, save_statistics
from music.merging.weighted import Fisher, RegMean

__all__ = ["Breadcrumbs", "Consensus", "DARE", "Entry", "Fisher", "Hasher", "IsoC", "IsoCTS", "MergeMethod",
           "MergeReport", "Merger", "Recipe", "RegMean", "SafetensorsReader", "Source", "StateDictReader", "Step",
           "TIES", "TSVM", "TaskArithmetic", "TaskVectorError", "apply_update", "compute_statistics", "fingerprint",
           "hashing_beside", "load_statistics", "open_reader", "save_statistics", "sequential_merge",
           "write_safetensors"]
