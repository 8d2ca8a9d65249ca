"""Optuna storages that many worker processes can share without losing or stranding trials.

The backend of :mod:`snexp.runtime.study` (which users import: ``open_study``,
``open_storage``); only that module imports this one.

Optuna runs a study on several processes (one host or many) when they open it on one storage
(Optuna docs, "Easy Parallelization"). Two things go wrong with plain storages, and this module
fixes both through Optuna's own machinery:

- A worker killed mid-trial (SIGKILL, OOM, preemption) leaves its trial ``RUNNING`` forever.
  RDB storages (SQLite, PostgreSQL) get Optuna's heartbeat: every running trial of
  ``Study.optimize`` writes a heartbeat each ``heartbeat_interval`` seconds, and a trial whose
  heartbeat is older than ``grace_period`` is failed by the next worker that starts a trial or
  opens the study (:func:`optuna.storages.fail_stale_trials`), then optionally re-queued by
  :class:`optuna.storages.RetryHeartbeatStaleTrialCallback`. Optuna 5's ``JournalStorage`` has
  no heartbeat; the journal storage here keeps one as a trial attribute. Every trial is also
  stamped with its owner process (host, kernel boot id, PID
  namespace, pid, start time); a worker that opens the study or asks for a trial fails the
  ``RUNNING`` trials whose owner ran in its own host, kernel and PID namespace and is gone (a
  worker in another container on the same host is never taken for dead). Owners are also how
  ask/tell trials (which get no heartbeat) are cleaned up on RDB storages.
- Several processes writing one SQLite file raise "database is locked": the connection waits
  up to ``sqlite_timeout`` seconds for the lock instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from snexp.runtime.config import ConfigError

__all__ = ["HEARTBEAT_ATTR", "OWNER_ATTR", "check_storage", "fail_dead_owner_trials",
           "make_storage", "reap"]

OWNER_ATTR = "snexp:owner"  # trial attribute "host:bootid/pidns:pid:start" of its worker
HEARTBEAT_ATTR = "snexp:heartbeat"  # journal files: time.time() of the trial's last heartbeat


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, Linux), "" where unknown, None: gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else fields[19]  # a zombie counts as gone
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""


def _machine() -> str:
    """This process's kernel and PID namespace: ``<boot id>/<pid-namespace inode>``.

    Host names do not tell containers apart (host networking shares one), and PIDs repeat in
    each PID namespace; the boot id tells the kernel (and reboots) apart. "" where unknown.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}/{pidns}"


def _owner() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{_machine()}:{pid}:{_start_time(pid) or ''}"


