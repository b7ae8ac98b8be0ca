"""The study report: ``<out>/REPORT.md``, its figures and CSV files, from queries on the study database.

Everything in the report is read from the database the grid writes (``study_db``: ``cells``,
``phases``, ``class_results``, ``grid_runs``), for the cells of this grid's plan. Nothing is
typed in by hand — including the statement of when sequential fine-tuning beats merged, which
compares, for every seed and learning rate, each ordering's final test accuracy with the merged
model's (same seed, same pretrained checkpoint, same learning rate).

Every comparison of two strategies is paired by seed (``common.paired_comparison``): cells of
one seed share its pretrained model and held-out samples, so a seed's luck moves both sides
together and only the paired difference, its interval and its Wilcoxon p say whether one
strategy is better than the other.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from music.checkpoint import write_atomically
from music.dashboard import markdown_table
from music.data import MusicDataModule
from music.eda import class_counts, write_pngs
from music.experiments import study_db
from music.experiments.common import (PAIRED_NOTE, Data, fmt_mean_std, fmt_paired, mean_std, mean_std_columns,
                                      paired_comparison, spread_note, write_csv)
from music.experiments.study_grid import Cell, Grid as Settings, lr_tag, method_name, plan
from music.plots import pyplot, save_figure

METRICS = study_db.METRICS
# Cells that are an ingredient of other strategies (one task's fine-tune, which a merge combines),
# not a way of learning every task: they are not ranked.
NOT_RANKED = {"task"}
LABELS = {"final_acc": "test acc", "held_out_acc": "acc on held-out classes", "untouched_acc": "acc on other classes",
          "average_accuracy": "avg acc (tasks)", "backward_transfer": "BWT", "mean_forgetting": "forgetting (tasks)",
          "untouched_forgetting": "forgetting (untouched, vs pretrained)", "collapse_share": "share predicted as last class"}


def load_cells(settings: Settings) -> tuple[list[dict], list[dict]]:
    """One record per finished cell of the plan (its plan entry, metrics, accuracy-matrix rows
    and final confusion matrix), and the grid runs — all from the database."""
    cells, phases, classes, runs = study_db.load(study_db.connect(settings.db_url, read_only=True))
    stored = {(c["seed"], c["name"]): c for c in cells}
    records = []
    for cell in plan(settings):
        row = stored.get((cell.seed, cell.name))
        if row is None:
            continue
        matrix = []
        for phase in phases[row["id"]]:
            line = {"row": phase["row"], "phase": phase["phase"], "acc": phase["acc"]}
            line |= {f"acc_{r['class']}": r["acc"] for r in classes[row["id"]] if r["row"] == phase["row"]}
            matrix.append(line)
        final_row = max(r["row"] for r in classes[row["id"]])
        confusion = [json.loads(r["confusion"]) for r in classes[row["id"]] if r["row"] == final_row]
        records.append({"cell": cell, "metrics": {m: row[m] for m in METRICS}, "rows": matrix,
                        "confusion": np.array(confusion, dtype=float), "seconds": row["wall_seconds"],
                        "host": row["host"]})
    return records, runs


def nan(value) -> float:
    return math.nan if value is None else float(value)


def fmt(values: list[float]) -> str:
    return fmt_mean_std(values, 3)


def order_name(cell: Cell) -> str:
    return arrow(cell.ordering) if cell.ordering else ""


def arrow(ordering) -> str:
    """``[3, 4, 7]`` -> ``3→4→7``, as the report names an ordering."""
    return "→".join(map(str, ordering))


# -- paired comparisons ------------------------------------------------------------------------

def strategy(cell: Cell) -> str:
    """A cell's strategy: its name without its learning-rate tag (``seq_3-4-7``, ``merged``,
    ``method_ewc_3-4-7``, ``joint``), so that a kind of cell the grid gains later is ranked
    without being named here."""
    return cell.name.removesuffix(f"_{lr_tag(cell.lr)}")


def trained_at_every_lr(cell: Cell) -> bool:
    """Whether the cell is one of a learning-rate axis (its name carries the lr); the others
    (pretrained, joint) are trained once per seed and stand beside every fine-tuning lr."""
    return cell.name.endswith(f"_{lr_tag(cell.lr)}")


def by_seed(records: list[dict], chosen, metric: str = "final_acc") -> dict[int, float]:
    """``seed -> metric`` (the final test accuracy) of the chosen cells, the mean over them when
    a seed has several (e.g. its orderings): one value per seed, the unit that pairs."""
    values: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if chosen(r["cell"]):
            values[r["cell"].seed].append(nan(r["metrics"].get(metric)))
    return {seed: statistics.mean(v) for seed, v in values.items()}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """``a - b``, paired over every seed present on both sides."""
    seeds = sorted(set(a) & set(b))
    return paired_comparison([a[s] for s in seeds], [b[s] for s in seeds])


def strategies_at(records: list[dict], lr: float) -> dict[str, list[dict]]:
    """The ranked strategies at one fine-tuning lr and their cells (one per seed)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        c = r["cell"]
        if c.kind not in NOT_RANKED and (not trained_at_every_lr(c) or c.lr == lr):
            out[strategy(c)].append(r)
    return out


