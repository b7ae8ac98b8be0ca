"""The data, looked at: class counts and random samples of every split, as PNG files."""

from __future__ import annotations

import json

from music.checkpoint import write_atomically
from music.experiments.common import Data


class EDA:
    """Draws the figures ``data.log_eda`` puts in TensorBoard (class counts per split, a sample
    grid per split) as ``<out>/*.png`` plus ``class_counts.json``, for the data module a config
    trains on: the splits are built exactly as ``music fit --config <config>`` builds them.

    Args:
        configs: the configs whose data section is drawn.
        data: where the dataset is.
        out: folder for the PNG files and ``class_counts.json``.
    """

    def __init__(self, configs: list[str] = ["seq"], data: Data = Data(), out: str = "results/eda") -> None:
        self.configs, self.data, self.out = configs, data, out

    def run(self) -> list[str]:
        from music.cli import lightning
        from music.eda import class_counts, write_pngs

        cli = lightning(["fit", *(a for c in self.configs for a in ("--config", c)), "--data.data_dir", self.data.data_dir,
                         "--data.download", str(self.data.download).lower()], run=False)
        datamodule = cli.datamodule
        datamodule.prepare_data()
        datamodule.setup()
        paths = write_pngs(datamodule, self.out)
        write_atomically(f"{self.out}/class_counts.json", json.dumps(class_counts(datamodule), indent=1))
        print("\n".join(paths))
        return paths
