"""The run directory's safety: its stamp, what --overwrite deletes, its lock, refused runs.

Rules: ``--overwrite`` deletes only a folder stamped ``.snexp-run`` and in it only what snexp
wrote; a new run refused (ConfigError) before its first checkpoint leaves the directory as it
was (the old run put back, or no directory at all); a second process on a live run directory
is refused naming the holder; concurrent atomic writes never tear a file.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import runtime_toy as toy
import torch
from fs_snapshot import snapshot

import snexp.runtime.run.directory as directory_module
import snexp.runtime.run.session as session_module
from snexp.runtime.checkpoint import load_checkpoint, save_checkpoint, write_text_atomic
from snexp.runtime.config import ConfigError, parse_args
from snexp.runtime.marker import LOCK_FILE, MARKER_FILE, REPLACED_DIR, read_marker
from snexp.runtime.run import Run

REPO = Path(__file__).resolve().parents[3]
TOY = Path(__file__).resolve().parent / "runtime_toy.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def make_config(out: Path, *extra: str) -> toy.ToyConfig:
    argv = ["--out", str(out), "--deterministic", "--device", "cpu", *extra]
    return parse_args(toy.ToyConfig, argv, flags=toy.FLAGS)


def open_run(cfg: toy.ToyConfig) -> Run:
    return Run(cfg, experiment="toy", safe_keys=toy.SAFE_KEYS, prog="toy", console=False)


def finished_run(out: Path) -> dict[str, bytes]:
    """A toy run of 2 steps that also writes two outputs; returns its files' bytes."""
    with open_run(make_config(out, "--set", "train.steps=2")) as run:
        toy.train(run)
        save_checkpoint({"w": torch.ones(2)}, run.dir / "model.pt")
        write_text_atomic(run.dir / "result.json", '{"acc": 0.5}')
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def contents(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


# ----------------------------------------------------------------------------- the stamp


def test_a_run_directory_is_stamped_with_what_snexp_wrote(tmp_path):
    finished_run(tmp_path)
    marker = read_marker(tmp_path)
    # The two outputs written through snexp's writers are listed; runtime files need not be.
    assert marker["experiment"] == "toy" and marker["outputs"] == ["model.pt", "result.json"]
    assert json.loads((tmp_path / MARKER_FILE).read_text())["kind"] == "snexp run directory"


def test_overwrite_deletes_only_what_snexp_wrote(tmp_path):
    finished_run(tmp_path)
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/important.py").write_text("print('keep me')")
    with open_run(make_config(tmp_path, "--overwrite")) as run:
        assert not run.resumed
    # The old run's checkpoints and outputs are gone; the user's files are untouched.
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "result.json").exists()
    assert not (tmp_path / "checkpoints/last.pt").exists()
    assert not (tmp_path / REPLACED_DIR).exists()
    assert (tmp_path / "notes.txt").read_text() == "my notes"
    assert (tmp_path / "src/important.py").read_text() == "print('keep me')"
    # The new run's log says what was set aside and what was kept.
    assert (f"--overwrite: the previous run's 7 entries are set aside in {tmp_path / REPLACED_DIR}"
            " until this run's first checkpoint; kept 2 entries snexp did not write: notes.txt, "
            "src") in (tmp_path / "run.log").read_text()


def test_overwrite_refuses_a_project_root_with_a_config_toml(tmp_path):
    (tmp_path / "config.toml").write_text("[project]\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/important.py").write_text("x = 1")
    before = contents(tmp_path)
    with pytest.raises(ConfigError) as info:
        open_run(make_config(tmp_path, "--overwrite"))
    assert str(info.value) == (
        f"--overwrite refused: {tmp_path} has no .snexp-run stamp, so it is not a run directory "
        "snexp made (runs made before the stamp existed have none either); --overwrite only "
        "deletes what snexp wrote: delete the folder yourself or choose another --out"
    )
    # Nothing was written or deleted, not even a lock file.
    assert contents(tmp_path) == before and not (tmp_path / LOCK_FILE).exists()


def test_overwrite_refuses_a_symlinked_out(tmp_path):
    real = tmp_path / "real"
    before = finished_run(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="is a symbolic link .* does not follow links"):
        open_run(make_config(link, "--overwrite"))
    assert contents(real) == before


# ----------------------------------------------------------------------------- refused runs


def _refused_in_the_loop(run: Run) -> None:
    """What a loop does when it finds a bad input only while building its data."""
    raise ConfigError("--content-dir photos/ does not exist")


