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


def image_loggers(loggers) -> list:
    """The loggers among ``loggers`` that take figures: TensorBoard, MLflow, W&B."""
    names = ("TensorBoardLogger", "MLFlowLogger", "WandbLogger")
    return [logger for logger in loggers if type(logger).__name__ in names]


def log_figure(loggers, tag: str, fig, step: int) -> None:
    """Log a matplotlib figure to every logger that takes images: TensorBoard's Images tab,
    an MLflow artifact ``<tag>/step_<step>.png``, a W&B image."""
    for logger in image_loggers(loggers):
        name = type(logger).__name__
        if name == "TensorBoardLogger":
            logger.experiment.add_figure(tag, fig, global_step=step)
        elif name == "MLFlowLogger":
            logger.experiment.log_figure(logger.run_id, fig, f"{tag}/step_{step}.png")
        else:
            import wandb

            logger.experiment.log({tag: wandb.Image(fig)}, step=step)
