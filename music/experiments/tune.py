"""``music tune``: a hyperparameter search (Optuna) over any run config, scored on validation.

Each trial is one ``music fit`` of the run configs (``configs``, e.g. ``split_mnist`` +
``methods/ewc``) with the values the sampler suggests for the keys of the search ``space``, set
as the command line's dotted overrides are (``model.lr``; an entry of a list by its index,
``model.methods[0].init_args.lambda_``). A trial never sees the test set: it evaluates the
``val`` split (``data.val_size`` samples carved from the training data) after every phase
(``evaluation.evaluate_val``; its test evaluation is off) and is scored by the mean validation
accuracy over the schedule's tasks after the last phase (the average accuracy of continual
learning, on val; a schedule without class tasks: the validation accuracy). After each phase
the same score over the tasks so far is reported to Optuna, whose pruner may stop the trial
there: the run ends cleanly at that phase's end.

Trials are Dask tasks (a ``LocalCluster`` by default, ``--scheduler`` for any cluster, as in
``music study``); every worker opens the Optuna study in one SQLAlchemy database (``--db``;
default ``sqlite:///<output folder>/tune.db``) and runs one trial per task. Re-running the same
command continues the study: trials that finished are kept and counted against ``trials``;
a trial whose process was killed stops sending its heartbeat, is marked failed once it is
stale (``heartbeat`` seconds × 2) and queued again with the same parameters
(``RetryFailedTrialCallback``), so it runs once more rather than being lost or counted. A
study whose settings differ from the stored one's (configs, space, overrides, ...) is refused.

The output: ``tune.md``/``tune.csv`` (every trial: state, score, parameters, epochs, seconds,
the budget and the best trial in the notes) and ``best.yaml`` (the best parameters as a config
delta: ``music fit --config <configs...> --config <folder>/best.yaml``).
"""

from __future__ import annotations

import copy
import math
import re
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
import yaml
from distributed import wait
from lightning.pytorch import Callback, LightningModule, Trainer

from music.callbacks import SequentialFineTuning
from music.checkpoint import write_atomically
from music.config import config_path, search_space_path
from music.continual import accuracy_on
from music.data import split_classes
from music.evaluation import PhaseEvaluation
from music.experiments import study_db
from music.experiments.common import (Data, Output, dask_client, fit, fmt_settings, fmt_value, machine, output_to,
                                      write_table)
from music.runner import UsageError, build
from music.speed import plain_process_malloc

EXPERIMENT = "tune"
KEY = re.compile(r"[A-Za-z_]\w*(\[\d+\])*(\.[A-Za-z_]\w*(\[\d+\])*)*")
RANGE_FIELDS = {"low", "high", "log", "step"}
ENDED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


# -- the search space --------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One key of the space and its distribution: ``choices``, or a ``low``-``high`` range
    (integers when both bounds are integers), ``log``-uniform or with a ``step``."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)

    def example(self) -> Any:
        return self.choices[0] if self.choices is not None else self.low


def parse_space(space: Any) -> list[Param]:
    """The space's entries, each checked; a bad one is a ``ValueError`` in one line naming it."""
    if not isinstance(space, dict) or not space:
        raise ValueError(f"space={space!r} is not allowed: give a mapping of settings to distributions, e.g. "
                         "{model.lr: {low: 1e-5, high: 1e-2, log: true}}.")
    return [_param(key, spec) for key, spec in space.items()]