RANKED_BY = {"final_acc": "final test accuracy",
             "average_accuracy": "final accuracy on each task's own test set, averaged over the tasks"}


def ranked_metric(settings: Settings) -> str:
    """What strategies are ranked by: the final test accuracy over every class, or, for a grid
    of domain tasks (whose classes every task shares), the mean accuracy over the tasks' own
    test sets."""
    return "final_acc" if settings.tasks is None else "average_accuracy"


def ranking(records: list[dict], settings: Settings) -> list[dict]:
    """Per fine-tuning lr, every strategy ranked by its mean ``ranked_metric`` over seeds
    (equal means share a rank), with its paired difference to the best one (same seeds)."""
    rows = []
    metric = ranked_metric(settings)
    for lr in settings.lrs:
        cells = strategies_at(records, lr)
        acc = {name: mean_std(nan(r["metrics"].get(metric)) for r in rs) for name, rs in cells.items()}
        level = {name: round(acc[name][0], 12) for name in cells}  # float noise makes no rank
        scored = sorted((name for name in cells if acc[name][2]), key=lambda name: (-level[name], name))
        best = by_seed(cells[scored[0]], lambda c: True, metric) if scored else {}
        for name in scored:
            held = mean_std(nan(r["metrics"].get("held_out_acc")) for r in cells[name])
            rank = 1 + sum(level[other] > level[name] for other in scored)
            versus = None if name == scored[0] else paired(by_seed(cells[name], lambda c: True, metric), best)
            rows.append({"lr": lr, "rank": rank, "strategy": name, "kind": cells[name][0]["cell"].kind,
                         "seeds": acc[name][2], "final_acc_mean": acc[name][0], "final_acc_std": acc[name][1],
                         "held_out_acc_mean": held[0], "held_out_acc_std": held[1], "best": scored[0],
                         "vs_best": versus, "cells": cells[name], "metric": metric})
    return rows


def ranking_table(rows: list[dict]) -> list[str]:
    """The ranking as Markdown: mean ± sample std beside the paired difference to the best."""
    metric = rows[0]["metric"] if rows else "final_acc"
    shown = (metric, "held_out_acc") if metric == "final_acc" else (metric, "final_acc")
    table = [[f"{row['lr']:g}", row["rank"], f"`{row['strategy']}`", row["seeds"],
              *(fmt([nan(r["metrics"].get(m)) for r in row["cells"]]) for m in shown),
              "best" if row["vs_best"] is None else fmt_paired(row["vs_best"])] for row in rows]
    return [markdown_table(["lr", "rank", "strategy", "seeds", *(LABELS[m] for m in shown),
                            f"{LABELS[metric]} − best's, paired by seed [95 % CI]"], table)]


def ranking_csv(rows: list[dict], path: Path) -> None:
    """The ranking at full precision, one row per lr and strategy."""
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if k != "cells"}
        versus = row.pop("vs_best") or {}
        out.append(row | {f"vs_best_{k}": versus.get(k) for k in
                          ("n", "mean_diff", "ci_low", "ci_high", "p_wilcoxon", "wins", "losses", "ties")})
    write_csv(path, [{k: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v for k, v in row.items()}
                     for row in out])


# -- tables ------------------------------------------------------------------------------------

def is_replay(cell: Cell) -> bool:
    """A cell of the ``replay`` method (``study.methods``), which the key findings and figures set
    beside sequential fine-tuning without one."""
    return cell.kind == "method" and method_name(cell.method) == "replay"


def group_key(cell: Cell) -> str:
    return f"method:{cell.method}" if cell.kind == "method" else cell.kind


