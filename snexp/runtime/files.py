"""How snexp writes files: atomically, never through a symbolic link, with the user's umask.

:func:`replace_atomic` is the one writer of whole files (checkpoints, models, ``config.toml``,
the ``.snexp-run`` stamp, figures): a uniquely named temporary file (``O_EXCL``, so a planted
link is never opened), fsync, ``os.replace`` (which replaces a link, never its target). A file
that must be opened in place (the lock, ``run.log``) goes through :func:`open_no_follow`.
New files get the permissions the user's umask allows (``0o666 & ~umask``, as ``open`` gives),
so teammates can read a shared model; a file whose text holds a password (a
``postgresql://user:password@host`` storage URL) is kept to its owner (``0o600``).

``torch.save`` reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]
... unexpected pos``; :func:`replace_atomic` raises the ``OSError`` behind it instead
(:func:`disk_error`), so a failed save is handled as the disk error it is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["disk_error", "file_mode", "has_credentials", "open_no_follow", "redact",
           "replace_atomic"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# scheme://user:password@host: the password is what must not be shown or shared.
_CREDENTIAL = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)([^/\s@]+)(@)")


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:  # read without changing it
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it and set it back
    os.umask(mask)
    return mask


def file_mode(*, private: bool = False) -> int:
    """The permissions of a new file: what ``open`` gives under the user's umask, or 0o600."""
    return 0o600 if private else 0o666 & ~_umask()


def has_credentials(text: str) -> bool:
    """Whether ``text`` holds a URL with a password (``scheme://user:password@host``)."""
    return _CREDENTIAL.search(text) is not None


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` shown as ``***``."""
    return _CREDENTIAL.sub(r"\1***\3", text)


def open_no_follow(path: str | Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` that refuses a symbolic link (``O_NOFOLLOW``) or anything but a regular file.

    Raises:
        OSError: ``ELOOP`` for a link, ``EINVAL`` for a folder, FIFO, device or socket.
    """
    fd = os.open(path, flags | _NOFOLLOW | _CLOEXEC, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def disk_error(exc: BaseException, path: str | Path) -> OSError | None:
    """The disk error behind a failed write, or ``None`` when ``exc`` is not one.

    ``torch.save`` into a file turns the ``OSError`` of a full disk into a ``RuntimeError``
    (``enforce fail at inline_container.cc ... unexpected pos``); the ``OSError`` is its context.
    Where the context is lost, a short write into a folder with no space left is ``ENOSPC``.
    """
    if isinstance(exc, OSError):
        return exc
    if not isinstance(exc, RuntimeError):
        return None
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        if cause.filename is None:
            cause.filename = str(path)
        return cause
    text = str(exc)
    if "inline_container" not in text and "unexpected pos" not in text:
        return None
    with contextlib.suppress(OSError):
        if shutil.disk_usage(Path(path).parent).free < 1 << 20:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"the write failed ({text.splitlines()[0]})", str(path))


def replace_atomic(path: str | Path, write: Callable[[IO[Any]], object], *, binary: bool,
                   private: bool = False) -> None:
    """Write ``path`` through a unique temporary file in its folder, fsync, ``os.replace``.

    Args:
        path: The file to create or replace; a link there is replaced, its target untouched.
        write: Called with the open temporary file.
        binary: Open it in binary mode (else UTF-8 text).
        private: Owner-only permissions (a file holding a password); else the umask's.

    Raises:
        OSError: The write failed (a full disk also when ``torch.save`` reports it as a
            ``RuntimeError``); the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with contextlib.suppress(AttributeError):  # no fchmod on Windows
            os.fchmod(fd, file_mode(private=private))  # mkstemp makes every file 0o600
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        found = disk_error(exc, path)
        if found is not None and found is not exc:
            raise found from None
        raise