def test_overwrite_refused_in_the_loop_puts_the_old_run_back(tmp_path):
    before = finished_run(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="content-dir"):
        with open_run(make_config(tmp_path, "--overwrite")) as run:
            _refused_in_the_loop(run)
    # Byte for byte the old run (checkpoints, model, config, log), and the user's file.
    assert contents(tmp_path) == {**before, "notes.txt": b"mine"}
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2


def test_fresh_run_refused_in_the_loop_leaves_no_directory(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ConfigError):
        with open_run(make_config(out)) as run:
            _refused_in_the_loop(run)
    # No empty run directory blocks the retry with the same --out.
    assert not out.exists()
    with open_run(make_config(out)) as run:
        toy.train(run)
    assert load_checkpoint(out / "checkpoints/last.pt")["step"] == 24


def test_overwrite_that_crashes_keeps_the_old_run_aside_and_says_how_to_resume_it(tmp_path):
    before = finished_run(tmp_path)
    with pytest.raises(RuntimeError):
        with open_run(make_config(tmp_path, "--overwrite")):
            raise RuntimeError("a bug in the new run")
    # The old run is kept, set aside, until a new run in the directory has a checkpoint.
    kept = contents(tmp_path / REPLACED_DIR)
    assert kept["checkpoints/last.pt"] == before["checkpoints/last.pt"]
    with pytest.raises(ConfigError) as info:
        open_run(make_config(tmp_path, "--resume"))
    assert f"left the run it replaced in {tmp_path / REPLACED_DIR}" in str(info.value)


def test_overwrite_forgets_the_old_run_at_the_first_checkpoint(tmp_path):
    finished_run(tmp_path)

    def look(run: Run) -> None:
        if run.step == 1:
            assert (tmp_path / REPLACED_DIR / "model.pt").is_file()  # not yet: no checkpoint

    with open_run(make_config(tmp_path, "--overwrite", "--set", "train.steps=10")) as run:
        toy.train(run, on_step=look)
        assert run.epoch == 1 and not (tmp_path / REPLACED_DIR).exists()  # epoch 1 saved


