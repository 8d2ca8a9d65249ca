"""Rank 0's hold on a run directory: the lock, the stamp, and a reversible ``--overwrite``.

Once every input is checked (:mod:`snexp.runtime.run.directory`), :meth:`Claim.take` creates
the directory and locks ``<out>/.snexp-lock`` with ``flock`` for the whole run: a second
process on the same directory (a fresh run, a ``--resume`` or an ``--overwrite``) is refused
with the holder's pid, host and command, and the lock goes away with the process, even on
SIGKILL. ``--overwrite`` does not delete the old run at once: :meth:`Claim.set_aside` moves
the entries snexp wrote (:func:`snexp.runtime.marker.owned_entries`) into ``.snexp-replaced``,
leaving the user's own files where they are, and :meth:`Claim.commit` deletes them once the
new run has written its first checkpoint (or ended cleanly). If the new run is refused before
that (a :class:`~snexp.runtime.config.ConfigError`: a typo in an input found while building
the data), :meth:`Claim.release` puts the old run back; a fresh run refused that way leaves
no directory behind, so the same ``--out`` can be retried.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

from snexp.runtime.config import ConfigError
from snexp.runtime.files import open_no_follow, redact
from snexp.runtime.marker import (
    LOCK_FILE,
    REPLACED_DIR,
    RUNTIME_ENTRIES,
    owned_entries,
    read_marker,
    write_marker,
)

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

__all__ = ["Claim", "disk_error", "not_a_file", "refuse_if_locked", "restore_command"]

logger = logging.getLogger("snexp.runtime.run")


def disk_error(folder: Path, exc: OSError) -> ConfigError:
    """The one-paragraph message of a directory that cannot be written."""
    return ConfigError(
        f"cannot write the run directory {folder}: {exc.strerror or exc} "
        f"({exc.filename or folder}); choose a writable --out with free space"
    )


def not_a_file(path: Path) -> ConfigError:
    """The one-paragraph refusal of a run-directory entry that is a link or not a file."""
    what = (f"a symbolic link (to {os.readlink(path)})" if path.is_symlink()
            else "not a regular file")
    return ConfigError(
        f"{path} is {what}; snexp never writes through links or into special files in a run "
        "directory (a link planted there would make it overwrite the file it points to): "
        f"remove it (rm {path}) if you put it there, or choose another --out")


def _holder() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            # the lock file is readable by others: a password on the command line is not shown
            "command": redact(" ".join([os.path.basename(sys.executable), *sys.argv]))[:300],
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (f"process {info['pid']} on {info['host']} (running since {info['since']}: "
                f"{info['command']})")
    except (ValueError, KeyError, TypeError):
        return "another process"


def refuse_if_locked(folder: Path) -> None:
    """Refuse a directory another process holds, without writing anything (a shared probe)."""
    if fcntl is None:
        return
    try:
        # non-blocking: opening a FIFO planted as the lock must not hang the probe
        fd = open_no_follow(folder / LOCK_FILE, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return  # no lock file (or not a file: refused by the directory checks): nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _in_use(folder, os.pread(fd, 4096, 0).decode("utf-8", "replace")) from None
    finally:
        os.close(fd)


def _in_use(folder: Path, text: str) -> ConfigError:
    return ConfigError(f"run directory {folder} is in use by {_describe_holder(text)}; wait for "
                       "it to end (or stop it), or choose another --out")


def restore_command(folder: Path) -> str:
    """The shell command that puts back the run an ``--overwrite`` set aside.

    The stopped new run's own entries (its ``config.toml``, ``run.log``, ``tb/``,
    ``checkpoints/``, stamp) are in the way of moving the old ones back: they go first.
    """
    aside = folder / REPLACED_DIR
    owned, _ = owned_entries(folder)
    ours = [shlex.quote(str(folder / n)) for n in owned if n != REPLACED_DIR]
    theirs = [shlex.quote(str(p)) for p in sorted(aside.iterdir())] if aside.is_dir() else []
    steps = [f"rm -r -- {' '.join(ours)}"] if ours else []
    steps += [f"mv -- {' '.join(theirs)} {shlex.quote(str(folder))}/",
              f"rmdir -- {shlex.quote(str(aside))}"]
    return " && ".join(steps)


class Claim:
    """The lock on a run directory and what ``--overwrite`` set aside (rank 0 only)."""

    def __init__(self, folder: Path, experiment: str) -> None:
        self.folder = folder
        self.experiment = experiment
        self.created = False  # this process made the directory
        self.fresh = False  # a new run (not a resume): its files may be removed on refusal
        self.replaced: Path | None = None  # the old run, set aside by --overwrite
        self.committed = False
        self._fd: int | None = None
        self._new_lock = False  # the lock file did not exist before this process
        self.note = ""  # what set_aside did, for the run's log
        self.restart = False  # the folder holds only a start killed before its checkpoint

    @classmethod
    def take(cls, folder: Path, experiment: str) -> Claim:
        """Create ``folder`` if needed and lock it; refuse if another process holds it."""
        claim = cls(folder, experiment)
        try:
            claim.created = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / LOCK_FILE
            claim._new_lock = not path.exists()
            # never through a link: a planted .snexp-lock -> victim would be truncated
            fd = open_no_follow(path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EINVAL):
                raise not_a_file(path) from None
            raise disk_error(folder, exc) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                raise _in_use(folder, text) from None
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino != os.stat(path).st_ino:  # removed while we waited
                    os.close(fd)
                    raise ConfigError(f"run directory {folder} changed while this run "
                                      "started; start it again")
        claim._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        except OSError as exc:
            claim.release(undo=False)
            raise disk_error(folder, exc) from None
        return claim

    def start(self, *, overwrite: bool, resume: bool) -> None:
        """Set the old run aside (``--overwrite``), remove stale temporary files, stamp."""
        self.fresh = not resume
        if overwrite:
            self.set_aside()
        data = read_marker(self.folder)
        ours = {*RUNTIME_ENTRIES, *(data["outputs"] if data else ())}
        for tmp in [*self.folder.glob(".*.tmp"), *self.folder.glob("checkpoints/.*.tmp")]:
            name = tmp.name[1:-len(".tmp")].rpartition(".")[0]  # .<name>.<random>.tmp
            if tmp.parent.name == "checkpoints" or name in ours:
                with contextlib.suppress(OSError):
                    tmp.unlink()  # left by a killed write; no one else writes here now
        if not resume or data is None:
            write_marker(self.folder, self.experiment)

    def set_aside(self) -> None:
        """Move the entries snexp wrote into ``.snexp-replaced`` (the user's files stay)."""
        old = self.folder / REPLACED_DIR
        owned, kept = owned_entries(self.folder)
        owned = [name for name in owned if name != REPLACED_DIR]
        if old.is_dir() and not (self.folder / "checkpoints" / "last.pt").is_file():
            # An earlier --overwrite stopped before its first checkpoint: the run it set aside
            # is still the last one with a checkpoint, so it stays aside (and comes back if
            # this run is refused too); what that stopped run wrote goes.
            for name in owned:
                path = self.folder / name
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            self.replaced = old
            self.note = (f"--overwrite: {old} still holds the run an earlier --overwrite "
                         "replaced (that one stopped before its first checkpoint); it stays "
                         "there until this run's first checkpoint")
            return
        if old.is_dir():
            shutil.rmtree(old)  # left by a failed clean-up after a checkpoint: nothing in it
        if not owned:
            return
        old.mkdir()
        for name in owned:
            os.rename(self.folder / name, old / name)
        self.replaced = old
        if self.restart:  # nothing of a start without a checkpoint is worth putting back
            shutil.rmtree(old)
            self.replaced = None
            self.note = (f"{self.folder} held only a run stopped before its first checkpoint; "
                         "starting afresh in its place")
            return
        self.note = (f"--overwrite: the previous run's {len(owned)} entries are set aside in "
                     f"{old} until this run's first checkpoint"
                     + (f"; kept {len(kept)} entries snexp did not write: "
                        f"{', '.join(kept[:5])}" if kept else ""))

    def commit(self) -> None:
        """The new run has a checkpoint: delete what ``--overwrite`` set aside."""
        if self.committed:
            return
        self.committed = True
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def release(self, *, undo: bool) -> None:
        """Unlock; with ``undo`` (a refused new run), remove its files and restore the old."""
        if undo and not self.committed and (self.fresh or self.replaced is not None):
            with contextlib.suppress(OSError):
                self._undo()
        elif self.replaced is not None and not self.committed:
            logger.warning("the run this one replaced stays in %s until a run in %s writes a "
                           "checkpoint; to put it back (and resume it): %s", self.replaced,
                           self.folder, restore_command(self.folder))
        if self._fd is not None:
            os.close(self._fd)  # the flock goes with it
            self._fd = None

    def _undo(self) -> None:
        owned, _ = owned_entries(self.folder)
        for name in owned:
            if name == REPLACED_DIR:
                continue
            path = self.folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if self.replaced is not None:
            for entry in self.replaced.iterdir():
                os.rename(entry, self.folder / entry.name)
            self.replaced.rmdir()
            self.replaced = None
        if self._new_lock:
            (self.folder / LOCK_FILE).unlink()  # the folder is as it was (we still hold it)
        if self.created and not any(self.folder.iterdir()):
            self.folder.rmdir()
