"""How a run stops early: SIGINT/SIGTERM, stops agreed by all ranks, and the exceptions.

The first SIGINT or SIGTERM only sets a flag: the current step finishes, a checkpoint is
written and :class:`RunInterrupted` (exit status 128 + signal) says how to resume. A second
Ctrl-C aborts at once (under torchrun only seconds later: the first one reaches each rank
twice). A NaN or infinite loss raises :class:`NonFiniteLoss` without saving. Under torchrun a
stop on any rank stops all, agreed by one all-reduce at the same points on every rank.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from snexp.runtime import distributed
from snexp.runtime.config import CliError

__all__ = ["NonFiniteLoss", "RunInterrupted", "RunStopped"]

logger = logging.getLogger("snexp.runtime.run")  # one logger for the package


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


class _Stops:
    """Signal handling and stops of :class:`snexp.runtime.run.Run` (a mixin; ``Run`` sets the
    state)."""

    dir: Path
    checkpoint_dir: Path
    device: torch.device
    world_size: int
    step: int
    epoch: int
    _prog: str
    _saved_at: tuple[int, int, int] | None
    _stop_signal: int | None
    _signal_time: float
    _handlers: dict[int, Any]

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

    def check_stop(self, *, where: str | None = None) -> None:
        """If a signal asked to stop: write a checkpoint and raise :class:`RunInterrupted`.

        :meth:`step_done` and :meth:`epochs` call it; call it yourself at other safe points
        (e.g. after a long evaluation; under torchrun on all ranks at once: a signal on any
        rank stops all).

        Args:
            where: Where the loop stopped, for the message, when its own count is not
                :attr:`step` (e.g. ``"step 19 of trial 3"``).
        """
        stop = self._stop_signal
        if self.world_size > 1:
            stop = int(distributed.all_reduce([float(stop or 0)], self.device, "max")[0]) or None
        self._stop_if(stop, where=where)

    def _stop_if(self, signum: int | None, *, where: str | None = None) -> None:
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
            f"received {name}, so the run stopped after "
            f"{where or f'step {self.step} ({self.epoch} epochs completed)'}; checkpoint saved "
            f"to {path}. Resume with: {command}",
            signum,
        )