def test_stale_temporary_files_of_killed_writes_are_removed(tmp_path):
    finished_run(tmp_path)
    stale = [tmp_path / "checkpoints/.last.pt.k1ll3d.tmp", tmp_path / ".model.pt.x8.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (tmp_path / ".mine.tmp").write_text("user's")
    with open_run(make_config(tmp_path, "--resume")):
        pass
    assert not any(p.exists() for p in stale) and (tmp_path / ".mine.tmp").exists()


# ----------------------------------------------------------------------------- disk errors


def test_read_only_out_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(directory_module.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError) as info:
        open_run(make_config(tmp_path / "run"))
    assert str(info.value) == (
        f"--out {tmp_path / 'run'}: {tmp_path} is not writable (read-only folder or file "
        "system); choose a folder you can write to"
    )
    assert not (tmp_path / "run").exists()


def test_full_disk_at_start_is_one_paragraph_and_leaves_nothing(tmp_path, monkeypatch):
    def full(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(session_module, "write_text_atomic", full)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        open_run(make_config(out))
    assert str(info.value) == (
        f"cannot write the run directory {out}: No space left on device ({out / 'config.toml'}); "
        "choose a writable --out with free space"
    )
    assert not out.exists()


def test_full_disk_at_a_checkpoint_says_how_to_resume(tmp_path, monkeypatch):
    import snexp.runtime.run.checkpointer as checkpointer_module

    def full(obj, path):
        raise OSError(28, "No space left on device")

    with open_run(make_config(tmp_path, "--set", "train.steps=2")) as run:
        toy.train(run)
    monkeypatch.setattr(checkpointer_module, "save_checkpoint", full)
    with pytest.raises(ConfigError) as info:
        with open_run(make_config(tmp_path, "--resume", "--set", "train.steps=4")) as run:
            toy.train(run)
    assert str(info.value) == (
        f"cannot write {tmp_path / 'checkpoints/last.pt'}: No space left on device; free "
        "space (or make the folder writable), then continue from the last checkpoint: toy "
        f"--out {tmp_path} --resume"
    )
    # The last good checkpoint is still there.
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2


# ----------------------------------------------------------------------------- the lock


def test_a_live_run_directory_is_refused_to_a_second_process(tmp_path):
    # This process holds the run; a real second process is refused whatever it asks for.
    with open_run(make_config(tmp_path, "--set", "train.steps=2")) as run:
        toy.train(run)
        run.save()
        for extra in ([], ["--resume"], ["--overwrite"]):
            proc = subprocess.run(
                [sys.executable, str(TOY), "--out", str(tmp_path), "--device", "cpu", *extra],
                capture_output=True, text=True, env=ENV, timeout=120)
            message = " ".join(proc.stderr.split())
            assert proc.returncode == 2, proc.stderr
            assert message.startswith(
                f"toy: error: run directory {tmp_path} is in use by process {os.getpid()} on "
            ), message
            assert message.endswith("wait for it to end (or stop it), or choose another --out")
        # The live run's files are untouched by the refused processes.
        assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 2
        assert read_marker(tmp_path) is not None


def test_the_lock_dies_with_its_process(tmp_path):
    # A run killed with SIGKILL holds no lock: the next process resumes it.
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TOY.parent)!r})
        import runtime_toy as toy
        from snexp.runtime.config import parse_args
        from snexp.runtime.run import Run
        cfg = parse_args(toy.ToyConfig, ["--out", {str(tmp_path)!r}, "--device", "cpu",
                                         "--deterministic", "--set", "train.steps=2"],
                         flags=toy.FLAGS)
        with Run(cfg, experiment="toy", console=False) as run:
            toy.train(run)
            run.save()
            print("holding", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env=ENV)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(ConfigError, match=f"in use by process {proc.pid} on "):
            open_run(make_config(tmp_path, "--resume"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with open_run(make_config(tmp_path, "--resume", "--set", "train.steps=4")) as run:
        toy.train(run)
    assert run.step == 4


_WRITER = """
import sys, torch
from snexp.runtime.checkpoint import save_checkpoint
weights = torch.arange(100_000, dtype=torch.float64)
for step in range(int(sys.argv[2])):
    save_checkpoint({"step": step, "w": weights + step}, sys.argv[1])
"""


def test_two_writers_of_one_checkpoint_never_tear_it(tmp_path):
    # Each atomic write goes through its own temporary file, so readers see whole files only.
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 0, "w": torch.arange(100_000, dtype=torch.float64)}, path)
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "60"], env=ENV)
               for _ in range(2)]
    reads = 0
    try:
        while any(w.poll() is None for w in writers):
            checkpoint = load_checkpoint(path)
            expected = torch.arange(100_000, dtype=torch.float64) + checkpoint["step"]
            assert torch.equal(checkpoint["w"], expected)
            reads += 1
    finally:
        for w in writers:
            w.wait(timeout=60)
    assert [w.returncode for w in writers] == [0, 0] and reads > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left


def test_lock_file_names_the_holder(tmp_path):
    with open_run(make_config(tmp_path)):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["since"] <= time.strftime("%Y-%m-%dT%H:%M:%S")


@pytest.mark.slow
def test_two_new_runs_started_together_on_one_out_one_wins(tmp_path):
    # Two fresh runs race for one --out: one trains, the other is refused and writes nothing.
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, str(TOY), "--out", str(out), "--device", "cpu",
                               "--epochs", "2"], stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2]
    refused = " ".join(next(err for code, err in results if code == 2).split())
    assert (f"run directory {out} is in use by process" in refused
            or f"run directory {out} already exists and is not empty" in refused), refused
    # The winner's run is whole: one start in its log, its last checkpoint at 2 epochs.
    assert (out / "run.log").read_text().count("toy run in") == 1
    assert load_checkpoint(out / "checkpoints/last.pt")["epoch"] == 2


# ----------------------------------------------------------------------------- planted links


def toy_cli(cwd: Path, *args: str, patch: str = "") -> subprocess.CompletedProcess:
    """The toy's real entry point in its own process (``patch``: code run before it)."""
    code = (f"import sys; sys.path.insert(0, {str(TOY.parent)!r})\n{patch}\n"
            "import runtime_toy; runtime_toy.main(sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", code, "--device", "cpu", *args], cwd=cwd,
                          capture_output=True, text=True, env=ENV, timeout=120)


def _plant(out: Path, name: str, target: Path) -> None:
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).symlink_to(target)