def strategies(s: Settings) -> list[str]:
    """What the grid's fine-tuning cells do, in words, for the report's set-up."""
    first = arrow(s.orderings[0])
    out = [f"sequential in {orderings_label(s, of=True)}" if s.tasks is None
           else f"sequential in {len(s.orderings)} ordering(s) of the tasks {', '.join(f'`{t}`' for t in s.tasks)}"]
    if s.tasks is None:
        out.append("merged (every held-out sample at once)")
    if s.methods:
        out.append(f"sequential ({first}) with each of {', '.join(method_name(m) for m in s.methods)}")
    if s.merges:
        out.append(f"each task fine-tuned alone and its task vector merged into the pretrained model by "
                   f"{', '.join(method_name(m) for m in s.merges)}, all at once and in each ordering, λ chosen on "
                   "`val` (`MERGE_REPORT.md`)")
    return out


def orderings_label(settings: Settings, of: bool = False) -> str:
    """``3→4→7`` for a grid of one ordering, ``all 6 orderings`` (``... of [3, 4, 7]``) otherwise."""
    if len(settings.orderings) == 1:
        return arrow(settings.orderings[0])
    return f"all {len(settings.orderings)} orderings" + (f" of {settings.held_out_classes}" if of else "")


def groups(records: list[dict], settings: Settings) -> list[tuple[str, list[dict]]]:
    """Reference points and, per learning rate, merged / sequential (all orderings) / each method."""
    by = defaultdict(list)
    for r in records:
        c = r["cell"]
        by[(group_key(c), None if c.kind in ("pretrain", "joint") else c.lr)].append(r)
    out = [("pretrained", by[("pretrain", None)]), ("joint (all training data)", by[("joint", None)])]
    for lr in settings.lrs:
        out += [(f"merged, lr {lr:g}", by[("merged", lr)]),
                (f"sequential ({orderings_label(settings)}), lr {lr:g}", by[("seq", lr)])]
        first = arrow(settings.orderings[0])  # method cells train in the first ordering
        out += [(f"sequential + {method_name(m)} ({first}), lr {lr:g}", by[(f"method:{m}", lr)]) for m in settings.methods]
    return out


def reference_table(records: list[dict], settings: Settings) -> list[str]:
    columns = ["final_acc", "held_out_acc", "untouched_acc", "untouched_forgetting", "collapse_share"]
    rows = [[name, len(rs), *(fmt([nan(r["metrics"].get(c)) for r in rs]) for c in columns)]
            for name, rs in groups(records, settings)]
    return [markdown_table(["model", "cells", *(LABELS[c] for c in columns)], rows)]


def continual_table(records: list[dict], settings: Settings) -> list[str]:
    columns = ["average_accuracy", "backward_transfer", "mean_forgetting", "untouched_forgetting", "collapse_share"]
    rows = [[name, *(fmt([nan(r["metrics"].get(c)) for r in rs]) for c in columns)]
            for name, rs in groups(records, settings)[2:] if rs and rs[0]["cell"].kind in ("seq", "method")]
    return [markdown_table(["model", *(LABELS[c] for c in columns)], rows)]


def methods_table(records: list[dict], settings: Settings) -> list[str]:
    """Per learning rate, the first ordering with each method beside the same ordering without
    one and merged: like with like (same seeds, checkpoints, phases)."""
    first = settings.orderings[0]
    columns = ["final_acc", "held_out_acc", "untouched_acc", "mean_forgetting", "untouched_forgetting", "backward_transfer"]
    rows = [("none (sequential)", lambda c: c.kind == "seq" and c.ordering == first)]
    rows += [(method_name(m), lambda c, m=m: c.kind == "method" and c.method == m) for m in settings.methods]
    rows.append(("merged (all classes at once)", lambda c: c.kind == "merged"))
    table = []
    for lr in settings.lrs:
        none = by_seed(records, lambda c, lr=lr: c.lr == lr and rows[0][1](c))
        for i, (label, chosen) in enumerate(rows):
            rs = [r for r in records if r["cell"].lr == lr and chosen(r["cell"])]
            versus = "" if i == 0 else fmt_paired(paired(by_seed(rs, lambda c: True), none))
            table.append([f"{lr:g}", label, len(rs), *(fmt([nan(r["metrics"].get(c)) for r in rs]) for c in columns), versus])
    return [markdown_table(["lr", "fine-tuning", "seeds", *(LABELS[c] for c in columns),
                            "test acc − none's, paired by seed [95 % CI]"], table)]


