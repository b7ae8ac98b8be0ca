"""The training path's shortcuts, each measured to pay more than 10% of a SimpleNN epoch on a
CPU (``docs/speed.md``); everything else about speed is plain Lightning configuration.

1. **Direct steps.** Inside a block, ``manual_backward`` and ``LightningOptimizer.step`` wrap
   ``loss.backward()`` and ``optimizer.step()`` in hook dispatch over the module and every
   callback (13-14% of an epoch). When nothing would happen in those hooks (``steps_are_plain``),
   ``direct_steps`` takes the plain calls and counts each step as ``LightningOptimizer.step``
   does, through its ``_on_before_step``/``_on_after_step`` callbacks -- Lightning's private
   API, hence the pin ``lightning>=2.6,<2.7`` in ``pyproject.toml`` and the test
   ``tests/test_speed.py::test_direct_steps_rely_on_the_pinned_lightning`` that fails on any
   other minor version until this is checked again.
2. **No NVML probe per step on a machine without CUDA.** Importing Lightning sets
   ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` (so asking whether CUDA exists never initialises it
   before a fork); every ``Adam.step`` asks, and on a machine without a GPU NVML is then
   looked for anew each time (15-19% of an epoch). ``runtime_cuda_check`` asks the CUDA
   runtime instead while training, only where no CUDA device exists, so there is
   nothing a fork could find initialised.
3. **glibc's allocator as a plain process has it, in Dask workers.** Dask's nanny starts every
   worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes glibc's mmap threshold at
   128 KiB: every activation and gradient above it is then mapped and unmapped, page faults
   included, at every step. A pretraining cell trained 35 s instead of 20 s so (24.6 s with
   ``plain_process_malloc``). Study cells call it; it is a no-op off glibc.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

# The Lightning minor version the direct steps were checked against (pyproject pins it).
CHECKED_LIGHTNING = "2.6"
# The hooks Lightning calls between a training loss and the optimizer step it leads to.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def steps_are_plain(trainer: Trainer, module: LightningModule) -> bool:
    """Whether ``manual_backward`` and ``LightningOptimizer.step`` would do nothing but
    ``loss.backward()`` and ``optimizer.step()`` plus calls of hooks nobody overrides: one device
    (no gradient sync), 32-bit precision (no loss scaling or casting), no profiler timing the
    step, and neither the module nor any callback overriding ``STEP_HOOKS`` (or ``backward``)."""
    return (type(trainer.strategy) is SingleDeviceStrategy
            and type(trainer.precision_plugin) is Precision
            and type(trainer.profiler) is PassThroughProfiler
            and not is_overridden("backward", module)
            and not any(is_overridden(hook, listener) for hook in STEP_HOOKS for listener in [module, *trainer.callbacks]))


def direct_step(optimizer: LightningOptimizer) -> Callable[[Tensor], None]:
    """zero_grad, ``loss.backward()`` and the optimizer's own ``step``, counted as
    ``LightningOptimizer.step`` counts it, so ``global_step`` and checkpoints are the same.
    Only valid where ``steps_are_plain``."""
    plain = optimizer.optimizer

    def step(loss: Tensor) -> None:
        plain.zero_grad()
        loss.backward()
        optimizer._on_before_step()
        plain.step()
        optimizer._on_after_step()

    return step


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
    """While entered, ``torch.cuda.is_available()`` asks the CUDA runtime (microseconds)
    instead of NVML, if the run is not on a GPU and no CUDA device exists; else a no-op.
    ``Classifier`` enters it from ``on_train_start`` to ``on_train_end``."""
    if device.type == "cuda" or os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1" or torch.cuda.is_available():
        yield
        return
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    try:
        yield
    finally:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
