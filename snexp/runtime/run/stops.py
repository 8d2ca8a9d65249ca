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

__all__ = ["NonFiniteLoss", "RunInterrupted", "RunStopped", "StopSignals"]

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


class StopSignals:
    """SIGINT/SIGTERM of one run: caught while it runs, and agreed across ranks.

    Args:
        world_size: The number of ranks training together (a stop on any rank stops all).
        device: The device the ranks agree on (one all-reduce).

    Attributes:
        signum: The first stop signal received (or agreed with another rank), or ``None``.
    """

    def __init__(self, world_size: int, device: torch.device) -> None:
        self.world_size, self.device = world_size, device
        self.signum: int | None = None
        self.time = 0.0  # time.monotonic() of the first stop signal
        self.previous: dict[int, Any] = {}  # the handlers install() replaced

    def install(self) -> None:
        """Catch SIGINT and SIGTERM (in the main thread; elsewhere Python cannot)."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGINT/SIGTERM will not stop gracefully")
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self.on_signal)

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def on_signal(self, signum: int, frame: Any) -> None:
        """The handler: the first signal asks to stop after the step; a second Ctrl-C aborts."""
        name = signal.Signals(signum).name
        if self.signum is not None:
            # Under torchrun a Ctrl-C reaches each rank twice, from the terminal and forwarded
            # by torchrun: only a Ctrl-C seconds later means "abort now".
            echo = self.world_size > 1 and time.monotonic() - self.time < 5.0
            if signum == signal.SIGINT and not echo:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            return
        self.signum, self.time = signum, time.monotonic()
        logger.warning(
            "%s received: finishing the current step, then saving a checkpoint%s",
            name,
            " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else "",
        )

    def agree(self, *, bad: bool = False) -> tuple[bool, int | None]:
        """(any rank's ``bad``, the stop signal of any rank): one all-reduce under torchrun.

        Collective: all ranks call it at the same points.
        """
        stop = self.signum
        if self.world_size > 1:
            flags = distributed.all_reduce([float(bad), float(stop or 0)], self.device, "max")
            bad, stop = bad or flags[0] > 0, int(flags[1]) or None
        return bad, stop

    def adopt(self, signum: int) -> None:
        """Stop for ``signum`` as if received here (agreed on another rank's signal)."""
        if self.signum is None:
            self.signum, self.time = signum, time.monotonic()


def interrupted(signum: int, *, where: str, path: Path, command: str,
                world_size: int) -> RunInterrupted:
    """The :class:`RunInterrupted` of a stop after ``where``, saved to ``path``."""
    if world_size > 1 and command.startswith("python "):
        command = "torchrun [your torchrun options] " + command[len("python "):]
    return RunInterrupted(
        f"received {signal.Signals(signum).name}, so the run stopped after {where}; checkpoint "
        f"saved to {path}. Resume with: {command}",
        signum,
    )


def non_finite(value: float | str, *, step: int, epoch: int, last: Path,
               saved_step: int | None) -> NonFiniteLoss:
    """The :class:`NonFiniteLoss` of a loss that became ``value`` in step ``step + 1``."""
    kept = (f"the last good checkpoint, {last} (step {saved_step}), is kept"
            if saved_step is not None else "no checkpoint had been written yet")
    return NonFiniteLoss(
        f"the loss became {value} at step {step + 1} ({epoch} epochs completed); the run "
        f"stopped and {kept}. Try a lower learning rate, gradient clipping or --amp off."
    )
