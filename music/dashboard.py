"""What a run shows in TensorBoard: one tag per quantity, per-class charts, HParams, tables.

A quantity keeps one tag for the whole run (``test/acc``), with one point per evaluation at
the global step it was made, so "test accuracy after each phase" is one curve, and runs whose
steps continue each other (``Classifier(init_from=...)``) share one x-axis. Per-class values go
under ``<prefix>_per_class/<metric>/class_<c>``, a group of their own, and are drawn as one
multi-line chart per metric in the Custom Scalars tab. Every run writes the same layout and the
same HParams experiment (so TensorBoard, which merges layouts and reads one experiment
definition, shows every run's settings), and a Markdown table of its evaluations in the Text tab,
where a series of one point per phase reads better than on a smoothed chart.

Only a ``TensorBoardLogger`` gets figures, text, layout and HParams; scalars go to any logger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# evaluate()'s macro keys -> the tag's last part; "f1" alone would read as a per-class value
MACRO_NAMES = {"acc": "acc", "loss": "loss", "f1": "f1_macro", "precision": "precision_macro",
               "recall": "recall_macro"}
PER_CLASS = ("f1", "recall", "precision")
CONTINUAL = ("average_accuracy", "backward_transfer", "mean_forgetting", "held_out_acc", "untouched_acc",
             "untouched_forgetting", "collapse_share", "reference_acc")
# The metric columns of the HParams tab: the last value of each tag, i.e. the run's final one.
HPARAM_METRICS = ("test/acc", "test/f1_macro", "test/loss", "continual/average_accuracy",
                  "continual/backward_transfer", "continual/mean_forgetting", "continual/held_out_acc",
                  "continual/untouched_acc", "continual/collapse_share", "train/loss")


def metric_scalars(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """``evaluate()``'s keys as tags: ``acc`` -> ``test/acc``, ``f1`` -> ``test/f1_macro``,
    ``f1/3`` -> ``test_per_class/f1/class_3``."""
    out = {}
    for key, value in metrics.items():
        metric, _, cls = key.partition("/")
        if cls:
            out[f"{prefix}_per_class/{metric}/class_{cls}"] = value
        else:
            out[f"{prefix}/{MACRO_NAMES.get(metric, metric)}"] = value
    return out


def continual_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The run-level continual metrics (``continual/...``) and forgetting per class
    (``continual_per_class/forgetting/class_<c>``); undefined ones (``None``/NaN) are left out."""
    def defined(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

    out = {f"continual/{k}": float(summary[k]) for k in CONTINUAL if defined(summary.get(k))}
    out |= {f"continual_per_class/forgetting/class_{c}": float(v)
            for c, v in (summary.get("forgetting_per_class") or {}).items() if defined(v)}
    return out


def layout() -> dict:
    """The Custom Scalars tab: one multi-line chart per per-class metric, and the run-level
    curves. Regexes, not class lists, so every run writes the same layout (TensorBoard merges
    the layouts of all runs and drops duplicate charts)."""
    return {
        "Test set, after each evaluation": {
            "accuracy and macro F1": ["Multiline", [r"^test/(acc|f1_macro)$"]],
            "loss": ["Multiline", [r"^test/loss$"]],
        },
        "Test set, per class (one line per class)": {
            "F1 per class": ["Multiline", [r"^test_per_class/f1/"]],
            "recall per class (= accuracy on the class)": ["Multiline", [r"^test_per_class/recall/"]],
            "precision per class": ["Multiline", [r"^test_per_class/precision/"]],
        },
        "Continual learning": {
            "forgetting per class": ["Multiline", [r"^continual_per_class/forgetting/"]],
            "average accuracy, backward transfer, forgetting": [
                "Multiline", [r"^continual/(average_accuracy|backward_transfer|mean_forgetting)$"]],
        },
        "Training": {
            "loss (per step and per epoch) and phase": ["Multiline", [r"^train/loss", r"^phase$"]],
        },
    }


def tensorboard(logger) -> Any | None:
    """The ``SummaryWriter`` of a TensorBoard logger, else ``None``."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return logger.experiment if isinstance(logger, TensorBoardLogger) else None


def run_name(logger) -> str:
    """``<name>/version_<n>``, the run as TensorBoard lists it."""
    if logger is None:
        return "run"
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return f"{logger.name}/{version}" if logger.name else version


def log_figure(logger, tag: str, fig, step: int) -> None:
    """A figure in the Images tab (TensorBoard loggers only); the figure is closed."""
    from music.plots import pyplot

    writer = tensorboard(logger)
    if writer is not None:
        writer.add_figure(tag, fig, global_step=step, close=False)
    pyplot().close(fig)


def log_text(logger, tag: str, markdown: str, step: int) -> None:
    writer = tensorboard(logger)
    if writer is not None:
        writer.add_text(tag, markdown, global_step=step)


def log_layout(logger) -> None:
    writer = tensorboard(logger)
    if writer is not None:
        writer.add_custom_scalars(layout())


def log_hparams(logger, hparams: Mapping[str, Any], start: bool = True) -> None:
    """The HParams tab: the run's settings (``hparams``: str, number or bool values) and the
    ``HPARAM_METRICS`` columns. Written when the run starts, so a run that stops early is
    listed too; the metric values are read by TensorBoard from the tags' last points. With
    ``start=False``, marks the run finished instead."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    writer = tensorboard(logger)
    if writer is None:
        return
    experiment, session_start, session_end = hparams_summaries(dict(hparams), dict.fromkeys(HPARAM_METRICS, 0.0))
    file_writer = writer._get_file_writer()  # as Lightning's own TensorBoardLogger.log_hyperparams writes them
    for summary in ((experiment, session_start) if start else (session_end,)):
        file_writer.add_summary(summary)


def flat_settings(prefix: str, values: Mapping[str, Any]) -> dict[str, str | float | bool]:
    """``{"lr": 0.001, "finetune": {"mode": "lora"}}`` -> ``{"model.lr": 0.001, "model.finetune":
    "mode=lora"}``: HParams takes strings, numbers and booleans, one value per key, and the same
    keys for every run (so ``None`` becomes ``"none"`` rather than a missing column)."""
    out: dict[str, str | float | bool] = {}
    for key, value in values.items():
        out[f"{prefix}.{key}"] = setting(value)
    return out


def setting(value: Any) -> str | float | bool:
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return value
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={setting(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(setting(v)) for v in value)
    if isinstance(value, type) or callable(value):
        return getattr(value, "__qualname__", None) or type(value).__name__
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (the Text tab renders it), floats to 4 decimals."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "–" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