@pytest.mark.parametrize(("name", "mode"), [
    (LOCK_FILE, ()),  # a folder holding only the planted link is not an empty folder
    (LOCK_FILE, ("--overwrite",)),
    ("run.log", ("--resume",)),
    ("checkpoints/last.pt", ("--resume",)),
])
def test_a_link_planted_in_a_run_directory_is_refused_and_its_target_kept(tmp_path, name, mode):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"KEEP\n")
    out = tmp_path / "run"
    if mode:
        finished_run(out)
        (out / name).unlink()
    else:
        out.mkdir()
    _plant(out, name, victim)
    before = snapshot(tmp_path)
    proc = toy_cli(tmp_path, "--out", str(out), *mode)
    # Refused with one paragraph naming the link; the file it points to is byte for byte kept.
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert " ".join(proc.stderr.split()) == (
        f"toy: error: {out / name} is a symbolic link (to {victim}); snexp never writes "
        "through links or into special files in a run directory (a link planted there would "
        "make it overwrite the file it points to): remove it (rm "
        f"{out / name}) if you put it there, or choose another --out")
    assert snapshot(tmp_path) == before and victim.read_bytes() == b"KEEP\n"


def test_the_lock_is_never_opened_through_a_link(tmp_path):
    # Even when the checks are passed by (a link planted after them), the lock's open refuses.
    from snexp.runtime.run.claim import Claim

    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"KEEP\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(victim)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        Claim.take(tmp_path / "run", "toy")
    assert victim.read_bytes() == b"KEEP\n"


def test_a_fifo_as_lock_file_is_refused_without_hanging(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / LOCK_FILE)
    with pytest.raises(ConfigError, match="is not a regular file"):
        open_run(make_config(out))


# ----------------------------------------------------------------------------- a full disk

# torch.save on a full disk, as it really fails: the OSError becomes the context of a
# RuntimeError from its zip writer (seen on a 512 KiB tmpfs with torch 2.14).
_TORCH_SAVE_FULL = """
import torch
def full(obj, f, *args, **kwargs):
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
torch.save = full
"""


def test_a_full_disk_during_overwrite_puts_the_old_run_back(tmp_path):
    out = tmp_path / "run"
    before = finished_run(out)
    (out / "notes.txt").write_text("mine")
    proc = toy_cli(tmp_path, "--out", str(out), "--overwrite", patch=_TORCH_SAVE_FULL)
    message = " ".join(proc.stderr.split())
    # One paragraph (exit 2), and the old run is back byte for byte, nothing set aside.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"toy: error: cannot write {out / 'checkpoints'}/" in message  # best.pt comes first
    assert message.endswith(
        ".pt: No space left on device; free space (or make the folder writable), then start "
        f"again; the run that --overwrite replaced is put back in {out} as it was")
    assert contents(out) == {**before, "notes.txt": b"mine"}
    assert not (out / REPLACED_DIR).exists()


