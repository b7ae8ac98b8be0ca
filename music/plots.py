"""Figures for files and TensorBoard: matplotlib (lazily imported) and fast PIL raster images.

Imported lazily by the modules that plot, so ``python -m music --help`` and runs that draw
nothing never load matplotlib."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: never a window, works on headless machines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, to, dpi: int) -> None:
    """Lay out matplotlib figure ``fig``, write it as a PNG to ``to`` (a path or a binary file)
    and close it."""
    fig.tight_layout()
    fig.savefig(to, format="png", dpi=dpi)
    pyplot().close(fig)


# -- raster images without matplotlib ---------------------------------------------------------
# A figure through matplotlib spends its time on text layout and rendering; a fit with
# ``log_eda`` draws a sample grid per split. These draw them with PIL, far cheaper (docs/speed.md);
# TensorBoard logs them with ``add_image(..., dataformats="HWC")``.


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def titled(image, title: str):
    """``image`` (a PIL image) with ``title`` in a white band above it."""
    from PIL import Image, ImageDraw

    band = 22
    out = Image.new("RGB", (image.width, image.height + band), "white")
    out.paste(image, (0, band))
    ImageDraw.Draw(out).text((4, 4), title, fill="black", font=_font(13))
    return out


def labelled_grid(images, labels, cols: int, scale: int = 2):
    """Grey images ``(N, H, W)`` in [0, 1] tiled ``cols`` wide, each with its label in red at
    its top left corner; returns a PIL image."""
    import torch
    from PIL import Image, ImageDraw

    rows = -(-len(images) // cols)
    height, width = images.shape[-2:]
    size_h, size_w = height * scale + 2, width * scale + 2
    canvas = Image.new("RGB", (cols * size_w, rows * size_h), "white")
    tiles = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    draw = ImageDraw.Draw(canvas)
    font = _font(10)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        r, c = divmod(i, cols)
        x, y = c * size_w + 1, r * size_h + 1
        canvas.paste(Image.fromarray(tile, "L").resize((width * scale, height * scale), Image.NEAREST), (x, y))
        draw.text((x + 2, y + 1), str(int(label)), fill="red", font=font)
    return canvas


def as_array(image):
    """A PIL image as the ``(H, W, 3)`` uint8 array TensorBoard's ``add_image`` takes."""
    import numpy as np

    return np.asarray(image.convert("RGB"))


def image_loggers(loggers) -> list:
    """The loggers among ``loggers`` (one logger or a list) that take figures: TensorBoard,
    MLflow, W&B."""
    names = ("TensorBoardLogger", "MLFlowLogger", "WandbLogger")
    return [logger for logger in (loggers if isinstance(loggers, list) else [loggers]) if type(logger).__name__ in names]


def log_figure(loggers, tag: str, fig, step: int) -> None:
    """Log a matplotlib figure or a PIL image to every logger that takes images:
    TensorBoard's Images tab, an MLflow artifact ``<tag>/step_<step>.png``, a W&B image."""
    drawn = not hasattr(fig, "savefig")  # a PIL image
    for logger in image_loggers(loggers):
        name = type(logger).__name__
        if name == "TensorBoardLogger" and drawn:
            logger.experiment.add_image(tag, as_array(fig), global_step=step, dataformats="HWC")
        elif name == "TensorBoardLogger":
            logger.experiment.add_figure(tag, fig, global_step=step)
        elif name == "MLFlowLogger" and drawn:
            logger.experiment.log_image(logger.run_id, fig, f"{tag}/step_{step}.png")
        elif name == "MLFlowLogger":
            logger.experiment.log_figure(logger.run_id, fig, f"{tag}/step_{step}.png")
        else:
            import wandb

            logger.experiment.log({tag: wandb.Image(fig)}, step=step)