def _param(key: Any, spec: Any) -> Param:
    where = f"space: {key}"
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise ValueError(f"{where} is not a setting: write it as the command line's overrides, e.g. model.lr or "
                         "model.methods[0].init_args.lambda_.")
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: {spec!r} is not a distribution: give {{low, high[, log, step]}} or {{choices: [...]}}.")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            raise ValueError(f"{where}: {spec} mixes choices with {sorted(set(spec) - {'choices'})}: give one or the other.")
        if not isinstance(choices, list) or not choices or \
                not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise ValueError(f"{where}: choices={choices!r} is not allowed: give a non-empty list of numbers, strings, "
                             "booleans or null.")
        return Param(key, choices=tuple(choices))
    unknown = sorted(set(spec) - RANGE_FIELDS)
    if unknown or not {"low", "high"} <= set(spec):
        raise ValueError(f"{where}: {spec} is not a distribution: give low and high (and optionally log: true or step), "
                         f"or choices{f'; unknown fields {unknown}' if unknown else ''}.")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"{where}: {name}={value!r} is not allowed: it must be a finite number.")
    if not isinstance(log, bool):
        raise ValueError(f"{where}: log={log!r} is not allowed: it must be true or false.")
    if not low < high:
        raise ValueError(f"{where}: low={low}, high={high} is not allowed: low must be < high.")
    if log and low <= 0:
        raise ValueError(f"{where}: low={low} is not allowed with log: true: a log-uniform range needs low > 0.")
    if step is not None and (step <= 0 or log):
        raise ValueError(f"{where}: step={step} is not allowed: it must be > 0, and not combined with log.")
    if isinstance(low, int) and isinstance(high, int) and step is not None and not isinstance(step, int):
        raise ValueError(f"{where}: step={step} is not allowed for an integer range: give an integer step.")
    return Param(key, low=low, high=high, log=log, step=step)


def _tokens(key: str) -> list[str | int]:
    """``model.methods[0].init_args.lambda_`` -> ``["model", "methods", 0, "init_args", "lambda_"]``."""
    return [int(t[1:-1]) if t.startswith("[") else t for t in re.findall(r"\[\d+\]|[^.\[\]]+", key)]


def _listed(key: str) -> str | None:
    """The override that holds an indexed key (``model.methods`` for ``model.methods[0]....``), or
    None for a plain dotted key, which is an override itself."""
    return key[: key.index("[")] if "[" in key else None


def overrides_for(values: dict[str, Any], lists: dict[str, Any]) -> dict[str, Any]:
    """The ``music fit`` overrides that set ``values``: a plain key as it is; keys inside a list
    (``model.methods[0].init_args.lambda_``) as the whole list, from ``lists`` (the configs'
    resolved value of each such list) with those entries changed."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        holder = _listed(key)
        if holder is None:
            out[key] = value
            continue
        target = out.setdefault(holder, copy.deepcopy(lists[holder]))
        path = _tokens(key)[len(_tokens(holder)):]
        for token in path[:-1]:
            target = target[token]
        target[path[-1]] = value
    return out


def _plain(value: Any) -> Any:
    """A parsed config value (jsonargparse ``Namespace``s, lists of them) as plain data."""
    if hasattr(value, "as_dict"):
        return _plain(value.as_dict())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("__")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def resolve_lists(params: list[Param], configs: list[str], fixed: dict[str, Any]) -> dict[str, Any]:
    """Check the space against the run configs before any trial runs, and return the configs'
    value of every list an indexed key reaches into. The configs are parsed and their objects
    built (nothing runs) with each key set to an example value, so an unknown key, an index
    past a list's end, or a value of the wrong type is refused here, in one line."""
    holders = sorted({h for p in params if (h := _listed(p.key)) is not None})
    lists: dict[str, Any] = {}
    if holders:
        parsed = _build(configs, fixed, "the run configs")
        for holder in holders:
            value = parsed.config.get(holder)
            if not isinstance(value, list):
                raise ValueError(f"space: {holder} is {'not set' if value is None else 'not a list'} in the run configs "
                                 f"{configs}: an indexed key needs a list there.")
            lists[holder] = _plain(value)
    for p in params:
        if (holder := _listed(p.key)) is not None:
            target: Any = lists[holder]
            for token in _tokens(p.key)[len(_tokens(holder)):]:
                if isinstance(token, int) and not (isinstance(target, list) and token < len(target)):
                    raise ValueError(f"space: {p.key}: {holder} has {len(target) if isinstance(target, list) else 'no'} "
                                     f"entries in the run configs {configs}: index {token} is out of range.")
                if isinstance(token, str) and not (isinstance(target, dict) and token in target):
                    known = f" (it has {', '.join(target)})" if isinstance(target, dict) else ""
                    raise ValueError(f"space: {p.key} is not a setting of the run configs {configs}: "
                                     f"{token!r} is not set there{known}.")
                target = target[token]
    example = overrides_for({p.key: p.example() for p in params}, lists)
    _build(configs, fixed | example, "the search space")
    return lists


