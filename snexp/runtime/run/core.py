"""The :class:`Run`: it starts and ends a run, and gives the loop the calls of its members.

Starting validates everything a user can get wrong before any work (device, ``--amp``, the
directory, ``--resume``), joins the process group under torchrun, then creates the directory
and ``run.log``, seeds, writes ``config.toml``, opens the tracker and catches SIGINT/SIGTERM.
Ending writes the final checkpoint on a clean exit and always puts the process back as it was.
In between, the work is the members': :class:`~.state.RunState`, :class:`~.data.DataOrder`,
:class:`~.checkpointer.Checkpointer`, :class:`~.stops.StopSignals`,
:class:`~snexp.runtime.device.Precision` and the :class:`~.loop.Loop` that ties them together.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from snexp.runtime import distributed
from snexp.runtime.checkpoint import seed_everything, write_text_atomic
from snexp.runtime.config import CONFIG_FILE, ConfigError, RuntimeConfig, override, to_toml
from snexp.runtime.config.errors import _prog_name
from snexp.runtime.device import Precision, describe_device, move_to, place_model, select_device
from snexp.runtime.run.checkpointer import Checkpointer
from snexp.runtime.run.claim import disk_error
from snexp.runtime.run.data import DataOrder
from snexp.runtime.run.directory import claim_directory_on_main, new_run_dir
from snexp.runtime.run.log import RunLog
from snexp.runtime.run.loop import Loop
from snexp.runtime.run.resume import RUNTIME_SAFE_KEYS
from snexp.runtime.run.state import RunState
from snexp.runtime.run.stops import RunStopped, StopSignals
from snexp.runtime.track import Tracker

__all__ = ["Run"]

logger = logging.getLogger("snexp.runtime.run")  # one logger for the package

# What a write answers on a full disk, past a quota or file-size limit, or a read-only mount.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class _Delegated:
    """A :class:`Run` attribute that one of its members holds (``run.step`` is
    ``run.progress.step``): read and written there, so there is one copy of each value."""

    def __init__(self, member: str, name: str | None = None) -> None:
        self.member, self.name = member, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, run: Run | None, owner: type | None = None) -> Any:
        return self if run is None else getattr(getattr(run, self.member), self.name)

    def __set__(self, run: Run, value: Any) -> None:
        setattr(getattr(run, self.member), self.name, value)


class Run:
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
        progress: The :class:`RunState` (``step``, ``epoch``, ``best``, ``state``, ...).
        data, checkpoints, signals, precision, loop: The members doing the work.
    """

    step = _Delegated("progress")
    epoch = _Delegated("progress")
    best = _Delegated("progress")
    state = _Delegated("progress")
    generator = _Delegated("data")
    scaler = _Delegated("precision")
    amp_dtype = _Delegated("precision", "dtype")
    tracker = _Delegated("loop")

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
        prog = prog or _prog_name()
        self.claim = None  # rank 0's lock on the directory

        # Everything a user can get wrong is checked before the disk is touched. Under
        # torchrun all ranks join the process group first; rank 0 alone checks the directory.
        many = distributed.env_world_size() > 1 or distributed.is_distributed()
        self.device = (distributed.rank_device if many else select_device)(runtime.device)
        self.precision = Precision(runtime.amp, self.device)
        self._owns_group = distributed.init_from_env(self.device)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        try:
            folder = runtime.out or (str(new_run_dir(experiment)) if self.is_main else None)
            self.dir = Path(distributed.broadcast_object(folder))
            self.checkpoint_dir = self.dir / "checkpoints"
            checkpoint, self.claim = claim_directory_on_main(
                self.dir, runtime, config, experiment=experiment, safe_keys=self.safe_keys,
                is_main=self.is_main, world_size=self.world_size)
        except BaseException:
            distributed.destroy(self._owns_group)
            raise
        self.config = override(config, {"runtime.out": str(self.dir), "runtime.overwrite": False})
        self.runtime: RuntimeConfig = self.config.runtime
        self.resumed = checkpoint is not None

        self.progress = RunState.starting_at(checkpoint)
        self.data = DataOrder(runtime.seed, self.device, rank=self.rank,
                              world_size=self.world_size, progress=self.progress)
        self.checkpoints = Checkpointer(
            self.dir, experiment=experiment, config=self.config, progress=self.progress,
            data=self.data, scaler=self.precision.scaler, rank=self.rank,
            world_size=self.world_size, claim=self.claim, prog=prog, resume_from=checkpoint)
        self.signals = StopSignals(self.world_size, self.device)
        self.loop = Loop(self.progress, self.data, self.checkpoints, self.signals, Tracker(None),
                         checkpoint_every=runtime.checkpoint_every,
                         resume_command=f"{prog} --out {self.dir} --resume")
        self.run_log = RunLog()
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()
        self._closed = False
        try:
            restart = self.claim is not None and self.claim.restart
            self._start(console, overwrite=runtime.overwrite or restart)
        except OSError as exc:  # a read-only or full disk while creating the directory
            self.close(undo=True)
            raise disk_error(self.dir, exc) from None
        except BaseException as exc:
            self.close(undo=isinstance(exc, ConfigError))
            raise

    def _start(self, console: bool, *, overwrite: bool) -> None:
        """Create the directory and its log, seed, write config.toml, open the tracker."""
        runtime = self.runtime
        if self.is_main:
            self.claim.start(overwrite=overwrite, resume=self.resumed)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
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
            purge = self.step + 1 if self.resumed else None
            self.tracker = Tracker(self.dir / "tb", purge_step=purge)
            self.tracker.text("config", "```toml\n" + text + "```", self.step)
        self.signals.install()
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
        self.signals.restore()
        torch.use_deterministic_algorithms(self._deterministic_before)
        self.run_log.close()
        if self.claim is not None:
            self.claim.release(undo=undo)
        distributed.destroy(self._owns_group)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if self._closed:
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
                        self.save()
                    except ConfigError:
                        undo = True  # the final checkpoint failed: as if refused
                        raise
                if self.claim is not None:
                    self.claim.commit()
                logger.info(
                    "run finished at step %d, epoch %d: %s", self.step, self.epoch, self.dir
                )
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

    # The loop's calls (documented where the work is done).

    def prepare(self, model: torch.nn.Module, *,
                find_unused_parameters: bool = False) -> torch.nn.Module:
        """The model on the device, channels-last, DDP-wrapped and compiled as the run asks
        (:func:`snexp.runtime.device.place_model`); :meth:`attach` the one you built."""
        runtime = self.runtime
        return place_model(model, self.device, channels_last=runtime.channels_last,
                           sync_norm=runtime.sync_norm, compile=runtime.compile,
                           find_unused_parameters=find_unused_parameters)

    def to_device(self, data: Any) -> Any:
        """Tensors (also inside lists, tuples and dicts) moved to the device, non-blocking."""
        return move_to(data, self.device, channels_last=self.runtime.channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for ``--amp bf16|fp16``; a no-op context for ``--amp off``."""
        return self.precision.autocast()

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                       clip_grad_norm: float | None = None,
                       parameters: Iterable[torch.Tensor] | None = None) -> float | None:
        """Backward, clip, step and zero the grads under ``--amp``; the norm when clipping
        (:meth:`snexp.runtime.device.Precision.optimizer_step`)."""
        return self.precision.optimizer_step(loss, optimizer, clip_grad_norm=clip_grad_norm,
                                             parameters=parameters)

    def dataloader(self, dataset: Dataset, *, batch_size: int, shuffle: bool = True,
                   num_workers: int = 0, drop_last: bool = False, **kwargs: Any) -> DataLoader:
        """A DataLoader ordered by :attr:`generator`, with seeded workers and, under torchrun,
        a shard per rank (:meth:`snexp.runtime.run.data.DataOrder.dataloader`)."""
        return self.data.dataloader(dataset, batch_size=batch_size, shuffle=shuffle,
                                    num_workers=num_workers, drop_last=drop_last, **kwargs)

    def attach(self, **objects: Any) -> None:
        """Register what every checkpoint holds (models, optimizers, schedulers) and, on
        ``--resume``, load it back (:meth:`snexp.runtime.run.checkpointer.Checkpointer.attach`).
        """
        self.checkpoints.attach(**objects)

    def epochs(self, total: int) -> Iterator[int]:
        """Epochs up to ``total``, each checkpointed (:meth:`~.loop.Loop.epochs`)."""
        return self.loop.epochs(total)

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The epoch's batches, after a resume the unused ones (:meth:`~.loop.Loop.batches`)."""
        return self.loop.batches(loader)

    def step_done(self, loss: float | torch.Tensor | None = None,
                  metrics: Mapping[str, float | torch.Tensor] | None = None) -> None:
        """Check the loss, count the step, log ``metrics``, checkpoint, honour signals
        (:meth:`~.loop.Loop.step_done`)."""
        self.loop.step_done(loss, metrics)

    def update_best(self, value: float, *, mode: Literal["max", "min"] = "max") -> bool:
        """Whether ``value`` beats :attr:`best`; if so also write ``best.pt``. Collective."""
        return self.loop.update_best(value, mode=mode)

    def save(self) -> Path:
        """Write ``checkpoints/last.pt`` now (rank 0, atomically) and return its path. Collective.
        """
        return self.loop.save()

    @property
    def stop_requested(self) -> bool:
        """Whether SIGINT/SIGTERM asked the run to stop."""
        return self.signals.signum is not None

    def check_stop(self, *, where: str | None = None) -> None:
        """If a signal asked to stop: checkpoint and raise :class:`RunInterrupted`; ``where``
        names the point for the message (:meth:`~.loop.Loop.check_stop`). Collective."""
        self.loop.check_stop(where=where)
