"""The study database: one row per finished cell, its accuracy matrix and its metrics.

Any SQLAlchemy URL works: the default is a SQLite file in the study folder
(``sqlite:///<output.root>/<output.name>/study.db``); a team that runs one grid from several
machines points ``--study.db`` at one PostgreSQL (``postgresql://user@host/db``, with a driver
such as ``psycopg2`` installed). A cell is written in ONE transaction by the worker that ran it,
so the database holds a cell completely or not at all, and holding it is what "finished" means.

Schema (documented in ``docs/study.md``, queried by ``study_report.py``):

- ``cells``: one row per finished cell — ``seed``, ``name``, ``kind`` (pretrain, joint, seq,
  merged, method, task, merge), ``method`` (the continual-learning method config of a
  ``method`` cell, e.g. ``ewc``, the merge config of a ``merge`` cell; NULL for others), ``lr``,
  ``ordering`` (``"3-4-7"``, NULL for others), ``fingerprint``, ``settings`` (JSON: what
  determines the result), the final metrics (``final_acc``, ``held_out_acc``, ``untouched_acc``,
  ``average_accuracy``, ``backward_transfer``, ``mean_forgetting``, ``untouched_forgetting``,
  ``collapse_share``),
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
- ``music_schema``: one row, ``version`` (``SCHEMA_VERSION``), written when MUSIC creates the
  database: what tells a MUSIC study database from any other.

A grid writes only into a database MUSIC made (or an empty one, which it makes MUSIC's);
``--query`` and ``--report_only`` open it read-only and never create one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any
from urllib.parse import quote

from sqlalchemy import (Boolean, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event, insert, inspect, select, text)
from sqlalchemy.engine import Engine, make_url
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

schema = Table("music_schema", metadata, Column("version", Integer, nullable=False))

# The schema this release writes; a database stamped with a later one is refused.
SCHEMA_VERSION = 1
# Databases made before ``music_schema`` existed are recognised by their ``cells`` columns.
IDENTIFYING_COLUMNS = {"seed", "name", "kind", "lr", "fingerprint"}

_engines: dict[tuple[str, bool], Engine] = {}


class NotAStudyDatabase(ValueError):
    """The URL names a database that MUSIC did not make, a missing one where one must exist, or
    one whose tables need a column this release does not write."""


def connect(url: str, read_only: bool = False) -> Engine:
    """An engine on ``url``; one per URL, mode and process. A URL that cannot be opened is a
    ``ValueError`` naming it, raised before anything is written.

    Writable (a grid): an empty database is made MUSIC's (tables and ``music_schema``); one
    with tables is used only if it is MUSIC's. Read-only (``--query``, ``--report_only``): the
    database must exist and be MUSIC's, and SQLite files are opened with ``mode=ro``, so nothing
    can change them."""
    if (url, read_only) in _engines:
        return _engines[(url, read_only)]
    try:
        sqlite = url.startswith("sqlite")
        engine = create_engine(_read_only_url(url) if sqlite and read_only else url,
                               connect_args={"timeout": 120} if sqlite else {},
                               **({"execution_options": {"postgresql_readonly": True}}
                                  if read_only and url.startswith("postgresql") else {}))
        if sqlite:  # several workers write one file: wait for the lock instead of failing
            event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout = 120000"))
        if read_only:
            with engine.connect() as conn:
                _check_ours(conn, url, inspect(conn).get_table_names())
        else:
            with engine.begin() as conn:
                present = inspect(conn).get_table_names()
                if present:
                    _check_ours(conn, url, present)
                    _check_writable(conn, url, present)
                metadata.create_all(conn)
                _add_missing_columns(conn)
                if conn.execute(select(schema.c.version)).first() is None:
                    conn.execute(insert(schema).values(version=SCHEMA_VERSION))
    except NotAStudyDatabase:
        raise
    except (SQLAlchemyError, ImportError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"study.db={url!r} cannot be opened: {first}. Give an SQLAlchemy URL such as "
                         "sqlite:////abs/path/study.db or postgresql://user@host/db.") from None
    _engines[(url, read_only)] = engine
    return engine


def _read_only_url(url: str) -> str:
    """The SQLite URL opened with ``mode=ro``: a missing file is refused here, since SQLite
    would otherwise create an empty database for a query to find nothing in."""
    database = make_url(url).database
    if not database or database == ":memory:":
        raise NotAStudyDatabase(f"study.db={url!r} is an in-memory database: there is no study in it to read.")
    if not os.path.isfile(database):
        raise NotAStudyDatabase(f"study.db={url!r}: no database at {database!r}; run the grid first "
                                "(music study) or give the --study.db it wrote to.")
    return f"sqlite:///file:{quote(os.path.abspath(database))}?mode=ro&uri=true"


def _check_ours(conn, url: str, present: list[str]) -> None:
    """Refuse a database MUSIC did not make. Ours: it has ``music_schema`` at a version this
    release knows, or -- made before that table existed -- only MUSIC's tables, with a
    ``cells`` table that has MUSIC's identifying columns."""
    if schema.name in present:
        version = conn.execute(select(schema.c.version)).scalar()
        if version is not None and version > SCHEMA_VERSION:
            raise NotAStudyDatabase(f"study.db={url!r} has MUSIC schema version {version}, newer than this "
                                    f"release's {SCHEMA_VERSION}: use the MUSIC release that wrote it.")
        return
    ours = set(metadata.tables)
    columns = {c["name"] for c in inspect(conn).get_columns("cells")} if "cells" in present else set()
    if not present or not set(present) <= ours or not IDENTIFYING_COLUMNS <= columns:
        found = ", ".join(sorted(present)) or "no tables"
        raise NotAStudyDatabase(f"study.db={url!r} is not a MUSIC study database (it has {found}, and no "
                                "music_schema table): give the --study.db a grid wrote, or a new one.")


