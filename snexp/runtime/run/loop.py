"""The loop's calls of a run: epochs, batches, step accounting, the best metric and stops.

:meth:`Loop.epochs` counts completed epochs and checkpoints at each end; :meth:`Loop.batches`
continues a resumed epoch where it stopped (:class:`~snexp.runtime.run.data.DataOrder`);
:meth:`Loop.step_done` counts a step, checks its loss, logs metrics (the mean over ranks under
torchrun), checkpoints every ``--checkpoint-every`` steps and honours stops;
:meth:`Loop.update_best` keeps ``best.pt``; :meth:`Loop.check_stop` ends the run, checkpoint
written, when SIGINT/SIGTERM asked (:class:`~snexp.runtime.run.stops.StopSignals`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from snexp.runtime import distributed
from snexp.runtime.run.checkpointer import Checkpointer
from snexp.runtime.run.data import DataOrder
from snexp.runtime.run.state import RunState
from snexp.runtime.run.stops import StopSignals, interrupted, non_finite

__all__ = ["Loop"]


class Loop:
    """Epochs, batches and steps of a run, with the checkpoints and stops between them.

    Args:
        progress: The run's state (counted here).
        data: The run's data order.
        checkpoints: Writes ``last.pt`` and ``best.pt``.
        signals: The run's stop signals.
        tracker: Where metrics go (``run.tracker``); replaced when the run directory opens.
        checkpoint_every: ``--checkpoint-every``: steps between checkpoints (0: epoch ends only).
        resume_command: The command that resumes this run, for the stop message.
    """

    def __init__(self, progress: RunState, data: DataOrder, checkpoints: Checkpointer,
                 signals: StopSignals, tracker: Any, *, checkpoint_every: int,
                 resume_command: str) -> None:
        self.progress, self.data, self.checkpoints = progress, data, checkpoints
        self.signals, self.tracker = signals, tracker
        self.checkpoint_every, self.resume_command = checkpoint_every, resume_command
        self.world_size, self.device = data.world_size, data.device

    def epochs(self, total: int) -> Iterator[int]:
        """Epoch numbers from the current one up to ``total`` (exclusive).

        After each epoch's body, the epoch counts as completed and a checkpoint is written; a
        pending SIGINT/SIGTERM then stops the run.
        """
        self._require_attached()
        while self.progress.epoch < total:
            self.data.begin_epoch(self.progress.epoch)
            yield self.progress.epoch
            self.progress.epoch += 1
            self.progress.batch_in_epoch = 0
            self.save()
            self.check_stop()

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The loader's batches for this epoch; after a mid-epoch resume, only the unused ones.

        Use it for the one loader whose batches drive the steps of an epoch
        (:meth:`DataOrder.batches <snexp.runtime.run.data.DataOrder.batches>`).
        """
        self._require_attached()
        yield from self.data.batches(loader)

    def step_done(
        self,
        loss: float | torch.Tensor | None = None,
        metrics: Mapping[str, float | torch.Tensor] | None = None,
    ) -> None:
        """Finish an optimizer step: check the loss, count, log, checkpoint, honour signals.

        Args:
            loss: The step's loss; NaN or infinity stops the run (:class:`~.stops.NonFiniteLoss`)
                without saving, so ``last.pt`` stays the last good checkpoint.
            metrics: Scalars logged to TensorBoard at the new step, e.g.
                ``{"loss/total": loss, "lr": lr}``.

        Under torchrun, all ranks call it at every step with the same metric keys: a stop or
        non-finite loss on any rank stops all (agreed by one all-reduce), and the logged
        metrics are the mean over the ranks.

        Raises:
            NonFiniteLoss: The loss is not finite.
            RunInterrupted: A signal arrived; the checkpoint has been written.
        """
        value = None
        if loss is not None:
            value = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        bad, stop = self.signals.agree(bad=value is not None and not math.isfinite(value))
        if bad:
            shown = value if value is not None and not math.isfinite(value) else "non-finite"
            saved = self.checkpoints.saved_at
            raise non_finite(shown, step=self.progress.step, epoch=self.progress.epoch,
                             last=self.checkpoints.last,
                             saved_step=saved[0] if saved is not None else None)
        self.progress.step += 1
        if metrics:
            if self.world_size > 1:
                numbers = [float(v.detach().item() if isinstance(v, torch.Tensor) else v)
                           for v in metrics.values()]
                total = distributed.all_reduce(numbers, self.device, "sum")
                metrics = {k: v / self.world_size for k, v in zip(metrics, total)}
            self.tracker.scalars(metrics, self.progress.step)
        every = self.checkpoint_every
        if every and self.progress.step % every == 0:
            self.save()
        self._stop_if(stop)

    def update_best(self, value: float, *, mode: Literal["max", "min"] = "max") -> bool:
        """Record a metric; when it beats the best so far, write ``best.pt`` and return True.

        Under torchrun all ranks call it together; rank 0's ``value`` counts.
        """
        if self.world_size > 1:
            value = distributed.broadcast_object(float(value))
        best = self.progress.best
        if best is None or (value > best if mode == "max" else value < best):
            self.progress.best = float(value)
            self.checkpoints.save_best()
            return True
        return False

    def save(self) -> Path:
        """Write ``checkpoints/last.pt`` now and flush the metrics up to it. Collective."""
        path = self.checkpoints.save()
        self.tracker.flush()
        return path

    def check_stop(self, *, where: str | None = None) -> None:
        """If a signal asked to stop: write a checkpoint and raise :class:`~.stops.RunInterrupted`.

        :meth:`step_done` and :meth:`epochs` call it; call it yourself at other safe points
        (e.g. after a long evaluation; under torchrun on all ranks at once: a signal on any
        rank stops all).

        Args:
            where: Where the loop stopped, for the message, when its own count is not
                the step (e.g. ``"step 19 of trial 3"``).
        """
        self._stop_if(self.signals.agree()[1], where=where)

    def _stop_if(self, signum: int | None, *, where: str | None = None) -> None:
        """Stop for ``signum`` (agreed by all ranks), if any: checkpoint, then raise."""
        if signum is None:
            return
        self.signals.adopt(signum)
        path = self.save()
        step, epoch = self.progress.step, self.progress.epoch
        raise interrupted(signum, where=where or f"step {step} ({epoch} epochs completed)",
                          path=path, command=self.resume_command, world_size=self.world_size)

    def _require_attached(self) -> None:
        if self.checkpoints.pending is not None:
            raise RuntimeError(
                "resuming: call run.attach(model=..., optimizer=...) before the loop"
            )
