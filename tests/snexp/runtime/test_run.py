"""Tests of snexp.runtime.run: run directories, atomic checkpoints, exact resume, signals, device,
AMP."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import runtime_toy as toy
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import snexp.runtime.checkpoint as checkpoint_module
from snexp.runtime.checkpoint import load_checkpoint, save_checkpoint
from snexp.runtime.config import (
    CONFIG_FILE,
    ConfigError,
    cli_errors,
    load_config,
    override,
    parse_args,
)
from snexp.runtime.device import select_device
from snexp.runtime.run import NonFiniteLoss, Run, RunInterrupted

REPO = Path(__file__).resolve().parents[3]


def make_config(out: Path, *extra: str) -> toy.ToyConfig:
    argv = ["--out", str(out), "--deterministic", "--device", "cpu", *extra]
    return parse_args(toy.ToyConfig, argv, flags=toy.FLAGS)


def open_run(cfg: toy.ToyConfig, **kwargs) -> Run:
    return Run(cfg, experiment="toy", safe_keys=toy.SAFE_KEYS, prog="toy", console=False, **kwargs)


def scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def train_straight(out: Path, *extra: str) -> tuple[dict, Run]:
    with open_run(make_config(out, *extra)) as run:
        model = toy.train(run)
    return model.state_dict(), run


# ----------------------------------------------------------------------------- resume


def _sigterm_at(step: int):
    def on_step(run: Run) -> None:
        if run.step == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


def _crash_at(step: int):
    def on_step(run: Run) -> None:
        if run.step == step:
            raise RuntimeError("simulated crash")

    return on_step


@pytest.mark.parametrize(
    ("how", "extra", "on_step", "error", "saved_step"),
    [
        # SIGTERM mid-epoch: the next step finishes, then the checkpoint.
        ("sigterm-mid-epoch", (), _sigterm_at(5), RunInterrupted, 6),
        # SIGTERM on an epoch's last step: the epoch ends (evaluation, epoch checkpoint) first.
        ("sigterm-epoch-end", (), _sigterm_at(8), RunInterrupted, 8),
        # A crash after a periodic checkpoint: steps 5-6 are redone and their events purged.
        ("crash", ("--checkpoint-every", "4"), _crash_at(6), RuntimeError, 4),
    ],
)
def test_resumed_run_ends_identical_to_uninterrupted(
    tmp_path, how, extra, on_step, error, saved_step
):
    straight, straight_run = train_straight(tmp_path / "straight", *extra)

    out = tmp_path / how
    with pytest.raises(error), open_run(make_config(out, *extra)) as run:
        toy.train(run, on_step=on_step)
    # The run stopped where expected and left a checkpoint of that step.
    assert load_checkpoint(out / "checkpoints/last.pt")["step"] == saved_step

    with open_run(parse_args(toy.ToyConfig, ["--out", str(out), "--resume"])) as run:
        assert run.resumed and run.step == saved_step
        resumed = toy.train(run).state_dict()

    # Same final weights, bit for bit, and the same best metric.
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert run.best == straight_run.best and run.step == straight_run.step == 24
    # Same curves: every step logged once, with the same values.
    for tag in ("train/loss", "train/acc"):
        assert scalars(out, tag) == scalars(tmp_path / "straight", tag)
    assert [s for s, _ in scalars(out, "train/loss")] == list(range(1, 25))


def test_sigterm_finishes_the_step_checkpoints_and_stops(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seen, flagged = [], []

    def on_step(run: Run) -> None:
        seen.append(run.step)
        if run.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            flagged.append(run.stop_requested)

    with pytest.raises(RunInterrupted) as info, open_run(make_config(tmp_path)) as run:
        toy.train(run, on_step=on_step)
    # The signal only set a flag; the loop stopped inside step 4's step_done, with a checkpoint.
    assert flagged == [True] and seen == [1, 2, 3]
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 4
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert str(info.value) == (
        "received SIGTERM, so the run stopped after step 4 (0 epochs completed); checkpoint "
        f"saved to {tmp_path / 'checkpoints/last.pt'}. Resume with: toy --out {tmp_path} --resume"
    )
    # The writers are closed, the handler restored and the message is in run.log.
    assert run.tracker.writer is None
    assert signal.getsignal(signal.SIGTERM) is before
    assert (
        "received SIGTERM, so the run stopped after step 4" in (tmp_path / "run.log").read_text()
    )


def test_cli_reports_a_stop_with_the_signal_exit_status(capsys):
    with pytest.raises(SystemExit) as info, cli_errors("toy"):
        raise RunInterrupted("received SIGTERM after step 4; resume with: toy --resume", 15)
    # 128 + signal number, as a shell expects, and the resume hint without a traceback.
    assert info.value.code == 143
    assert capsys.readouterr().err == (
        "toy: stopped: received SIGTERM after step 4; resume with: toy --resume\n"
    )


def test_second_ctrl_c_aborts_without_saving(tmp_path):
    def on_step(run: Run) -> None:
        if run.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs as a background job
    with pytest.raises(KeyboardInterrupt), open_run(make_config(tmp_path)) as run:
        toy.train(run, on_step=on_step)
    # The impatient second Ctrl-C wins: no checkpoint was written at all.
    assert not (tmp_path / "checkpoints/last.pt").exists()
    # and the handler that was there before the run is back
    assert signal.getsignal(signal.SIGINT) is before


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good(tmp_path):
    with pytest.raises(NonFiniteLoss) as info:
        with open_run(make_config(tmp_path, "--checkpoint-every", "4")) as run:
            model = torch.nn.Linear(2, 2)
            run.attach(model=model)
            for step in range(10):
                run.step_done(float("nan") if step == 6 else 1.0, {"loss": 1.0})
    # The message names the step; last.pt is the checkpoint of step 4, not a later one.
    assert str(info.value) == (
        f"the loss became nan at step 7 (0 epochs completed); the run stopped and the last good "
        f"checkpoint, {tmp_path / 'checkpoints/last.pt'} (step 4), is kept. Try a lower learning "
        "rate, gradient clipping or --amp off."
    )
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 4


def test_resume_refuses_changed_config_but_allows_safe_keys(tmp_path):
    train_straight(tmp_path, "--set", "train.steps=5")
    argv = ["--out", str(tmp_path), "--resume", "--lr", "0.5", "--act", "tanh"]
    changed = parse_args(toy.ToyConfig, argv, flags=toy.FLAGS)
    with pytest.raises(ConfigError) as info:
        open_run(changed)
    # Every differing key is named with both values, and the safe keys are listed.
    assert str(info.value).startswith(
        f"cannot resume {tmp_path} with a different config: act ('relu' -> 'tanh'); "
        "train.lr (0.1 -> 0.5). Only these keys may change on resume: runtime.checkpoint_every,"
    )
    # Epochs and the step limit are safe to change.
    argv = ["--out", str(tmp_path), "--resume", "--epochs", "4", "--set", "train.steps=none"]
    safe = parse_args(toy.ToyConfig, argv, flags=toy.FLAGS)
    with open_run(safe) as run:
        toy.train(run)
    assert run.step == 32 and run.epoch == 4
    # config.toml holds the new safe values (and resume=false: it is a setting, not an action).
    saved = load_config(toy.ToyConfig, tmp_path / CONFIG_FILE)
    assert (saved.train.epochs, saved.train.steps, saved.runtime.resume) == (4, None, False)


def test_attach_refuses_a_checkpoint_of_other_objects(tmp_path):
    train_straight(tmp_path, "--set", "train.steps=2")
    with open_run(make_config(tmp_path, "--resume")) as run:
        with pytest.raises(ConfigError, match=r"holds \['model', 'optimizer', 'scheduler'\]"):
            run.attach(model=torch.nn.Linear(4, 3))


# ----------------------------------------------------------------------------- run directory


def test_existing_run_directory_is_never_overwritten_silently(tmp_path):
    train_straight(tmp_path, "--set", "train.steps=2")
    before = (tmp_path / "checkpoints/last.pt").read_bytes()
    with pytest.raises(ConfigError) as info:
        open_run(make_config(tmp_path))
    # Refused with the ways forward; nothing in the directory changed.
    assert str(info.value) == (
        f"run directory {tmp_path} already exists and is not empty; pass --resume to continue "
        "it, --overwrite to delete it and start afresh, or choose another --out"
    )
    assert (tmp_path / "checkpoints/last.pt").read_bytes() == before
    # --overwrite starts afresh: the old run's files are gone, a file the user added stays.
    (tmp_path / "notes.txt").write_text("mine")
    with open_run(make_config(tmp_path, "--overwrite")) as run:
        assert not run.resumed
    assert not (tmp_path / "checkpoints/last.pt").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    (tmp_path / "config.toml").write_text("[tool]\n")  # a config.toml alone does not make a run
    with pytest.raises(ConfigError, match="no .snexp-run stamp, so it is not a run directory"):
        open_run(make_config(tmp_path, "--overwrite"))
    # The folder's content survives.
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_resume_mistakes_are_explained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"cannot resume: {tmp_path / 'nope'} does not exist"):
        open_run(make_config(tmp_path / "nope", "--resume"))
    (tmp_path / "runs/toy/20250101-000000/checkpoints").mkdir(parents=True)
    (tmp_path / "runs/toy/20250101-000000/checkpoints/last.pt").write_bytes(b"")
    cfg = override(make_config(tmp_path), {"runtime.out": None, "runtime.resume": True})
    with pytest.raises(ConfigError) as info:
        open_run(cfg)
    # Without --out, the most recent run is pointed at rather than guessed.
    assert str(info.value) == (
        "--resume needs --out DIR, the run to continue; the most recent run is "
        "runs/toy/20250101-000000"
    )


def test_default_directory_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = override(make_config(tmp_path), {"runtime.out": None, "train.epochs": 1})
    with open_run(cfg) as run:
        toy.train(run)
        logging.getLogger("toy").info("hello from the loop")
    # runs/<experiment>/<YYYYmmdd-HHMMSS> with config, log, events and checkpoints.
    assert run.dir.parent == Path("runs/toy") and len(run.dir.name) == len("20250101-000000")
    names = sorted(str(p.relative_to(run.dir)) for p in run.dir.rglob("*") if p.is_file())
    assert names[:6] == [".snexp-lock", ".snexp-run", "checkpoints/best.pt",
                         "checkpoints/last.pt", "config.toml", "run.log"]
    assert names[6].startswith("tb/events.out.tfevents.") and len(names) == 7
    assert load_config(toy.ToyConfig, run.dir / CONFIG_FILE).runtime.out == str(run.dir)
    assert "INFO toy: hello from the loop" in (run.dir / "run.log").read_text()


def test_run_log_mirrors_the_console(tmp_path, capsys):
    with Run(make_config(tmp_path), experiment="toy", prog="toy") as run:
        logging.getLogger("toy").warning("watch out")
    err = capsys.readouterr().err.splitlines()
    log = (run.dir / "run.log").read_text().splitlines()
    # The same lines, in the same format, on the console and in run.log.
    assert err == log and len(log) == 3 and log[1].endswith("WARNING toy: watch out")
    # Nothing was attached, so there is no empty checkpoint to trip over later.
    assert not (run.dir / "checkpoints/last.pt").exists()


# ----------------------------------------------------------------------------- checkpoints


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dying_save(obj, f):  # writes half a checkpoint, then the process "dies"
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    # The old checkpoint is intact and the partial file is gone.
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "replace", full_disk)
    with pytest.raises(OSError):
        save_checkpoint({"step": 3}, path)
    monkeypatch.undo()
    # A failure at the very last moment (the rename) also leaves the old file.
    assert load_checkpoint(path)["step"] == 1


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    script = textwrap.dedent(f"""
        import torch
        from snexp.runtime.checkpoint import save_checkpoint
        weights = torch.arange(1_000_000, dtype=torch.float64)
        for step in range(1, 10_000):
            save_checkpoint({{"step": step, "w": weights + step}}, {str(path)!r})
            print(step, flush=True)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        for _ in range(3):  # let a few saves complete, then kill during the next ones
            proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    checkpoint = load_checkpoint(path)
    # Whatever moment SIGKILL hit, last.pt is a whole checkpoint.
    assert checkpoint["step"] >= 3
    expected = torch.arange(1_000_000, dtype=torch.float64) + checkpoint["step"]
    assert torch.equal(checkpoint["w"], expected)
    assert proc.returncode == -signal.SIGKILL


