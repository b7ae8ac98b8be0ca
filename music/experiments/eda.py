"""The data, looked at: class counts and random samples of every split, as PNG files."""

from __future__ import annotations

import json

from music.checkpoint import write_atomically
from music.eda import class_counts, write_pngs
from music.experiments.common import Data, Output
from music.runner import build


class EDA:
    """Draws the figures ``data.log_eda`` puts in TensorBoard (class counts per split, a sample
    grid per split) as PNG files plus ``class_counts.json``, for the data module a config trains
    on: the splits are built exactly as ``music fit --config <config>`` builds them. They go to
    ``<output.root>/eda/``, or to ``output.results`` when it is set.

    Args:
        configs: the configs whose data section is drawn.
        data: where the dataset is.
        output: where the files go (``root``, ``name``, ``results``; nothing is trained).
    """

    def __init__(self, configs: list[str] = ["seq"], data: Data = Data(), output: Output = Output()) -> None:
        self.configs, self.data, self.output = configs, data, output

    def run(self) -> list[str]:
        datamodule = build(self.configs, {"data.data_dir": self.data.data_dir, "data.download": self.data.download}).datamodule
        datamodule.prepare_data()
        datamodule.setup()
        out = self.output.tables("eda")
        paths = write_pngs(datamodule, str(out))
        write_atomically(out / "class_counts.json", json.dumps(class_counts(datamodule), indent=1))
        print("\n".join(paths))
        return paths
