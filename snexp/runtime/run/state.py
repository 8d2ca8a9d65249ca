"""The counters of a run that a checkpoint saves and ``--resume`` puts back.

:class:`RunState` is where the loop stands (steps, epochs, batches into the current epoch), the
best metric so far and the experiment's own state; the checkpoint keeps its fields under keys
of the same names (:mod:`snexp.runtime.run.checkpointer`). The data order and the RNG states,
the other half of an exact resume, live with the data (:mod:`snexp.runtime.run.data`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunState"]


@dataclass
class RunState:
    """Where a run stands; every field is saved in each checkpoint under its own name."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches taken from run.batches() in the current epoch
    best: float | None = None  # best metric so far (run.update_best), or None
    state: dict[str, Any] = field(default_factory=dict)  # the experiment's own saved values

    @classmethod
    def starting_at(cls, checkpoint: Mapping[str, Any] | None) -> RunState:
        """The state before :meth:`restore`: the checkpoint's counters, so that the run's
        start can say where it resumes; ``--resume`` restores the rest on ``attach``."""
        if checkpoint is None:
            return cls()
        return cls(step=int(checkpoint["step"]), epoch=int(checkpoint["epoch"]))

    @property
    def position(self) -> tuple[int, int, int]:
        """(step, epoch, batch_in_epoch): a checkpoint written here needs no rewrite."""
        return self.step, self.epoch, self.batch_in_epoch

    def checkpoint_fields(self) -> dict[str, Any]:
        """The checkpoint's entries for this state (keys ``step``, ``epoch``, ...)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "best": self.best, "state": self.state}

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Put back the rest of what a checkpoint holds (step and epoch came with
        :meth:`starting_at`)."""
        self.batch_in_epoch = int(checkpoint["batch_in_epoch"])
        self.best, self.state = checkpoint["best"], dict(checkpoint["state"])
