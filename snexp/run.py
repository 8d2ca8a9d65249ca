"""A training run: its directory, checkpoints and resume, signals, device, precision and seeds.

A run directory holds::

    <out>/config.toml           the fully resolved config, rewritten at every (re)start
    <out>/run.log               the log lines the console shows
    <out>/tb/                   TensorBoard events (snexp.track.Tracker)
    <out>/checkpoints/last.pt   everything needed to continue as if never stopped
    <out>/checkpoints/best.pt   the same, at the best metric (where an experiment has one)

A checkpoint is one dict of plain containers and tensors (format version, config, counters,
model/optimizer/scheduler/scaler state dicts, experiment state, RNG states of python, numpy and
torch CPU/CUDA, the data-order generator), written atomically (temporary file, fsync,
``os.replace``) and read with ``torch.load(weights_only=True)``: a SIGKILL at any moment leaves
the previous checkpoint intact, and loading never executes code.

The loop stays in charge; :class:`Run` gives it a few calls::

    with Run(cfg, experiment="stylize", safe_keys=("train.epochs",)) as run:
        net = run.prepare(model)                    # device, channels-last, torch.compile
        run.attach(model=model, optimizer=opt)      # what checkpoints hold; loads on --resume
        loader = run.dataloader(dataset, batch_size=4)
        for epoch in run.epochs(cfg.train.epochs):  # checkpoint at every epoch end
            for x in run.batches(loader):           # mid-epoch resume skips used batches
                with run.autocast():
                    loss = criterion(net(run.to_device(x)))
                run.optimizer_step(loss, opt)
                run.step_done(loss, {"loss/total": loss})  # count, log, checkpoint, stop

With ``--deterministic`` on CPU, a run stopped at any step and resumed ends with the same
weights and metrics as one never stopped (tests/snexp/test_run.py).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs data-parallel (snexp.distributed):
each rank uses ``cuda:LOCAL_RANK`` (or the CPU), ``prepare`` wraps the model in
DistributedDataParallel, ``dataloader`` gives each rank its shard, and only rank 0 writes the
run directory, logs and TensorBoard. Checkpoints, stops and ``update_best`` are collective: all
ranks call them at the same points, as the loop above does (tests/snexp/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from snexp import distributed
from snexp.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    seed_worker,
    set_rng_state,
    unwrap_model,
    write_text_atomic,
)
from snexp.config import (
    CONFIG_FILE,
    CliError,
    ConfigError,
    RuntimeConfig,
    flatten,
    override,
    to_toml,
)
from snexp.config.errors import _prog_name
from snexp.device import describe_device, select_device
from snexp.track import TqdmLoggingHandler, Tracker

__all__ = ["NonFiniteLoss", "Run", "RunInterrupted", "RunStopped"]

logger = logging.getLogger(__name__)

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
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunStopped(CliError):
    """The run stopped early on purpose; the message says what happened and what to do."""

    label = "stopped"


class RunInterrupted(RunStopped):
    """SIGINT or SIGTERM: the current step finished and a checkpoint was written."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class NonFiniteLoss(RunStopped):
    """A loss became NaN or infinite; nothing was saved after the last good checkpoint."""

    exit_code = 1