def comparisons(records: list[dict], settings: Settings) -> dict:
    """Per lr and ordering: the sequential − merged differences in final test accuracy, paired by seed."""
    merged = {(r["cell"].seed, r["cell"].lr): r["metrics"]["final_acc"] for r in records if r["cell"].kind == "merged"}
    out: dict = {lr: {} for lr in settings.lrs}
    for r in records:
        c = r["cell"]
        if c.kind == "seq" and (c.seed, c.lr) in merged:
            out[c.lr].setdefault(order_name(c), []).append(r["metrics"]["final_acc"] - merged[(c.seed, c.lr)])
    return out


def ordering_table(records: list[dict], settings: Settings) -> list[str]:
    diffs = comparisons(records, settings)
    rows = []
    for ordering in settings.orderings:
        name = arrow(ordering)
        accs = [fmt([r["metrics"]["final_acc"] for r in records if r["cell"].kind == "seq" and r["cell"].lr == lr
                     and r["cell"].ordering == ordering]) for lr in settings.lrs]
        wins = [f"{sum(d > 0 for d in diffs[lr].get(name, []))}/{len(diffs[lr].get(name, []))}" for lr in settings.lrs]
        versus = [fmt_paired(paired(by_seed(records, lambda c, lr=lr: c.kind == "seq" and c.lr == lr and c.ordering == ordering),
                                    by_seed(records, lambda c, lr=lr: c.kind == "merged" and c.lr == lr)))
                  for lr in settings.lrs]
        rows.append([name, *accs, *wins, *versus])
    merged = [fmt([r["metrics"]["final_acc"] for r in records if r["cell"].kind == "merged" and r["cell"].lr == lr])
              for lr in settings.lrs]
    rows.append(["merged", *merged, *([""] * 2 * len(settings.lrs))])
    return [markdown_table(["ordering", *(f"lr {lr:g}: test acc" for lr in settings.lrs),
                            *(f"lr {lr:g}: wins vs merged" for lr in settings.lrs),
                            *(f"lr {lr:g}: − merged, paired by seed [95 % CI]" for lr in settings.lrs)], rows)]


def statement(records: list[dict], settings: Settings, train_size: int) -> list[str]:
    """When does sequential beat merged? Counted from the paired cells, in plain words."""
    diffs = comparisons(records, settings)
    lines = []
    for lr in settings.lrs:
        every = [d for ds in diffs[lr].values() for d in ds]
        if not every:
            continue
        wins = sum(d > 0 for d in every)
        mean, std, n = mean_std(every)
        better = [o for o, ds in diffs[lr].items() if statistics.mean(ds) > 0]
        verdict = ("never beat merged" if wins == 0 else "beat merged in every cell" if wins == n
                   else f"beat merged in {wins} of {n} cells")
        seeds = paired(by_seed(records, lambda c, lr=lr: c.kind == "seq" and c.lr == lr),
                       by_seed(records, lambda c, lr=lr: c.kind == "merged" and c.lr == lr))
        lines.append(
            f"- **lr {lr:g}**: sequential {verdict} ({wins}/{n} seed × ordering cells). Sequential (each seed's mean "
            f"over its orderings) minus merged, paired by seed: {fmt_paired(seeds)}; per cell "
            f"{mean:+.3f}{'' if n == 1 else f' ± {std:.3f}'} ({spread_note([n], 'cells')}). "
            + (f"Orderings better than merged on average: {', '.join(better)}." if better
               else "No ordering is better than merged on average.")
        )
    seq_by_lr = {lr: [r["metrics"]["final_acc"] for r in records if r["cell"].kind == "seq" and r["cell"].lr == lr]
                 for lr in settings.lrs}
    spreads = []
    for lr in settings.lrs:
        per_order = {o: statistics.mean([r["metrics"]["final_acc"] for r in records if r["cell"].kind == "seq"
                                         and r["cell"].lr == lr and order_name(r["cell"]) == o])
                     for o in diffs[lr]}
        if len(per_order) > 1:
            best, worst = max(per_order, key=per_order.get), min(per_order, key=per_order.get)
            gap = paired(*(by_seed(records, lambda c, lr=lr, o=o: c.kind == "seq" and c.lr == lr and order_name(c) == o)
                           for o in (best, worst)))
            spreads.append(f"lr {lr:g}: best {best} ({per_order[best]:.3f}), worst {worst} ({per_order[worst]:.3f}), "
                           f"best − worst paired by seed {fmt_paired(gap)}")
    if spreads:
        lines.append("- **Does the order matter?** Mean final test accuracy of the best and worst ordering — "
                     + "; ".join(spreads) + ". (Best and worst are picked on these seeds, so their p is optimistic.)")
    replay = {lr: [r["metrics"]["final_acc"] for r in records if is_replay(r["cell"]) and r["cell"].lr == lr]
              for lr in settings.lrs}
    pretrained = [r["metrics"]["final_acc"] for r in records if r["cell"].kind == "pretrain"]
    parts = []
    first = settings.orderings[0]
    for lr in settings.lrs:
        if replay[lr] and seq_by_lr[lr]:
            gain = paired(by_seed(records, lambda c, lr=lr: is_replay(c) and c.lr == lr),
                          by_seed(records, lambda c, lr=lr: c.kind == "seq" and c.lr == lr and c.ordering == first))
            parts.append(f"lr {lr:g}: replay {fmt(replay[lr])} vs sequential without replay {fmt(seq_by_lr[lr])}; "
                         f"replay − sequential in the same ordering ({arrow(first)}), paired by seed: {fmt_paired(gain)}")
    joint = [r["metrics"]["final_acc"] for r in records if r["cell"].kind == "joint"]
    if joint and pretrained:
        relation = "above" if statistics.mean(joint) > statistics.mean(pretrained) else "below"
        gap = paired(by_seed(records, lambda c: c.kind == "joint"), by_seed(records, lambda c: c.kind == "pretrain"))
        lines.append(f"- **Joint** ({settings.joint_epochs or settings.pretrain_epochs} epochs on all {train_size:,} training "
                     f"samples): {fmt(joint)}, {relation} the pretrained model ({fmt(pretrained)}, "
                     f"{settings.pretrain_epochs} epochs without the held-out samples; joint − pretrained, paired by seed: "
                     f"{fmt_paired(gap)})"
                     + ("; with fewer epochs than pretraining it is not a true upper bound here."
                        if relation == "below" else "."))
    if parts:
        lines.append(f"- **Replay** (the `replay` method, `music.methods.Replay`, in {arrow(first)}; its memory "
                     "holds `remaining` samples first, then each finished class): "
                     + "; ".join(parts) + f" (pretrained: {fmt(pretrained)}).")
    return lines


