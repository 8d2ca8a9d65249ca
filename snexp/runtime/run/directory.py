"""The run directory before a run starts: checks of ``--out`` and names of new runs.

Everything a user can get wrong about the directory is refused with a one-paragraph
:class:`~snexp.runtime.config.ConfigError` before anything is written: a non-empty ``--out``
without ``--resume`` or ``--overwrite`` (unless it holds only a start killed before its first
checkpoint, which a new run replaces); ``--overwrite`` of a folder without snexp's stamp
(:mod:`snexp.runtime.marker`) or of a symbolic link; an entry snexp writes (the lock,
``run.log``, ``checkpoints/``, ...) that is a link or a special file; an ``--out`` that cannot
be written or named; a ``--resume`` without a checkpoint or with a config that changes unsafe
keys (:func:`snexp.runtime.run.resume.check_resumable`). Then rank 0 locks the directory
(:mod:`snexp.runtime.run.claim`) and checks again under the lock. Under torchrun rank 0 alone
looks at the disk and the other ranks get its verdict. New runs go to
``runs/<experiment>/<YYYYmmdd-HHMMSS>``.
"""

from __future__ import annotations

import datetime
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snexp.runtime import distributed
from snexp.runtime.checkpoint import load_checkpoint
from snexp.runtime.config import ConfigError, RuntimeConfig
from snexp.runtime.marker import (
    LOCK_FILE,
    MARKER_FILE,
    REPLACED_DIR,
    RUNTIME_ENTRIES,
    read_marker,
)
from snexp.runtime.run.claim import Claim, not_a_file, refuse_if_locked, restore_command
from snexp.runtime.run.resume import check_resumable

__all__ = ["claim_directory_on_main", "killed_start", "new_run_dir"]


def _check_directory(folder: Path, runtime: RuntimeConfig, config: Any, *, experiment: str,
                     safe_keys: Sequence[str], locked: bool = False) -> dict | None:
    """Refuse unsafe uses of the run directory; on resume, load and check the checkpoint.

    ``locked``: this process holds the directory's lock already (the check under the lock).
    """
    _check_name_lengths(folder)
    last = folder / "checkpoints" / "last.pt"
    if folder.is_dir():
        _refuse_links(folder)  # before anything opens them, the lock probe included
    if folder.is_dir() and not locked:
        refuse_if_locked(folder)  # a live run: say so first, whatever else is asked
    if runtime.resume:
        if not runtime.out:
            recent = _latest_run(experiment)
            hint = f"; the most recent run is {recent}" if recent else ""
            raise ConfigError(f"--resume needs --out DIR, the run to continue{hint}")
        if not last.is_file():
            what = "does not exist" if not folder.exists() else "has no checkpoints/last.pt"
            aside = folder / REPLACED_DIR
            hint = (f"; an --overwrite stopped before its first checkpoint left the run it "
                    f"replaced in {aside}; to resume it, put it back with: "
                    f"{restore_command(folder)}"
                    if (aside / "checkpoints" / "last.pt").is_file() else "")
            if not hint and killed_start(folder):
                hint = ("; the run started there was stopped before its first checkpoint, so "
                        "there is nothing to resume: run the same command without --resume "
                        "to start it afresh (the files of the stopped start are replaced)")
            raise ConfigError(f"cannot resume: {folder} {what}{hint}")
        checkpoint = load_checkpoint(last)
        check_resumable(checkpoint, config, last, folder=folder, safe_keys=safe_keys)
        return checkpoint
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file, not a directory")
    if folder.is_dir() and any(p.name != LOCK_FILE for p in folder.iterdir()):
        if not runtime.overwrite and not killed_start(folder):
            raise ConfigError(
                f"run directory {folder} already exists and is not empty; pass --resume to "
                "continue it, --overwrite to delete it and start afresh, or choose another "
                "--out"
            )
        if folder.is_symlink():
            raise ConfigError(
                f"--overwrite refused: --out {folder} is a symbolic link (to "
                f"{folder.resolve()}); --overwrite does not follow links: pass the real path"
            )
        if read_marker(folder) is None:
            raise ConfigError(
                f"--overwrite refused: {folder} has no {MARKER_FILE} stamp, so it is not a run "
                "directory snexp made (runs made before the stamp existed have none either); "
                "--overwrite only deletes what snexp wrote: delete the folder yourself or "
                "choose another --out"
            )
    _check_writable(folder)
    return None


