"""A folder's whole content as a value, for tests that check nothing on disk changed."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file bytes, link targets, folders."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            out[name] = f"-> {os.readlink(path)}"
        elif path.is_file():
            out[name] = path.read_bytes()
        else:
            out[name] = "dir"
    return out
