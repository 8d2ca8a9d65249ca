"""What a run's checkpoint holds, how it is written, and how ``--resume`` restores it.

A checkpoint is one dict of plain containers and tensors (format version, config, counters,
model/optimizer/scheduler/scaler state dicts, experiment state, RNG states of python, numpy and
torch CPU/CUDA of every rank, the data-order generator at the current step and at the start of
the epoch), written atomically by :func:`snexp.runtime.checkpoint.save_checkpoint`. A run resumes
only with the same config, except the keys that steer the process rather than the computation
(:data:`RUNTIME_SAFE_KEYS` and the experiment's own ``safe_keys``).
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch

from snexp.runtime import distributed
from snexp.runtime.checkpoint import (
    CHECKPOINT_FORMAT,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)
from snexp.runtime.config import ConfigError, flatten
from snexp.runtime.config.resolve import upgrade_flat

__all__ = ["RUNTIME_SAFE_KEYS"]

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
_REQUIRED = ("config", "step", "epoch", "batch_in_epoch", "best", "state", "objects", "scaler",
             "rng", "data_rng")


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
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


def _check_resumable(checkpoint: Mapping[str, Any], config: Any, path: Path, *, folder: Path,
                     safe_keys: Sequence[str]) -> None:
    """Refuse a checkpoint of another format, or a config that changes keys not safe_keys."""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"cannot resume from {path}: checkpoint format {checkpoint.get('format')!r}, "
            f"this code reads format {CHECKPOINT_FORMAT}"
        )
    missing = [k for k in _REQUIRED if k not in checkpoint]
    if missing or not isinstance(checkpoint.get("config"), Mapping):
        raise ConfigError(
            f"cannot resume from {path}: the checkpoint lacks {', '.join(missing) or 'config'}, "
            "so it was not written by a complete snexp run; start a new run with another --out"
        )
    # a checkpoint written before a section folded some keys into others reads as it would now
    saved = _plain(upgrade_flat(type(config), checkpoint["config"]))
    now = _plain(flatten(config))
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


class _Checkpoints:
    """What :class:`snexp.runtime.run.Run` checkpoints: attach, save, restore (a mixin on its
    state)."""

    experiment: str
    config: Any
    dir: Path
    checkpoint_dir: Path
    device: torch.device
    rank: int
    world_size: int
    is_main: bool
    step: int
    epoch: int
    best: float | None
    state: dict[str, Any]
    generator: torch.Generator
    scaler: torch.amp.GradScaler
    tracker: Any
    _objects: dict[str, Any]
    _checkpoint: dict | None
    _batch_in_epoch: int
    _skip: int
    _epoch_rng: torch.Tensor
    _saved_at: tuple[int, int, int] | None
    _claim: Any

    def attach(self, **objects: Any) -> None:
        """Register what every checkpoint holds and, on ``--resume``, load it back.

        Pass models (the plain module, or a compiled/DDP one: its inner module is used),
        optimizers, LR schedulers and anything else with ``state_dict``/``load_state_dict``.
        Attach everything in one call. The AMP scaler is included automatically. On resume
        this also restores the counters, :attr:`best`, :attr:`state` and all RNG states, so
        call it after building everything and right before the loop.

        Raises:
            ConfigError: On resume, the checkpoint lacks one of the objects or has extra ones.
        """
        for name, obj in objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"attach({name}=...): {type(obj).__name__} has no state_dict")
            self._objects[name] = unwrap_model(obj)
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is None:
            return
        saved = checkpoint["objects"]
        if set(saved) != set(self._objects):
            raise ConfigError(
                f"cannot resume {self.dir}: the checkpoint holds {sorted(saved)}, this run "
                f"attaches {sorted(self._objects)}"
            )
        for name, obj in self._objects.items():
            obj.load_state_dict(saved[name])
        if checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.best, self.state = checkpoint["best"], dict(checkpoint["state"])
        self._batch_in_epoch = self._skip = int(checkpoint["batch_in_epoch"])
        self._epoch_rng = checkpoint["data_rng"]["epoch_start"]
        self.generator.set_state(checkpoint["data_rng"]["now"])
        ranks = checkpoint.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank])
        else:
            if ranks is not None or self.world_size > 1:
                logger.warning("the checkpoint holds the RNG states of %d process(es), this run "
                               "has %d: every rank continues from rank 0's (not an exact resume)",
                               len(ranks or [0]), self.world_size)
            set_rng_state(checkpoint["rng"])
        logger.info("resumed from %s at step %d", self.checkpoint_dir / "last.pt", self.step)

    def _checkpoint_dict(self) -> dict[str, Any] | None:
        """The checkpoint (rank 0; ``None`` on the others). Collective under torchrun."""
        rng = rng_state(self.device)
        ranks = distributed.all_gather_object(rng) if self.world_size > 1 else None
        if not self.is_main:
            return None
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "experiment": self.experiment,
            "config": _plain(flatten(self.config)),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "best": self.best,
            "state": self.state,
            "objects": {name: obj.state_dict() for name, obj in self._objects.items()},
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "data_rng": {"now": self.generator.get_state(), "epoch_start": self._epoch_rng},
            "torch": str(torch.__version__),
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        if ranks is not None:
            checkpoint["rng_ranks"] = ranks  # every rank's own RNG states, in rank order
        return checkpoint

    def _disk_full(self, exc: OSError) -> ConfigError:
        """The one paragraph for a write that failed (a full disk, a folder made read-only).

        The run is refused as a mistake is (:class:`ConfigError`), so a new run without a
        checkpoint is undone: ``--overwrite`` puts the run it replaced back.
        """
        where = exc.filename or self.dir
        head = f"cannot write {where}: {exc.strerror or exc}; free space (or make the folder " \
               "writable), then"
        if (self.checkpoint_dir / "last.pt").is_file():
            return ConfigError(f"{head} continue from the last checkpoint: {self._prog} --out "
                               f"{self.dir} --resume")
        if self._claim is not None and self._claim.replaced is not None:
            return ConfigError(f"{head} start again; the run that --overwrite replaced is put "
                               f"back in {self.dir} as it was")
        return ConfigError(f"{head} start again (this run had no checkpoint yet, so its "
                           "files are removed)")

    def save(self) -> Path:
        """Write ``checkpoints/last.pt`` now (atomically) and return its path.

        Under torchrun all ranks call it together; rank 0 writes.
        """
        path = self.checkpoint_dir / "last.pt"
        checkpoint = self._checkpoint_dict()
        if checkpoint is not None:
            try:
                save_checkpoint(checkpoint, path)
            except OSError as exc:  # a full disk, a folder made read-only
                exc.filename = exc.filename or str(path)
                raise self._disk_full(exc) from None
            if self._claim is not None:
                self._claim.commit()  # the new run has a checkpoint: the replaced one goes
        self._saved_at = (self.step, self.epoch, self._batch_in_epoch)
        self.tracker.flush()
        return path
