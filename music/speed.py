"""The block path and every use of Lightning's private API, in one module.

Lightning's per-step loop costs a large share of a SimpleNN step on a CPU (docs/speed.md), so the
SimpleNN configs hand the loop *blocks* of batches (``data.batches_per_block``) and train each
block here, one optimizer step per batch. Everything that path needs beyond Lightning's public
API is in this file, pinned by ``pyproject.toml`` (``lightning>=2.6,<2.7``) and checked by
``tests/test_speed.py::test_private_lightning_api_is_the_pinned_one``:

1. **Blocks** (``Block``, ``as_block``, ``BlockSteps``): one index fetch and one transfer per
   block; the model still takes one optimizer step per batch, in the same order, so the weights
   are bit for bit those of a batch-by-batch run. Blocks train through manual optimization,
   which rules out the Trainer's clipping, accumulation and learning-rate schedulers
   (``check_blocks``).
2. **Direct steps.** Inside a block, ``manual_backward`` and ``LightningOptimizer.step`` wrap
   ``loss.backward()`` and ``optimizer.step()`` in hook dispatch over the module and every
   callback, a measurable share of every epoch (docs/speed.md). When nothing would happen in
   those hooks (``steps_are_plain``), the plain calls are taken and each step is counted as
   ``LightningOptimizer.step`` counts it, through its private ``_on_before_step``/``_on_after_step``.
   The module's own ``on_before_optimizer_step`` (the Classifier runs its methods' gradient hook
   there: A-GEM) is called by the direct steps too, between backward and step (``DIRECT_HOOKS``).
3. **No NVML probe per step on a machine without CUDA.** Importing Lightning sets
   ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (so asking whether CUDA exists never initialises it
   before a fork); every ``Adam.step`` asks, and on a machine without a GPU NVML is then
   looked for anew each time, a measurable share of every epoch (docs/speed.md).
   ``runtime_cuda_check`` asks the CUDA runtime instead while training, only where no CUDA
   device exists, so there is nothing a fork could find initialised.
4. **glibc's allocator as a plain process has it, in Dask workers.** Dask's nanny starts every
   worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes glibc's mmap threshold at
   128 KiB: every activation and gradient above it is then mapped and unmapped, page faults
   included, at every step, which slows a study cell markedly (measured in docs/study.md).
   Study cells call ``plain_process_malloc``; it is a no-op off glibc.

5. **No ``transformers`` (nor ``scipy.signal``) at import.** torchmetrics imports
   ``transformers`` (for BERTScore and InfoLM) whenever it is installed, as it is with the
   ``lora`` extra (PEFT needs it), and ``scipy.signal`` whenever scipy is; together they were
   about a third of ``import music.cli`` (docs/speed.md). ``torchmetrics_without_unused_packages``
   imports torchmetrics while its availability checks do not see them, so only a run that uses
   LoRA imports ``transformers`` (through PEFT), and scipy comes when MUSIC's own code asks for
   it. ``music.experiments`` (through which the CLI, ``python -m music`` and every Dask worker
   of a study come) imports this module first, before anything imports Lightning; torchmetrics'
   BERTScore, InfoLM and scipy paths, which MUSIC does not use, are then missing in that
   process. A program that imports the library alone (``music.module``) gets torchmetrics as
   usual.

The other private reads: the phase schedule sets the fit loop's epoch count
(``set_max_epochs``: the Trainer has no public setter, and the phases, not the config, define
it), and ``training_progress`` reads the epochs a checkpoint's fit loop had processed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError
from typing import Any, NamedTuple, Protocol

# Packages torchmetrics imports at its own import when installed, for metrics MUSIC does not
# use: transformers for BERTScore and InfoLM, scipy.signal for an audio metric's compatibility patch.
UNUSED_BY_TORCHMETRICS = ("transformers", "scipy")


def torchmetrics_without_unused_packages() -> bool:
    """Import torchmetrics with its availability checks (lightning_utilities' ``package_available``,
    ``module_available`` and ``RequirementCache``, which asks ``importlib.metadata`` through the
    private ``_version``) blind to ``UNUSED_BY_TORCHMETRICS``. Checks made during that import stay
    False (they are cached, or bound by torchmetrics then): its BERTScore, InfoLM and scipy paths
    are missing in this process. lightning_utilities' own functions are put back afterwards. Returns whether it did (False:
    torchmetrics was imported already, or lightning_utilities has changed)."""
    if "torchmetrics" in sys.modules:
        return False
    import lightning_utilities.core.imports as requirements

    real = {name: getattr(requirements, name, None) for name in ("_version", "module_available", "package_available")}
    if None in real.values():
        return False

    def version(name: str) -> str:
        if name in UNUSED_BY_TORCHMETRICS:
            raise PackageNotFoundError(name)
        return real["_version"](name)

    def module_available(path: str) -> bool:
        return path.split(".")[0] not in UNUSED_BY_TORCHMETRICS and real["module_available"](path)

    def package_available(name: str) -> bool:
        return name not in UNUSED_BY_TORCHMETRICS and real["package_available"](name)

    blind = {"_version": version, "module_available": module_available, "package_available": package_available}
    for name, function in blind.items():
        setattr(requirements, name, function)
    try:
        import torchmetrics  # noqa: F401
    finally:
        for name, function in real.items():
            setattr(requirements, name, function)
    return True


torchmetrics_without_unused_packages()  # before Lightning, which imports torchmetrics

import torch  # noqa: E402
from lightning.pytorch import LightningModule, Trainer  # noqa: E402
from lightning.pytorch.core.optimizer import LightningOptimizer  # noqa: E402
from lightning.pytorch.plugins.precision import Precision  # noqa: E402
from lightning.pytorch.profilers import PassThroughProfiler  # noqa: E402
from lightning.pytorch.strategies import SingleDeviceStrategy  # noqa: E402
from lightning.pytorch.utilities.model_helpers import is_overridden  # noqa: E402
from torch import Tensor  # noqa: E402

# The Lightning minor version the private calls here were checked against (pyproject pins it).
CHECKED_LIGHTNING = "2.6"
# The hooks Lightning calls between a training loss and the optimizer step it leads to.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
# The module's step hooks ``direct_step`` calls itself, where Lightning would: overriding them
# keeps the direct steps (the Classifier's runs its methods', e.g. A-GEM's projection).
DIRECT_HOOKS = ("on_before_optimizer_step",)


class Block(NamedTuple):
    """Consecutive training batches fetched at once, as one tensor pair: one index fetch, one
    transfer to the device, and ``batches()`` cuts it back into the batches (views, no copy) a
    batch-size loader would have served."""

    images: Tensor
    labels: Tensor
    batch_size: int

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        return zip(self.images.split(self.batch_size), self.labels.split(self.batch_size))

    @property
    def num_batches(self) -> int:
        return -(-len(self.labels) // self.batch_size)


def as_block(batch: tuple[Tensor, Tensor], batch_size: int) -> Block:
    """Collate function for blocks (``__getitems__`` batches arrive already stacked)."""
    return Block(*batch, batch_size)


def check_blocks(batches_per_block: int, gradient_clip_val: float | None, accumulate_grad_batches: int | None,
                 lr_scheduler: Any) -> None:
    """Blocks train through manual optimization, where Lightning refuses or ignores these;
    say so in the user's terms, before anything runs."""
    if batches_per_block == 1:
        return
    in_use = {"trainer.gradient_clip_val": (gradient_clip_val, bool(gradient_clip_val)),
              "trainer.accumulate_grad_batches": (accumulate_grad_batches, (accumulate_grad_batches or 1) != 1),
              "lr_scheduler": (lr_scheduler, bool(lr_scheduler))}
    for key, (value, used) in in_use.items():
        if used:
            raise ValueError(f"{key}={value} is not allowed with data.batches_per_block={batches_per_block}: blocks "
                             "are trained batch by batch through manual optimization. Set --data.batches_per_block 1.")


