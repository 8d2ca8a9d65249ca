"""The :class:`Run`: what happens when a run starts and when it ends.

Starting validates everything a user can get wrong before any work (device, ``--amp``, the
directory, ``--resume``: :mod:`snexp.runtime.run.directory`), joins the process group under
torchrun,
then creates the directory and ``run.log``, seeds, writes ``config.toml``, opens the tracker
and catches SIGINT/SIGTERM. Ending writes the final checkpoint on a clean exit and always puts
the process back as it was (writers, signal handlers, deterministic mode, logging, process
group). The calls the loop makes in between come from the mixins in
:mod:`snexp.runtime.run.training`,
:mod:`snexp.runtime.run.loop`, :mod:`snexp.runtime.run.stops` and :mod:`snexp.runtime.run.resume`.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from snexp.runtime import distributed
from snexp.runtime.checkpoint import seed_everything, write_text_atomic
from snexp.runtime.config import CONFIG_FILE, ConfigError, RuntimeConfig, override, to_toml
from snexp.runtime.config.errors import _prog_name
from snexp.runtime.device import describe_device, select_device
from snexp.runtime.run.claim import _Claim, _disk_error
from snexp.runtime.run.directory import _check_directory_on_main, _new_run_dir, _open_log
from snexp.runtime.run.loop import _Loop
from snexp.runtime.run.resume import RUNTIME_SAFE_KEYS, _Checkpoints
from snexp.runtime.run.stops import RunStopped, _Stops
from snexp.runtime.run.training import _AMP_DTYPES, _Training
from snexp.runtime.track import Tracker

__all__ = ["Run"]

logger = logging.getLogger("snexp.runtime.run")  # one logger for the package

# What a write answers on a full disk, past a quota or file-size limit, or a read-only mount.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class Run(_Loop, _Training, _Stops, _Checkpoints):
    """One run directory and the plumbing of its training loop.

    Creating a ``Run`` validates everything a user can get wrong before any work starts (the
    directory, ``--resume``, the config diff, the device), then creates ``<out>``, mirrors the
    console log into ``run.log``, seeds, writes ``config.toml``, opens the TensorBoard tracker
    and catches SIGINT/SIGTERM. Use it as a context manager: on a clean exit it writes the
    final checkpoint; always it closes the writers and restores signal handlers.

    Args:
        config: The experiment's frozen config; it must have a ``runtime: RuntimeConfig`` field.
        experiment: Name for the default directory ``runs/<experiment>/<YYYYmmdd-HHMMSS>``.
        safe_keys: Config keys (``fnmatch`` patterns) that may differ on resume besides the
            runtime's own (``runtime.device``, ``runtime.checkpoint_every``, ...), e.g.
            ``("train.epochs",)``.
        prog: Command shown in the resume hint; default: how this process was started.
        console: Also log to the console (stderr, bar-safe); ``run.log`` always gets the lines.

    Attributes:
        config: The config with ``runtime.out`` resolved.
        dir: The run directory.
        device: The torch device in use (``cuda:LOCAL_RANK`` under torchrun on GPUs).
        rank: This process's rank (0 without torchrun).
        world_size: The number of processes training together (1 without torchrun).
        is_main: Whether this is rank 0, the one that writes files and logs.
        tracker: TensorBoard tracker writing into ``<out>/tb``.
        generator: Seeded generator of the data order (give it to DataLoaders).
        scaler: The AMP GradScaler (enabled for ``--amp fp16`` only).
        step: Optimizer steps done. Log metrics at this step after :meth:`step_done`.
        epoch: Epochs completed.
        best: Best metric so far (see :meth:`update_best`), or ``None``.
        state: Experiment state saved with every checkpoint (plain values and tensors).
        resumed: Whether this run continues from a checkpoint.
    """

    def __init__(
        self,
        config: Any,
        *,
        experiment: str,
        safe_keys: Sequence[str] = (),
        prog: str | None = None,
        console: bool = True,
    ) -> None:
        runtime = getattr(config, "runtime", None)
        if not isinstance(runtime, RuntimeConfig):
            raise TypeError(f"{type(config).__name__} needs a 'runtime: RuntimeConfig' field")
        self.experiment = experiment
        self.safe_keys = RUNTIME_SAFE_KEYS + tuple(safe_keys)
        self._prog = prog or _prog_name()
        self._claim: _Claim | None = None  # rank 0's lock on the directory

        # Everything a user can get wrong is checked before the disk is touched. Under
        # torchrun all ranks join the process group first; rank 0 alone checks the directory.
        many = distributed.env_world_size() > 1 or distributed.is_distributed()
        self.device = (distributed.rank_device if many else select_device)(runtime.device)
        self.amp_dtype = _AMP_DTYPES[runtime.amp]
        if runtime.amp == "bf16" and self.device.type == "cuda":
            if not torch.cuda.is_bf16_supported():
                raise ConfigError(f"--amp bf16: {describe_device(self.device)} lacks bfloat16")
        self._owns_group = distributed.init_from_env(self.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        try:
            folder = runtime.out or (str(_new_run_dir(experiment)) if self.is_main else None)
            self.dir = Path(distributed.broadcast_object(folder))
            self.checkpoint_dir = self.dir / "checkpoints"
            checkpoint, self._claim = _check_directory_on_main(
                self.dir, runtime, config, experiment=experiment, safe_keys=self.safe_keys,
                is_main=self.is_main, world_size=self.world_size)
        except BaseException:
            distributed.destroy(self._owns_group)
            raise
        self.config = override(config, {"runtime.out": str(self.dir), "runtime.overwrite": False})
        self.runtime: RuntimeConfig = self.config.runtime

        self.resumed = checkpoint is not None
        self.step = int(checkpoint["step"]) if checkpoint else 0
        self.epoch = int(checkpoint["epoch"]) if checkpoint else 0
        self.best: float | None = None
        self.state: dict[str, Any] = {}
        self.generator = torch.Generator().manual_seed(runtime.seed)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=runtime.amp == "fp16")
        self.tracker = Tracker(None)
        self._samplers: list[DistributedSampler] = []  # their epoch is set by run.epochs()
        self._file_handler: logging.Handler | None = None
        self._objects: dict[str, Any] = {}
        self._checkpoint = checkpoint  # loaded into the objects by attach()
        self._batch_in_epoch = 0  # batches taken from run.batches() in the current epoch
        self._skip = 0  # batches to skip on the first run.batches() after a mid-epoch resume
        self._epoch_rng = self.generator.get_state()  # data-order generator at epoch start
        self._saved_at = (
            (self.step, self.epoch, int(checkpoint["batch_in_epoch"])) if checkpoint else None
        )
        self._stop_signal: int | None = None
        self._signal_time = 0.0  # time.monotonic() of the first stop signal
        self._handlers: dict[int, Any] = {}
        self._log_handlers: list[logging.Handler] = []
        self._root_level = logging.getLogger().level
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()
        self._closed = False
        try:
            restart = self._claim is not None and self._claim.restart
            self._start(console, overwrite=runtime.overwrite or restart)
        except OSError as exc:  # a read-only or full disk while creating the directory
            self.close(undo=True)
            raise _disk_error(self.dir, exc) from None
        except BaseException as exc:
            self.close(undo=isinstance(exc, ConfigError))
            raise

    def _start(self, console: bool, *, overwrite: bool) -> None:
        """Create the directory and its log, seed, write config.toml, open the tracker."""
        runtime = self.runtime
        if self.is_main:
            self._claim.start(overwrite=overwrite, resume=self.resumed)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self._log_handlers = _open_log(self.dir, console)
            self._file_handler = self._log_handlers[0]
            if self._claim.note:
                logger.info(self._claim.note)

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
            purge = self.step + 1 if self.resumed else None
            self.tracker = Tracker(self.dir / "tb", purge_step=purge)
            self.tracker.text("config", "```toml\n" + text + "```", self.step)
        self._install_signal_handlers()
        logger.info(
            "%s run in %s (%s); device %s, amp %s, seed %d%s",
            self.experiment,
            self.dir,
            f"resuming at step {self.step}, epoch {self.epoch}" if self.resumed else "new",
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
        if self._closed:
            return
        self._closed = True
        self.tracker.close()
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        torch.use_deterministic_algorithms(self._deterministic_before)
        root = logging.getLogger()
        for handler in self._log_handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(self._root_level)
        if self._claim is not None:
            self._claim.release(undo=undo)
        distributed.destroy(self._owns_group)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if self._closed:
            return
        # A write that failed for lack of space is refused as a mistake is: one paragraph, and
        # a new run without a checkpoint is undone (--overwrite's old run put back).
        full = (self._disk_full(exc) if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS
                else None)
        undo = isinstance(exc, ConfigError) or full is not None
        try:
            if exc is None:
                done = (self.step, self.epoch, self._batch_in_epoch)
                if self._objects and self._saved_at != done:
                    try:
                        self.save()
                    except ConfigError:
                        undo = True  # the final checkpoint failed: as if refused
                        raise
                if self._claim is not None:
                    self._claim.commit()
                logger.info(
                    "run finished at step %d, epoch %d: %s", self.step, self.epoch, self.dir
                )
            elif self._file_handler is None:
                pass  # not rank 0: no run.log
            elif isinstance(exc, RunStopped):
                self._file_handler.handle(self._record(logging.WARNING, str(exc), None))
            else:
                info = (exc_type, exc, tb)
                self._file_handler.handle(self._record(logging.ERROR, "run failed", info))
            if exc is None or isinstance(exc, RunStopped):
                # Every rank ends here together (stops are agreed); leaving the process group
                # while another rank still waits in a collective can abort it (gloo, SIGABRT).
                distributed.barrier()
        finally:
            self.close(undo=undo)
        if full is not None:
            raise full from None

    def _record(self, level: int, message: str, exc_info: Any) -> logging.LogRecord:
        return logger.makeRecord(logger.name, level, __file__, 0, message, (), exc_info)
