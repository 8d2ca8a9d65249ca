"""``--storage`` values that cannot work are refused before anything is created."""

from __future__ import annotations

import sqlite3

import pytest

from snexp.runtime.config import ConfigError
from snexp.runtime.study import check_study_storage, open_study

HINT = ("pass a SQLite file (study.db), a URL such as sqlite:///study.db or "
        "postgresql://user@host/db, or a journal file path")


def test_unknown_url_scheme_is_refused():
    with pytest.raises(ConfigError) as info:
        check_study_storage("foo://bar")
    assert str(info.value) == (
        f"storage 'foo://bar': 'foo' is not a database SQLAlchemy knows; {HINT}"
    )


def test_a_file_that_is_not_a_database_is_refused_and_kept(tmp_path):
    notadb = tmp_path / "notadb.db"
    notadb.write_text("my data, not a database")
    with pytest.raises(ConfigError) as info:
        check_study_storage(str(notadb))
    assert str(info.value) == (
        f"storage 'sqlite:///{notadb}': {notadb} exists but is not a SQLite database; pass a new "
        "file name, or the .db file an earlier run made"
    )
    # open_study checks the same, and the file is left as it was.
    with pytest.raises(ConfigError, match="is not a SQLite database"):
        open_study("s", storage=str(notadb))
    assert notadb.read_text() == "my data, not a database"


def test_a_file_that_is_not_a_journal_is_refused(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("line one\nline two\n")
    with pytest.raises(ConfigError, match="exists but is not an Optuna journal file"):
        check_study_storage(str(notes))
    assert notes.read_text() == "line one\nline two\n"


def test_missing_folder_and_folder_as_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="folder '.*nowhere' does not exist"):
        check_study_storage(str(tmp_path / "nowhere" / "s.db"))
    (tmp_path / "adir.db").mkdir()
    with pytest.raises(ConfigError, match="adir.db is not a file"):
        check_study_storage(str(tmp_path / "adir.db"))


def test_usable_storages_pass_and_create_nothing(tmp_path):
    db = tmp_path / "real.db"
    sqlite3.connect(db).close()  # an empty SQLite file (0 bytes) and a real one both pass
    check_study_storage(str(db))
    open_study("s", storage=str(db))
    check_study_storage(str(db))
    check_study_storage(str(tmp_path / "new.db"))
    check_study_storage(str(tmp_path / "journal.log"))
    check_study_storage(None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.db"]
