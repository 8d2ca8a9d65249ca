"""Where a run's numbers go: TensorBoard, Optuna studies and progress bars.

- :class:`Tracker` writes TensorBoard events into one directory (``<out>/tb``): scalars,
  images, text, histograms, SN importance (:func:`snexp.norm.importance.log_importance`) and
  hyperparameters with their final metrics in the *same* run. ``SummaryWriter.add_hparams``
  would open a stray timestamped sub-run; we write its three summaries ourselves. On resume a
  ``purge_step`` hides the events written after the checkpoint, so curves do not double.
- :func:`open_study` opens or creates an Optuna study on a storage: SQLite in the run directory
  by default, any RDB URL (PostgreSQL for many workers), or a journal file for several
  processes on one host; a dead worker's trials are failed, not left running
  (:mod:`snexp.runtime.storage`). ``optuna-dashboard <storage>`` shows it
  (:func:`dashboard_command`).
- :func:`progress` makes tqdm bars that stay quiet off-terminal and on non-zero ranks;
  :class:`TqdmLoggingHandler` prints log lines without breaking them.

The tracker does not know what a cell or a Gram matrix is: the loop hands it tags and values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import optuna
import torch
from optuna.storages import BaseStorage
from tqdm.auto import tqdm

from snexp.runtime.config import ConfigError, flatten
from snexp.runtime.files import file_mode, redact
from snexp.runtime.storage import check_storage, make_storage, reap

__all__ = [
    "SQLITE_FILE",
    "check_study_storage",
    "Tracker",
    "TqdmLoggingHandler",
    "dashboard_command",
    "open_storage",
    "open_study",
    "progress",
]

SQLITE_FILE = "optuna.db"  # default study storage inside a run directory
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def _number(value: float | torch.Tensor) -> float:
    return float(value.detach().item() if isinstance(value, torch.Tensor) else value)


class Tracker:
    """TensorBoard logging for one run directory; every method is a no-op when disabled.

    Args:
        log_dir: Directory of the event files (``<out>/tb``); ``None`` disables the tracker.
        purge_step: On resume, the first step not covered by the checkpoint: TensorBoard hides
            older events at this step or later. ``None`` for a fresh run.
        enabled: ``False`` on non-zero ranks of a distributed job.
        flush_secs: How often pending events are written to disk.

    Example:
        >>> with Tracker("runs/demo/tb") as tracker:  # doctest: +SKIP
        ...     tracker.scalars({"loss/total": 2.5, "lr": 1e-3}, step=1)
    """

    def __init__(
        self,
        log_dir: str | Path | None,
        *,
        purge_step: int | None = None,
        enabled: bool = True,
        flush_secs: int = 30,
    ) -> None:
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            if purge_step is not None:
                _wait_for_later_event_name(Path(log_dir))
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=flush_secs)

    @property
    def enabled(self) -> bool:
        """Whether events are written."""
        return self.writer is not None

    def scalar(self, tag: str, value: float | torch.Tensor, step: int) -> None:
        """One scalar, e.g. ``tracker.scalar("child/loss", loss, step)``."""
        if self.writer is not None:
            self.writer.add_scalar(tag, _number(value), step)

    def scalars(
        self, values: Mapping[str, float | torch.Tensor], step: int, *, prefix: str = ""
    ) -> None:
        """Several scalars at one step, each under its own tag (``prefix + key``).

        Unlike ``SummaryWriter.add_scalars`` this writes no sub-runs.
        """
        for tag, value in values.items():
            self.scalar(prefix + tag, value, step)

    def image(self, tag: str, images: torch.Tensor, step: int, *, nrow: int = 8) -> None:
        """An image ``(C, H, W)`` or a batch ``(N, C, H, W)`` shown as a grid; values in [0, 1]."""
        if self.writer is None:
            return
        images = images.detach().float().cpu().clamp(0, 1)
        if images.dim() == 4:
            from torchvision.utils import make_grid

            images = make_grid(images, nrow=nrow, padding=2)  # (C, H', W')
        self.writer.add_image(tag, images, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text (code blocks render), e.g. an architecture or the config."""
        if self.writer is not None:  # event files are as readable as run.log: no passwords
            self.writer.add_text(tag, redact(text), step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """The distribution of a tensor's values."""
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def importance(self, model: torch.nn.Module, step: int, **kwargs: Any) -> None:
        """Log the SN importance weights of every switchable layer of ``model``.

        Delegates to :func:`snexp.norm.importance.log_importance`; ``kwargs`` (``figure=False``)
        are passed on.
        """
        if self.writer is None:
            return
        from snexp.norm.importance import log_importance  # lazy: the core's inspection module

        log_importance(self.writer, getattr(model, "_orig_mod", model), step, **kwargs)

    def hparams(
        self, hparams: Mapping[str, Any] | Any, metrics: Mapping[str, float], *, step: int = 0
    ) -> None:
        """Record hyperparameters and their final metrics in this run (not a sub-run).

        Args:
            hparams: A config dataclass (flattened to dotted keys) or a mapping. Values other
                than numbers and strings are written as text (``none``, ``[a, b]``, ``true``).
            metrics: Final metric values; written as scalars at ``step`` under these tags, which
                the HParams dashboard shows next to the hyperparameters.
            step: Step of the metric scalars.
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        if dataclasses.is_dataclass(hparams) and not isinstance(hparams, type):
            hparams = flatten(hparams)
        values = {k: _hparam_value(v) for k, v in hparams.items()}
        finals = {k: _number(v) for k, v in metrics.items()}
        experiment, start, end = hparams_summary(values, finals)
        file_writer = self.writer.file_writer
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        for tag, value in finals.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        """Write pending events to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later calls are no-ops."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_for_later_event_name(folder: Path) -> None:
    """Sleep until the clock is past the creation second of every event file in ``folder``.

    TensorBoard reads a directory's event files in name order, and a name starts with the second
    it was created in: a resumed writer opened within that second could sort before the events
    its ``purge_step`` is meant to hide.
    """
    seconds = [p.name.split(".")[3] for p in folder.glob("events.out.tfevents.*")]
    latest = max((int(s) for s in seconds if s.isdigit()), default=None)
    if latest is not None and time.time() < latest + 1:
        time.sleep(latest + 1 - time.time())


def _hparam_value(value: Any) -> float | int | str:
    if isinstance(value, bool) or value is None:
        return "none" if value is None else str(value).lower()
    if isinstance(value, str):
        return redact(value)  # a --storage URL's password stays out of the event files
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (tuple, list)):
        return redact("[" + ", ".join(str(v) for v in value) + "]")
    return redact(str(value))