def _check_writable(conn, url: str, present: list[str]) -> None:
    """Refuse, before any cell runs, a database whose tables require a column that is not in
    this release's schema (NOT NULL, no default): no row written here could be stored in it.
    ``--report_only`` and ``--query`` read such a database still (``_columns``)."""
    for table in metadata.sorted_tables:
        if table.name not in present:
            continue
        for column in inspect(conn).get_columns(table.name):
            if column["name"] not in table.c and not column["nullable"] and column.get("default") is None:
                raise NotAStudyDatabase(
                    f"study.db={url!r}: its {table.name} table requires a column {column['name']!r} that this release "
                    "does not write, so no result can be stored in it: give a new study.db (--report_only and --query "
                    "read this one).")


def _add_missing_columns(conn) -> None:
    """Columns added to the schema since a database was made (all nullable): a study
    database made by an earlier release keeps its cells."""
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _columns(conn, table: Table) -> list[Column]:
    """The table's columns that the database has: one made by an earlier release, read
    read-only, lacks the newer ones (read as NULL)."""
    present = {c["name"] for c in inspect(conn).get_columns(table.name)}
    return [c for c in table.columns if c.name in present]


def _rows(conn, table: Table, order_by: list[str]) -> list[dict]:
    columns = _columns(conn, table)
    if not columns:
        return []
    rows = conn.execute(select(*columns).order_by(*(table.c[k] for k in order_by if any(c.name == k for c in columns))))
    return [{c.name: None for c in table.columns} | dict(r._mapping) for r in rows]


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
        present = set(inspect(conn).get_table_names())
        table = {t.name: (_rows if t.name in present else lambda *_: []) for t in metadata.sorted_tables}
        all_cells = table["cells"](conn, cells, ["id"])
        by_phase: dict[int, list[dict]] = {}
        for r in table["phases"](conn, phases, ["cell_id", "row"]):
            by_phase.setdefault(r["cell_id"], []).append(r)
        by_class: dict[int, list[dict]] = {}
        for r in table["class_results"](conn, class_results, ["cell_id", "row", "class"]):
            by_class.setdefault(r["cell_id"], []).append(r)
        runs = table["grid_runs"](conn, grid_runs, ["id"])
    return all_cells, by_phase, by_class, runs


def query(engine: Engine, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one SQL statement and return its column names and rows; the transaction is rolled
    back, so a query never changes the database (and ``--query`` opens it read-only)."""
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
