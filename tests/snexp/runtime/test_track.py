"""Tests of snexp.runtime.track: TensorBoard events read back, Optuna storages and dashboard,
bars."""

from __future__ import annotations

import io
import json
import logging
import sys
import types
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
import runtime_toy as toy
import torch
from optuna.storages import JournalStorage
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from snexp.runtime.config import ConfigError, parse_args
from snexp.runtime.run import Run
from snexp.runtime.track import (
    TqdmLoggingHandler,
    Tracker,
    dashboard_command,
    open_storage,
    open_study,
    progress,
)


def read_events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


# ----------------------------------------------------------------------------- TensorBoard


def test_every_kind_of_event_lands_in_one_directory(tmp_path):
    with Tracker(tmp_path / "tb") as tracker:
        tracker.scalar("loss/total", torch.tensor(2.5), 1)
        tracker.scalars({"acc": 0.5, "lr": 0.1}, 1, prefix="train/")
        tracker.image("preview/one", torch.rand(3, 8, 8), 1)
        tracker.image("preview/grid", torch.rand(6, 3, 8, 8), 1, nrow=3)
        tracker.text("arch", "normal: [(sep_conv_3x3, 0)]", 1)
        tracker.histogram("weights", torch.arange(10.0), 1)
        hparams = toy.ToyConfig()
        tracker.hparams(hparams, {"final/acc": 0.75}, step=2)
    events = read_events(tmp_path / "tb")
    tags = events.Tags()
    # Every kind of event is there under the tag it was given.
    assert set(tags["scalars"]) == {"loss/total", "train/acc", "train/lr", "final/acc"}
    assert set(tags["images"]) == {"preview/one", "preview/grid"}
    assert set(tags["histograms"]) == {"weights"}
    assert "arch/text_summary" in tags["tensors"]
    assert [(e.step, e.value) for e in events.Scalars("final/acc")] == [(2, 0.75)]
    grid = events.Images("preview/grid")[0]
    assert (grid.width, grid.height) == (3 * 10 + 2, 2 * 10 + 2)  # 3 x 2 tiles, 2 px padding
    # The hparams summaries are in the same run, not a timestamped sub-run.
    content = events.PluginTagToContent("hparams")
    assert set(content) == {
        "_hparams_/experiment",
        "_hparams_/session_start_info",
        "_hparams_/session_end_info",
    }
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    assert values["train.lr"].number_value == 0.1 and values["act"].string_value == "relu"
    assert values["runtime.out"].string_value == "none"
    assert values["runtime.compile"].string_value == "false"
    assert [p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()] == []


def test_purge_step_hides_events_written_after_the_checkpoint(tmp_path):
    with Tracker(tmp_path) as tracker:
        for step in range(1, 7):
            tracker.scalar("loss", step, step)
    with Tracker(tmp_path, purge_step=5) as tracker:  # resumed from the checkpoint of step 4
        for step in range(5, 9):
            tracker.scalar("loss", 10 * step, step)
    curve = [(e.step, e.value) for e in read_events(tmp_path).Scalars("loss")]
    # Steps 5 and 6 of the first session are hidden; each step appears once.
    assert curve == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50), (6, 60), (7, 70), (8, 80)]


def test_run_logs_its_config_as_text(tmp_path):
    cfg = parse_args(toy.ToyConfig, ["--out", str(tmp_path), "--set", "train.steps=2"])
    with Run(cfg, experiment="toy", console=False) as run:
        toy.train(run)
        run.tracker.hparams(run.config, {"final/loss": 1.0}, step=run.step)
    events = read_events(tmp_path / "tb")
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    # The resolved config, as written to config.toml, is in TensorBoard too.
    assert text.startswith("```toml\n# toy run, resolved config")
    assert "[train]\nlr = 0.1  # SGD learning rate" in text
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = Tracker(tmp_path / "tb", enabled=False)
    tracker.scalar("x", 1.0, 1)
    tracker.importance(torch.nn.Linear(2, 2), 1)
    tracker.hparams({"a": 1}, {"m": 1.0})
    tracker.close()
    # A non-zero rank leaves no trace.
    assert not tracker.enabled and not (tmp_path / "tb").exists()


def test_importance_is_delegated_to_the_core(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("snexp.norm.importance")
    fake.log_importance = lambda writer, model, step, **kw: calls.append((writer, model, step, kw))
    monkeypatch.setitem(sys.modules, "snexp.norm.importance", fake)
    model = torch.nn.Linear(2, 2)
    with Tracker(tmp_path) as tracker:
        tracker.importance(model, 7, figure=False)
        # The writer, the model, the step and options go to snexp.norm.importance.log_importance.
        assert calls == [(tracker.writer, model, 7, {"figure": False})]


def test_importance_of_a_real_switchable_layer(tmp_path):
    inspect = pytest.importorskip("snexp.inspect")
    norm = pytest.importorskip("snexp.norm")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), norm.make_norm("sn", 4))
    expected = inspect.importance(model)
    with Tracker(tmp_path) as tracker:
        tracker.importance(model, 3, figure=False)
    scalars = read_events(tmp_path).Tags()["scalars"]
    # One scalar per layer, statistic and candidate, at the given step.
    assert len(scalars) == sum(2 * len(v.candidates) for v in expected.values()) > 0
    assert all(tag.startswith("sn_importance/") for tag in scalars)


# ----------------------------------------------------------------------------- Optuna


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


# ----------------------------------------------------------------------------- progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_quiet_off_terminal_and_on_other_ranks():
    pipe, terminal = io.StringIO(), Terminal()
    # Off a terminal, or on rank 1, the bar is a silent pass-through.
    assert list(progress(range(3), file=pipe)) == [0, 1, 2] and pipe.getvalue() == ""
    assert list(progress(range(3), file=terminal, rank=1)) == [0, 1, 2]
    assert terminal.getvalue() == ""


def test_progress_bar_shows_postfix_and_log_lines_do_not_break_it():
    terminal = Terminal()
    handler = TqdmLoggingHandler(terminal)
    log = logging.getLogger("test_track.bar")
    log.addHandler(handler)
    log.propagate = False
    try:
        bar = progress(range(4), file=terminal, desc="epoch 1", mininterval=0)
        for i in bar:
            bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")
            if i == 1:
                log.warning("checkpoint written")
        bar.close()
    finally:
        log.removeHandler(handler)
    out = terminal.getvalue()
    # The bar shows the description and the postfix; the log line sits on a line of its own.
    assert "epoch 1" in out and "loss=0.250" in out
    assert "\ncheckpoint written\n" in out.replace("\r", "\n")


def test_a_password_in_the_config_stays_out_of_the_event_files(tmp_path):
    # Rule (issue 20): event files are as readable as run.log, so a URL's password is ***.
    url = "postgresql://me:s3cret@db/x"
    cfg = parse_args(toy.ToyConfig, ["--out", str(tmp_path / "run"), "--set", "train.steps=1",
                                     "--tag", url], flags=toy.FLAGS)
    with Run(cfg, experiment="toy", console=False) as run:
        toy.train(run)
        run.tracker.hparams(run.config, {"final/loss": 1.0}, step=run.step)
    raw = b"".join(p.read_bytes() for p in (tmp_path / "run/tb").iterdir())
    assert b"s3cret" not in raw and b"postgresql://me:***@db/x" in raw


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