class BlockModule(Protocol):
    """What ``BlockSteps`` needs of the module it trains."""

    def __call__(self, x: Tensor) -> Tensor: ...

    def objective(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor: ...

    def record_training(self, losses: Tensor, logits: Tensor, labels: Tensor, first_step: int,
                        sizes: list[int]) -> None: ...

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None: ...


class BlockSteps:
    """Trains a ``Block`` batch by batch inside one Lightning loop step: forward, loss,
    zero_grad, backward and step per batch, as automatic optimization takes them.

    ``direct`` (set by ``start`` when ``steps_are_plain``): the plain ``backward``/``step``
    calls, counted as Lightning counts them; else ``manual_backward`` and
    ``LightningOptimizer.step``, with every hook."""

    def __init__(self) -> None:
        self.direct = False

    def start(self, trainer: Trainer, module: LightningModule) -> None:
        self.direct = steps_are_plain(trainer, module)

    def train(self, module: BlockModule, block: Block | tuple[Tensor, Tensor]) -> None:
        optimizer = module.optimizers()
        step = direct_step(optimizer, module) if self.direct else _lightning_step(module, optimizer)
        first_step = module.global_step  # the step at which the first batch's loss is computed
        losses, logits, labels = [], [], []
        for x, y in (block.batches() if isinstance(block, Block) else [block]):  # DDP serves single batches
            out = module(x)
            loss = module.objective(out, y, x)
            step(loss)
            losses.append(loss.detach())
            logits.append(out.detach())
            labels.append(y)
        module.record_training(torch.stack(losses), torch.cat(logits), torch.cat(labels), first_step,
                               sizes=[len(y) for y in labels])


def _lightning_step(module: LightningModule, optimizer: LightningOptimizer) -> Callable[[Tensor], None]:
    def step(loss: Tensor) -> None:
        optimizer.zero_grad()
        module.manual_backward(loss)
        optimizer.step()
    return step


def steps_are_plain(trainer: Trainer, module: LightningModule) -> bool:
    """Whether ``manual_backward`` and ``LightningOptimizer.step`` would do nothing but
    ``loss.backward()`` and ``optimizer.step()`` plus calls of hooks nobody overrides: one device
    (no gradient sync), 32-bit precision (no loss scaling or casting), no profiler timing the
    step, no callback overriding ``STEP_HOOKS`` and the module overriding none of them (nor
    ``backward``) but the ``DIRECT_HOOKS``, which ``direct_step`` calls."""
    return (type(trainer.strategy) is SingleDeviceStrategy
            and type(trainer.precision_plugin) is Precision
            and type(trainer.profiler) is PassThroughProfiler
            and not is_overridden("backward", module)
            and not any(is_overridden(hook, module) for hook in STEP_HOOKS if hook not in DIRECT_HOOKS)
            and not any(is_overridden(hook, callback) for hook in STEP_HOOKS for callback in trainer.callbacks))


def direct_step(optimizer: LightningOptimizer, module: BlockModule) -> Callable[[Tensor], None]:
    """zero_grad, ``loss.backward()``, the module's ``on_before_optimizer_step`` and the
    optimizer's own ``step``, counted as ``LightningOptimizer.step`` counts it, so
    ``global_step`` and checkpoints are the same. Only valid where ``steps_are_plain``."""
    plain = optimizer.optimizer

    def step(loss: Tensor) -> None:
        plain.zero_grad()
        loss.backward()
        optimizer._on_before_step()
        module.on_before_optimizer_step(plain)
        plain.step()
        optimizer._on_after_step()

    return step


def set_max_epochs(trainer: Trainer, epochs: int) -> int | None:
    """Set the number of epochs of a fit after the Trainer was built (``Trainer.max_epochs``
    has no setter); returns the value it replaces."""
    before = trainer.fit_loop.max_epochs
    trainer.fit_loop.max_epochs = epochs
    return before


def training_progress(checkpoint: dict[str, Any]) -> tuple[int, int]:
    """Optimizer steps and finished epochs recorded in a Lightning checkpoint dict.

    The fit loop counts an epoch as processed before ``on_train_epoch_end``, where phase
    snapshots and ``last.ckpt`` are saved; ``"epoch"`` is the index of the epoch it was saved in."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    return int(checkpoint["global_step"]), int(progress.get("processed", checkpoint.get("epoch", -1) + 1))


def plain_process_malloc() -> bool:
    """Give glibc's allocator the thresholds its dynamic defaults reach in a long-running
    PyTorch process (mmap above 32 MiB, trim above 64 MiB), whatever the environment set.
    Returns whether it could (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 64 * 2**20))


@contextlib.contextmanager
def runtime_cuda_check(device: torch.device) -> Iterator[None]:
    """While entered, ``torch.cuda.is_available()`` asks the CUDA runtime instead of NVML, if
    the run is not on a GPU and no CUDA device exists; else a no-op.
    ``Classifier`` enters it from ``on_train_start`` to ``on_train_end``."""
    if device.type == "cuda" or os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1" or torch.cuda.is_available():
        yield
        return
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    try:
        yield
    finally:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
