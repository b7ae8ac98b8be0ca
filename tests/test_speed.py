"""The speed path (``music.speed``) keeps behaviour, and its private-API part is pinned."""

import os
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loops.optimization.manual import _ManualOptimization
from lightning.pytorch.profilers import SimpleProfiler

from music.runner import PROGRESS_BAR_REFRESH_RATE, lightning
from music.methods import Method
from music.module import Classifier
from music.speed import CHECKED_LIGHTNING, runtime_cuda_check, set_max_epochs, steps_are_plain, training_progress

REPO = Path(__file__).resolve().parents[1]


def test_private_lightning_api_is_the_pinned_one():
    """``music.speed`` uses Lightning's private API (``LightningOptimizer._on_before_step`` /
    ``_on_after_step``, the fit loop's ``max_epochs``, a checkpoint's ``loops`` entry), checked
    on one minor version. On another, re-check ``music.speed`` (and re-measure it,
    docs/speed.md), then move ``CHECKED_LIGHTNING`` and the pin in pyproject.toml."""
    installed = ".".join(version("lightning").split(".")[:2])
    assert installed == CHECKED_LIGHTNING, (
        f"lightning {version('lightning')} is installed, but music.speed was checked on "
        f"{CHECKED_LIGHTNING} only: it uses LightningOptimizer's private _on_before_step/_on_after_step.")
    major, minor = map(int, CHECKED_LIGHTNING.split("."))
    assert f'"lightning>={major}.{minor},<{major}.{minor + 1}"' in (REPO / "pyproject.toml").read_text()
    optimizer = LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert callable(optimizer._on_before_step) and callable(optimizer._on_after_step)
    assert callable(_ManualOptimization._on_before_step) and callable(_ManualOptimization._on_after_step)
    trainer = Trainer(logger=False, enable_checkpointing=False, max_epochs=3)
    assert set_max_epochs(trainer, 7) == 3 and trainer.max_epochs == 7
    state = trainer.fit_loop.state_dict()
    assert "current" in state["epoch_progress"] and "processed" in state["epoch_progress"]["current"]
    assert training_progress({"global_step": 5, "loops": {"fit_loop": state}}) == (5, 0)


# Lightning's private API, as MUSIC would reach it: an attribute or call with a leading underscore
# on a Lightning object, the fit loop, or a checkpoint's loop state, and LightningCLI's private
# methods (read or overridden).
PRIVATE = re.compile(r"\._on_(before|after)_step|\bfit_loop\b|epoch_progress|_batches_that_stepped|\._results\b"
                     r"|\._logger_connector|\._data_connector|\._checkpoint_connector"
                     r"|\._get\(|\b_parse_ckpt_path\b|\b_run_subcommand\b|\b_prepare_subcommand_kwargs\b"
                     r"|\b_instantiate_trainer\b|\._parser\(|\b_subcommand_parsers\b|\b_set_seed\b")


def test_private_lightning_api_is_used_in_music_speed_only():
    """The pin and the test above guard one file; any other use would go unguarded."""
    users = sorted(str(path.relative_to(REPO)) for path in (REPO / "music").rglob("*.py")
                   if path.name != "speed.py" and PRIVATE.search(path.read_text()))
    assert users == [], f"private Lightning API outside music/speed.py: {users}"


class ListensToBackward(Callback):
    def on_after_backward(self, trainer, pl_module) -> None:
        pass


@pytest.mark.parametrize(("kwargs", "plain"), [
    ({}, True),
    ({"profiler": "simple"}, False),
    ({"precision": "bf16-mixed"}, False),
    ({"callbacks": [ListensToBackward()]}, False),
], ids=["plain", "profiler", "mixed precision", "a callback on a step hook"])
def test_steps_are_plain_only_when_nobody_listens(tmp_path, kwargs, plain):
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path, **kwargs)
    assert steps_are_plain(trainer, Classifier()) is plain


def test_steps_are_not_plain_when_the_module_overrides_a_step_hook(tmp_path):
    class Listening(Classifier):
        def on_after_backward(self) -> None:
            pass

    trainer = Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    assert not steps_are_plain(trainer, Listening())


class CountsSteps(Method):
    """A method that counts its gradient-hook calls that found the step's gradients."""

    _state = ("calls",)

    def __init__(self) -> None:
        self.calls = 0

    def on_before_optimizer_step(self, model) -> None:
        self.calls += all(p.grad is not None for p in model.backbone.parameters())