def killed_start(folder: Path) -> bool:
    """Whether ``folder`` holds only a run stopped before its first checkpoint.

    Such a start (killed a second after taking the lock) has nothing worth keeping: only the
    runtime's own files (stamp, ``config.toml``, ``run.log``, ``tb/``, an empty
    ``checkpoints/``), no output, no study database, no run set aside by ``--overwrite``. A
    fresh run in it starts afresh, as ``--overwrite`` would, without being asked to.
    """
    data = read_marker(folder)
    if data is None or data["outputs"]:
        return False
    keep = {"optuna.db", REPLACED_DIR}
    names = [p.name for p in folder.iterdir() if p.name != LOCK_FILE]
    checkpoints = folder / "checkpoints"
    return (all(n in RUNTIME_ENTRIES and n not in keep for n in names)
            and not (checkpoints.is_dir() and any(checkpoints.glob("*.pt"))))


def _check_name_lengths(folder: Path) -> None:
    """Refuse an --out the file system cannot name (a part over NAME_MAX, the whole over
    PATH_MAX), which would otherwise fail deep inside ``mkdir`` or ``stat``."""
    try:
        name_max = os.pathconf(".", "PC_NAME_MAX")
        path_max = os.pathconf(".", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    for part in folder.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(
                f"--out {str(folder)[:60]}...: the name '{part[:40]}...' is "
                f"{len(os.fsencode(part))} bytes long, more than the {name_max} the file "
                "system allows for one name; choose a shorter --out")
    if len(os.fsencode(str(folder.absolute()))) >= path_max:
        raise ConfigError(f"--out {str(folder)[:60]}...: the path is longer than the "
                          f"{path_max} bytes the file system allows; choose a shorter --out")


_FILES = (MARKER_FILE, LOCK_FILE, "config.toml", "run.log", "optuna.db", "optuna.db-journal",
          "optuna.db-wal", "optuna.db-shm")  # entries snexp opens as regular files


def _refuse_links(folder: Path) -> None:
    """Refuse a run directory where an entry snexp writes is a link or a special file.

    snexp never writes through a link (a ``.snexp-lock`` planted as a link to another file
    would be truncated, a ``checkpoints`` link would send checkpoints elsewhere): the user
    removes it, whatever the mode (a new run, ``--resume`` or ``--overwrite``).
    """
    data = read_marker(folder) if not (folder / MARKER_FILE).is_symlink() else None
    names = {*RUNTIME_ENTRIES, *(data["outputs"] if data else ())}
    paths = [folder / name for name in sorted(names)]
    paths += [folder / "checkpoints" / name for name in ("last.pt", "best.pt")]
    for path in paths:
        try:
            mode = path.lstat().st_mode
        except OSError:
            continue  # absent (or checkpoints/ is no folder): nothing is written through it
        if stat.S_ISLNK(mode) or (path.name in _FILES and path.parent == folder
                                  and not stat.S_ISREG(mode)):
            raise not_a_file(path)


def _check_writable(folder: Path) -> None:
    """Refuse an --out whose nearest existing folder cannot be written."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {folder}: {existing} is not writable (read-only folder or file system); "
            "choose a folder you can write to"
        )


def _claim_directory(folder: Path, runtime: RuntimeConfig, config: Any, *, experiment: str,
                     safe_keys: Sequence[str]) -> tuple[dict | None, Claim]:
    """Check the directory, lock it, and check again under the lock (closing the race)."""
    checkpoint = _check_directory(folder, runtime, config, experiment=experiment,
                                  safe_keys=safe_keys)
    last = folder / "checkpoints" / "last.pt"
    seen = _signature(last)
    claim = Claim.take(folder, experiment)
    try:
        if not runtime.resume or _signature(last) != seen:  # another process ran meanwhile
            checkpoint = _check_directory(folder, runtime, config, experiment=experiment,
                                          safe_keys=safe_keys, locked=True)
    except BaseException:
        claim.release(undo=False)
        raise
    # A start killed before its first checkpoint: this run replaces it, as --overwrite would.
    claim.restart = not runtime.resume and not runtime.overwrite and killed_start(folder)
    return checkpoint, claim


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def claim_directory_on_main(folder: Path, runtime: RuntimeConfig, config: Any, *,
                            experiment: str, safe_keys: Sequence[str], is_main: bool,
                            world_size: int) -> tuple[dict | None, Claim | None]:
    """Check, lock and check again the run directory on rank 0 (the other ranks get its
    verdict, then read the checkpoint): ``--resume``'s checkpoint (or ``None``) and the claim.
    """
    check = {"experiment": experiment, "safe_keys": safe_keys}
    if world_size == 1:
        return _claim_directory(folder, runtime, config, **check)
    error, checkpoint, claim = None, None, None
    if is_main:
        try:
            checkpoint, claim = _claim_directory(folder, runtime, config, **check)
        except ConfigError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)  # also the barrier before the others read
    if error is not None:
        raise ConfigError(error)
    if not is_main and runtime.resume:
        checkpoint = load_checkpoint(folder / "checkpoints" / "last.pt")
    return checkpoint, claim


def new_run_dir(experiment: str) -> Path:
    """A new, unused folder ``runs/<experiment>/<YYYYmmdd-HHMMSS>[-n]``."""
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
