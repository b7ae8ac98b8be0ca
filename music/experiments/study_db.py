"""The study database: one row per finished cell, its accuracy matrix and its metrics.

Any SQLAlchemy URL works: the default is a SQLite file in the study folder
(``sqlite:///<output.root>/<output.name>/study.db``); a team that runs one grid from several
machines points ``--study.db`` at one PostgreSQL (``postgresql://user@host/db``, with a driver
such as ``psycopg2`` installed). A cell is written in ONE transaction by the worker that ran it,
so the database holds a cell completely or not at all, and holding it is what "finished" means.

Schema (documented in ``docs/study.md``, queried by ``study_report.py``):

- ``cells``: one row per finished cell — ``seed``, ``name``, ``kind`` (pretrain, joint, seq,
  merged, replay, method), ``method`` (the continual-learning method config of a ``method``
  cell, e.g. ``ewc``; NULL for others), ``lr``, ``ordering`` (``"3-4-7"``, NULL for others),
  ``replay_size``,
  ``fingerprint``, ``settings`` (JSON: what determines the result), the final metrics
  (``final_acc``, ``held_out_acc``, ``untouched_acc``, ``average_accuracy``,
  ``backward_transfer``, ``mean_forgetting``, ``untouched_forgetting``, ``collapse_share``),
  ``continual_metrics`` (JSON), ``wall_seconds``, ``host``, ``finished_at`` (UTC, ISO),
  ``run_dir``, ``resumed``. ``(seed, name)`` is unique.
- ``phases``: one row per evaluated phase of a cell (``row`` 0 is the model before the first
  phase) — ``cell_id``, ``row``, ``phase``, ``split``, ``acc``, and for the phases trained:
  ``loss``, ``precision``, ``recall``, ``f1`` (macro), ``train_seconds``.
- ``class_results``: one row per evaluated phase and class — ``cell_id``, ``row``, ``phase``,
  ``class``, ``acc`` (that class's test accuracy), ``confusion`` (JSON: the predicted-class
  counts of that true class; NULL for row 0, which only the accuracy matrix keeps).
- ``grid_runs``: one row per ``music study`` invocation — ``started_at``, ``seconds``,
  ``workers``, ``scheduler``, ``ran``, ``skipped``, ``failed``, ``host``.
- ``experiment_runs``: one row per finished run of another experiment (``music table1``,
  ``music continual``) — ``experiment``, ``name``, ``fingerprint``, ``settings`` (JSON),
  ``result`` (JSON: what its table is made from), ``wall_seconds``, ``host``, ``finished_at``,
  ``run_dir``. ``(experiment, name)`` is unique.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import (Boolean, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event, insert, select)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

METRICS = ["final_acc", "held_out_acc", "untouched_acc", "average_accuracy", "backward_transfer",
           "mean_forgetting", "untouched_forgetting", "collapse_share"]

metadata = MetaData()

cells = Table(
    "cells", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("seed", Integer, nullable=False),
    Column("name", String(200), nullable=False),
    Column("kind", String(20), nullable=False),
    Column("method", String(100)),
    Column("lr", Float, nullable=False),
    Column("ordering", String(100)),
    Column("replay_size", Integer, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("settings", Text, nullable=False),
    *(Column(m, Float) for m in METRICS),
    Column("continual_metrics", Text),
    Column("wall_seconds", Float),
    Column("host", String(255)),
    Column("finished_at", String(40)),
    Column("run_dir", Text),
    Column("resumed", Boolean),
    UniqueConstraint("seed", "name", name="one_row_per_cell"),
)

phases = Table(
    "phases", metadata,
    Column("cell_id", Integer, ForeignKey("cells.id"), nullable=False, index=True),
    Column("row", Integer, nullable=False),
    Column("phase", String(200), nullable=False),
    Column("split", String(100)),
    Column("acc", Float),
    Column("loss", Float),
    Column("precision", Float),
    Column("recall", Float),
    Column("f1", Float),
    Column("train_seconds", Float),
)

class_results = Table(
    "class_results", metadata,
    Column("cell_id", Integer, ForeignKey("cells.id"), nullable=False, index=True),
    Column("row", Integer, nullable=False),
    Column("phase", String(200), nullable=False),
    Column("class", Integer, nullable=False),
    Column("acc", Float),
    Column("confusion", Text),
)

grid_runs = Table(
    "grid_runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", String(40)),
    Column("seconds", Float),
    Column("workers", Integer),
    Column("scheduler", Text),
    Column("ran", Integer),
    Column("skipped", Integer),
    Column("failed", Integer),
    Column("host", String(255)),
)

experiment_runs = Table(
    "experiment_runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("experiment", String(100), nullable=False),
    Column("name", String(200), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("settings", Text, nullable=False),
    Column("result", Text, nullable=False),
    Column("wall_seconds", Float),
    Column("host", String(255)),
    Column("finished_at", String(40)),
    Column("run_dir", Text),
    UniqueConstraint("experiment", "name", name="one_row_per_experiment_run"),
)

_engines: dict[str, Engine] = {}


def connect(url: str) -> Engine:
    """An engine on ``url`` with the tables created; one per URL and process. A URL that
    cannot be opened is a ``ValueError`` naming it, raised before anything is written."""
    if url in _engines:
        return _engines[url]
    try:
        sqlite = url.startswith("sqlite")
        engine = create_engine(url, connect_args={"timeout": 120} if sqlite else {})
        if sqlite:  # several workers write one file: wait for the lock instead of failing
            event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout = 120000"))
        with engine.begin() as conn:
            metadata.create_all(conn)
            _add_missing_columns(conn)
    except (SQLAlchemyError, ImportError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"study.db={url!r} cannot be opened: {first}. Give an SQLAlchemy URL such as "
                         "sqlite:////abs/path/study.db or postgresql://user@host/db.") from None
    _engines[url] = engine
    return engine


def _add_missing_columns(conn) -> None:
    """Columns added to the schema since a database was made (all nullable): a study
    database made by an earlier release keeps its cells."""
    from sqlalchemy import inspect, text

    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def fingerprints(engine: Engine) -> dict[tuple[int, str], str]:
    """``(seed, name) -> fingerprint`` of every finished cell."""
    with engine.connect() as conn:
        return {(r.seed, r.name): r.fingerprint for r in conn.execute(select(cells.c.seed, cells.c.name, cells.c.fingerprint))}


def has_cell(engine: Engine, seed: int, name: str) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(cells.c.id).where(cells.c.seed == seed, cells.c.name == name)).first() is not None


def record_cell(engine: Engine, cell: dict[str, Any], phase_rows: list[dict], class_rows: list[dict]) -> bool:
    """Write a finished cell, its phases and per-class rows in one transaction; False (and
    nothing written) if the cell is there already — a cell re-run after its worker died
    is stored once."""
    with engine.begin() as conn:
        if conn.execute(select(cells.c.id).where(cells.c.seed == cell["seed"], cells.c.name == cell["name"])).first():
            return False
        cell_id = conn.execute(insert(cells).values(**cell)).inserted_primary_key[0]
        if phase_rows:
            conn.execute(insert(phases), [r | {"cell_id": cell_id} for r in phase_rows])
        if class_rows:
            conn.execute(insert(class_results), [r | {"cell_id": cell_id} for r in class_rows])
    return True


def record_grid_run(engine: Engine, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(insert(grid_runs).values(**values))


def load(engine: Engine) -> tuple[list[dict], dict[int, list[dict]], dict[int, list[dict]], list[dict]]:
    """Every table as dicts: cells, phases by cell id, class rows by cell id, grid runs."""
    with engine.connect() as conn:
        all_cells = [dict(r._mapping) for r in conn.execute(select(cells).order_by(cells.c.id))]
        by_phase: dict[int, list[dict]] = {}
        for r in conn.execute(select(phases).order_by(phases.c.cell_id, phases.c.row)):
            by_phase.setdefault(r.cell_id, []).append(dict(r._mapping))
        by_class: dict[int, list[dict]] = {}
        for r in conn.execute(select(class_results).order_by(class_results.c.cell_id, class_results.c.row,
                                                             class_results.c["class"])):
            by_class.setdefault(r.cell_id, []).append(dict(r._mapping))
        runs = [dict(r._mapping) for r in conn.execute(select(grid_runs).order_by(grid_runs.c.id))]
    return all_cells, by_phase, by_class, runs


def query(engine: Engine, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one SQL statement and return its column names and rows; the transaction is rolled
    back, so a query never changes the database."""
    from sqlalchemy import text

    with engine.connect() as conn:
        try:
            result = conn.execute(text(sql))
            columns, rows = (list(result.keys()), [tuple(r) for r in result]) if result.returns_rows else ([], [])
        except SQLAlchemyError as err:
            raise ValueError(f"query failed: {str(err).strip().splitlines()[0]}") from None
        finally:
            conn.rollback()
    return columns, rows


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def fingerprint(settings: Any) -> str:
    """The hash a stored result is matched by: of the settings that determine it, as JSON."""
    return hashlib.sha256(dumps(settings).encode()).hexdigest()[:16]


def stored_run(engine: Engine, experiment: str, name: str) -> dict | None:
    """The stored row of an experiment's run, or None if it has not finished."""
    with engine.connect() as conn:
        row = conn.execute(select(experiment_runs).where(experiment_runs.c.experiment == experiment,
                                                         experiment_runs.c.name == name)).first()
    return None if row is None else dict(row._mapping)


def record_run(engine: Engine, row: dict[str, Any]) -> bool:
    """Write a finished run in one transaction; False (and nothing written) if it is there already."""
    with engine.begin() as conn:
        if conn.execute(select(experiment_runs.c.id).where(experiment_runs.c.experiment == row["experiment"],
                                                           experiment_runs.c.name == row["name"])).first():
            return False
        conn.execute(insert(experiment_runs).values(**row))
    return True
