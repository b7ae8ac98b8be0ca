"""The study database: a cell is stored whole or not at all, once, and queries never write."""

import json

import pytest
from sqlalchemy import Column, Integer, MetaData, create_engine, func, insert, select

from music.experiments import study_db


def cell_row(seed: int = 0, name: str = "seq_3-4-7_lr1e-4", acc: float = 0.75) -> dict:
    return {"seed": seed, "name": name, "kind": "seq", "lr": 1e-4, "ordering": "3-4-7",
            "fingerprint": "f" * 16, "settings": "{}", "final_acc": acc, "wall_seconds": 1.0, "host": "h"}


def phase_rows() -> list[dict]:
    return [{"row": i, "phase": p, "split": p, "acc": 0.5} for i, p in enumerate(["start", "class_3"])]


def class_rows() -> list[dict]:
    return [{"row": i, "phase": p, "class": c, "acc": 0.5, "confusion": json.dumps([1, 2])}
            for i, p in enumerate(["start", "class_3"]) for c in range(3)]


def count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


@pytest.fixture
def engine(tmp_path):
    return study_db.connect(f"sqlite:///{tmp_path / 'study.db'}")


def test_a_cell_is_stored_once_with_all_its_rows(engine):
    assert study_db.record_cell(engine, cell_row(), phase_rows(), class_rows())
    assert not study_db.record_cell(engine, cell_row(acc=0.1), phase_rows(), class_rows())  # a re-run: not stored again
    assert (count(engine, study_db.cells), count(engine, study_db.phases), count(engine, study_db.class_results)) == (1, 2, 6)
    assert study_db.fingerprints(engine) == {(0, "seq_3-4-7_lr1e-4"): "f" * 16}
    cells, phases, classes, _ = study_db.load(engine)
    assert cells[0]["final_acc"] == 0.75 and len(phases[cells[0]["id"]]) == 2 and len(classes[cells[0]["id"]]) == 6


def test_a_failure_while_writing_a_cell_leaves_nothing_of_it(engine):
    broken = class_rows()
    broken[-1] = broken[-1] | {"class": None}  # NOT NULL: the last insert of the transaction fails
    with pytest.raises(Exception):
        study_db.record_cell(engine, cell_row(), phase_rows(), broken)
    assert (count(engine, study_db.cells), count(engine, study_db.phases), count(engine, study_db.class_results)) == (0, 0, 0)
    assert study_db.record_cell(engine, cell_row(), phase_rows(), class_rows())  # and the cell can be stored later


def test_query_answers_and_never_writes(engine):
    for seed, acc in ((0, 0.7), (1, 0.8)):
        study_db.record_cell(engine, cell_row(seed=seed, acc=acc), phase_rows(), class_rows())
    columns, rows = study_db.query(engine, "SELECT ordering, AVG(final_acc) AS acc, COUNT(*) AS n FROM cells "
                                           "WHERE kind = 'seq' AND lr = 1e-4 AND seed BETWEEN 0 AND 9 GROUP BY ordering")
    assert columns == ["ordering", "acc", "n"] and rows == [("3-4-7", pytest.approx(0.75), 2)]
    study_db.query(engine, "DELETE FROM cells")
    assert count(engine, study_db.cells) == 2
    with pytest.raises(ValueError, match="query failed"):
        study_db.query(engine, "SELECT nothing FROM nowhere")


@pytest.mark.parametrize("url", ["sqlite:////no/such/folder/study.db", "nosuchdialect://x", "not a url"])
def test_a_url_that_cannot_be_opened_is_one_clear_error(url):
    with pytest.raises(ValueError, match="cannot be opened") as error:
        study_db.connect(url)
    assert url in str(error.value) and "\n" not in str(error.value)


