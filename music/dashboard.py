"""What a run shows in TensorBoard: one tag per quantity, the phase axis, per-class charts,
HParams, tables.

A quantity keeps one tag for the whole run (``test/acc``), with one point per evaluation at
the global step it was made, so "test accuracy after each phase" is one curve, and runs whose
steps continue each other (``Classifier(init_from=...)``) share one x-axis. The headline
metrics are logged a second time on the phase axis, group ``by_phase`` (x = the evaluation's
row: 0 = start, 1 = after the first phase, ...), where a short fine-tuning phase after a long
pretraining is as wide as any other, with an image of the test accuracy per evaluation and the
Markdown table of the evaluations (Text tab): TensorBoard smooths scalar curves and may leave
points out of their y-range by default, which a curve of a few points cannot survive, and
neither touches images and text. TensorBoard groups cards by the tag's first part and sorts the
groups by name: ``by_phase`` first, ``test`` the headline numbers (accuracy, loss, macro F1,
the continual-learning metrics, the confusion and accuracy matrices), ``test_per_class`` the
per-class values (``<metric>/class_<c>``), which the Custom Scalars tab draws one chart per
class, and ``train`` the training curves. Every run writes the same layout (for its number of
classes) and the same HParams experiment (so TensorBoard, which merges layouts and reads one
experiment definition, shows every run's settings).

Only a ``TensorBoardLogger`` gets figures, text, layout and HParams; scalars go to any logger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from music.plots import log_figure as to_image_loggers
from music.plots import pyplot

# evaluate()'s macro keys -> the tag's last part; "f1" alone would read as a per-class value
MACRO_NAMES = {"acc": "acc", "loss": "loss", "f1": "f1_macro", "precision": "precision_macro",
               "recall": "recall_macro"}
# The phase axis: its group sorts first in TensorBoard (groups are sorted by name).
PHASE_GROUP = "by_phase"
PHASE_METRICS = {"test/acc": "test_acc", "test/loss": "test_loss", "test/f1_macro": "f1_macro"}
CONTINUAL = ("average_accuracy", "backward_transfer", "mean_forgetting", "held_out_acc", "untouched_acc",
             "untouched_forgetting", "collapse_share", "reference_acc")
# The metric columns of the HParams tab: the last value of each tag, i.e. the run's final one.
HPARAM_METRICS = ("test/acc", "test/f1_macro", "test/loss", "test/continual/average_accuracy",
                  "test/continual/backward_transfer", "test/continual/mean_forgetting", "test/continual/held_out_acc",
                  "test/continual/untouched_acc", "test/continual/collapse_share", "train/loss")


# The settings a study varies, shown first in the HParams tab (it shows five by default).
KEY_SETTINGS = ("seed", "schedule.phases", "model.init_from", "model.finetune", "model.lr")


def logged_step(trainer, pl_module) -> int:
    """The x-axis value for now: the global step (optimizer steps, also with blocks),
    continued from the model the run started from (``step_offset``: ``Classifier(init_from=...)``
    reads it from a Lightning checkpoint)."""
    return trainer.global_step + getattr(pl_module, "step_offset", 0)


def logged_epoch(trainer, pl_module, starting: bool = False) -> int:
    """Epochs trained so far, continued like ``logged_step``: at a phase end, the epoch just
    finished counts; ``starting``: the epoch running."""
    return trainer.current_epoch + (0 if starting else 1) + getattr(pl_module, "epoch_offset", 0)


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


def phase_scalars(scalars: Mapping[str, float]) -> dict[str, float]:
    """Tags of ``metric_scalars``/``continual_scalars`` for the phase axis, to be logged at the
    evaluation's row (0 = start, 1 = after the first phase, ...), so a run's phases sit side by
    side however many steps each took: ``test/acc`` -> ``by_phase/test_acc`` (also
    ``test_loss``, ``f1_macro``), ``test_per_class/<metric>/class_<c>`` ->
    ``by_phase_per_class/<metric>/class_<c>``; the others are left out."""
    out = {f"{PHASE_GROUP}/{name}": scalars[tag] for tag, name in PHASE_METRICS.items() if tag in scalars}
    out |= {f"{PHASE_GROUP}_per_class/{tag.split('/', 1)[1]}": value for tag, value in scalars.items()
            if tag.startswith("test_per_class/")}
    return out


def continual_scalars(summary: Mapping[str, Any], earlier: Mapping[str, Any] | None = None,
                      later_classes: Sequence[int] = (), last: bool = False) -> dict[str, float]:
    """The run-level continual metrics (``test/continual/...``) and forgetting per class
    (``test_per_class/forgetting/class_<c>``); undefined ones (``None``/NaN) are left out.

    A class's forgetting is measured against the reference row until the class is trained and
    against its own task afterwards, and is undefined right after its task: so it is left out
    for a class that ``later_classes`` (the classes of the phases still to come) holds, which
    keeps each curve one quantity without gaps, and, at the ``last`` evaluation, where the
    ``earlier`` summary (of the rows before it) had none, which would be a curve of one point."""
    def defined(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

    out = {f"test/continual/{k}": float(summary[k]) for k in CONTINUAL if defined(summary.get(k))}
    before = (earlier or {}).get("forgetting_per_class") or {}
    out |= {f"test_per_class/forgetting/class_{c}": float(v)
            for c, v in (summary.get("forgetting_per_class") or {}).items()
            if defined(v) and int(c) not in later_classes and (not last or earlier is None or defined(before.get(c)))}
    return out


PER_CLASS_CHARTS = {"f1": "F1", "recall": "recall (= accuracy on the class)", "precision": "precision",
                    "forgetting": "forgetting"}


def layout(num_classes: int) -> dict:
    """The Custom Scalars tab: the phase axis first, then one chart per class for each
    per-class metric, on the phase axis too (a Multiline chart colours its lines by run, so a
    chart holds one class and compares the runs), the continual-learning and training curves. Every run of the same
    number of classes writes the same layout (TensorBoard merges the layouts of all runs and
    drops duplicate charts)."""
    per_class = {f"{title} per class": {f"class {c}": ["Multiline", [rf"^{PHASE_GROUP}_per_class/{metric}/class_{c}$"]]
                                        for c in range(num_classes)}
                 for metric, title in PER_CLASS_CHARTS.items()}
    return {
        "Test set after each evaluation (x: 0 = start, 1 = after the first phase, ...)": {
            "test accuracy": ["Multiline", [rf"^{PHASE_GROUP}/test_acc$"]],
            "macro F1": ["Multiline", [rf"^{PHASE_GROUP}/f1_macro$"]],
            "loss": ["Multiline", [rf"^{PHASE_GROUP}/test_loss$"]],
        },
        **per_class,
        "Continual learning": {
            "average accuracy": ["Multiline", [r"^test/continual/average_accuracy$"]],
            "backward transfer": ["Multiline", [r"^test/continual/backward_transfer$"]],
            "mean forgetting": ["Multiline", [r"^test/continual/mean_forgetting$"]],
        },
        "Training": {
            "loss, per step and per epoch": ["Multiline", [r"^train/loss"]],
            "phase (index in the run)": ["Multiline", [r"^train/phase$"]],
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


def log_figure(loggers, tag: str, fig, step: int) -> None:
    """A figure for every logger (one or a list) that takes images: TensorBoard's Images tab,
    MLflow, W&B (``music.plots.log_figure``); the figure is closed."""
    to_image_loggers(loggers, tag, fig, step)
    pyplot().close(fig)


def log_text(logger, tag: str, markdown: str, step: int) -> None:
    writer = tensorboard(logger)
    if writer is not None:
        writer.add_text(tag, markdown, global_step=step)


def log_layout(logger, num_classes: int) -> None:
    writer = tensorboard(logger)
    if writer is not None:
        writer.add_custom_scalars(layout(num_classes))


def log_hparams(logger, hparams: Mapping[str, Any], start: bool = True) -> None:
    """The HParams tab: the run's settings (``hparams``: str, number or bool values) and the
    ``HPARAM_METRICS`` columns. Written when the run starts, so a run that stops early is
    listed too; TensorBoard reads each metric's value from its tag's last point, the run's
    final one. With ``start=False``, marks the run finished instead.

    TensorBoard takes the columns from the first experiment definition it finds, shows the
    first five hyperparameters and sorts those flagged as differing between runs first: the
    ``KEY_SETTINGS`` are flagged, so a study's axes are the columns shown."""
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams.plugin_data_pb2 import SessionEndInfo, SessionStartInfo

    writer = tensorboard(logger)
    if writer is None:
        return
    file_writer = writer._get_file_writer()  # as Lightning's own TensorBoardLogger.log_hyperparams writes
    if not start:
        file_writer.add_summary(_hparams_summary("session_end_info", SessionEndInfo(status=api_pb2.STATUS_SUCCESS)))
        return
    types = {str: api_pb2.DATA_TYPE_STRING, bool: api_pb2.DATA_TYPE_BOOL}
    infos = [api_pb2.HParamInfo(name=k, type=types.get(type(v), api_pb2.DATA_TYPE_FLOAT64), differs=k in KEY_SETTINGS)
             for k, v in hparams.items()]
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=f"{tag} (final)")
               for tag in HPARAM_METRICS]
    session = SessionStartInfo(group_name=run_name(logger))
    for key, value in hparams.items():
        if isinstance(value, bool):
            session.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            session.hparams[key].number_value = value
        else:
            session.hparams[key].string_value = str(value)
    file_writer.add_summary(_hparams_summary("experiment", api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)))
    file_writer.add_summary(_hparams_summary("session_start_info", session))


def _hparams_summary(kind: str, message):
    """One HParams plugin summary (``_hparams_/<kind>``), as ``tensorboard.plugins.hparams.summary``
    builds it without needing TensorFlow."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **{kind: message})
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=f"_hparams_/{kind}", metadata=SummaryMetadata(plugin_data=plugin))])


def flat_settings(prefix: str, values: Mapping[str, Any]) -> dict[str, str | float | bool]:
    """``{"lr": 0.001, "finetune": {"mode": "lora"}}`` -> ``{"model.lr": 0.001, "model.finetune":
    "mode=lora"}``: HParams takes strings, numbers and booleans, one value per key, and the same
    keys for every run (so ``None`` becomes ``"none"`` rather than a missing column)."""
    out: dict[str, str | float | bool] = {}
    for key, value in values.items():
        if not key.startswith("_"):  # Lightning's own entries, e.g. "_instantiator"
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