# ----------------------------------------------------------------------------- Optuna


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
        logging.getLogger(__name__).warning(
            "optuna study '%s': trials %s of dead workers marked failed", name, failed)
    logging.getLogger(__name__).info("optuna study '%s' in %s (view: %s)", name, redact(label),
                                     redact(view))
    return study


# ----------------------------------------------------------------------------- progress


def _is_tty(stream: IO[str] | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    rank: int = 0,
    file: IO[str] | None = None,
    leave: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar, off when its stream is not a terminal or on non-zero ranks.

    Put the current numbers in the postfix: ``bar.set_postfix(loss=f"{loss:.3f}")``.

    Args:
        iterable: What to iterate over (or ``None`` and call ``bar.update(n)``).
        total: Number of items, when ``iterable`` has no ``len``.
        desc: Text before the bar, e.g. ``"epoch 3"``.
        rank: Distributed rank; only rank 0 shows a bar.
        file: Stream of the bar (default ``sys.stderr``).
        leave: Keep the finished bar on screen.
        **kwargs: Passed to ``tqdm``.

    Returns:
        The bar (a plain pass-through iterator when disabled).
    """
    file = file if file is not None else sys.stderr
    disable = rank != 0 or not _is_tty(file)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        file=file,
        leave=leave,
        disable=disable,
        dynamic_ncols=True,
        **kwargs,
    )


class TqdmLoggingHandler(logging.StreamHandler):
    """A console handler that prints through ``tqdm.write`` so log lines do not break bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