def test_a_database_made_without_the_method_column_gains_it_and_keeps_its_cells(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the cells table as a release without methods made it
        conn.execute("CREATE TABLE cells (id INTEGER PRIMARY KEY, seed INTEGER NOT NULL, name VARCHAR(200) NOT NULL, "
                     "kind VARCHAR(20) NOT NULL, lr FLOAT NOT NULL, fingerprint VARCHAR(64) NOT NULL)")
        conn.execute("INSERT INTO cells (seed, name, kind, lr, fingerprint) VALUES (0, 'seq', 'seq', 0.001, 'f')")
    engine = study_db.connect(f"sqlite:///{path}")
    assert study_db.fingerprints(engine) == {(0, "seq"): "f"}
    with engine.connect() as conn:
        assert conn.execute(select(study_db.cells.c.method)).scalar() is None


def unrelated(tmp_path):
    """Someone else's SQLite file that happens to have a ``cells`` table."""
    import sqlite3

    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE cells (id INTEGER PRIMARY KEY, sheet TEXT, value TEXT)")
        conn.execute("INSERT INTO cells (sheet, value) VALUES ('a', '1')")
    return path


@pytest.mark.parametrize("read_only", [True, False], ids=["query", "grid"])
def test_a_database_music_did_not_make_is_refused_untouched(tmp_path, read_only):
    path = unrelated(tmp_path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"is not a MUSIC study database \(it has cells, and no music_schema") as error:
        study_db.connect(f"sqlite:///{path}", read_only=read_only)
    assert str(path) in str(error.value)
    assert path.read_bytes() == before


def test_reading_a_missing_database_refuses_and_creates_nothing(tmp_path):
    path = tmp_path / "nothing.db"
    with pytest.raises(ValueError, match=r"no database at .*nothing.db.*run the grid first"):
        study_db.connect(f"sqlite:///{path}", read_only=True)
    assert not path.exists()


def test_a_new_database_is_stamped_and_read_only_access_cannot_write(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study_db.record_cell(study_db.connect(url), cell_row(), phase_rows(), class_rows())
    with study_db.connect(url).connect() as conn:
        assert conn.execute(select(study_db.schema.c.version)).scalars().all() == [study_db.SCHEMA_VERSION]
    reader = study_db.connect(url, read_only=True)
    with pytest.raises(ValueError, match="(?i)query failed.*readonly"):
        study_db.query(reader, "DELETE FROM cells")
    assert count(reader, study_db.cells) == 1


def test_a_database_from_before_the_schema_table_is_read_as_it_is(tmp_path):
    """Recognised by MUSIC's ``cells`` columns; read-only, nothing is added to it."""
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE cells (id INTEGER PRIMARY KEY, seed INTEGER NOT NULL, name VARCHAR(200) NOT NULL, "
                     "kind VARCHAR(20) NOT NULL, lr FLOAT NOT NULL, fingerprint VARCHAR(64) NOT NULL)")
        conn.execute("INSERT INTO cells (seed, name, kind, lr, fingerprint) VALUES (0, 'seq', 'seq', 0.001, 'f')")
    before = path.read_bytes()
    cells, phases, _, runs = study_db.load(study_db.connect(f"sqlite:///{path}", read_only=True))
    assert [(c["seed"], c["name"], c["method"]) for c in cells] == [(0, "seq", None)] and phases == {} and runs == []
    assert path.read_bytes() == before


# The column that cells of kind `replay` (a grid option, not a method) required, 0 in every other row.
RETIRED_COLUMN = "replay_size"


def write_with_retired_column(url: str, cells: list[tuple[dict, list[dict], list[dict]]]) -> None:
    """A study database as MUSIC wrote it while ``cells`` required ``RETIRED_COLUMN``: each cell's
    row, phase rows and class rows go in as that release wrote them, the column set to 0."""
    old = MetaData()
    for table in study_db.metadata.sorted_tables:
        table.to_metadata(old)
    old.tables["cells"].append_column(Column(RETIRED_COLUMN, Integer, nullable=False))
    engine = create_engine(url)
    with engine.begin() as conn:
        old.create_all(conn)
        conn.execute(insert(old.tables["music_schema"]).values(version=study_db.SCHEMA_VERSION))
        for row, phases, classes in cells:
            cell_id = conn.execute(insert(old.tables["cells"]).values(**row, **{RETIRED_COLUMN: 0})).inserted_primary_key[0]
            for table, rows in (("phases", phases), ("class_results", classes)):
                if rows:
                    conn.execute(insert(old.tables[table]), [r | {"cell_id": cell_id} for r in rows])
    engine.dispose()


def test_a_database_whose_cells_require_a_retired_column_is_read_but_never_written(tmp_path):
    """``--report_only`` and ``--query`` read it as it is; a grid is refused before any cell runs,
    since none of its rows could be stored there."""
    path = tmp_path / "old.db"
    url = f"sqlite:///{path}"
    write_with_retired_column(url, [(cell_row(), phase_rows(), class_rows())])
    before = path.read_bytes()
    cells, phases, classes, _ = study_db.load(study_db.connect(url, read_only=True))
    assert [(c["seed"], c["name"], c["final_acc"]) for c in cells] == [(0, "seq_3-4-7_lr1e-4", 0.75)]
    assert RETIRED_COLUMN not in cells[0] and len(phases[cells[0]["id"]]) == 2 and len(classes[cells[0]["id"]]) == 6
    columns, rows = study_db.query(study_db.connect(url, read_only=True), f"SELECT name, {RETIRED_COLUMN} FROM cells")
    assert rows == [("seq_3-4-7_lr1e-4", 0)]
    with pytest.raises(ValueError, match=rf"{path}.*cells table requires a column '{RETIRED_COLUMN}'.*give a new study.db"):
        study_db.connect(url)
    assert path.read_bytes() == before
