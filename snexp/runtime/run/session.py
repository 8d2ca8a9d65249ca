"""A run's hold on its directory and its process, from its start to its end.

:meth:`Session.start` creates the directory (under the claim rank 0 took) and ``run.log``,
seeds, sets deterministic mode and the CUDA device, writes ``config.toml``, opens the TensorBoard
tracker and catches SIGINT/SIGTERM; :meth:`Session.end` writes the final checkpoint on a clean
exit and logs how the run ended; :meth:`Session.close` always puts the process back as it was
(writers, signal handlers, deterministic mode, logging, lock, process group).
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from snexp.runtime import distributed
from snexp.runtime.checkpoint import seed_everything, write_text_atomic
from snexp.runtime.config import CONFIG_FILE, ConfigError, override, to_toml
from snexp.runtime.device import describe_device
from snexp.runtime.run.checkpointer import Checkpointer
from snexp.runtime.run.claim import Claim
from snexp.runtime.run.log import RunLog
from snexp.runtime.run.state import RunState
from snexp.runtime.run.stops import RunStopped, StopSignals
from snexp.runtime.track import Tracker

__all__ = ["Session"]

logger = logging.getLogger("snexp.runtime.run")  # one logger for the package

# What a write answers on a full disk, past a quota or file-size limit, or a read-only mount.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class Session:
    """What a run holds while it is open, and gives back when it ends.

    Args:
        config: The run's config (``runtime.out`` resolved).
        experiment: The experiment's name (config.toml's header, the log).
        folder: The run directory.
        device: The run's device.
        rank: This process's rank (0 writes the directory).
        world_size: The number of ranks.
        owns_group: Whether this run joined the process group (and so leaves it).
        claim: Rank 0's lock on the directory (``None`` on the other ranks).
        progress: The run's state (where it starts, where it ends).
        checkpoints: The run's checkpoints (a failed write's message).
        signals: The run's stop signals (caught on start, released on close).

    Attributes:
        tracker: The TensorBoard tracker (rank 0 writes ``<folder>/tb``).
        run_log: ``run.log`` and the console.
    """

    def __init__(self, config: Any, *, experiment: str, folder: Path, device: torch.device,
                 rank: int, world_size: int, owns_group: bool, claim: Claim | None,
                 progress: RunState, checkpoints: Checkpointer, signals: StopSignals) -> None:
        self.config, self.experiment, self.dir, self.device = config, experiment, folder, device
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.owns_group, self.claim = owns_group, claim
        self.progress, self.checkpoints, self.signals = progress, checkpoints, signals
        self.resumed = checkpoints.pending is not None  # --resume's checkpoint, not yet attached
        self.tracker = Tracker(None)
        self.run_log = RunLog()
        self.deterministic_before = torch.are_deterministic_algorithms_enabled()
        self.closed = False

    def start(self, console: bool, *, overwrite: bool) -> None:
        """Create the directory and its log, seed, write config.toml, open the tracker."""
        runtime, step = self.config.runtime, self.progress.step
        if self.is_main:
            self.claim.start(overwrite=overwrite, resume=self.resumed)
            (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            self.run_log.open(self.dir, console)
            if self.claim.note:
                logger.info(self.claim.note)

        # NOTE: rank r seeds with seed + r, so dropout and augmentation differ across ranks
        # (in DataLoader workers too: see dataloader()); DDP copies rank 0's initial weights to
        # all ranks, and the data order has its own seed.
        seed_everything(runtime.seed + self.rank)
        if runtime.deterministic:
            if self.device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        text = to_toml(
            override(self.config, {"runtime.resume": False}),
            header=f"{self.experiment} run, resolved config ({stamp})",
        )
        if self.is_main:
            write_text_atomic(self.dir / CONFIG_FILE, text)
            purge = step + 1 if self.resumed else None
            self.tracker = Tracker(self.dir / "tb", purge_step=purge)
            self.tracker.text("config", "```toml\n" + text + "```", step)
        self.signals.install()
        logger.info(
            "%s run in %s (%s); device %s, amp %s, seed %d%s",
            self.experiment,
            self.dir,
            f"resuming at step {step}, epoch {self.progress.epoch}" if self.resumed else "new",
            describe_device(self.device),
            runtime.amp,
            runtime.seed,
            ", deterministic" if runtime.deterministic else "",
        )
        if self.world_size > 1:
            logger.info("distributed: %d processes (%s backend), rank 0 writes %s%s",
                        self.world_size, torch.distributed.get_backend(), self.dir,
                        "; norms synchronized (--sync-norm)" if runtime.sync_norm else "")

    def close(self, *, undo: bool = False) -> None:
        """Close the tracker and log file, restore signal handlers and global settings,
        unlock the directory and leave the process group if this run joined it.

        Args:
            undo: The run was refused (a ConfigError) before its first checkpoint: remove
                what it wrote and put back the run that ``--overwrite`` set aside.
        """
        if self.closed:
            return
        self.closed = True
        self.tracker.close()
        self.signals.restore()
        torch.use_deterministic_algorithms(self.deterministic_before)
        self.run_log.close()
        if self.claim is not None:
            self.claim.release(undo=undo)
        distributed.destroy(self.owns_group)

    def end(self, exc_type: type | None, exc: BaseException | None, tb: Any, *,
            save: Callable[[], object]) -> None:
        """End the run as ``with`` ends it: on a clean exit ``save`` the final checkpoint (if
        the last one is not here) and keep the run; log how it ended; close."""
        if self.closed:
            return
        # A write that failed for lack of space is refused as a mistake is: one paragraph, and
        # a new run without a checkpoint is undone (--overwrite's old run put back).
        full = (self.checkpoints.disk_full(exc)
                if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS else None)
        undo = isinstance(exc, ConfigError) or full is not None
        try:
            if exc is None:
                saved = self.checkpoints.saved_at
                if self.checkpoints.objects and saved != self.progress.position:
                    try:
                        save()
                    except ConfigError:
                        undo = True  # the final checkpoint failed: as if refused
                        raise
                if self.claim is not None:
                    self.claim.commit()
                logger.info("run finished at step %d, epoch %d: %s", self.progress.step,
                            self.progress.epoch, self.dir)
            elif isinstance(exc, RunStopped):
                self.run_log.to_file(logging.WARNING, str(exc))
            else:
                self.run_log.to_file(logging.ERROR, "run failed", (exc_type, exc, tb))
            if exc is None or isinstance(exc, RunStopped):
                # Every rank ends here together (stops are agreed); leaving the process group
                # while another rank still waits in a collective can abort it (gloo, SIGABRT).
                distributed.barrier()
        finally:
            self.close(undo=undo)
        if full is not None:
            raise full from None
