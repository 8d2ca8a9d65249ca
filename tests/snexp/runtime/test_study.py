"""Tests of snexp.runtime.study: studies on SQLite and journal storages, the dashboard command,
storage values and file permissions (workers: test_workers.py, seeds: test_worker_seed.py)."""

from __future__ import annotations

import io
import json

import optuna
import optuna_dashboard
import pytest
from optuna.storages import JournalStorage

from snexp.runtime.config import ConfigError
from snexp.runtime.study import dashboard_command, open_storage, open_study


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    return 1.0 - x * x


def list_studies(storage) -> list[str]:
    """Ask optuna-dashboard's WSGI app for /api/studies/, in process."""
    app = optuna_dashboard.wsgi(storage)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/api/studies/",
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
        "wsgi.version": (1, 0),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    status = []
    body = b"".join(app(environ, lambda code, headers, exc_info=None: status.append(code)))
    assert status == ["200 OK"]
    return [s["study_name"] for s in json.loads(body)["study_summaries"]]


def test_sqlite_study_in_the_run_directory(tmp_path):
    study = open_study("search", run_dir=tmp_path, user_attrs={"proposer": "lstm"})
    study.optimize(objective, n_trials=3)
    again = open_study("search", run_dir=tmp_path)
    # The default storage is <run>/optuna.db; reopening loads the same study and its trials.
    assert (tmp_path / "optuna.db").is_file()
    assert len(again.trials) == 3 and again.user_attrs == {"proposer": "lstm"}
    assert again.best_value == max(t.value for t in study.trials)
    url = f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    assert dashboard_command(run_dir=tmp_path) == f"optuna-dashboard {url}"
    # optuna-dashboard, on the same URL, lists the study.
    assert list_studies(url) == ["search"]


def test_journal_study_shared_by_two_openers(tmp_path):
    path = tmp_path / "studies.log"
    first = open_study("tune", storage=path, directions=["minimize", "minimize"])
    second = open_study("tune", storage=str(path), directions=["minimize", "minimize"])
    first.optimize(lambda t: (t.suggest_float("a", 0, 1), 1.0), n_trials=2)
    second.optimize(lambda t: (t.suggest_float("a", 0, 1), 2.0), n_trials=1)
    # A journal file is one storage for several processes: each opener sees all trials.
    assert isinstance(open_storage(path), JournalStorage)
    assert len(open_study("tune", storage=path, directions=["minimize"] * 2).trials) == 3
    assert dashboard_command(path) == f"optuna-dashboard {path.resolve()}"
    assert list_studies(open_storage(path)) == ["tune"]


def test_storage_values(tmp_path):
    # URLs pass through untouched; .db paths mean SQLite files (RDB storages with a heartbeat).
    assert dashboard_command("postgresql://user@db/o") == "optuna-dashboard postgresql://user@db/o"
    sqlite = open_storage(tmp_path / "x.sqlite3")
    assert sqlite.url == f"sqlite:///{(tmp_path / 'x.sqlite3')}"
    assert sqlite.get_heartbeat_interval() == 60
    with pytest.raises(ConfigError) as info:
        open_storage(tmp_path / "missing/dir/x.db")
    assert str(info.value) == (
        f"storage '{tmp_path / 'missing/dir/x.db'}': folder '{tmp_path / 'missing/dir'}' "
        "does not exist"
    )


def test_reopening_with_other_directions_is_refused(tmp_path):
    open_study("search", run_dir=tmp_path, direction="maximize")
    with pytest.raises(ConfigError) as info:
        open_study("search", run_dir=tmp_path, direction="minimize")
    # The mismatch is explained instead of silently optimizing the wrong way.
    assert "already exists and optimizes ['maximize'], not ['minimize']" in str(info.value)


def test_a_new_sqlite_study_gets_the_umask_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o002)
    try:
        open_study("s", storage=str(tmp_path / "s.db"))
    finally:
        os.umask(old)
    # SQLite itself creates 0o644 whatever the umask; the group may write, as with other files.
    assert stat.S_IMODE((tmp_path / "s.db").stat().st_mode) == 0o664
