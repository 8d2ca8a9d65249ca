"""``run.log``: the log lines of a run, in its directory and on the console.

While a run is open, the root logger writes INFO and up to ``<out>/run.log`` (rank 0) and, if
asked, to the console through the progress bars' handler; closing the run removes both and puts
the root logger's level back. A password in a logged URL or command line is shown as ``***``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from snexp.runtime.files import file_mode, open_no_follow, redact
from snexp.runtime.track import TqdmLoggingHandler

__all__ = ["RunLog"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("snexp.runtime.run")  # one logger for the package


class _LogFile(logging.FileHandler):
    """``run.log``: opened without following a link, with the umask's permissions; a password
    in a logged URL or command line is shown as ``***`` (others may read the file)."""

    def _open(self):  # noqa: ANN202 - logging.FileHandler's hook
        fd = open_no_follow(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                            file_mode())
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        # A full disk: the console still shows the line; logging's own report would print a
        # traceback for every line after it.
        pass


class RunLog:
    """The handlers a run adds to the root logger, and the level to put back when it ends."""

    def __init__(self) -> None:
        self.handlers: list[logging.Handler] = []
        self.file: logging.Handler | None = None  # run.log's handler (rank 0, once opened)
        self.root_level = logging.getLogger().level

    def open(self, folder: Path, console: bool) -> None:
        """Log INFO and up to ``<folder>/run.log`` (and to the console if ``console``)."""
        formatter = logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
        self.file = _LogFile(folder / "run.log", encoding="utf-8")
        self.handlers = [self.file, *([TqdmLoggingHandler()] if console else [])]
        root = logging.getLogger()
        for handler in self.handlers:
            handler.setFormatter(formatter)
            handler.setLevel(logging.INFO)
            root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)

    def to_file(self, level: int, message: str, exc_info: Any = None) -> None:
        """Write a line to ``run.log`` only (the console has seen it, as an error, already)."""
        if self.file is not None:
            self.file.handle(logger.makeRecord(logger.name, level, __file__, 0, message, (),
                                               exc_info))

    def close(self) -> None:
        """Remove the handlers and put the root logger's level back."""
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(self.root_level)