def _build(configs: list[str], overrides: dict[str, Any], what: str):
    try:
        return build(configs, overrides)
    except UsageError as err:
        raise ValueError(f"{what} does not fit the run configs {configs}: {' '.join(str(err).split())}") from None


# -- one trial ---------------------------------------------------------------------------------

def validation_score(val_rows: dict[str, list], phases: Sequence, held_out: Sequence[int],
                     task_accuracy: dict[str, float] | None = None) -> float:
    """The mean validation accuracy over the tasks of ``phases`` after the last of them: read
    off its confusion matrix (the tasks whose split names classes), or, where each task has its
    own validation samples (domains, a label map: ``task_accuracy``, task split -> accuracy),
    the mean of those; without tasks, the validation accuracy. A task without validation
    samples is left out of the mean."""
    if task_accuracy is not None:
        scores = [task_accuracy[p.split] for p in phases if p.split in task_accuracy]
        tasks = [p.split for p in phases]
    else:
        confusion = val_rows[phases[-1].name]
        tasks = [t for t in (split_classes(p.split, held_out) for p in phases) if t]
        if not tasks:
            return accuracy_on(confusion, range(len(confusion)))
        scores = [accuracy_on(confusion, t) for t in tasks]
    scores = [s for s in scores if not math.isnan(s)]
    if not scores:
        raise ValueError(f"the validation split holds no sample of the tasks {tasks}: set a larger data.val_size.")
    return sum(scores) / len(scores)


class ReportPhases(Callback):
    """A phase listener for one trial: after each phase (once ``PhaseEvaluation`` has scored the
    validation split) it reports the score over the tasks so far to the trial and, when the
    pruner says so, ends the fit at the end of this epoch."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.scores: list[float] = []
        self.pruned = False

    def on_phase_start(self, trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning,
                       index: int) -> None:
        pass

    def on_phase_end(self, trainer: Trainer, pl_module: LightningModule, schedule: SequentialFineTuning,
                     index: int) -> None:
        evaluation = next(c for c in trainer.callbacks if isinstance(c, PhaseEvaluation))
        phases = schedule.phases[: index + 1]
        score = validation_score(evaluation.val_rows, phases, trainer.datamodule.held_out_classes,
                                 evaluation.val_task_accuracy.get(phases[-1].name))
        self.scores.append(score)
        self.trial.report(score, step=index)
        if index + 1 < len(schedule.phases) and self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


@dataclass
class Job:
    """What a Dask worker needs to run trials of the study (plain data, sent to the worker)."""

    configs: list[str]
    params: list[Param]
    lists: dict[str, Any]
    fixed: dict[str, Any]
    data: Data
    output: Output
    db_url: str
    study_name: str
    seed: int
    pruner: str
    startup_trials: int
    heartbeat: int
    keep_checkpoints: bool
    session: str = ""


def storage(job: Job) -> optuna.storages.RDBStorage:
    """The study's RDB storage: trials send a heartbeat every ``job.heartbeat`` seconds, and
    one silent for twice that is failed and queued again with its parameters."""
    sqlite = job.db_url.startswith("sqlite")
    with warnings.catch_warnings():  # Optuna marks heartbeats experimental, and says so on every use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            job.db_url, engine_kwargs={"connect_args": {"timeout": 300}} if sqlite else None,  # several writers: wait
            heartbeat_interval=job.heartbeat, grace_period=2 * job.heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))


def open_study(job: Job, index: int = 0) -> optuna.Study:
    """The study; ``index`` seeds the sampler, so parallel trials draw different values."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=job.startup_trials) if job.pruner == "median" \
        else optuna.pruners.NopPruner()
    return optuna.load_study(study_name=job.study_name, storage=storage(job),
                             sampler=optuna.samplers.TPESampler(seed=job.seed + index), pruner=pruner)


