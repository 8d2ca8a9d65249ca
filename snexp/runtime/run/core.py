"""The :class:`Run`: it builds its members and gives the loop their calls.

Creating a run validates everything a user can get wrong before any work (device, ``--amp``,
the directory, ``--resume``) and joins the process group under torchrun; then its
:class:`~.session.Session` starts it (directory, ``run.log``, seeds, ``config.toml``, tracker,
signals) and, when the ``with`` block ends, ends it. In between, the work is the members':
:class:`~.state.RunState`, :class:`~.data.DataOrder`, :class:`~.checkpointer.Checkpointer`,
:class:`~.stops.StopSignals`, :class:`~snexp.runtime.device.Precision` and the
:class:`~.loop.Loop` that ties them together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from snexp.runtime import distributed
from snexp.runtime.config import ConfigError, RuntimeConfig, override
from snexp.runtime.config.errors import _prog_name
from snexp.runtime.device import Precision, move_to, select_device
from snexp.runtime.distributed import place_model
from snexp.runtime.run.checkpointer import Checkpointer
from snexp.runtime.run.claim import disk_error
from snexp.runtime.run.data import DataOrder
from snexp.runtime.run.directory import claim_directory_on_main, new_run_dir
from snexp.runtime.run.loop import Loop
from snexp.runtime.run.resume import RUNTIME_SAFE_KEYS
from snexp.runtime.run.session import Session
from snexp.runtime.run.state import RunState
from snexp.runtime.run.stops import StopSignals

__all__ = ["Run"]


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
        data, checkpoints, signals, precision, session, loop: The members doing the work.
    """

    step = _Delegated("progress")
    epoch = _Delegated("progress")
    best = _Delegated("progress")
    state = _Delegated("progress")
    generator = _Delegated("data")
    scaler = _Delegated("precision")
    amp_dtype = _Delegated("precision", "dtype")
    tracker = _Delegated("session")

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
        owns_group = distributed.init_from_env(self.device)
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
            distributed.destroy(owns_group)
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
        self.session = Session(
            self.config, experiment=experiment, folder=self.dir, device=self.device,
            rank=self.rank, world_size=self.world_size, owns_group=owns_group, claim=self.claim,
            progress=self.progress, checkpoints=self.checkpoints, signals=self.signals)
        try:
            restart = self.claim is not None and self.claim.restart
            self.session.start(console, overwrite=runtime.overwrite or restart)
        except OSError as exc:  # a read-only or full disk while creating the directory
            self.close(undo=True)
            raise disk_error(self.dir, exc) from None
        except BaseException as exc:
            self.close(undo=isinstance(exc, ConfigError))
            raise
        self.loop = Loop(self.progress, self.data, self.checkpoints, self.signals, self.tracker,
                         checkpoint_every=runtime.checkpoint_every,
                         resume_command=f"{prog} --out {self.dir} --resume")

    def close(self, *, undo: bool = False) -> None:
        """Put the process back as it was (:meth:`snexp.runtime.run.session.Session.close`);
        ``undo``: the run was refused before its first checkpoint, so remove what it wrote."""
        self.session.close(undo=undo)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        self.session.end(exc_type, exc, tb, save=self.save)

    # The loop's calls (documented where the work is done).

    def prepare(self, model: torch.nn.Module, *,
                find_unused_parameters: bool = False) -> torch.nn.Module:
        """The model on the device, channels-last, DDP-wrapped and compiled as the run asks
        (:func:`snexp.runtime.distributed.place_model`); :meth:`attach` the one you built."""
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
