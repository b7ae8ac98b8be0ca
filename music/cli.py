"""``music``: one command for training, evaluation and every experiment.

``music fit | validate | test | predict`` is LightningCLI over ``Classifier`` and
``MusicDataModule``; ``music <experiment>`` runs one of ``music.experiments``. Both read the same
config language: YAML through jsonargparse, ``--config`` repeatable (a shipped config by name,
e.g. ``--config seq`` or ``--config methods/ewc``, or any path; see ``music.config``), dotted
overrides, ``--print_config``, ``--help``. The Lightning subcommands start from
``configs/base.yaml``, so a shipped config holds only what differs from it.

Bad input ends in one line, ``error: ...`` on stderr, exit code 2; ``--debug`` (or
``MUSIC_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from music.config import CONFIG_DIR, GROUPS, resolve_configs, shipped_names
from music.experiments import EXPERIMENTS, run_experiment
from music.runner import LIGHTNING_SUBCOMMANDS, USER_ERRORS, UsageError, lightning, user_message


def quiet_upstream() -> None:
    """Silence what MUSIC cannot act on, for the whole process: the command line's choice, so
    a program that imports MUSIC keeps its own warning and logging settings."""
    # Upstream deprecations: Lightning 2.6's own use of torch's LeafSpec, and LightningCLI's use
    # of jsonargparse APIs deprecated in 4.49.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lightning\.pytorch\.cli")
    # Splits are tensors in memory: loader worker processes would only add start-up cost.
    warnings.filterwarnings("ignore", message=r".*does not have many workers", module=r"lightning\.pytorch")
    # The phase schedule sets the number of epochs when fitting starts (the sum of its phases');
    # Lightning warns before that, when the Trainer's own max_epochs is unset.
    warnings.filterwarnings("ignore", message=r"`max_epochs` was not set", module=r"lightning\.pytorch")
    # Lightning logs an advertisement for its cloud logger on every Trainer that has none.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_cloud_tip)


def _no_cloud_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip: For seamless cloud logging")


def usage() -> str:
    lines = ["usage: music <subcommand> [--config NAME|PATH ...] [--key value ...] [--print_config] [--help]", "",
             "Training and evaluation (LightningCLI; configs start from configs/base.yaml):",
             "  fit        train through the phases of `schedule`, with a snapshot and test evaluation after each",
             "  validate   evaluate on the validation split",
             "  test       evaluate on the test set (--ckpt_path or --model.init_from)",
             "  predict    predict on the test set", "", "Experiments:"]
    lines += [f"  {name:<18} {experiment.summary}" for name, experiment in EXPERIMENTS.items()]
    names = shipped_names()
    lines += ["", f"Shipped configs ({CONFIG_DIR}), by --config name; the group may be left out where no other "
                  "group has the name, and ./NAME.yaml is a local file:",
              "  " + ", ".join(n for n in names if "/" not in n)]
    lines += [f"  {group}/: " + ", ".join(n.split("/", 1)[1] for n in names if n.startswith(f"{group}/"))
              for group in GROUPS]
    lines += ["  (experiments/<experiment> is read before any --config of `music <experiment>`)",
              "`music <subcommand> --help` lists every setting with its documentation."]
    return "\n".join(lines)


def dispatch(args: list[str]) -> Any:
    """Run one subcommand; raises ``UsageError`` and the ``USER_ERRORS`` instead of exiting."""
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        if not args:
            raise UsageError("no subcommand given", code=2)
        return None
    if args[0] in EXPERIMENTS:
        return run_experiment(args[0], resolve_configs(args[1:]))
    if args[0] in LIGHTNING_SUBCOMMANDS or args[0].startswith("-"):
        return lightning(args)
    known = [*LIGHTNING_SUBCOMMANDS, *EXPERIMENTS]
    raise UsageError(f"unknown subcommand {args[0]!r}: choose one of {', '.join(known)}")


def main(args: list[str] | None = None) -> None:
    """The ``music`` entry point: errors from bad input are one line on stderr, exit code 2."""
    quiet_upstream()
    args = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get("MUSIC_DEBUG", "") not in ("", "0") or "--debug" in args
    args = [a for a in args if a != "--debug"]
    if debug:
        dispatch(args)
        return
    try:
        dispatch(args)
    except UsageError as err:
        _fail(str(err), err.code)
    except USER_ERRORS as err:
        _fail(user_message(str(err)), 2)


def _fail(message: str, code: int) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)
