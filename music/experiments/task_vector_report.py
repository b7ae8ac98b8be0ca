"""The task-vector geometry section of a report: ``music.task_vector_analysis`` as two tables
(Markdown + CSV through ``common.write_table``) and a figure, for any experiment that has task
vectors (``music taskvectors`` writes it into ``task_vectors.md``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from music.experiments.common import write_table
from music.task_vector import TaskVector
from music.task_vector_analysis import analyse, plot_analysis


def _num(value: float, digits: int = 3) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def write_analysis_section(vectors: Mapping[str, TaskVector], out_dir: str | Path,
                           stem: str = "task_vector_analysis") -> str:
    """``<stem>_cosine.md/.csv``, ``<stem>_layers.md/.csv`` and ``<stem>.png`` in ``out_dir``;
    returns the Markdown section (``## Task-vector geometry``) that shows them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(vectors)
    names = list(analysis.names)
    cosine = write_table(
        out_dir, f"{stem}_cosine", "Cosine similarity of the task vectors",
        "Whole vectors, every key flattened into one; 0: orthogonal (little interference when added), "
        "1: the same direction. A zero vector has none (–).",
        ["τ", *names], [[name, *(_num(c) for c in row)] for name, row in zip(names, analysis.cosine)],
        [{"vector": name, **dict(zip(names, map(float, row)))} for name, row in zip(names, analysis.cosine)])
    layers = write_table(
        out_dir, f"{stem}_layers", "Per layer: sign conflicts, norms, effective ranks",
        "Sign conflicts: the share of the layer's entries, among those where at least two vectors are nonzero, "
        "whose nonzero values disagree in sign (TIES-merging's conflicts; – with fewer than two vectors). ‖τ‖: "
        "the layer's L2 norm in each vector. Effective rank (Roy & Vetterli 2007): exp of the entropy of the "
        "layer update's singular values normalised to sum 1 — 1 for a rank-1 update, n for an n × n identity; "
        "2-D layers only.",
        ["layer", "shape", "sign conflicts", *(f"‖τ‖ {n}" for n in names), *(f"eff. rank {n}" for n in names)],
        [[layer, "×".join(map(str, shape)), _num(analysis.sign_conflict[j]),
          *(_num(analysis.norms[i, j], 4) for i in range(len(names))),
          *((_num(r, 2) for r in analysis.effective_rank[layer]) if layer in analysis.effective_rank
            else ["–"] * len(names))]
         for j, (layer, shape) in enumerate(zip(analysis.layers, analysis.shapes))],
        [{"layer": layer, "shape": "x".join(map(str, shape)), "sign_conflict": float(analysis.sign_conflict[j]),
          **{f"norm_{n}": float(analysis.norms[i, j]) for i, n in enumerate(names)},
          **{f"effective_rank_{n}": (analysis.effective_rank[layer][i] if layer in analysis.effective_rank else "")
             for i, n in enumerate(names)}}
         for j, (layer, shape) in enumerate(zip(analysis.layers, analysis.shapes))])
    plot_analysis(analysis, out_dir / f"{stem}.png")
    return "\n".join([
        "## Task-vector geometry", "",
        f"The task vectors τ = θ_finetuned − θ_pretrained of {', '.join(f'`{n}`' for n in names)} "
        f"(`music.task_vector_analysis`). CSVs: `{stem}_cosine.csv`, `{stem}_layers.csv`.", "",
        "###" + cosine.removeprefix("#").rstrip("\n"), "",  # write_table's title, one level under the section
        "###" + layers.removeprefix("#").rstrip("\n"), "",
        f"![task-vector geometry]({stem}.png)", ""])
