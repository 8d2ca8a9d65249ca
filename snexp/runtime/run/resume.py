"""Whether a checkpoint may resume a config: its format, its entries, the config's changes.

A run resumes only from a checkpoint of this code's format that holds every entry a complete
run writes (:data:`CHECKPOINT_KEYS`), and only with the same config, except the keys that steer
the process rather than the computation (:data:`RUNTIME_SAFE_KEYS` and the experiment's own
``safe_keys``). The checkpoint itself is written and restored by
:mod:`snexp.runtime.run.checkpointer`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from snexp.runtime.checkpoint import CHECKPOINT_FORMAT
from snexp.runtime.config import ConfigError, flatten
from snexp.runtime.config.resolve import upgrade_flat

__all__ = ["CHECKPOINT_KEYS", "RUNTIME_SAFE_KEYS", "check_resumable", "plain_values"]

logger = logging.getLogger("snexp.runtime.run")  # one logger for the package

# Keys that may change when resuming: they steer the process, not the computation.
RUNTIME_SAFE_KEYS: tuple[str, ...] = (
    "runtime.out",
    "runtime.resume",
    "runtime.overwrite",
    "runtime.checkpoint_every",
    "runtime.device",
    "runtime.channels_last",
    "runtime.compile",
)

# What every checkpoint of this format holds (rng_ranks only under torchrun).
CHECKPOINT_KEYS = ("config", "step", "epoch", "batch_in_epoch", "best", "state", "objects",
                   "scaler", "rng", "data_rng")


def plain_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Config values as checkpoint-safe plain data (tuples become lists; a text value such as
    a ``NormSpec`` its text, which ``torch.load(weights_only=True)`` reads)."""
    return {k: _plain_value(v) for k, v in values.items()}


def _plain_value(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain_value(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float)) else str(value)


def _same(a: Any, b: Any) -> bool:
    """Config values equal, where ``nan`` equals ``nan`` (a config may hold one)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_resumable(checkpoint: Mapping[str, Any], config: Any, path: Path, *, folder: Path,
                     safe_keys: Sequence[str]) -> None:
    """Refuse a checkpoint of another format, or a config that changes keys not safe_keys."""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"cannot resume from {path}: checkpoint format {checkpoint.get('format')!r}, "
            f"this code reads format {CHECKPOINT_FORMAT}"
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint]
    if missing or not isinstance(checkpoint.get("config"), Mapping):
        raise ConfigError(
            f"cannot resume from {path}: the checkpoint lacks {', '.join(missing) or 'config'}, "
            "so it was not written by a complete snexp run; start a new run with another --out"
        )
    # a checkpoint written before a section folded some keys into others reads as it would now
    saved = plain_values(upgrade_flat(type(config), checkpoint["config"]))
    now = plain_values(flatten(config))
    differing = []
    for key in sorted(set(saved) | set(now)):
        if key not in saved or key not in now:
            where = "this code" if key not in saved else "the checkpoint"
            logger.warning("config key %s exists only in %s; ignored for resume", key, where)
        elif not _same(saved[key], now[key]) and not any(fnmatchcase(key, p) for p in safe_keys):
            differing.append(f"{key} ({saved[key]!r} -> {now[key]!r})")
    if differing:
        hidden = ("runtime.out", "runtime.resume", "runtime.overwrite")
        safe = ", ".join(k for k in safe_keys if k not in hidden)
        raise ConfigError(
            f"cannot resume {folder} with a different config: {'; '.join(differing)}. "
            f"Only these keys may change on resume: {safe}. Resume without those changes, "
            "or start a new run with another --out."
        )
