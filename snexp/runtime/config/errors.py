"""Errors meant for the person at the command line, and how an entry point shows them.

A :class:`CliError` carries a one-paragraph message, a label and an exit status;
:func:`cli_errors` wraps an entry point's body and prints such an error as
``<prog>: <label>: <message>`` on stderr, without a traceback (real bugs still raise with
theirs). :class:`ConfigError` is the one for mistakes in a config or command line (exit 2).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

__all__ = ["CliError", "ConfigError", "cli_errors"]


class CliError(Exception):
    """An error whose message is meant for the person at the command line.

    :func:`cli_errors` prints it as ``<prog>: <label>: <message>`` without a traceback and
    exits with :attr:`exit_code`.
    """

    exit_code: int = 1
    label: str = "error"


class ConfigError(CliError, ValueError):
    """A mistake in the configuration or the command line; refused before any work starts."""

    exit_code = 2


def _prog_name() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return "python -m " + spec.name.removesuffix(".__main__")
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


@contextlib.contextmanager
def cli_errors(prog: str | None = None) -> Iterator[None]:
    """Turn :class:`CliError` (and Ctrl-C) into one paragraph on stderr and an exit status.

    Wrap an entry point's body in it; real bugs still raise with their traceback.

    Example:
        >>> def main(argv=None):  # doctest: +SKIP
        ...     with cli_errors("python -m nas.search"):
        ...         cfg = parse_args(SearchConfig, argv)
        ...         ...
    """
    name = prog or _prog_name()
    try:
        yield
    except CliError as exc:
        width = max(40, min(120, shutil.get_terminal_size().columns))
        text = " ".join(f"{name}: {exc.label}: {exc}".split())
        print(
            textwrap.fill(text, width=width, break_long_words=False, break_on_hyphens=False),
            file=sys.stderr,
        )
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