# -- figures -----------------------------------------------------------------------------------

def plot_phases(records: list[dict], settings: Settings, path: Path) -> None:
    """Test accuracy after each phase (row 0: the pretrained model), one line per ordering, and
    the ``replay`` method's (dashed) in the first ordering."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(settings.lrs), figsize=(5 * len(settings.lrs), 4.2), sharey=True, squeeze=False)
    reference = {k: [r["metrics"]["final_acc"] for r in records if r["cell"].kind == k] for k in ("pretrain", "joint")}
    for ax, lr in zip(axes[0], settings.lrs):
        lines = [(arrow(o), False, lambda c, o=o: c.kind == "seq" and c.ordering == o) for o in settings.orderings]
        lines.append((f"{arrow(settings.orderings[0])} + replay", True, is_replay))
        for label, replay, chosen in lines:
            rs = [r for r in records if chosen(r["cell"]) and r["cell"].lr == lr]
            if not rs:
                continue
            acc = np.array([[float(row["acc"]) for row in r["rows"]] for r in rs])
            mean, std = mean_std_columns(acc)
            line, = ax.plot(range(acc.shape[1]), mean, marker="o", label=label,
                            linestyle="--" if replay else "-", linewidth=2.5 if replay else 1.5)
            ax.fill_between(range(acc.shape[1]), mean - std, mean + std, color=line.get_color(), alpha=0.15)
        merged = [r["metrics"]["final_acc"] for r in records if r["cell"].kind == "merged" and r["cell"].lr == lr]
        if merged:
            mean, std = mean_std_columns(np.array(merged)[:, None])
            ax.errorbar([len(settings.held_out_classes)], mean, std, fmt="ks", label="merged")
        for kind, style in (("pretrain", ":"), ("joint", "-.")):
            if reference[kind]:
                ax.axhline(np.mean(reference[kind]), color="grey", linestyle=style, label="pretrained" if kind == "pretrain" else "joint")
        ax.set(title=f"fine-tuning lr {lr:g}", xlabel="after phase (0: pretrained)", xticks=range(len(settings.held_out_classes) + 1))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean ± sample std over seeds)")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    save_figure(fig, path, 100)


def fine_tuning_kinds(settings: Settings) -> list[tuple[str, Callable[[Any], bool]]]:
    """The ways of fine-tuning the per-lr figures compare, as (label, cell selector)."""
    return [("sequential (all orderings)", lambda c: c.kind == "seq"), ("merged", lambda c: c.kind == "merged"),
            (f"sequential ({arrow(settings.orderings[0])}) + replay", is_replay)]


def plot_forgetting(records: list[dict], settings: Settings, path: Path) -> None:
    """Per class: pretrained accuracy minus final accuracy (positive: forgotten)."""
    plt = pyplot()
    kinds = [(k, chosen) for k, chosen in fine_tuning_kinds(settings) if any(chosen(r["cell"]) for r in records)]
    fig, axes = plt.subplots(1, len(settings.lrs), figsize=(5 * len(settings.lrs), 4), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], settings.lrs):
        for i, (kind, chosen) in enumerate(kinds):
            rs = [r for r in records if chosen(r["cell"]) and r["cell"].lr == lr]
            if not rs:
                continue
            drop = np.array([[float(r["rows"][0][f"acc_{c}"]) - float(r["rows"][-1][f"acc_{c}"])
                              for c in range(len(r["confusion"]))] for r in rs])
            x = np.arange(drop.shape[1]) + (i - (len(kinds) - 1) / 2) * 0.8 / len(kinds)
            mean, std = mean_std_columns(drop)
            ax.bar(x, mean, 0.8 / len(kinds), yerr=std, label=kind, capsize=2)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(title=f"lr {lr:g}", xlabel="class", xticks=range(10))
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("pretrained acc − final acc (mean ± sample std)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Forgetting per class (negative: the class was learned)")
    save_figure(fig, path, 100)


def plot_lr(records: list[dict], settings: Settings, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), squeeze=False)
    for ax, metric in zip(axes[0], ("final_acc", "held_out_acc", "untouched_acc")):
        for label, chosen in fine_tuning_kinds(settings):
            points = [(lr, [nan(r["metrics"].get(metric)) for r in records if chosen(r["cell"]) and r["cell"].lr == lr])
                      for lr in settings.lrs]
            points = [(lr, mean_std(v)) for lr, v in points if v]
            if points:
                ax.errorbar([p[0] for p in points], [p[1][0] for p in points], [_bar(p[1][1]) for p in points],
                            marker="o", capsize=3, label=label)
        for kind, style in (("pretrain", ":"), ("joint", "-.")):
            values = [nan(r["metrics"].get(metric)) for r in records if r["cell"].kind == kind]
            if values and not all(math.isnan(v) for v in values):
                ax.axhline(np.nanmean(values), color="grey", linestyle=style, label="pretrained" if kind == "pretrain" else "joint")
        ax.set(xscale="log", xlabel="fine-tuning learning rate", title=LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean ± sample std over cells")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path, 100)


def plot_confusions(records: list[dict], settings: Settings, path: Path) -> None:
    """Final confusion matrices summed over seeds, rows normalised (share of each true class)."""
    plt = pyplot()
    panels = [("pretrained", lambda c: c.kind == "pretrain"), ("joint", lambda c: c.kind == "joint")]
    for lr in settings.lrs:
        first = settings.orderings[0]
        panels += [(f"merged, lr {lr:g}", lambda c, lr=lr: c.kind == "merged" and c.lr == lr),
                   (f"seq {arrow(first)}, lr {lr:g}", lambda c, lr=lr, o=first: c.kind == "seq" and c.lr == lr and c.ordering == o),
                   (f"replay, lr {lr:g}", lambda c, lr=lr: is_replay(c) and c.lr == lr)]
    panels = [(t, [r["confusion"] for r in records if match(r["cell"])]) for t, match in panels]
    panels = [(t, sum(ms)) for t, ms in panels if ms]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, confusion) in zip(axes.flat, panels):
        share = confusion / confusion.sum(1, keepdims=True)
        ax.axis("on")
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(share)):
            for j in range(len(share)):
                if share[i, j] >= 0.01:
                    ax.text(j, i, f"{share[i, j] * 100:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(10), yticks=range(10))
    fig.suptitle("Final test confusion matrices, summed over seeds (% of each true class)")
    save_figure(fig, path, 90)


# -- files -------------------------------------------------------------------------------------

def _num(value) -> str:
    return f"{value:.6f}" if isinstance(value, float) else ""


def write_csvs(records: list[dict], out: Path) -> None:
    write_csv(out / "study_cells.csv",
              [[r["cell"].seed, r["cell"].kind, r["cell"].method or "", r["cell"].name, r["cell"].lr,
                order_name(r["cell"]), *(f"{nan(r['metrics'].get(m)):.4f}" for m in METRICS),
                f"{r['seconds']:.1f}"] for r in records],
              ["seed", "kind", "method", "cell", "lr", "ordering", *METRICS, "seconds"])
    write_csv(out / "study_accuracy_matrices.csv",
              [[r["cell"].seed, r["cell"].name, row["row"], row["phase"], *(_num(row.get(f"acc_{c}")) for c in range(10)),
                _num(row["acc"])] for r in records for row in r["rows"]],
              ["seed", "cell", "row", "phase", *(f"acc_{c}" for c in range(10)), "acc"])


def write_report(settings: Settings, data: Data) -> Path:
    out = Path(settings.out)
    figures = out / "figures"
    records, timing = load_cells(settings)
    planned = plan(settings)
    if not records:
        raise FileNotFoundError(f"No finished cells of this grid in {settings.db_url}: run the grid first.")
    eda = _eda(settings, data, out / "study_eda")  # first: it needs the data, and a missing data set writes nothing
    figures.mkdir(parents=True, exist_ok=True)
    write_csvs(records, out)
    ranked = ranking(records, settings)
    ranking_csv(ranked, out / "study_ranking.csv")
    grid = Path(settings.runs_dir) / "grid.json"
    if grid.exists():  # the settings and cell list travel with the report (run directories do not)
        write_atomically(out / "study_grid.json", grid.read_text())
    plot_phases(records, settings, figures / "accuracy_after_each_phase.png")
    plot_forgetting(records, settings, figures / "forgetting_per_class.png")
    plot_lr(records, settings, figures / "accuracy_vs_lr.png")
    plot_confusions(records, settings, figures / "confusion_matrices.png")
    train_size, test_size = sum(eda["train"]), sum(eda["test"])
    cell_seconds = sum(r["seconds"] for r in records)
    wall = " + ".join(f"{t['seconds'] / 60:.1f} min ({t['ran']} cells run, {t['skipped']} skipped, {t['workers']} Dask "
                      f"workers, {'local cluster' if t['scheduler'] == 'local' else 'scheduler ' + t['scheduler']})"
                      for t in timing) or "not recorded"
    s = settings
    text = [
        "# Multi-seed study: does the order matter, and how much is forgotten?",
        "",
        "Generated by `music study` (`music/experiments/study_report.py`): every number below is a query on the "
        "grid's results database (`study_db`; the schema is in `docs/study.md`).",
        "",
        "## Setup",
        "",
        f"- Seeds {s.seeds}; per seed ONE model pretrained on `remaining` ({s.pretrain_epochs} epochs, Adam lr "
        f"{s.pretrain_lr:g}, batch 32{'; the paper uses 50 epochs — shortened so the grid fits the time budget' if s.pretrain_epochs < 50 else ''}), "
        "reused by every cell of that seed."
        + (" Each seed also draws its own held-out samples (`split_seed` = seed)." if s.split_seed_follows_seed else ""),
        f"- Fine-tuning from that checkpoint, {s.finetune_epochs} epochs per phase, a fresh Adam per phase, learning rates "
        f"{', '.join(f'{lr:g}' for lr in s.lrs)}: {'; '.join(strategies(s))}. Joint: trained from scratch on the whole "
        f"training set ({train_size:,}) for {s.joint_epochs or s.pretrain_epochs} epochs"
        + (" — the upper bound." if s.tasks is None else " (plain images: not trained on the tasks' domains)."),
        *([f"- Held-out samples per class: {s.samples_per_class}"
           + (" — every training sample of the held-out classes, so `remaining` has none of them and each task is a "
              "class the pretrained model has never seen." if s.samples_per_class == "all" else ".")]
          if s.samples_per_class is not None else []),
        f"- Test set: the full {test_size:,}-image MNIST test set after every phase. Cells finished: {len(records)}/{len(planned)}."
        + (f" Training limited to {s.limit_train_batches} batches an epoch (quick mode)." if s.limit_train_batches else ""),
        f"- Wall time: {wall}; sum of cell times {cell_seconds / 60:.1f} min. Machine: {platform.machine()}, "
        f"{platform.system()}, {os.cpu_count()} CPU cores; {s.threads} torch thread(s) per cell; cells ran on "
        f"{', '.join(sorted({r['host'] for r in records}))}.",
        "- Full settings and cell list: `study_grid.json`; per-cell numbers: `study_cells.csv`, the ranking: "
        "`study_ranking.csv`, accuracy matrices: "
        "`study_accuracy_matrices.csv`.",
        "",
        "## When does sequential beat merged?",
        "",
        "Paired by seed: each ordering's final test accuracy against the merged model fine-tuned from the same "
        "checkpoint at the same learning rate.",
        "",
        *statement(records, settings, train_size),
        "",
        PAIRED_NOTE,
        "",
        f"## Ranking of every strategy ({RANKED_BY[ranked_metric(s)]})",
        "",
        "Per fine-tuning learning rate, every kind of cell of the grid — each ordering of sequential fine-tuning, "
        "merged, each method, each merge method (all at once and in each ordering), and the pretrained and "
        "joint models (trained once per seed, shown at every lr) — ranked by its mean "
        f"{RANKED_BY[ranked_metric(s)]} over seeds, beside its paired difference to the best one "
        f"(same seeds); {spread_note([r['seeds'] for r in ranked]) if ranked else 'no cells'}. Strategy names are the cells' names without "
        "their lr (`study_cells.csv`); full precision: `study_ranking.csv`.",
        "",
        *ranking_table(ranked),
        "",
        f"## Reference points ({spread_note([len(rs) for _, rs in groups(records, s) if rs], 'cells')})",
        "",
        *reference_table(records, settings),
        "",
        "The held-out classes are " + ", ".join(map(str, s.held_out_classes)) + "; the other (untouched) classes are all others. "
        "'share predicted as last class' is the share of all test predictions equal to the last phase's class "
        "(≈0.10 for a healthy model; 1.0 is total collapse).",
        "",
        f"## Sequential per ordering vs merged (final test accuracy, {spread_note([len(s.seeds)])})",
        "",
        *ordering_table(records, settings),
        "",
        *([f"## What keeps forgetting down ({arrow(s.orderings[0])}, {spread_note([len(s.seeds)])})",
           "",
           "Each method is a config delta over the sequential cells (`music fit --config seq_finetune --config "
           "<method>`), told that the model was pretrained on `remaining`, so that it protects pretraining as an "
           "earlier task. Configs: " + ", ".join(f"`{m}`" for m in s.methods) + " (`configs/methods/`; their "
           "hyper-parameters are the shipped ones, not tuned on this grid).",
           "",
           *methods_table(records, settings),
           ""] if s.methods else []),
        f"## Continual-learning metrics (sequential cells; {spread_note([len(s.seeds)])} and orderings)",
        "",
        "Average accuracy: mean final accuracy on the fine-tuning tasks (classes); BWT: final minus just-learned "
        "accuracy, averaged over all tasks but the last (Lopez-Paz & Ranzato 2017); forgetting (tasks): best earlier "
        "minus final accuracy on the tasks learned before the last (Chaudhry et al. 2018); forgetting (untouched): "
        "pretrained minus final accuracy, averaged over the untouched classes.",
        "",
        *continual_table(records, settings),
        "",
        "## Figures",
        "",
        "![accuracy after each phase](figures/accuracy_after_each_phase.png)",
        "",
        "![forgetting per class](figures/forgetting_per_class.png)",
        "",
        "![accuracy vs fine-tuning learning rate](figures/accuracy_vs_lr.png)",
        "",
        "![confusion matrices](figures/confusion_matrices.png)",
        "",
        "## Data",
        "",
        f"Splits of seed {s.seeds[0]} (`music eda` makes the same figures for any data config):",
        "",
        markdown_table(["split", "samples", "per class (0–9)"],
                       [[name, f"{sum(counts):,}", " ".join(map(str, counts))] for name, counts in eda.items()]),
        "",
        "![class counts](study_eda/class_counts.png)",
        "",
        "Random samples of the merged split (the other splits: `study_eda/samples_<split>.png`):",
        "",
        "![merged samples](study_eda/samples_merged.png)",
        "",
    ]
    write_atomically(out / "REPORT.md", "\n".join(text))
    return out / "REPORT.md"


def _eda(settings: Settings, data: Data, out: Path) -> dict[str, list[int]]:
    datamodule = MusicDataModule(data_dir=data.data_dir, download=False, held_out_classes=settings.held_out_classes,
                                 split_seed=settings.seeds[0] if settings.split_seed_follows_seed else 0,
                                 **({} if settings.samples_per_class is None else {"samples_per_class": settings.samples_per_class}))
    write_pngs(datamodule, str(out))
    return class_counts(datamodule)


def _bar(std: float) -> float:
    """An error bar's half-length: none for a single value (whose sample std is undefined)."""
    return 0.0 if math.isnan(std) else std
