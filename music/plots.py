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


# -- raster images without matplotlib ---------------------------------------------------------
# A figure through matplotlib costs 0.1-0.3 s of text layout and rendering; a short fit draws
# about a dozen (EDA grids, confusion matrices). These draw the same content with PIL in
# milliseconds; TensorBoard logs them with ``add_image(..., dataformats="HWC")``.


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


def confusion_image(confusion, cell: int = 40):
    """A confusion matrix as a PIL image: rows true class, columns predicted, cells shaded by
    count (white to blue) and labelled with it."""
    from PIL import Image, ImageDraw

    counts = confusion.tolist()
    n = len(counts)
    top = max(max(row) for row in counts) or 1
    margin = 34
    image = Image.new("RGB", (margin + n * cell + 4, margin + n * cell + 4), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(11), _font(10)
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            shade = count / top
            fill = tuple(int(255 - shade * (255 - c)) for c in (8, 48, 107))  # white -> dark blue
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill, outline=(220, 220, 220))
            draw.text((x + cell / 2, y + cell / 2), str(count), fill="white" if shade > 0.5 else "black",
                      font=small, anchor="mm")
        draw.text((margin - 6, margin + i * cell + cell / 2), str(i), fill="black", font=font, anchor="rm")
        draw.text((margin + i * cell + cell / 2, margin - 6), str(i), fill="black", font=font, anchor="mb")
    draw.text((2, 2), "true \\ predicted", fill="black", font=small)
    return image


def as_array(image):
    """A PIL image as the ``(H, W, 3)`` uint8 array TensorBoard's ``add_image`` takes."""
    import numpy as np

    return np.asarray(image.convert("RGB"))


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