def run_trial(job: Job, index: int) -> int | None:
    """One trial (a Dask task): a queued one (a retry) if there is one, else new values from
    the sampler; returns its number. A trial whose run raises is marked failed, its error kept
    in its ``error`` attribute."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial: its error is in the table
    torch.set_num_threads(job.output.threads)
    plain_process_malloc()  # undo the Dask nanny's MALLOC_TRIM_THRESHOLD_ (music.speed)
    study = open_study(job, index)
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        ran.append(trial.number)
        trial.set_user_attr("session", job.session)
        values = {p.key: p.suggest(trial) for p in job.params}
        listener = ReportPhases(trial)
        start = time.perf_counter()
        try:
            with output_to(job.output.folder(EXPERIMENT) / f"trial_{trial.number}.log"):
                result = fit(job.configs, f"trial_{trial.number}", job.data, job.output, EXPERIMENT,
                             job.fixed | overrides_for(values, job.lists), callbacks=[listener])
        except Exception as err:  # noqa: BLE001 - the trial fails, the study goes on; the table names the error
            trial.set_user_attr("error", f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")
            return math.nan
        trial.set_user_attr("seconds", time.perf_counter() - start)
        trial.set_user_attr("epochs", result.trainer.current_epoch)
        trial.set_user_attr("run_dir", str(result.run_dir))
        if not job.keep_checkpoints:
            for path in (result.run_dir / "checkpoints").glob("*.ckpt"):
                path.unlink()
        if listener.pruned:
            raise optuna.TrialPruned()
        return listener.scores[-1]

    study.optimize(objective, n_trials=1, gc_after_trial=True)  # a worker runs many trials: free each one
    return ran[0] if ran else None


# -- the study on Dask -------------------------------------------------------------------------

def tally(trials: Sequence[optuna.trial.FrozenTrial], session: str) -> tuple[int, int]:
    """``(ended, others_running)``: trials that count against the budget (complete, pruned, or
    failed and not queued again), and trials running for another session (a process that is
    still going, or one killed whose trial has not yet been found stale)."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    ended = sum(t.state in ENDED and not (t.state == optuna.trial.TrialState.FAIL and t.number in retried) for t in trials)
    others = sum(t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("session") != session for t in trials)
    return ended, others


