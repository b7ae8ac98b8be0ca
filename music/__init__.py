"""MUSIC: Make Unification Simple In Image Classification."""

from music import speed  # noqa: F401  (first: it imports torchmetrics before Lightning does)