@pytest.mark.parametrize("blocks", [1, 5], ids=["automatic", "blocks"])
def test_the_methods_gradient_hook_runs_at_every_step_on_the_direct_path_too(shrink, tmp_path, blocks):
    """``on_before_optimizer_step`` (the methods' gradient hook, A-GEM's) is a direct hook: the
    Classifier overrides it and keeps the plain steps, which call it once per optimizer step."""
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    assert steps_are_plain(trainer, Classifier())
    phases = [{"name": "pretrain", "split": "remaining", "epochs": 1}]
    cli = lightning(["--config", str(shrink("seq", phases=phases, batches_per_block=blocks)),
                     "--model.methods", f"[{{class_path: {__name__}.CountsSteps}}]",
                     "--trainer.limit_train_batches", "4"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.blocks is None or cli.model.blocks.direct
    assert cli.model.methods[0].calls == cli.trainer.global_step > 0


def test_runtime_cuda_check_is_scoped_and_only_without_cuda(monkeypatch):
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    with runtime_cuda_check(torch.device("cpu")):
        inside = os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]
        assert torch.cuda.is_available() is (torch.cuda.device_count() > 0)
    assert inside == ("1" if torch.cuda.is_available() else "0")
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    with runtime_cuda_check(torch.device("cuda", 0)):
        assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"


def test_fused_adam_config_gives_a_fused_adam(shrink):
    cli = lightning(["--config", str(shrink("pretrain", "fused_adam"))], run=False)
    optimizer = cli.model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["fused"] is True
    assert optimizer.defaults["lr"] == cli.model.lr
    default = lightning(["--config", str(shrink("pretrain"))], run=False).model.configure_optimizers()
    assert not default.defaults["fused"]


def test_plain_benchmark_side_trains_on_the_remaining_split(mnist):
    from conftest import load_script

    assert torch.equal(load_script("plain_pretrain").remaining_split(mnist.train_labels), mnist.splits["remaining"])


def progress_bars(trainer):
    return [c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)]


def test_default_progress_bar_refreshes_every_n_steps_and_config_wins(shrink):
    config = shrink("pretrain")
    trainer = lightning(["--config", str(config), "--trainer.enable_progress_bar", "true"], run=False).trainer
    (bar,) = progress_bars(trainer)
    assert bar.refresh_rate == PROGRESS_BAR_REFRESH_RATE
    own = lightning(["--config", str(config), "--trainer.enable_progress_bar", "true", "--trainer.callbacks+",
                "lightning.pytorch.callbacks.TQDMProgressBar", "--trainer.callbacks.refresh_rate", "1",
                "--trainer.profiler", "simple"], run=False).trainer
    assert [b.refresh_rate for b in progress_bars(own)] == [1] and isinstance(own.profiler, SimpleProfiler)
    assert progress_bars(lightning(["--config", str(config)], run=False).trainer) == []  # shrink disables the bar


def test_split_datasets_are_gathered_once(mnist):
    assert mnist.dataset("remaining") is mnist.dataset("remaining")
    assert len(mnist.dataset("class_3")) == 1000 and mnist.dataset("test") is mnist.dataset("test")


def test_plain_process_malloc_sets_the_thresholds_where_glibc_is():
    import platform

    from music.speed import plain_process_malloc

    assert plain_process_malloc() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_music_imports_no_transformers_nor_scipy_and_peft_still_brings_it():
    """torchmetrics imports ``transformers`` and ``scipy.signal`` whenever they are installed
    (the ``lora`` extra; scipy); ``music.speed`` keeps them out of the import, and
    lightning_utilities' checks answer as usual afterwards. Asked of a fresh process, since this
    one may have imported them already."""
    import importlib.util
    import subprocess
    import sys

    code = ("import sys, music.speed, torchmetrics.functional as F; import lightning_utilities.core.imports as r; "
            "print('transformers' in sys.modules, 'scipy' in sys.modules, hasattr(F, 'bert_score'), "
            "r.package_available('scipy') is (importlib.util.find_spec('scipy') is not None))")
    code = "import importlib.util; " + code
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "False", "True"]
    if importlib.util.find_spec("peft") is not None:  # LoRA runs still get it, through PEFT
        code = "import sys, music.cli, peft; print('transformers' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
        assert out.split() == ["True"]


def test_torchmetrics_trick_does_nothing_once_torchmetrics_is_imported():
    from music.speed import torchmetrics_without_unused_packages

    assert torchmetrics_without_unused_packages() is False  # this process imported it through music


def test_the_dataset_is_read_once_per_process_and_again_when_its_files_change(tmp_path):
    from music.data import MusicDataModule

    def loaded(root):
        datamodule = MusicDataModule(data_dir=str(root), download=False, dataset="synthetic.SyntheticDigits",
                                     samples_per_class=40)
        datamodule.setup()
        return datamodule

    first, second = loaded(tmp_path), loaded(tmp_path)
    assert second.train_images is first.train_images and second.test_labels is first.test_labels
    assert second.splits["class_3"].equal(first.splits["class_3"])
    other = loaded(tmp_path / "other")
    assert other.train_images is not first.train_images and other.train_images.equal(first.train_images)
    files = tmp_path / "other" / "SyntheticDigits"
    files.mkdir(parents=True)
    (files / "raw").write_text("changed")
    assert loaded(tmp_path / "other").train_images is not other.train_images
