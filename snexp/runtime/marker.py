"""The stamp that makes a folder a run directory, and the list of what snexp wrote in it.

Every run directory holds ``.snexp-run``, a small JSON file only snexp writes: the experiment,
when the run started, and ``outputs``, the top-level names snexp's writers put there
(:func:`snexp.runtime.checkpoint.save_checkpoint` and
:func:`~snexp.runtime.checkpoint.write_text_atomic` call :func:`record_output`). ``--overwrite``
deletes only a folder with this stamp, and in it only the runtime's own entries
(:data:`RUNTIME_ENTRIES`) and the listed outputs: a file the user put there stays.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snexp.runtime.files import replace_atomic

__all__ = ["LOCK_FILE", "MARKER_FILE", "REPLACED_DIR", "RUNTIME_ENTRIES", "owned_entries",
           "read_marker", "record_output", "write_marker"]

MARKER_FILE = ".snexp-run"  # the stamp: JSON written by snexp only
LOCK_FILE = ".snexp-lock"  # flock'ed by the process running in the directory
REPLACED_DIR = ".snexp-replaced"  # what --overwrite set aside until the new run's checkpoint
# What the runtime itself writes in every run directory (plus the marker, lock and set-aside).
RUNTIME_ENTRIES = (MARKER_FILE, LOCK_FILE, REPLACED_DIR, "config.toml", "run.log", "tb",
                   "checkpoints", "optuna.db", "optuna.db-journal", "optuna.db-wal",
                   "optuna.db-shm")
_KIND = "snexp run directory"


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of ``folder``, or ``None`` where there is none (or not one snexp wrote)."""
    path = Path(folder) / MARKER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") != _KIND:
        return None
    outputs = data.get("outputs")
    data["outputs"] = [str(o) for o in outputs] if isinstance(outputs, list) else []
    return data


def write_marker(folder: str | Path, experiment: str, outputs: Sequence[str] = ()) -> None:
    """Stamp ``folder`` as a run directory of ``experiment`` (atomically)."""
    data = {"kind": _KIND, "experiment": experiment,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "outputs": sorted(set(outputs))}
    _replace(Path(folder) / MARKER_FILE, json.dumps(data, indent=1) + "\n")


def _replace(path: Path, text: str) -> None:
    replace_atomic(path, lambda f: f.write(text), binary=False)


def record_output(path: str | Path) -> None:
    """Note in the enclosing run directory's marker that snexp wrote ``path``.

    Looks in ``path``'s folder and the one above it; outside a run directory this does
    nothing. Only the top-level name is listed (``model.pt``, ``samples/``).
    """
    path = Path(path)
    for folder in (path.parent, path.parent.parent):
        data = read_marker(folder)
        if data is None:
            continue
        name = path.relative_to(folder).parts[0]
        if name not in RUNTIME_ENTRIES and name not in data["outputs"]:
            data["outputs"] = sorted([*data["outputs"], name])
            with contextlib.suppress(OSError):
                _replace(folder / MARKER_FILE, json.dumps(data, indent=1) + "\n")
        return


def owned_entries(folder: str | Path) -> tuple[list[str], list[str]]:
    """The entries of a run directory that snexp wrote, and the others (both sorted).

    The lock file is in neither list: it belongs to whoever holds it.
    """
    folder = Path(folder)
    data = read_marker(folder)
    listed = set(RUNTIME_ENTRIES) | set(data["outputs"] if data else ())
    names = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
    return [n for n in names if n in listed], [n for n in names if n not in listed]
