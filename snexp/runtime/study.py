"""Optuna studies shared by many workers: storages, samplers, the dashboard command.

Every Optuna name of the runtime lives here, so that only a study's users import optuna and
sqlalchemy (``python -m stylize.apply`` or ``nas.train`` do not):

- :func:`open_study` opens or creates a study on a storage: SQLite in the run directory by
  default, any RDB URL (PostgreSQL for many workers), or a journal file for several processes
  on one host. A dead worker's trials are failed (or re-queued), not left running: heartbeats
  and owner stamps, kept by the backend :mod:`snexp.runtime.storage`. ``optuna-dashboard
  <storage>`` shows it (:func:`dashboard_command`); :func:`check_study_storage` refuses a
  ``--storage`` that cannot work before the run directory is touched.
- :class:`WorkerSeededSampler` gives each worker on one study a distinct, reproducible seed.
  Seeded with the run's ``--seed`` alone, workers started alike would draw the same random
  startup trials (Optuna's TPE samples its first ``n_startup_trials`` independently at
  random). It builds the real sampler at the worker's first trial, seeded by
  :func:`worker_seed` from ``--seed`` and that trial's number, which the storage hands out
  once per study (under a lock on the study's row in SQL databases, in log order in journal
  files), so concurrent workers never share it. What is reproducible:

  - one worker on a new study makes trial 0 and is seeded with ``--seed`` itself: its trials
    are those of a plain ``TPESampler(seed=--seed)``, run after run;
  - a worker joining a study that already holds ``n`` trials is seeded from ``(--seed, n)``:
    the same study contents and seed give the same draws;
  - several workers at once get distinct seeds, but which worker gets which trial numbers, and
    so the history TPE models, depends on timing: such runs are not reproducible (nor are
    they with any seeding), only each worker's seed is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from snexp.runtime.config import ConfigError
from snexp.runtime.files import file_mode, redact
from snexp.runtime.storage import (
    HEARTBEAT_ATTR,
    OWNER_ATTR,
    check_storage,
    fail_dead_owner_trials,
    make_storage,
    reap,
)

__all__ = [
    "HEARTBEAT_ATTR", "OWNER_ATTR", "SQLITE_FILE", "WorkerSeededSampler", "check_study_storage",
    "dashboard_command", "fail_dead_owner_trials", "open_storage", "open_study", "reap",
    "worker_seed",
]

logger = logging.getLogger(__name__)

SQLITE_FILE = "optuna.db"  # default study storage inside a run directory
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


# ----------------------------------------------------------------------------- storages


def _storage_label(storage: str | Path | None, run_dir: str | Path | None) -> str:
    """The URL, or the absolute journal file path, that a ``--storage`` value stands for."""
    if storage is None:
        if run_dir is None:
            raise ValueError("no storage given and no run directory to put optuna.db in")
        return f"sqlite:///{(Path(run_dir) / SQLITE_FILE).resolve()}"
    text = str(storage)
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    return f"sqlite:///{path}" if path.suffix in _SQLITE_SUFFIXES else str(path)


def open_storage(
    storage: str | Path | None = None,
    run_dir: str | Path | None = None,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    retries: int = 0,
    sqlite_timeout: float = 60.0,
) -> BaseStorage:
    """An Optuna storage from a user's ``--storage`` value, safe for many worker processes.

    A worker killed mid-trial does not leave its trial running forever: the next worker that
    opens the study or starts a trial marks it FAIL (see :mod:`snexp.runtime.storage`).

    Args:
        storage: ``None``: SQLite ``<run_dir>/optuna.db``. A URL with ``://`` (``sqlite:///x.db``,
            ``postgresql://user@host/db``): used as is. A path ending in ``.db``, ``.sqlite`` or
            ``.sqlite3``: that SQLite file. Any other path: a journal file
            (``JournalFileBackend``), safe for several processes on one host.
        run_dir: The run directory, needed when ``storage`` is ``None``.
        heartbeat_interval: Seconds between a running trial's heartbeats (``None``: none).
            Journal files also find dead owners on this host by process id.
        grace_period: Seconds without a heartbeat before a trial is failed (``None``: twice
            ``heartbeat_interval``).
        retries: How many times a dead worker's trial is re-queued with its parameters.
        sqlite_timeout: Seconds a SQLite writer waits for another worker's lock.

    Returns:
        An ``RDBStorage`` or ``JournalStorage``, as ``optuna.create_study`` takes them.

    Raises:
        ConfigError: A file storage whose folder does not exist.
    """
    label = _storage_label(storage, run_dir)
    file = Path(label.removeprefix("sqlite:///"))
    if (label.startswith("sqlite:///") or "://" not in label) and not file.parent.is_dir():
        raise ConfigError(f"storage '{redact(str(storage))}': folder '{file.parent}' does not "
                          "exist")
    new = label.startswith("sqlite:///") and not file.exists()
    made = make_storage(label, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                        retries=retries, sqlite_timeout=sqlite_timeout)
    if new and file.is_file() and not file.is_symlink():
        with contextlib.suppress(OSError):  # SQLite creates 0o644 whatever the umask allows
            os.chmod(file, file_mode())
    return made


def check_study_storage(storage: str | Path | None, study: str | None = None) -> None:
    """Refuse a ``--storage`` value (and ``--study`` name) that cannot work, before anything
    is created.

    ``None`` (the run directory's ``optuna.db``) always can. Entry points call this before
    the run directory is touched; :func:`open_storage` checks the same again.

    Raises:
        ConfigError: An empty value (``--storage ""`` would be the working folder, ``--study
            ""`` a study nobody can name), an unknown URL scheme, a missing driver or folder,
            or an existing file that is neither a SQLite database nor an Optuna journal.
    """
    if storage is not None and not str(storage).strip():
        raise ConfigError("--storage is empty; pass a database URL or file (e.g. --storage "
                          "study.db), or leave it out for the run directory's optuna.db")
    if study is not None and not study.strip():
        raise ConfigError("--study is empty; pass a study name (workers sharing a storage "
                          "share a study by its name), or leave it out for the default")
    if storage is not None:
        check_storage(_storage_label(storage, None))


def dashboard_command(storage: str | Path | None = None, run_dir: str | Path | None = None) -> str:
    """The shell command that shows a storage's studies, e.g. ``optuna-dashboard sqlite:///x.db``.

    Takes the same ``storage`` and ``run_dir`` as :func:`open_storage`.
    """
    return f"optuna-dashboard {_storage_label(storage, run_dir)}"


def open_study(
    name: str,
    *,
    storage: str | Path | BaseStorage | None = None,
    run_dir: str | Path | None = None,
    direction: str | None = None,
    directions: Sequence[str] | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    user_attrs: Mapping[str, Any] | None = None,
    **storage_options: Any,
) -> optuna.Study:
    """Open the study ``name`` on a storage, creating it if needed (``load_if_exists=True``).

    Args:
        name: Study name.
        storage: See :func:`open_storage`; a ready storage object is used as is.
        run_dir: Run directory for the default SQLite file.
        direction: ``"maximize"`` or ``"minimize"`` for one objective (default maximize).
        directions: Several objectives (multi-objective study); excludes ``direction``.
        sampler: Optuna sampler (``None``: Optuna's default, TPE).
        pruner: Optuna pruner (``None``: Optuna's default, median).
        user_attrs: Stored on the study with ``set_user_attr`` (JSON values).
        **storage_options: ``heartbeat_interval``, ``grace_period``, ``retries``,
            ``sqlite_timeout`` of :func:`open_storage`.

    Returns:
        The study, with the trials of dead workers already failed (or re-queued). Where it
        lives and the dashboard command are logged.

    Raises:
        ConfigError: The study exists with other optimization directions.

    Example:
        >>> study = open_study("search", run_dir="runs/nas/demo")  # doctest: +SKIP
    """
    if direction is not None and directions is not None:
        raise ValueError("open_study: give direction or directions, not both")
    wanted = [d.lower() for d in (directions or [direction or "maximize"])]
    if isinstance(storage, BaseStorage):
        label, view = type(storage).__name__, "optuna-dashboard <storage>"
    else:
        label, view = _storage_label(storage, run_dir), dashboard_command(storage, run_dir)
        storage = open_storage(storage, run_dir, **storage_options)
    # NOTE: Optuna logs through its own stderr handler by default; route its records to ours
    # (run.log and the bar-safe console) instead.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        directions=wanted,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    have = [d.name.lower() for d in study.directions]
    if have != wanted:
        raise ConfigError(
            f"study '{name}' in {label} already exists and optimizes {have}, not {wanted}; "
            "pick another study name or storage"
        )
    for key, value in (user_attrs or {}).items():
        study.set_user_attr(key, value)
    if failed := reap(study):
        logger.warning("optuna study '%s': trials %s of dead workers marked failed", name, failed)
    logger.info("optuna study '%s' in %s (view: %s)", name, redact(label), redact(view))
    return study


# ----------------------------------------------------------------------------- samplers


def worker_seed(seed: int, first_trial: int) -> int:
    """The sampler seed of a worker whose first trial of the study has number ``first_trial``.

    Args:
        seed: The run's ``--seed``.
        first_trial: The number of the first trial this worker makes.

    Returns:
        ``seed`` itself for trial 0 (a lone worker on a new study); otherwise a 32-bit seed
        mixed from both by numpy's ``SeedSequence``.
    """
    if first_trial == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**32, first_trial]).generate_state(1)[0])


class WorkerSeededSampler(BaseSampler):
    """A sampler built at this worker's first trial, seeded with :func:`worker_seed`.

    Args:
        make: Builds the real sampler from a keyword ``seed``, e.g. ``optuna.samplers.
            TPESampler`` or ``functools.partial(TPESampler, n_startup_trials=10)``.
        seed: The run's ``--seed``.

    Attributes:
        worker_seed: The seed in use (``None`` before the first trial).

    Example:
        >>> sampler = WorkerSeededSampler(optuna.samplers.TPESampler, seed=0)
        >>> study = open_study("search", storage="studies.log", sampler=sampler)  # doctest: +SKIP
    """

    def __init__(self, make: Callable[..., BaseSampler], seed: int) -> None:
        self._make, self.seed = make, seed
        self.worker_seed: int | None = None
        self._sampler: BaseSampler | None = None

    def _inner(self) -> BaseSampler:
        if self._sampler is None:
            raise RuntimeError("WorkerSeededSampler is built at the first trial (before_trial)")
        return self._sampler

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._sampler is None:
            self.worker_seed = worker_seed(self.seed, trial.number)
            self._sampler = self._make(seed=self.worker_seed)
            logger.info("optuna study '%s': this worker's sampler seed is %d (--seed %d, first "
                        "trial %d)", study.study_name, self.worker_seed, self.seed, trial.number)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._inner().infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._inner().sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._inner().sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner().after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._sampler is not None:
            self._sampler.reseed_rng()
