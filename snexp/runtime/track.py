"""Where a run's numbers go: TensorBoard events and progress bars.

- :class:`Tracker` writes TensorBoard events into one directory (``<out>/tb``): scalars,
  images, text, histograms, SN importance (:func:`snexp.norm.importance.log_importance`) and
  hyperparameters with their final metrics in the *same* run. ``SummaryWriter.add_hparams``
  would open a stray timestamped sub-run; we write its three summaries ourselves. On resume a
  ``purge_step`` hides the events written after the checkpoint, so curves do not double.
- :func:`progress` makes tqdm bars that stay quiet off-terminal and on non-zero ranks;
  :class:`TqdmLoggingHandler` prints log lines without breaking them.

The tracker does not know what a cell or a Gram matrix is: the loop hands it tags and values.
Optuna studies live in :mod:`snexp.runtime.study`; this module imports no optuna, so a run
that opens no study (training, retraining) never loads it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from tqdm.auto import tqdm

from snexp.runtime.config import flatten
from snexp.runtime.files import redact

__all__ = ["Tracker", "TqdmLoggingHandler", "progress"]


def _number(value: float | torch.Tensor) -> float:
    return float(value.detach().item() if isinstance(value, torch.Tensor) else value)


class Tracker:
    """TensorBoard logging for one run directory; every method is a no-op when disabled.

    Args:
        log_dir: Directory of the event files (``<out>/tb``); ``None`` disables the tracker.
        purge_step: On resume, the first step not covered by the checkpoint: TensorBoard hides
            older events at this step or later. ``None`` for a fresh run.
        enabled: ``False`` on non-zero ranks of a distributed job.
        flush_secs: How often pending events are written to disk.

    Example:
        >>> with Tracker("runs/demo/tb") as tracker:  # doctest: +SKIP
        ...     tracker.scalars({"loss/total": 2.5, "lr": 1e-3}, step=1)
    """

    def __init__(
        self,
        log_dir: str | Path | None,
        *,
        purge_step: int | None = None,
        enabled: bool = True,
        flush_secs: int = 30,
    ) -> None:
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            if purge_step is not None:
                _wait_for_later_event_name(Path(log_dir))
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step, flush_secs=flush_secs)

    @property
    def enabled(self) -> bool:
        """Whether events are written."""
        return self.writer is not None

    def scalar(self, tag: str, value: float | torch.Tensor, step: int) -> None:
        """One scalar, e.g. ``tracker.scalar("child/loss", loss, step)``."""
        if self.writer is not None:
            self.writer.add_scalar(tag, _number(value), step)

    def scalars(
        self, values: Mapping[str, float | torch.Tensor], step: int, *, prefix: str = ""
    ) -> None:
        """Several scalars at one step, each under its own tag (``prefix + key``).

        Unlike ``SummaryWriter.add_scalars`` this writes no sub-runs.
        """
        for tag, value in values.items():
            self.scalar(prefix + tag, value, step)

    def image(self, tag: str, images: torch.Tensor, step: int, *, nrow: int = 8) -> None:
        """An image ``(C, H, W)`` or a batch ``(N, C, H, W)`` shown as a grid; values in [0, 1]."""
        if self.writer is None:
            return
        images = images.detach().float().cpu().clamp(0, 1)
        if images.dim() == 4:
            from torchvision.utils import make_grid

            images = make_grid(images, nrow=nrow, padding=2)  # (C, H', W')
        self.writer.add_image(tag, images, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Markdown text (code blocks render), e.g. an architecture or the config."""
        if self.writer is not None:  # event files are as readable as run.log: no passwords
            self.writer.add_text(tag, redact(text), step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """The distribution of a tensor's values."""
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def importance(self, model: torch.nn.Module, step: int, **kwargs: Any) -> None:
        """Log the SN importance weights of every switchable layer of ``model``.

        Delegates to :func:`snexp.norm.importance.log_importance`; ``kwargs`` (``figure=False``)
        are passed on.
        """
        if self.writer is None:
            return
        from snexp.norm.importance import log_importance  # lazy: the core's inspection module

        log_importance(self.writer, getattr(model, "_orig_mod", model), step, **kwargs)

    def hparams(
        self, hparams: Mapping[str, Any] | Any, metrics: Mapping[str, float], *, step: int = 0
    ) -> None:
        """Record hyperparameters and their final metrics in this run (not a sub-run).

        Args:
            hparams: A config dataclass (flattened to dotted keys) or a mapping. Values other
                than numbers and strings are written as text (``none``, ``[a, b]``, ``true``).
            metrics: Final metric values; written as scalars at ``step`` under these tags, which
                the HParams dashboard shows next to the hyperparameters.
            step: Step of the metric scalars.
        """
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        if dataclasses.is_dataclass(hparams) and not isinstance(hparams, type):
            hparams = flatten(hparams)
        values = {k: _hparam_value(v) for k, v in hparams.items()}
        finals = {k: _number(v) for k, v in metrics.items()}
        experiment, start, end = hparams_summary(values, finals)
        file_writer = self.writer.file_writer
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        for tag, value in finals.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        """Write pending events to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later calls are no-ops."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_for_later_event_name(folder: Path) -> None:
    """Sleep until the clock is past the creation second of every event file in ``folder``.

    TensorBoard reads a directory's event files in name order, and a name starts with the second
    it was created in: a resumed writer opened within that second could sort before the events
    its ``purge_step`` is meant to hide.
    """
    seconds = [p.name.split(".")[3] for p in folder.glob("events.out.tfevents.*")]
    latest = max((int(s) for s in seconds if s.isdigit()), default=None)
    if latest is not None and time.time() < latest + 1:
        time.sleep(latest + 1 - time.time())


def _hparam_value(value: Any) -> float | int | str:
    if isinstance(value, bool) or value is None:
        return "none" if value is None else str(value).lower()
    if isinstance(value, str):
        return redact(value)  # a --storage URL's password stays out of the event files
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (tuple, list)):
        return redact("[" + ", ".join(str(v) for v in value) + "]")
    return redact(str(value))


# ----------------------------------------------------------------------------- progress


def _is_tty(stream: IO[str] | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    rank: int = 0,
    file: IO[str] | None = None,
    leave: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar, off when its stream is not a terminal or on non-zero ranks.

    Put the current numbers in the postfix: ``bar.set_postfix(loss=f"{loss:.3f}")``.

    Args:
        iterable: What to iterate over (or ``None`` and call ``bar.update(n)``).
        total: Number of items, when ``iterable`` has no ``len``.
        desc: Text before the bar, e.g. ``"epoch 3"``.
        rank: Distributed rank; only rank 0 shows a bar.
        file: Stream of the bar (default ``sys.stderr``).
        leave: Keep the finished bar on screen.
        **kwargs: Passed to ``tqdm``.

    Returns:
        The bar (a plain pass-through iterator when disabled).
    """
    file = file if file is not None else sys.stderr
    disable = rank != 0 or not _is_tty(file)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        file=file,
        leave=leave,
        disable=disable,
        dynamic_ncols=True,
        **kwargs,
    )


class TqdmLoggingHandler(logging.StreamHandler):
    """A console handler that prints through ``tqdm.write`` so log lines do not break bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
