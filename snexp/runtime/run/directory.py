"""The run directory before a run starts: checks of ``--out``, names of new runs, ``run.log``.

Everything a user can get wrong about the directory is refused with a one-paragraph
:class:`~snexp.runtime.config.ConfigError` before anything is written: a non-empty ``--out``
without
``--resume`` or ``--overwrite``, ``--overwrite`` of a folder that is not a run directory, a
``--resume`` without a checkpoint or with a config that changes unsafe keys
(:func:`snexp.runtime.run.resume._check_resumable`). Under torchrun rank 0 alone looks at the disk
and
the other ranks get its verdict. New runs go to ``runs/<experiment>/<YYYYmmdd-HHMMSS>``.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snexp.runtime import distributed
from snexp.runtime.checkpoint import load_checkpoint
from snexp.runtime.config import CONFIG_FILE, ConfigError, RuntimeConfig
from snexp.runtime.run.resume import _check_resumable
from snexp.runtime.track import TqdmLoggingHandler

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _check_directory(folder: Path, runtime: RuntimeConfig, config: Any, *, experiment: str,
                     safe_keys: Sequence[str]) -> dict | None:
    """Refuse unsafe uses of the run directory; on resume, load and check the checkpoint."""
    last = folder / "checkpoints" / "last.pt"
    if runtime.resume:
        if not runtime.out:
            recent = _latest_run(experiment)
            hint = f"; the most recent run is {recent}" if recent else ""
            raise ConfigError(f"--resume needs --out DIR, the run to continue{hint}")
        if not last.is_file():
            what = "does not exist" if not folder.exists() else "has no checkpoints/last.pt"
            raise ConfigError(f"cannot resume: {folder} {what}")
        checkpoint = load_checkpoint(last)
        _check_resumable(checkpoint, config, last, folder=folder, safe_keys=safe_keys)
        return checkpoint
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file, not a directory")
    if folder.exists() and any(folder.iterdir()):
        if not runtime.overwrite:
            raise ConfigError(
                f"run directory {folder} already exists and is not empty; pass --resume to "
                "continue it, --overwrite to delete it and start afresh, or choose another "
                "--out"
            )
        if not (folder / CONFIG_FILE).is_file():
            raise ConfigError(
                f"--overwrite refused: {folder} has no {CONFIG_FILE}, so it does not look "
                "like a run directory; delete it yourself or choose another --out"
            )
    return None


def _check_directory_on_main(folder: Path, runtime: RuntimeConfig, config: Any, *,
                             experiment: str, safe_keys: Sequence[str], is_main: bool,
                             world_size: int) -> dict | None:
    """:func:`_check_directory` on rank 0; the other ranks get its verdict, then read."""
    check = {"experiment": experiment, "safe_keys": safe_keys}
    if world_size == 1:
        return _check_directory(folder, runtime, config, **check)
    error, checkpoint = None, None
    if is_main:
        try:
            checkpoint = _check_directory(folder, runtime, config, **check)
        except ConfigError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)  # also the barrier before the others read
    if error is not None:
        raise ConfigError(error)
    if not is_main and runtime.resume:
        checkpoint = load_checkpoint(folder / "checkpoints" / "last.pt")
    return checkpoint


def _open_log(folder: Path, console: bool) -> list[logging.Handler]:
    """Log INFO and up to ``<folder>/run.log`` (and the console); the file handler is first."""
    formatter = logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(folder / "run.log", encoding="utf-8")]
    if console:
        handlers.append(TqdmLoggingHandler())
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(logging.INFO)
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handlers


def _new_run_dir(experiment: str) -> Path:
    base = Path("runs") / experiment / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def _latest_run(experiment: str) -> Path | None:
    root = Path("runs") / experiment
    runs = sorted(p for p in root.glob("*/checkpoints/last.pt")) if root.is_dir() else []
    return runs[-1].parent.parent if runs else None
