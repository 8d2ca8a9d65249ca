"""The loop's calls of a run: epochs, batches, step accounting and the best metric.

:meth:`~_Loop.epochs` counts completed epochs and checkpoints at each end;
:meth:`~_Loop.batches` skips, after a mid-epoch resume, the batches already used (reloading
them in the same order and putting the RNG states back, so random transforms continue where
they stopped); :meth:`~_Loop.step_done` counts a step, checks its loss, logs metrics (the mean
over ranks under torchrun), checkpoints every ``--checkpoint-every`` steps and honours stops;
:meth:`~_Loop.update_best` keeps ``best.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DistributedSampler

from snexp.runtime import distributed
from snexp.runtime.checkpoint import rng_state, save_checkpoint, set_rng_state
from snexp.runtime.config import RuntimeConfig
from snexp.runtime.run.stops import NonFiniteLoss


class _Loop:
    """Epochs, batches and steps of :class:`snexp.runtime.run.Run` (a mixin; ``Run`` sets the
    state)."""

    runtime: RuntimeConfig
    checkpoint_dir: Path
    device: torch.device
    world_size: int
    step: int
    epoch: int
    best: float | None
    generator: torch.Generator
    tracker: Any
    _samplers: list[DistributedSampler]
    _checkpoint: dict | None
    _batch_in_epoch: int
    _skip: int
    _epoch_rng: torch.Tensor
    _stop_signal: int | None

    def epochs(self, total: int) -> Iterator[int]:
        """Epoch numbers from the current one up to ``total`` (exclusive).

        After each epoch's body, the epoch counts as completed and a checkpoint is written; a
        pending SIGINT/SIGTERM then stops the run.
        """
        self._require_attached()
        while self.epoch < total:
            if self._skip == 0:
                self._epoch_rng = self.generator.get_state()
            for sampler in self._samplers:
                sampler.set_epoch(self.epoch)
            yield self.epoch
            self.epoch += 1
            self._batch_in_epoch = 0
            self.save()
            self.check_stop()

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The loader's batches for this epoch; after a mid-epoch resume, only the unused ones.

        The skipped batches are loaded again (in the same order, since the loader draws its
        order from :attr:`generator`) and dropped; the global RNG states are put back after
        skipping, so random transforms continue exactly where they stopped. Use it for the one
        loader whose batches drive the steps of an epoch.
        """
        self._require_attached()
        skip, self._skip = self._skip, 0
        if skip:
            rng = rng_state(self.device)
            self.generator.set_state(self._epoch_rng)
        for index, batch in enumerate(loader):
            if index < skip:
                if index == skip - 1:
                    set_rng_state(rng)
                continue
            self._batch_in_epoch = index + 1
            yield batch

    def step_done(
        self,
        loss: float | torch.Tensor | None = None,
        metrics: Mapping[str, float | torch.Tensor] | None = None,
    ) -> None:
        """Finish an optimizer step: check the loss, count, log, checkpoint, honour signals.

        Args:
            loss: The step's loss; NaN or infinity stops the run (:class:`NonFiniteLoss`)
                without saving, so ``last.pt`` stays the last good checkpoint.
            metrics: Scalars logged to TensorBoard at the new :attr:`step`, e.g.
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
        bad = value is not None and not math.isfinite(value)
        stop = self._stop_signal
        if self.world_size > 1:
            flags = distributed.all_reduce([float(bad), float(stop or 0)], self.device, "max")
            bad = bad or flags[0] > 0
            stop = int(flags[1]) or None
        if bad:
            raise NonFiniteLoss(self._non_finite_message(
                value if value is not None and not math.isfinite(value) else "non-finite"))
        self.step += 1
        if metrics:
            if self.world_size > 1:
                numbers = [float(v.detach().item() if isinstance(v, torch.Tensor) else v)
                           for v in metrics.values()]
                total = distributed.all_reduce(numbers, self.device, "sum")
                metrics = {k: v / self.world_size for k, v in zip(metrics, total)}
            self.tracker.scalars(metrics, self.step)
        every = self.runtime.checkpoint_every
        if every and self.step % every == 0:
            self.save()
        self._stop_if(stop)

    def _require_attached(self) -> None:
        if self._checkpoint is not None:
            raise RuntimeError(
                "resuming: call run.attach(model=..., optimizer=...) before the loop"
            )

    def update_best(self, value: float, *, mode: Literal["max", "min"] = "max") -> bool:
        """Record a metric; when it beats :attr:`best`, write ``best.pt`` and return True.

        Under torchrun all ranks call it together; rank 0's ``value`` counts.
        """
        if self.world_size > 1:
            value = distributed.broadcast_object(float(value))
        better = self.best is None or (value > self.best if mode == "max" else value < self.best)
        if better:
            self.best = float(value)
            checkpoint = self._checkpoint_dict()
            if checkpoint is not None:
                save_checkpoint(checkpoint, self.checkpoint_dir / "best.pt")
        return better
