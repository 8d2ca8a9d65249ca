"""A run's checkpoints: what they hold, writing ``last.pt``/``best.pt``, restoring on resume.

A checkpoint is one dict of plain containers and tensors (format version, config, the
:class:`~snexp.runtime.run.state.RunState` fields, model/optimizer/scheduler/scaler state dicts,
RNG states of python, numpy and torch CPU/CUDA of every rank, the data-order generator at the
current step and at the start of the epoch), written atomically by
:func:`snexp.runtime.checkpoint.save_checkpoint`. Whether one may resume a config is
:mod:`snexp.runtime.run.resume`'s question, asked before the run starts.
"""

from __future__ import annotations

import datetime
import logging
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
from snexp.runtime.run.claim import Claim
from snexp.runtime.run.data import DataOrder
from snexp.runtime.run.resume import plain_values
from snexp.runtime.run.state import RunState

__all__ = ["Checkpointer"]

logger = logging.getLogger("snexp.runtime.run")  # one logger for the package


class Checkpointer:
    """The checkpoints of one run directory (rank 0 writes; all ranks call together).

    Args:
        folder: The run directory; checkpoints go to ``<folder>/checkpoints``.
        experiment: The experiment's name, saved in each checkpoint.
        config: The run's config, saved (flattened) in each checkpoint.
        progress: The run's state, saved and restored.
        data: The run's data order, saved and restored.
        scaler: The AMP GradScaler, saved and restored.
        rank: This process's rank (0 writes).
        world_size: The number of ranks (each saves its own RNG states).
        claim: Rank 0's lock on the directory: the first checkpoint commits an ``--overwrite``.
        prog: The command shown in resume hints.
        resume_from: The checkpoint ``--resume`` loaded, restored by :meth:`attach`.

    Attributes:
        objects: What each checkpoint holds, by name (see :meth:`attach`).
        saved_at: The :attr:`RunState.position` of the last ``last.pt`` written or resumed.
    """

    def __init__(self, folder: Path, *, experiment: str, config: Any, progress: RunState,
                 data: DataOrder, scaler: torch.amp.GradScaler, rank: int, world_size: int,
                 claim: Claim | None, prog: str, resume_from: dict | None) -> None:
        self.folder, self.dir = folder, folder / "checkpoints"
        self.experiment, self.config, self.prog = experiment, config, prog
        self.progress, self.data, self.scaler = progress, data, scaler
        self.rank, self.world_size, self.claim = rank, world_size, claim
        self.device = data.device
        self.objects: dict[str, Any] = {}
        self.pending = resume_from  # not yet restored: the loop must wait for attach()
        self.saved_at = (
            (progress.step, progress.epoch, int(resume_from["batch_in_epoch"]))
            if resume_from else None
        )

    @property
    def last(self) -> Path:
        """``checkpoints/last.pt``."""
        return self.dir / "last.pt"

    def attach(self, **objects: Any) -> None:
        """Register what every checkpoint holds and, on ``--resume``, load it back.

        See :meth:`snexp.runtime.run.Run.attach`.

        Raises:
            ConfigError: On resume, the checkpoint lacks one of the objects or has extra ones.
        """
        for name, obj in objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"attach({name}=...): {type(obj).__name__} has no state_dict")
            self.objects[name] = unwrap_model(obj)
        checkpoint, self.pending = self.pending, None
        if checkpoint is None:
            return
        saved = checkpoint["objects"]
        if set(saved) != set(self.objects):
            raise ConfigError(
                f"cannot resume {self.folder}: the checkpoint holds {sorted(saved)}, this run "
                f"attaches {sorted(self.objects)}"
            )
        for name, obj in self.objects.items():
            obj.load_state_dict(saved[name])
        if checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.progress.restore(checkpoint)
        self.data.restore(checkpoint)
        ranks = checkpoint.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank])
        else:
            if ranks is not None or self.world_size > 1:
                logger.warning("the checkpoint holds the RNG states of %d process(es), this run "
                               "has %d: every rank continues from rank 0's (not an exact resume)",
                               len(ranks or [0]), self.world_size)
            set_rng_state(checkpoint["rng"])
        logger.info("resumed from %s at step %d", self.last, self.progress.step)

    def checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint (rank 0; ``None`` on the others). Collective under torchrun."""
        rng = rng_state(self.device)
        ranks = distributed.all_gather_object(rng) if self.world_size > 1 else None
        if self.rank != 0:
            return None
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "experiment": self.experiment,
            "config": plain_values(flatten(self.config)),
            **self.progress.checkpoint_fields(),
            "objects": {name: obj.state_dict() for name, obj in self.objects.items()},
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            **self.data.checkpoint_fields(),
            "torch": str(torch.__version__),
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        if ranks is not None:
            checkpoint["rng_ranks"] = ranks  # every rank's own RNG states, in rank order
        return checkpoint

    def save(self) -> Path:
        """Write ``last.pt`` now (atomically; rank 0) and return its path. Collective.

        Raises:
            ConfigError: The write failed (:meth:`disk_full`).
        """
        checkpoint = self.checkpoint()
        if checkpoint is not None:
            try:
                save_checkpoint(checkpoint, self.last)
            except OSError as exc:  # a full disk, a folder made read-only
                exc.filename = exc.filename or str(self.last)
                raise self.disk_full(exc) from None
            if self.claim is not None:
                self.claim.commit()  # the new run has a checkpoint: the replaced one goes
        self.saved_at = self.progress.position
        return self.last

    def save_best(self) -> None:
        """Write ``best.pt`` now (rank 0). Collective."""
        checkpoint = self.checkpoint()
        if checkpoint is not None:
            save_checkpoint(checkpoint, self.dir / "best.pt")

    def disk_full(self, exc: OSError) -> ConfigError:
        """The one paragraph for a write that failed (a full disk, a folder made read-only).

        The run is refused as a mistake is (:class:`ConfigError`), so a new run without a
        checkpoint is undone: ``--overwrite`` puts the run it replaced back.
        """
        where = exc.filename or self.folder
        head = f"cannot write {where}: {exc.strerror or exc}; free space (or make the folder " \
               "writable), then"
        if self.last.is_file():
            return ConfigError(f"{head} continue from the last checkpoint: {self.prog} --out "
                               f"{self.folder} --resume")
        if self.claim is not None and self.claim.replaced is not None:
            return ConfigError(f"{head} start again; the run that --overwrite replaced is put "
                               f"back in {self.folder} as it was")
        return ConfigError(f"{head} start again (this run had no checkpoint yet, so its "
                           "files are removed)")
