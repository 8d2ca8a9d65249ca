"""``python -m snexp.inspect CHECKPOINT [--png FILE]``: what each SN layer of a checkpoint uses.

Reads a state dict (or a checkpoint holding one) with ``weights_only=True``
(:func:`snexp.norm.importance.load_weights`, which the runtime's checkpoints use too), prints
one row per SN layer (mean and variance weight of each candidate) and draws the SN paper's
stacked-bar figure. The functions behind it live in :mod:`snexp.norm.importance` (re-exported
here).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from snexp.norm.importance import (
    Importance,
    format_importance,
    importance,
    importance_from_state_dict,
    load_weights,
    log_importance,
    plot_importance,
)

__all__ = ["Importance", "importance", "importance_from_state_dict", "format_importance",
           "plot_importance", "log_importance", "main"]

_PROG = "python -m snexp.inspect"


class _UsageError(Exception):
    """A mistake on the command line: one line on stderr, status 2 (no runtime import)."""


def _load(path: str) -> object:
    """The object saved in ``path`` (``weights_only``), or a _UsageError saying what is wrong."""
    try:
        return load_weights(path)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _check_png(path: str) -> None:
    """Refuse a --png whose folder is missing or whose extension matplotlib cannot write."""
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        raise _UsageError(f"--png {path}: folder '{folder}' does not exist; create it first "
                          "or pick another path")
    if not os.access(folder, os.W_OK):
        raise _UsageError(f"--png {path}: folder '{folder}' is not writable")
    if target.suffix.lower() not in ("", ".png"):
        raise _UsageError(f"--png {path}: the figure is a PNG file; name it *.png")


def _run(args: argparse.Namespace) -> int:
    if args.png:
        _check_png(args.png)  # before the work, not after it
    state = _load(args.checkpoint)
    try:
        imp = importance_from_state_dict(state)
    except ValueError as exc:
        raise _UsageError(f"{args.checkpoint}: {exc}") from None
    if not imp:
        raise _UsageError(f"{args.checkpoint} holds no SN layers (no '*.mean_weight' keys)")
    print(format_importance(imp))
    if args.png:
        plot_importance(imp, args.png)
        print(f"figure written to {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m snexp.inspect CHECKPOINT [--png FILE]``; returns the exit status.

    A mistake (missing, empty or unreadable file, a checkpoint missing keys, a --png into a
    missing folder) is one line on stderr and status 2, found before any work.
    """
    parser = argparse.ArgumentParser(
        prog=_PROG, description="Print the SN importance weights stored in a checkpoint.")
    parser.add_argument("checkpoint", help="a .pt file: a state dict or a checkpoint holding one")
    parser.add_argument("--png", help="also draw the stacked-bar figure into this PNG file")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except _UsageError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
