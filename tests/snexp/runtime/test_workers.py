"""Many Optuna worker processes on one study: journal file, SQLite and (optional) PostgreSQL.

The PostgreSQL test starts its own throw-away server on 127.0.0.1 (``initdb`` + ``pg_ctl`` of
the Debian ``postgresql`` package, found under ``/usr/lib/postgresql/*/bin``) and stops it at
the end. PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user
the Debian package creates (``runuser -u postgres``), in a temporary folder that user owns.
Without a server binary, a ``postgres`` user (as root) or the driver, it is skipped with the
reason; ``.ci/postgres.sh`` installs them.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from snexp.runtime.study import OWNER_ATTR, open_study

WORKERS, TRIALS = 3, 4
CTX = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    time.sleep(0.02)
    return x * x


def _worker(storage: str) -> None:
    study = open_study("shared", storage=storage, direction="minimize", heartbeat_interval=1)
    study.optimize(_objective, n_trials=TRIALS)


def _hang(storage: str, marker: str, elsewhere: bool) -> None:
    if elsewhere:  # pose as a worker on another host: only the heartbeat can tell it died
        socket.gethostname = lambda: "another-host"
    study = open_study("shared", storage=storage, direction="minimize", heartbeat_interval=1,
                       grace_period=2, retries=1)

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", -1.0, 1.0)
        Path(marker).write_text(str(trial.number))
        time.sleep(120)
        return 0.0

    study.optimize(objective, n_trials=1)


def _run_workers(storage: str) -> None:
    procs = [CTX.Process(target=_worker, args=(storage,)) for _ in range(WORKERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * WORKERS
    trials = open_study("shared", storage=storage, direction="minimize").trials
    # Every trial of every worker is there once, numbered 0..n-1, and finished.
    assert sorted(t.number for t in trials) == list(range(WORKERS * TRIALS))
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert all(t.value == pytest.approx(t.params["x"] ** 2) for t in trials)
    assert len({t.system_attrs[OWNER_ATTR] for t in trials}) == WORKERS  # all worked


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_workers_share_one_study(tmp_path, kind):
    _run_workers(str(tmp_path / ("studies.log" if kind == "journal" else "studies.db")))


def _kill_mid_trial(tmp_path: Path, storage: str, *, elsewhere: bool) -> int:
    marker = tmp_path / "started"
    proc = CTX.Process(target=_hang, args=(storage, str(marker), elsewhere))
    proc.start()
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the worker never started its trial"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()  # reaped, as the shell that started a real worker would
    return int(marker.read_text())


def test_killed_journal_worker_is_failed_at_the_next_start(tmp_path):
    storage = str(tmp_path / "studies.log")
    number = _kill_mid_trial(tmp_path, storage, elsewhere=False)
    # The next worker to start finds the owner process gone: FAIL, and one retry queued.
    study = open_study("shared", storage=storage, direction="minimize", retries=1)
    killed = study.trials[number]
    assert killed.state == TrialState.FAIL
    retry = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.params for t in retry] == [killed.params]
    study.optimize(_objective, n_trials=1)  # the retry runs first, with the same x
    assert study.trials[retry[0].number].state == TrialState.COMPLETE
    assert study.trials[retry[0].number].value == pytest.approx(killed.params["x"] ** 2)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_killed_worker_on_another_host_fails_after_the_grace_period(tmp_path, kind):
    # Journal files too (issue 20): Optuna's JournalStorage has no heartbeat, snexp's keeps
    # one, so a long trial whose process cannot be judged from here is not RUNNING forever.
    storage = str(tmp_path / ("studies.db" if kind == "sqlite" else "studies.log"))
    number = _kill_mid_trial(tmp_path, storage, elsewhere=True)
    options = {"direction": "minimize", "heartbeat_interval": 1, "grace_period": 2}
    # Within the grace period a silent worker on another host may still be alive ...
    assert open_study("shared", storage=storage, **options).trials[number].state == (
        TrialState.RUNNING)
    time.sleep(4)  # ... past it (heartbeats have second resolution), it is dead.
    study = open_study("shared", storage=storage, **options)
    assert study.trials[number].state == TrialState.FAIL
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # retries=0 here: no re-queue


def _ask_and_exit(storage: str) -> None:
    open_study("shared", storage=storage, heartbeat_interval=None).ask()
    os._exit(0)  # dies holding the trial, as a killed ask/tell loop (nas TPE proposals) would


def test_dead_ask_tell_worker_on_sqlite_is_failed_at_the_next_start(tmp_path):
    # ask/tell trials get no heartbeat; their owner stamp still tells they were orphaned.
    storage = str(tmp_path / "studies.db")
    proc = CTX.Process(target=_ask_and_exit, args=(storage,))
    proc.start()
    proc.join(30)
    study = open_study("shared", storage=storage, heartbeat_interval=None)
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert study.trials[0].system_attrs[OWNER_ATTR].split(":")[2] == str(proc.pid)


# ----------------------------------------------------------------------------- PostgreSQL


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL server on 127.0.0.1 with an empty database; stopped afterwards."""
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    reason = None
    if not binaries:
        reason = "no PostgreSQL server (initdb under /usr/lib/postgresql/*/bin); .ci/postgres.sh"
    elif importlib_missing("psycopg"):
        reason = "no PostgreSQL driver: pip install 'psycopg[binary]>=3.1'"
    elif os.geteuid() == 0 and shutil.which("runuser") is None:
        reason = "running as root without runuser to start PostgreSQL as 'postgres'"
    if reason is None and os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            reason = "running as root and no 'postgres' user to run the server as"
    if reason:
        print(f"skipping the PostgreSQL test: {reason}")
        pytest.skip(reason)
    bin_dir = Path(binaries[-1]).parent
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="snexp-pg-"))
    if as_user:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run(as_user + [str(bin_dir / args[0]), *args[1:]], check=True,
                       capture_output=True, timeout=60)

    try:
        pg("initdb", "-D", str(data), "-U", "snexp", "-A", "trust", "--no-sync", "-E", "UTF8")
        pg("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "start", "-o",
           f"-h 127.0.0.1 -p {port} -k {folder} -F")
        try:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "snexp", "optuna")
            yield f"postgresql://snexp@127.0.0.1:{port}/optuna"
        finally:
            pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_workers_share_one_postgresql_study(postgres_url):
    _run_workers(postgres_url)