class Tune:
    """A hyperparameter search over a run config, scored on a validation split, with pruning,
    on Dask, resumable (``music tune``).

    Args:
        configs: the run configs (shipped names or paths), as ``music fit --config`` takes them,
            e.g. ``[split_mnist, methods/ewc]``.
        space: the search space: settings (dotted, as overrides; ``model.methods[0].init_args.lambda_``)
            mapped to ``{low, high}`` (integers if both are; ``log: true`` for log-uniform, or a
            ``step``) or ``{choices: [...]}``; or the path of a YAML file holding that mapping.
        trials: the budget: trials that end (complete, pruned, or failed by an error of their
            run) in this study, counting those of earlier invocations.
        overrides: more ``music fit`` settings for every trial (e.g. ``{data.iterations_per_epoch: 500}``).
        val_size: samples carved from the training data for the validation split the trials are
            scored on (``data.val_size``); null: the configs' own, which must be > 0.
        pruner: ``median`` (Optuna's MedianPruner, after each phase) or ``none``.
        startup_trials: trials the median pruner lets finish before it prunes any.
        seed: the sampler's seed (TPE); each trial's run keeps the configs' ``seed_everything``.
        scheduler: a Dask scheduler address (``tcp://host:8786``); null: a ``LocalCluster`` here.
        workers: worker processes of the local cluster; null: one per core.
        db: an SQLAlchemy URL of the Optuna study's database; null:
            ``sqlite:///<output folder>/tune.db``. Workers of a remote cluster must reach it.
        heartbeat: seconds between a running trial's heartbeats; a trial silent for twice that
            (its process killed) is failed and queued again.
        keep_checkpoints: keep each trial's checkpoints (deleted once it is scored otherwise).
        data: where the dataset is (``--data.data_dir``), a path every worker can read.
        output: ``<root>/<name>`` (default ``lightning_logs/tune``): the trials' runs, ``tune.db``,
            ``tune.md``/``.csv`` and ``best.yaml`` (or those in ``results``); torch threads per trial.
    """

    def __init__(self, configs: list[str], space: dict[str, Any] | str, trials: int = 20,
                 overrides: dict[str, Any] = {}, val_size: int | None = 5000,
                 pruner: Literal["median", "none"] = "median", startup_trials: int = 5, seed: int = 0,
                 scheduler: str | None = None, workers: int | None = None, db: str | None = None,
                 heartbeat: int = 10, keep_checkpoints: bool = False, data: Data = Data(),
                 output: Output = Output()) -> None:
        if not isinstance(trials, int) or trials < 1:
            raise ValueError(f"trials={trials} is not allowed: it must be an integer >= 1.")
        if pruner not in ("median", "none"):
            raise ValueError(f"pruner={pruner!r} is not allowed: choose median or none.")
        for name, value, low in (("startup_trials", startup_trials, 0), ("heartbeat", heartbeat, 1)):
            if value < low:
                raise ValueError(f"{name}={value} is not allowed: it must be an integer >= {low}.")
        if val_size is not None and val_size < 1:
            raise ValueError(f"val_size={val_size} is not allowed: give at least 1 sample, or null for the configs' own.")
        if workers is not None and workers < 1:
            raise ValueError(f"workers={workers} is not allowed: it must be >= 1 (or null for one per core).")
        if scheduler is not None and "://" not in scheduler:
            raise ValueError(f"scheduler={scheduler!r} is not a Dask scheduler address: give e.g. tcp://host:8786.")
        if not configs:
            raise ValueError("configs is empty: give the run configs to tune, e.g. [split_mnist, methods/ewc].")
        for name in configs:
            config_path(name)  # an unknown config fails here, before anything runs
        self.space = _load_space(space)
        self.params = parse_space(self.space)
        self.configs = list(configs)
        self.trials = trials
        self.overrides = dict(overrides)
        self.val_size = val_size
        self.pruner, self.startup_trials, self.seed = pruner, startup_trials, seed
        self.scheduler, self.workers, self.heartbeat = scheduler, workers, heartbeat
        self.keep_checkpoints = keep_checkpoints
        self.folder = output.folder(EXPERIMENT).resolve()
        self.db = db or f"sqlite:///{self.folder / 'tune.db'}"
        self.data = replace(data, data_dir=str(Path(data.data_dir).resolve()))  # every worker reads it at this path
        self.output = replace(output, root=str(Path(output.root).resolve()))
        self.tables = output.tables(EXPERIMENT)
        self.study_name = output.name or EXPERIMENT

    def fixed(self) -> dict[str, Any]:
        """What every trial sets besides the space: the validation split, evaluated after every
        phase, and no test evaluation (a search never looks at test)."""
        fixed = {"evaluation.evaluate_val": True, "evaluation.evaluate_test": False, "evaluation.log_figures": False,
                 "data.log_eda": False}
        if self.val_size is not None:
            fixed["data.val_size"] = self.val_size
        return fixed | self.overrides

    def settings(self) -> dict[str, Any]:
        """What makes trials comparable: a stored study with other settings is refused."""
        return {"configs": self.configs, "space": self.space, "overrides": self.overrides, "val_size": self.val_size,
                "pruner": self.pruner, "startup_trials": self.startup_trials, "seed": self.seed,
                "quick": self.output.quick}

    def run(self) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        fixed = self.fixed()
        data_settings = {"data.data_dir": self.data.data_dir, "data.download": self.data.download}
        lists = resolve_lists(self.params, self.configs, fixed | data_settings)
        job = Job(self.configs, self.params, lists, fixed, self.data, self.output, self.db, self.study_name, self.seed,
                  self.pruner, self.startup_trials, self.heartbeat, self.keep_checkpoints, session=uuid.uuid4().hex)
        study = self._open(job)
        failed_tasks = self._drive(study, job)
        result = self._report(study, lists)
        if failed_tasks:
            raise RuntimeError(f"{len(failed_tasks)} trial task(s) failed outside their trial: " + "; ".join(failed_tasks))
        return result

    def _open(self, job: Job) -> optuna.Study:
        try:
            study = optuna.create_study(storage=storage(job), study_name=self.study_name, direction="maximize",
                                        load_if_exists=True)
        except Exception as err:  # noqa: BLE001 - SQLAlchemy's and the driver's errors: the URL is wrong
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"db={self.db!r} cannot be opened: {first}. Give an SQLAlchemy URL such as "
                             "sqlite:////abs/path/tune.db or postgresql://user@host/db.") from None
        stored = study.user_attrs.get("music_settings")
        if stored is None:
            study.set_user_attr("music_settings", self.settings())
        elif study_db.fingerprint(stored) != study_db.fingerprint(self.settings()):
            raise ValueError(f"the study {self.study_name!r} in {self.db} was started with other settings ({stored}): "
                             "use another output.root/output.name (or db), or give the same configs, space and overrides.")
        return study

    def _drive(self, study: optuna.Study, job: Job) -> list[str]:
        """Submit trial tasks until ``trials`` trials have ended. Trials running for another
        process are waited for (their heartbeats say whether it is alive; a stale one is failed
        and queued again, and a task of this session then runs it)."""
        failed: list[str] = []
        with dask_client(self.scheduler, self.workers, self.output.threads) as client:
            futures: dict[Any, int] = {}
            index = len(study.get_trials(deepcopy=False))
            start = time.perf_counter()
            while True:
                ended, others = tally(study.get_trials(deepcopy=False), job.session)
                need = 0 if failed else self.trials - ended - len(futures) - others
                for _ in range(max(need, 0)):
                    future = client.submit(run_trial, job, index, key=f"tune-{job.session[:8]}-{index}", pure=False)
                    futures[future] = index
                    index += 1
                if not futures and not others:
                    break
                if futures:
                    try:
                        done = wait(list(futures), timeout=self.heartbeat, return_when="FIRST_COMPLETED").done
                    except TimeoutError:
                        done = set()
                    for future in done:
                        futures.pop(future)
                        if future.status != "finished":
                            error = future.exception()
                            failed.append(f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")
                        print(f"[{time.perf_counter() - start:6.0f} s] {tally(study.get_trials(deepcopy=False), '')[0]}"
                              f"/{self.trials} trials ended")
                else:
                    time.sleep(self.heartbeat)
                if others:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        optuna.storages.fail_stale_trials(study)
        return failed

    def _report(self, study: optuna.Study, lists: dict[str, Any]) -> dict:
        trials = study.get_trials(deepcopy=False)
        retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
        keys = [p.key for p in self.params]
        header = ["trial", "state", "val score", *keys, "epochs", "seconds", "error"]
        rows, csv_rows = [], []
        for t in trials:
            if t.state not in ENDED:
                continue
            state = "killed, queued again" if t.number in retried else t.state.name.lower()
            score = t.value if t.value is not None else (max(t.intermediate_values.items())[1]
                                                         if t.intermediate_values else None)
            rows.append([t.number, state, "–" if score is None else f"{score:.4f}",
                         *(fmt_value(t.params.get(k)) for k in keys), t.user_attrs.get("epochs", "–"),
                         "–" if "seconds" not in t.user_attrs else f"{t.user_attrs['seconds']:.1f}",
                         t.user_attrs.get("error", "")])
            csv_rows.append({"trial": t.number, "state": state, "value": t.value,
                             "last_reported": score, **{k: t.params.get(k) for k in keys},
                             "epochs": t.user_attrs.get("epochs"), "seconds": t.user_attrs.get("seconds"),
                             "run_dir": t.user_attrs.get("run_dir"), "error": t.user_attrs.get("error")})
        counted = [t for t in trials if t.state in ENDED and t.number not in retried]
        states = {s: sum(t.state.name.lower() == s for t in counted) for s in ("complete", "pruned", "fail")}
        epochs = sum(t.user_attrs.get("epochs", 0) for t in trials)
        seconds = sum(t.user_attrs.get("seconds", 0.0) for t in trials)
        complete = [t for t in counted if t.state == optuna.trial.TrialState.COMPLETE]
        best = max(complete, key=lambda t: t.value) if complete else None
        best_values = overrides_for(best.params, lists) if best else {}
        notes = [f"Run configs: {', '.join(self.configs)}; overrides: {self.overrides or 'none'}; validation split: "
                 f"{self.val_size or 'the configs'} samples. Score: the mean validation accuracy over the schedule's "
                 "tasks after the last phase (after each phase, over the tasks so far, for pruning); the test set is "
                 "never evaluated.",
                 f"Budget: {self.trials} trials; ended {len(counted)} ({states['complete']} complete, {states['pruned']} "
                 f"pruned, {states['fail']} failed){f', {len(retried)} killed and queued again' if retried else ''}; "
                 f"{epochs} epochs and {seconds:.0f} s of training in all, on {machine(self.output.threads)} per trial. "
                 f"Sampler TPE (seed {self.seed}), pruner {self.pruner}.",
                 f"Best: trial {best.number}, val score {best.value:.4f}, {fmt_settings(best.params)}; as a config delta "
                 f"in best.yaml." if best else "Best: no trial has completed."]
        self.tables.mkdir(parents=True, exist_ok=True)
        markdown = write_table(self.tables, EXPERIMENT, f"Hyperparameter search: {', '.join(self.configs)}",
                               "\n\n".join(notes), header, rows, csv_rows)
        if best is not None:
            write_atomically(self.tables / "best.yaml",
                             f"# music tune: trial {best.number}, val score {best.value:.4f} ({study.study_name} in {self.db})\n"
                             + yaml.safe_dump(_nested(best_values), sort_keys=False))
        print(markdown)
        return {"best_value": best.value if best else None, "best_params": best.params if best else {},
                "ended": len(counted), **states, "table": str(self.tables / f"{EXPERIMENT}.md")}


def _load_space(space: dict | str) -> dict:
    if isinstance(space, dict):
        return space
    if space.lstrip().startswith("{"):  # inline YAML the parser could not read as a mapping
        try:
            return yaml.safe_load(space)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"space={space!r} is not valid YAML: {problem}. Quote a key with brackets: "
                             '\'{"model.methods[0].init_args.lambda_": {low: 1, high: 1e6, log: true}}\'.') from None
    path = Path(space) if Path(space).is_file() else search_space_path(space)
    if path is None:
        raise ValueError(f"space={space!r} is neither a mapping nor a YAML file: give {{key: {{low, high}}}}, a path "
                         "or a shipped space (search/ewc).")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"space={space!r} is not valid YAML: {' '.join(str(err).split())}.") from None
    return loaded


def _nested(overrides: dict[str, Any]) -> dict:
    """Dotted overrides as a YAML config delta."""
    out: dict = {}
    for key, value in overrides.items():
        *parents, last = key.split(".")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return out