def _owner_gone(owner: str) -> bool:
    """Whether ``owner`` ran in this host, kernel and PID namespace and is gone (pid reuse aware).

    An owner elsewhere (another host, container, or a boot before this one) is never judged:
    only a heartbeat can tell. Owners written before the namespace was recorded
    (``host:pid:start``) are judged by host name alone, as they used to be.
    """
    parts = owner.split(":")
    if len(parts) == 4:
        host, where, pid, start = parts
        if not where or where != _machine():
            return False
    else:
        host, pid, start = (owner.rsplit(":", 2) + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's process: only a heartbeat can tell
    now = _start_time(int(pid))
    return now is None or bool(start and now and now != start)


class _OwnedTrials:
    """Storage mixin: stamp each trial with its owner; fail trials whose owner died."""

    _retry: RetryHeartbeatStaleTrialCallback | None = None

    def _new_trial(
        self, create: Callable[..., Any], study_id: int, template_trial: FrozenTrial | None
    ) -> Any:
        fail_dead_owner_trials(self, study_id)
        created = create(study_id, template_trial)
        if template_trial is None or template_trial.state == TrialState.RUNNING:
            trial_id = created if isinstance(created, int) else created._trial_id
            self.set_trial_system_attr(trial_id, OWNER_ATTR, _owner())
        return created

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        done = super().set_trial_state_values(trial_id, state, values)
        if done and state == TrialState.RUNNING:  # a WAITING (enqueued, retried) trial starts
            self.set_trial_system_attr(trial_id, OWNER_ATTR, _owner())
        return done


def fail_dead_owner_trials(storage: Any, study_id: int) -> list[int]:
    """Mark FAIL the study's ``RUNNING`` trials whose owner process on this host is gone.

    Only owners in this host, kernel and PID namespace are judged (a PID means the same
    process there); with a retry callback on the storage, each failed trial is re-queued as
    ``WAITING``. Runs on every new trial; call it to clean up earlier.

    Args:
        storage: A storage made by :func:`make_storage` (not Optuna's cache around it).
        study_id: The study's storage id (``study._study_id``).

    Returns:
        The numbers of the trials failed here.
    """
    failed = []
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.system_attrs.get(OWNER_ATTR)
        if not owner or not _owner_gone(owner):
            continue
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first
    if failed and storage._retry is not None:
        name = storage.get_study_name_from_id(study_id)
        study = optuna.load_study(study_name=name, storage=storage)
        for trial in failed:
            storage._retry(study, storage.get_trial(trial._trial_id))
    return [t.number for t in failed]


class _JournalStorage(_OwnedTrials, JournalStorage, BaseHeartbeat):
    # NOTE: Optuna's JournalStorage has no heartbeat. This one keeps it as a trial system
    # attribute (wall-clock seconds), so Study.optimize's heartbeat thread and
    # optuna.storages.fail_stale_trials work as on RDB storages: a long trial of a worker whose
    # process cannot be judged from here (another container, a host sharing the file) is
    # failed once its heartbeat is older than the grace period. Trials without one (ask/tell)
    # are left to the owner check.
    _heartbeat_interval: int | None = None
    _grace_period: int | None = None

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._new_trial(super().create_new_trial, study_id, template_trial)

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if self._heartbeat_interval is None:
            return []
        grace = self._grace_period or 2 * self._heartbeat_interval
        now = time.time()
        return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False,
                                                          states=(TrialState.RUNNING,))
                if now - float(t.system_attrs.get(HEARTBEAT_ATTR, now)) > grace]

    def get_heartbeat_interval(self) -> int | None:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[..., None] | None:
        return self._retry


class _RDBStorage(_OwnedTrials, RDBStorage):
    # NOTE: Optuna's _CachedStorage (which wraps every RDBStorage a study uses) creates trials
    # through the private _create_new_trial, so that is the hook here.
    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        return self._new_trial(super()._create_new_trial, study_id, template_trial)