# ----------------------------------------------------------------------------- containers

_NS_WORKER = """
import sys, time
from snexp.runtime.study import open_study
study = open_study("shared", storage=sys.argv[1], heartbeat_interval=None)
trial = study.ask()
print(trial.number, flush=True)
time.sleep(120)
"""

_NS_JUDGE = """
import sys
from snexp.runtime.study import open_study
study = open_study("shared", storage=sys.argv[1])  # reaps the trials of dead owners
print(",".join(t.state.name for t in study.trials))
"""


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not shutil.which("unshare") or not _unshare_works(),
                    reason="needs unshare --pid --mount-proc (root or user namespaces)")
def test_a_live_worker_in_another_pid_namespace_is_not_taken_for_dead(tmp_path):
    # Same host name, another PID namespace (containers with host networking): the worker's
    # pid does not exist in the judge's namespace, yet the worker lives; its trial stays.
    journal = str(tmp_path / "journal.log")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    worker = subprocess.Popen([sys.executable, "-c", _NS_WORKER, journal],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert worker.stdout.readline().strip() == "0"
        judge = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                                "-c", _NS_JUDGE, journal], capture_output=True, text=True,
                               env=env, timeout=120)
        assert judge.stdout.strip() == "RUNNING", judge.stderr
        assert worker.poll() is None
    finally:
        worker.kill()
        worker.wait(timeout=30)
    # Once the worker is really dead, a judge in its own namespace fails the trial.
    study = open_study("shared", storage=journal)
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_owner_stamps_name_host_kernel_and_pid_namespace():
    from snexp.runtime.storage import _machine, _owner, _owner_gone

    host, where, pid, start = _owner().split(":")
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert where == f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}" == _machine()
    assert pid == str(os.getpid()) and not _owner_gone(_owner())
    # A pid that is free here, stamped from another namespace or kernel: not judged.
    free = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 10_000
    assert _owner_gone(f"{host}:{where}:{free}:123")
    assert not _owner_gone(f"{host}:{boot}/1:{free}:123")
    assert not _owner_gone(f"{host}:other-boot/{where.split('/')[1]}:{free}:123")
