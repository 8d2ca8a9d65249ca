"""The ``[runtime]`` section every entry point shares, and the flags that set it.

:class:`RuntimeConfig` is a field of each experiment's config (``runtime: RuntimeConfig``):
where the run directory is, resume/overwrite, checkpoint cadence, device, seed, precision and
the like. :data:`RUNTIME_FLAGS` maps its everyday flags (``--out``, ``--resume``, ``--seed``,
...) to its keys; :func:`snexp.runtime.config.build_parser` adds them to every such entry point.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from snexp.runtime.config.bounds import Range

__all__ = ["CONFIG_FILE", "RUNTIME_FLAGS", "RuntimeConfig"]

CONFIG_FILE = "config.toml"  # name of the resolved config inside a run directory
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """The settings every entry point shares (the ``[runtime]`` section)."""

    out: str | None = None  # run directory; none: runs/<experiment>/<YYYYmmdd-HHMMSS>
    resume: bool = False  # continue the run in --out from its checkpoints/last.pt
    overwrite: bool = False  # replace the run in --out (only files snexp wrote) and start afresh
    checkpoint_every: int = 0  # also checkpoint every N steps (epoch and run ends always)
    device: str = "auto"  # auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps
    seed: Annotated[int, Range(ge=0, lt=2**64)] = 0  # seed of python, numpy and torch RNGs
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast precision; fp16 adds a GradScaler
    deterministic: bool = False  # deterministic algorithms only (exact resume on CPU)
    channels_last: bool = False  # channels-last memory format for models and image batches
    compile: bool = False  # torch.compile the model (the checkpoint keeps the plain module)
    sync_norm: bool = False  # under torchrun: SN/BN batch statistics over all ranks (SyncSN)

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not _DEVICE_RE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: pick one")


# Flags every entry point gets (when its config has a ``runtime`` section), flag -> key.
RUNTIME_FLAGS: dict[str, str] = {
    "--out": "runtime.out",
    "--resume": "runtime.resume",
    "--overwrite": "runtime.overwrite",
    "--checkpoint-every": "runtime.checkpoint_every",
    "--device": "runtime.device",
    "--seed": "runtime.seed",
    "--amp": "runtime.amp",
    "--deterministic": "runtime.deterministic",
    "--channels-last": "runtime.channels_last",
    "--compile": "runtime.compile",
    "--sync-norm": "runtime.sync_norm",
}