class Exploit:
    """Unpickling this would create a folder: the classic pickle code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_load_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": Exploit(marker)}, path)
    with pytest.raises(ConfigError) as info:
        load_checkpoint(path)
    # Refused with the reason, and the payload never ran.
    assert str(info.value) == (
        f"checkpoint '{path}' holds objects other than tensors and plain data "
        "(os.makedirs), so it is refused: loading it could run arbitrary code"
    )
    assert not marker.exists()


def test_load_explains_missing_and_torn_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    save_checkpoint({"w": torch.ones(1000)}, tmp_path / "torn.pt")
    data = (tmp_path / "torn.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="is unreadable or truncated"):
        load_checkpoint(tmp_path / "torn.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="is unreadable or truncated"):
        load_checkpoint(tmp_path / "notes.pt")
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"zero.pt' is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "zero.pt")


def test_checkpoint_holds_rng_and_counters(tmp_path):
    with open_run(make_config(tmp_path, "--set", "train.steps=3")) as run:
        toy.train(run)
        run.state["baseline"] = torch.tensor(0.5)
    checkpoint = load_checkpoint(tmp_path / "checkpoints/last.pt")
    # Counters, experiment state, config and every generator are in the checkpoint.
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"]) == (3, 0, 3)
    assert float(checkpoint["state"]["baseline"]) == 0.5
    assert checkpoint["config"]["train.lr"] == 0.1 and checkpoint["config"]["tags"] == []
    assert set(checkpoint["rng"]) >= {"python", "numpy", "torch"}
    assert checkpoint["rng"]["numpy"]["bit_generator"] == "MT19937"
    assert set(checkpoint["objects"]) == {"model", "optimizer", "scheduler"}


# ----------------------------------------------------------------------------- device, AMP


def test_select_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    # auto falls back to the CPU; asking for a missing accelerator is a clear error.
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda: CUDA is not available"):
        select_device("cuda")
    with pytest.raises(ConfigError, match="MPS .* is not available here"):
        select_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError) as info:
        select_device("cuda:5")
    assert str(info.value) == "--device cuda:5: there are 2 CUDA device(s) here, cuda:0..cuda:1"


@pytest.mark.parametrize(
    ("amp", "dtype", "scaled"),
    [
        ("off", torch.float32, False),
        ("bf16", torch.bfloat16, False),
        ("fp16", torch.float16, True),
    ],
)
def test_amp_modes(tmp_path, amp, dtype, scaled):
    with open_run(make_config(tmp_path, "--amp", amp, "--set", "train.steps=3")) as run:
        with run.autocast():
            y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
        toy.train(run)
    # Autocast computes in the chosen dtype; only fp16 scales the loss.
    assert y.dtype == dtype
    assert run.scaler.is_enabled() is scaled
    assert bool(load_checkpoint(tmp_path / "checkpoints/last.pt")["scaler"]) is scaled


def test_deterministic_mode_is_restored_and_channels_last_applied(tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    with open_run(make_config(tmp_path, "--channels-last")) as run:
        assert torch.are_deterministic_algorithms_enabled()
        conv = run.prepare(torch.nn.Conv2d(3, 4, 3))
        x = run.to_device({"img": torch.randn(2, 3, 8, 8), "label": [torch.tensor(1)]})
    # Global switches go back on close; channels-last reaches weights and 4-D batches only.
    assert not torch.are_deterministic_algorithms_enabled()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert x["img"].is_contiguous(memory_format=torch.channels_last)
    assert not x["img"].is_contiguous() and x["label"][0].item() == 1


class RandomItems(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, float]:
        import numpy as np

        return i, float(np.random.rand())


def test_dataloader_order_and_worker_seeds_follow_the_run_seed(tmp_path):
    def batches(out: Path, seed: str) -> list:
        with open_run(make_config(out, "--seed", seed)) as run:
            loader = run.dataloader(RandomItems(), batch_size=4, num_workers=2)
            return [(i.tolist(), v.tolist()) for i, v in loader]

    first, again, other = (
        batches(tmp_path / n, s) for n, s in [("a", "1"), ("b", "1"), ("c", "2")]
    )
    # Same seed: same order and same numpy draws in the workers; the two workers differ.
    assert first == again and first != other
    assert first[0][1] != first[1][1]