_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- the run


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
            checkpoint = self._check_directory_on_main(runtime, config)
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
            self._start(console, overwrite=runtime.overwrite)
        except BaseException:
            self.close()
            raise

    def _start(self, console: bool, *, overwrite: bool) -> None:
        """Create the directory and its log, seed, write config.toml, open the tracker."""
        runtime = self.runtime
        if self.is_main:
            if overwrite and self.dir.exists():
                shutil.rmtree(self.dir)
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self._setup_logging(console)

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

    # -- setup -------------------------------------------------------------------------------

    def _check_directory(self, runtime: RuntimeConfig, config: Any) -> dict | None:
        """Refuse unsafe uses of the run directory; on resume, load and check the checkpoint."""
        folder, last = self.dir, self.checkpoint_dir / "last.pt"
        if runtime.resume:
            if not runtime.out:
                recent = _latest_run(self.experiment)
                hint = f"; the most recent run is {recent}" if recent else ""
                raise ConfigError(f"--resume needs --out DIR, the run to continue{hint}")
            if not last.is_file():
                what = "does not exist" if not folder.exists() else "has no checkpoints/last.pt"
                raise ConfigError(f"cannot resume: {folder} {what}")
            checkpoint = load_checkpoint(last)
            self._check_resumable(checkpoint, config, last)
            return checkpoint
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--out {folder} is a file, not a directory")
        if folder.exists() and any(folder.iterdir()):
            if not runtime.overwrite:
                raise ConfigError(
                    f"run directory {folder} already exists and is not empty; pass --resume to "
                    "continue it, --overwrite to delete it and start afresh, or choose another "
                    "--out"
                )
            if not (folder / CONFIG_FILE).is_file():
                raise ConfigError(
                    f"--overwrite refused: {folder} has no {CONFIG_FILE}, so it does not look "
                    "like a run directory; delete it yourself or choose another --out"
                )
        return None

    def _check_directory_on_main(self, runtime: RuntimeConfig, config: Any) -> dict | None:
        """:meth:`_check_directory` on rank 0; the other ranks get its verdict, then read."""
        if self.world_size == 1:
            return self._check_directory(runtime, config)
        error, checkpoint = None, None
        if self.is_main:
            try:
                checkpoint = self._check_directory(runtime, config)
            except ConfigError as exc:
                error = str(exc)
        error = distributed.broadcast_object(error)  # also the barrier before the others read
        if error is not None:
            raise ConfigError(error)
        if not self.is_main and runtime.resume:
            checkpoint = load_checkpoint(self.checkpoint_dir / "last.pt")
        return checkpoint

    def _check_resumable(self, checkpoint: Mapping[str, Any], config: Any, path: Path) -> None:
        if checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(
                f"cannot resume from {path}: checkpoint format {checkpoint.get('format')!r}, "
                f"this code reads format {CHECKPOINT_FORMAT}"
            )
        saved, now = checkpoint["config"], _plain(flatten(config))
        differing = []
        for key in sorted(set(saved) | set(now)):
            if key not in saved or key not in now:
                where = "this code" if key not in saved else "the checkpoint"
                logger.warning("config key %s exists only in %s; ignored for resume", key, where)
            elif saved[key] != now[key] and not any(fnmatchcase(key, p) for p in self.safe_keys):
                differing.append(f"{key} ({saved[key]!r} -> {now[key]!r})")
        if differing:
            hidden = ("runtime.out", "runtime.resume", "runtime.overwrite")
            safe = ", ".join(k for k in self.safe_keys if k not in hidden)
            raise ConfigError(
                f"cannot resume {self.dir} with a different config: {'; '.join(differing)}. "
                f"Only these keys may change on resume: {safe}. Resume without those changes, "
                "or start a new run with another --out."
            )

    def _setup_logging(self, console: bool) -> None:
        formatter = logging.Formatter(_LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
        self._file_handler = logging.FileHandler(self.dir / "run.log", encoding="utf-8")
        self._log_handlers = [self._file_handler]
        if console:
            self._log_handlers.append(TqdmLoggingHandler())
        root = logging.getLogger()
        for handler in self._log_handlers:
            handler.setFormatter(formatter)
            handler.setLevel(logging.INFO)
            root.addHandler(handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGINT/SIGTERM will not stop gracefully")
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop_signal is not None:
            # Under torchrun a Ctrl-C reaches each rank twice, from the terminal and forwarded
            # by torchrun: only a Ctrl-C seconds later means "abort now".
            echo = self.world_size > 1 and time.monotonic() - self._signal_time < 5.0
            if signum == signal.SIGINT and not echo:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            return
        self._stop_signal, self._signal_time = signum, time.monotonic()
        logger.warning(
            "%s received: finishing the current step, then saving a checkpoint%s",
            name,
            " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else "",
        )

    # -- objects, device, precision -------------------------------------------------------------

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

    def prepare(self, model: torch.nn.Module, *,
                find_unused_parameters: bool = False) -> torch.nn.Module:
        """Move a model to the device (channels-last if asked) and ``torch.compile`` it if asked.

        Under torchrun, the model is wrapped in DistributedDataParallel, after ``--sync-norm``
        turned its SN/BN layers into synchronized ones (in place: build the optimizer after
        this call). Train the returned module; :meth:`attach` the one you built (or either:
        wrappers are unwrapped), so checkpoints hold plain state dict keys. Pass
        ``find_unused_parameters=True`` when a step uses only some parameters (weight
        sharing); see :func:`snexp.distributed.wrap_model`.
        """
        model = model.to(self.device)
        if self.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = distributed.wrap_model(model, self.device, sync_norm=self.runtime.sync_norm,
                                       find_unused_parameters=find_unused_parameters)
        if self.runtime.compile:
            model = torch.compile(model)
        return model

    def to_device(self, data: Any) -> Any:
        """Tensors (also inside lists, tuples and dicts) moved to the device, non-blocking."""
        if isinstance(data, torch.Tensor):
            data = data.to(self.device, non_blocking=True)
            if self.runtime.channels_last and data.dim() == 4 and data.is_floating_point():
                data = data.contiguous(memory_format=torch.channels_last)
            return data
        if isinstance(data, Mapping):
            return type(data)((k, self.to_device(v)) for k, v in data.items())
        if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
            return type(data)(*(self.to_device(v) for v in data))
        if isinstance(data, (list, tuple)):
            return type(data)(self.to_device(v) for v in data)
        return data

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for ``--amp bf16|fp16``; a no-op context for ``--amp off``."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimizer_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad_norm: float | None = None,
        parameters: Iterable[torch.Tensor] | None = None,
    ) -> float | None:
        """Backward (scaled for fp16), optional gradient clipping, step, then zero the grads.

        Args:
            loss: Scalar loss.
            optimizer: The optimizer to step.
            clip_grad_norm: Clip the total gradient norm to this (after unscaling).
            parameters: Parameters to clip (default: the optimizer's).

        Returns:
            The gradient norm before clipping, when clipping; else ``None``.
        """
        self.scaler.scale(loss).backward()
        norm = None
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)
            params = parameters or [p for g in optimizer.param_groups for p in g["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def dataloader(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> DataLoader:
        """A DataLoader whose order comes from :attr:`generator` and whose workers are seeded.

        Memory is pinned when training on CUDA. Workers are not persistent, so a resumed run
        reseeds them exactly as the uninterrupted run did. Under torchrun each rank reads its
        own shard (a ``DistributedSampler`` seeded with ``--seed``, its epoch set by
        :meth:`epochs`), so ``batch_size`` is per rank and the effective batch is
        ``batch_size * world_size``; the workers of rank ``r > 0`` mix ``r`` into their seeds
        (:func:`snexp.checkpoint.seed_worker`), so random transforms differ across ranks while
        :attr:`generator`, and so the data order, advances alike on all of them.
        """
        kwargs.setdefault("pin_memory", self.device.type == "cuda")
        if self.world_size > 1 and "sampler" not in kwargs and "batch_sampler" not in kwargs:
            sampler = DistributedSampler(dataset, self.world_size, self.rank, shuffle=shuffle,
                                         seed=self.runtime.seed, drop_last=drop_last)
            self._samplers.append(sampler)
            kwargs["sampler"], shuffle = sampler, False
            logger.info("data: %d ranks x batch %d = effective batch %d; each rank reads %d of "
                        "%d samples per epoch", self.world_size, batch_size,
                        batch_size * self.world_size, len(sampler), len(dataset))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            drop_last=drop_last,
            generator=self.generator,
            worker_init_fn=functools.partial(seed_worker, rank=self.rank),
            **kwargs,
        )

    # -- the loop ------------------------------------------------------------------------------

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

    def _non_finite_message(self, value: float | str) -> str:
        last = self.checkpoint_dir / "last.pt"
        kept = (
            f"the last good checkpoint, {last} (step {self._saved_at[0]}), is kept"
            if self._saved_at is not None
            else "no checkpoint had been written yet"
        )
        return (
            f"the loss became {value} at step {self.step + 1} ({self.epoch} epochs completed); "
            "the run "
            f"stopped and {kept}. Try a lower learning rate, gradient clipping or --amp off."
        )

    @property
    def stop_requested(self) -> bool:
        """Whether SIGINT/SIGTERM asked the run to stop."""
        return self._stop_signal is not None

    def check_stop(self) -> None:
        """If a signal asked to stop: write a checkpoint and raise :class:`RunInterrupted`.

        :meth:`step_done` and :meth:`epochs` call it; call it yourself at other safe points
        (e.g. after a long evaluation; under torchrun on all ranks at once: a signal on any
        rank stops all).
        """
        stop = self._stop_signal
        if self.world_size > 1:
            stop = int(distributed.all_reduce([float(stop or 0)], self.device, "max")[0]) or None
        self._stop_if(stop)

    def _stop_if(self, signum: int | None) -> None:
        """Stop for ``signum`` (agreed by all ranks), if any: checkpoint, then raise."""
        if signum is None:
            return
        if self._stop_signal is None:  # agreed on another rank's signal
            self._stop_signal, self._signal_time = signum, time.monotonic()
        path = self.save()
        name = signal.Signals(signum).name
        command = f"{self._prog} --out {self.dir} --resume"
        if self.world_size > 1 and command.startswith("python "):
            command = "torchrun [your torchrun options] " + command[len("python "):]
        raise RunInterrupted(
            f"received {name}, so the run stopped after step {self.step} ({self.epoch} epochs "
            f"completed); checkpoint saved to {path}. Resume with: {command}",
            signum,
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

    # -- checkpoints -----------------------------------------------------------------------------

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

    def save(self) -> Path:
        """Write ``checkpoints/last.pt`` now (atomically) and return its path.

        Under torchrun all ranks call it together; rank 0 writes.
        """
        path = self.checkpoint_dir / "last.pt"
        checkpoint = self._checkpoint_dict()
        if checkpoint is not None:
            save_checkpoint(checkpoint, path)
        self._saved_at = (self.step, self.epoch, self._batch_in_epoch)
        self.tracker.flush()
        return path

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the tracker and log file, restore signal handlers and global settings, and
        leave the process group if this run joined it."""
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
        distributed.destroy(self._owns_group)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if self._closed:
            return
        try:
            if exc is None:
                done = (self.step, self.epoch, self._batch_in_epoch)
                if self._objects and self._saved_at != done:
                    self.save()
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
            self.close()

    def _record(self, level: int, message: str, exc_info: Any) -> logging.LogRecord:
        return logger.makeRecord(logger.name, level, __file__, 0, message, (), exc_info)


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """Config values as checkpoint-safe plain data (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def _new_run_dir(experiment: str) -> Path:
    base = Path("runs") / experiment / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def _latest_run(experiment: str) -> Path | None:
    root = Path("runs") / experiment
    runs = sorted(p for p in root.glob("*/checkpoints/last.pt")) if root.is_dir() else []
    return runs[-1].parent.parent if runs else None
