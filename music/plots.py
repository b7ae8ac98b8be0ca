"""Matplotlib for files and TensorBoard only: every figure MUSIC draws goes through here.

Imported lazily by the modules that plot, so ``python -m music --help`` and runs that draw
nothing never load matplotlib."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: never a window, works on headless machines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