def _open_rdb(label: str, **options: Any) -> RDBStorage:
    """``RDBStorage(label, **options)``, retried while other workers create the same tables."""
    for attempt in range(8):
        try:
            return _RDBStorage(label, **options)
        except ImportError as error:
            raise ConfigError(
                f"storage '{label}': its database driver is missing ({error.__cause__}); "
                "for PostgreSQL run: pip install 'psycopg[binary]>=3.1'"
            ) from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.DatabaseError,
                sqlalchemy.exc.ProgrammingError) as error:
            why = " ".join(str(error.orig).split())
            # NOTE: workers started at once on a fresh database race to create Optuna's
            # schema (SQLite: "table ... already exists", PostgreSQL: DuplicateTable, or a
            # duplicate alembic version row); the losers retry and find it made.
            racing = isinstance(error, sqlalchemy.exc.IntegrityError) or "exists" in why
            if not racing or attempt == 7:
                raise ConfigError(
                    f"storage '{label}': cannot open the database ({why}); check that the "
                    "server runs and the URL's user, password, host, port and database are right"
                ) from None
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def check_storage(label: str) -> None:
    """Refuse a storage that cannot work, without creating or connecting to anything.

    Checks that a URL names a database SQLAlchemy knows and whose driver is installed, that a
    SQLite file's folder exists and an existing file is a SQLite database, and that an
    existing journal file is an Optuna journal (JSON lines). Used by entry points before the
    run directory is touched.

    Args:
        label: What :func:`make_storage` takes: a SQLAlchemy URL or a journal file path.

    Raises:
        ConfigError: What is wrong, and what to pass instead.
    """
    hint = ("pass a SQLite file (study.db), a URL such as sqlite:///study.db or "
            "postgresql://user@host/db, or a journal file path")
    if "://" in label:
        try:
            url = sqlalchemy.engine.make_url(label)
            url.get_dialect()
        except sqlalchemy.exc.NoSuchModuleError:
            raise ConfigError(
                f"storage '{label}': '{label.split('://')[0]}' is not a database SQLAlchemy "
                f"knows; {hint}"
            ) from None
        except sqlalchemy.exc.ArgumentError:
            raise ConfigError(f"storage '{label}' is not a database URL; {hint}") from None
        except ImportError as error:
            raise ConfigError(
                f"storage '{label}': its database driver is missing ({error}); for "
                "PostgreSQL run: pip install 'psycopg[binary]>=3.1'"
            ) from None
        if url.get_backend_name() != "sqlite" or not url.database:
            return
        path = Path(url.database)
    else:
        path = Path(label)
    if not path.parent.is_dir():
        raise ConfigError(f"storage '{label}': folder '{path.parent}' does not exist")
    if path.exists() and not path.is_file():
        raise ConfigError(f"storage '{label}': {path} is not a file; {hint}")
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        head = f.read(4096)
    if "://" in label:
        if not head.startswith(b"SQLite format 3\x00"):
            raise ConfigError(
                f"storage '{label}': {path} exists but is not a SQLite database; pass a new "
                "file name, or the .db file an earlier run made"
            )
    elif not _journal_like(head):
        raise ConfigError(
            f"storage '{label}': {path} exists but is not an Optuna journal file (a journal "
            "holds one JSON object per line); pass a new file name, or a .db file for SQLite"
        )


def _journal_like(head: bytes) -> bool:
    first = head.split(b"\n", 1)[0]
    if b"\n" not in head and len(head) == 4096:
        return first.lstrip().startswith(b"{")
    try:
        return isinstance(json.loads(first), dict)
    except ValueError:
        return False


def make_storage(
    label: str,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    retries: int = 0,
    sqlite_timeout: float = 60.0,
) -> JournalStorage | RDBStorage:
    """A storage for an RDB URL or a journal file path, safe for many workers.

    Args:
        label: ``sqlite:///...``, ``postgresql://...`` (any SQLAlchemy URL) or a journal file.
        heartbeat_interval: Seconds between a running trial's heartbeats (``None``: no
            heartbeat; journal files keep it as a trial attribute).
        grace_period: Seconds without a heartbeat before a trial counts as dead (``None``:
            twice ``heartbeat_interval``).
        retries: How many times a dead worker's trial is re-queued with the same parameters
            (0: it stays FAIL).
        sqlite_timeout: Seconds a SQLite writer waits for another's lock before erroring.

    Returns:
        An ``RDBStorage`` or a ``JournalStorage`` that stamps and reaps trial owners.

    Raises:
        ConfigError: No driver for the URL's database, or it cannot be reached.
    """
    check_storage(label)
    with warnings.catch_warnings():  # heartbeat and retry are "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=retries) if retries > 0 else None
        if "://" not in label:
            storage = _JournalStorage(JournalFileBackend(label))
            storage._heartbeat_interval, storage._grace_period = heartbeat_interval, grace_period
        else:
            engine: dict[str, Any] = {"pool_pre_ping": True}
            if label.startswith("sqlite"):
                engine = {"connect_args": {"timeout": sqlite_timeout}}
            storage = _open_rdb(
                label,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry if heartbeat_interval else None,
            )
    storage._retry = retry
    return storage


def reap(study: optuna.Study) -> list[int]:
    """Fail (and re-queue) the trials of dead workers now: stale heartbeats, gone owners.

    Returns:
        The numbers of the trials failed here.
    """
    storage = study._storage
    if isinstance(storage, optuna.storages._CachedStorage):  # how Optuna wraps RDB storages
        storage = storage._backend
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if isinstance(storage, _OwnedTrials):
        fail_dead_owner_trials(storage, study._study_id)
    after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return sorted(after - before)
