"""EDA: class counts per split and sample grids, as PNG and in TensorBoard."""


from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from music.data import MusicDataModule
from music.eda import class_counts, log_eda


def test_class_counts_per_split(mnist):
    counts = class_counts(mnist)
    assert list(counts)[:3] == ["train", "test", "remaining"]
    assert sum(counts["train"]) == 60_000 and sum(counts["test"]) == 10_000
    assert counts["merged"] == [1000 if c in (3, 4, 7) else 0 for c in range(10)]
    assert [a - b for a, b in zip(counts["train"], counts["remaining"])] == counts["merged"]


def test_logged_to_tensorboard(data_dir, tmp_path):
    datamodule = MusicDataModule(data_dir=data_dir, download=False, held_out_classes=[7])
    logger = TensorBoardLogger(str(tmp_path), name="eda")
    log_eda(datamodule, logger)
    logger.experiment.flush()
    images = set(EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload().Tags()["images"])
    assert {"z_eda/class_counts", "z_eda/samples/train", "z_eda/samples/class_7", "z_eda/samples/test"} <= images


def test_shipped_pretrain_config_logs_eda_figures_to_tensorboard(shrink, tmp_path):
    from conftest import run

    cli = run("fit", "--config", shrink("pretrain", log_eda=True), "--trainer.limit_train_batches", "2")
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert "z_eda/class_counts" in tags and any(t.startswith("z_eda/samples/") for t in tags)