def test_a_full_disk_in_a_new_run_is_a_message_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    proc = toy_cli(tmp_path, "--out", str(out), patch=_TORCH_SAVE_FULL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert " ".join(proc.stderr.split()).endswith(
        "then start again (this run had no checkpoint yet, so its files are removed)")
    assert not out.exists()


def test_a_full_disk_at_a_later_checkpoint_keeps_the_last_and_says_resume(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    last = (out / "checkpoints/last.pt").read_bytes()
    proc = toy_cli(tmp_path, "--out", str(out), "--resume", "--epochs", "5",
                   patch=_TORCH_SAVE_FULL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert " ".join(proc.stderr.split()).endswith(
        f"then continue from the last checkpoint: toy --out {out} --resume")
    assert (out / "checkpoints/last.pt").read_bytes() == last
    assert not list(out.rglob("*.tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root, as in the project's containers); skipped where it cannot be
    mounted: the injected-failure tests above cover the same paths everywhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_really_full_disk_during_overwrite_puts_the_old_run_back(small_disk):
    out = small_disk / "run"
    before = finished_run(out)
    # hidden=40000: a checkpoint of ~2.5 MB (weights and momentum) does not fit in 1 MiB.
    proc = toy_cli(small_disk, "--out", str(out), "--overwrite", "--set", "hidden=40000")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "No space left on device" in proc.stderr
    assert contents(out) == before and not (out / REPLACED_DIR).exists()
    assert not list(out.rglob("*.tmp"))


# ----------------------------------------------------------------------------- killed starts

# SIGKILL right after the run took the lock and wrote its first files (config.toml, run.log,
# tb/), before any checkpoint: what a kill 0.3-1.5 s into a run leaves.
_KILLED_AT_START = """
import os, signal
import snexp.runtime.run.session as session
started = session.Session.start
def start_then_die(self, *args, **kwargs):
    started(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
session.Session.start = start_then_die
"""


def test_a_run_killed_before_its_first_checkpoint_is_retried_as_it_was_started(tmp_path):
    out = tmp_path / "run"
    assert toy_cli(tmp_path, "--out", str(out), patch=_KILLED_AT_START).returncode == -9
    assert (out / "config.toml").is_file() and not (out / "checkpoints/last.pt").exists()
    # --resume has nothing to resume, and says to run the same command without it.
    proc = toy_cli(tmp_path, "--out", str(out), "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert " ".join(proc.stderr.split()).endswith(
        "the run started there was stopped before its first checkpoint, so there is nothing "
        "to resume: run the same command without --resume to start it afresh (the files of "
        "the stopped start are replaced)")
    # The same command again just runs, in place of the stopped start.
    proc = toy_cli(tmp_path, "--out", str(out), "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    assert "held only a run stopped before its first checkpoint" in proc.stderr
    assert load_checkpoint(out / "checkpoints/last.pt")["epoch"] == 1
    assert not (out / REPLACED_DIR).exists()


def test_a_folder_with_a_users_file_is_not_taken_for_a_killed_start(tmp_path):
    out = tmp_path / "run"
    toy_cli(tmp_path, "--out", str(out), patch=_KILLED_AT_START)
    (out / "notes.txt").write_text("mine")
    proc = toy_cli(tmp_path, "--out", str(out))
    assert proc.returncode == 2
    assert "already exists and is not empty" in " ".join(proc.stderr.split())


def test_a_killed_overwrite_says_the_exact_commands_that_put_the_old_run_back(tmp_path):
    out = tmp_path / "run"
    before = finished_run(out)
    assert toy_cli(tmp_path, "--out", str(out), "--overwrite",
                   patch=_KILLED_AT_START).returncode == -9
    proc = toy_cli(tmp_path, "--out", str(out), "--resume")
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    command = message.split("put it back with: ")[1]
    # Running the command it gives brings the old run back byte for byte, and it resumes.
    subprocess.run(command, shell=True, check=True)
    assert contents(out) == before
    assert toy_cli(tmp_path, "--out", str(out), "--resume", "--epochs", "1").returncode == 0


# ----------------------------------------------------------------------------- permissions


def _modes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in sorted(out.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_file_of_a_run_gets_the_users_umask(tmp_path, umask, mode):
    out = tmp_path / "run"
    old = os.umask(umask)
    try:
        finished_run(out)
    finally:
        os.umask(old)
    # Rule: config.toml, checkpoints, outputs and the stamp (made by mkstemp, 0o600) are as
    # readable as run.log, the lock and TensorBoard's events (made by open): what the umask says.
    modes = _modes(out)
    assert {"config.toml", "checkpoints/last.pt", "model.pt", "result.json", ".snexp-run",
            "run.log", LOCK_FILE} <= set(modes)
    assert set(modes.values()) == {mode}, modes


def test_a_password_in_a_url_is_never_shown_to_others(tmp_path):
    out = tmp_path / "run"
    url = "postgresql://me:s3cret@db.example/studies"
    old = os.umask(0o022)
    try:
        proc = toy_cli(tmp_path, "--out", str(out), "--epochs", "1", "--tag", url)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    # The lock file and run.log (readable by others) show the URL without its password ...
    assert "postgresql://me:***@db.example/studies" in (out / LOCK_FILE).read_text()
    for name in (LOCK_FILE, "run.log"):
        assert "s3cret" not in (out / name).read_text()
    # ... and the files that must hold it to resume are kept to their owner.
    assert url in (out / "config.toml").read_text()
    modes = _modes(out)
    assert modes["config.toml"] == modes["checkpoints/last.pt"] == 0o600
    assert modes["run.log"] == 0o644
    assert toy_cli(tmp_path, "--out", str(out), "--resume", "--epochs", "2").returncode == 0


def test_an_overwrite_retried_after_a_killed_one_keeps_the_old_run_recoverable(tmp_path):
    # Issue 20: the retry used to delete .snexp-replaced (the last run with a checkpoint) for
    # good. Now it stays aside, and a refused retry (a full disk) puts it back byte for byte.
    out = tmp_path / "run"
    before = finished_run(out)
    toy_cli(tmp_path, "--out", str(out), "--overwrite", patch=_KILLED_AT_START)
    proc = toy_cli(tmp_path, "--out", str(out), "--overwrite", patch=_TORCH_SAVE_FULL)
    assert proc.returncode == 2 and "put back" in proc.stderr.replace("\n", " "), proc.stderr
    assert contents(out) == before and not (out / REPLACED_DIR).exists()
