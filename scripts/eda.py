"""The data section: class counts per split and random samples per split, as PNG.

    python scripts/eda.py --data.data_dir ../shared/data --out results/eda
    python scripts/eda.py --data.replay_size 300        # include the replay buffer

Any ``MusicDataModule`` argument is accepted as ``--data.<name>`` (jsonargparse), so the
figures describe exactly the splits a config trains on.
"""

from __future__ import annotations

import json
import os

from jsonargparse import ArgumentParser

from music.data import MusicDataModule
from music.eda import class_counts, write_pngs


def main(argv: list[str] | None = None) -> list[str]:
    parser = ArgumentParser(description=__doc__)
    parser.add_class_arguments(MusicDataModule, "data", default={"download": False})
    parser.add_argument("--out", default="results/eda", help="folder for the PNG files and class_counts.json")
    args = parser.parse_args(argv)
    datamodule = MusicDataModule(**vars(args.data))
    paths = write_pngs(datamodule, args.out)
    with open(os.path.join(args.out, "class_counts.json"), "w") as f:
        json.dump(class_counts(datamodule), f, indent=1)
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main()
