"""Tests of snexp.runtime.track: TensorBoard events read back, progress bars and log lines."""

from __future__ import annotations

import io
import logging
import sys
import types
from pathlib import Path

import pytest
import runtime_toy as toy
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from snexp.runtime.config import parse_args
from snexp.runtime.run import Run
from snexp.runtime.track import TqdmLoggingHandler, Tracker, progress


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
