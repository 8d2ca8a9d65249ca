"""The device a run computes on: ``--device`` selection, ``--amp`` precision, data placement.

:func:`select_device` turns ``--device auto|cpu|cuda|cuda:N|mps`` into a device, with friendly
refusals; :func:`bf16_is_native` is the one answer to "does this device compute bfloat16"
(``Run`` refuses ``--amp bf16`` on a CUDA device without it, ``stylize.train`` turns emulated
bf16 off); :class:`Precision` is ``--amp``: autocast, the fp16 GradScaler and the scaled
optimizer step; :func:`place_model` and :func:`move_to` put models and (nested) batches on the
device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from snexp.runtime.config import ConfigError

__all__ = ["AMP_DTYPES", "Precision", "bf16_is_native", "describe_device", "move_to",
           "select_device"]

# --amp: the autocast dtype of each choice (None: no autocast).
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}


def select_device(spec: str = "auto") -> torch.device:
    """The device asked for: ``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda[:N]``, ``mps``.

    Raises:
        ConfigError: The device does not exist here (the message says what does).
    """
    has_mps = torch.backends.mps.is_available()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if has_mps else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not has_mps:
            raise ConfigError("--device mps: MPS (Apple GPU) is not available here; use cpu")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:") and spec[5:].isdigit():
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {spec}: CUDA is not available (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto"
            )
        index = int(spec[5:]) if ":" in spec else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(
                f"--device {spec}: there are {count} CUDA device(s) here, cuda:0..cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    raise ConfigError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")


def describe_device(device: torch.device) -> str:
    """The device as the run log shows it: its name and memory, or the CPU's threads."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16; a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def move_to(data: Any, device: torch.device, *, channels_last: bool = False) -> Any:
    """Tensors (also inside lists, tuples, namedtuples and dicts) moved to ``device``.

    The copies are non-blocking; with ``channels_last``, 4-D floating-point tensors (image
    batches) also get the channels-last memory format.
    """
    if isinstance(data, torch.Tensor):
        data = data.to(device, non_blocking=True)
        if channels_last and data.dim() == 4 and data.is_floating_point():
            data = data.contiguous(memory_format=torch.channels_last)
        return data
    if isinstance(data, Mapping):
        return type(data)((k, move_to(v, device, channels_last=channels_last))
                          for k, v in data.items())
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(move_to(v, device, channels_last=channels_last) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(move_to(v, device, channels_last=channels_last) for v in data)
    return data


class Precision:
    """``--amp off|bf16|fp16`` on one device: autocast, the GradScaler, the optimizer step.

    Args:
        amp: ``off``, ``bf16`` (autocast, no scaling) or ``fp16`` (autocast with a GradScaler).
        device: The device autocast applies to.

    Raises:
        ConfigError: ``bf16`` on a CUDA device without bfloat16 (on a CPU it is emulated,
            slowly but correctly).

    Attributes:
        dtype: The autocast dtype, or ``None`` for ``off``.
        scaler: The GradScaler, enabled for ``fp16`` only (a checkpoint holds its state).
    """

    def __init__(self, amp: str, device: torch.device) -> None:
        if amp == "bf16" and device.type == "cuda" and not bf16_is_native(device):
            raise ConfigError(f"--amp bf16: {describe_device(device)} lacks bfloat16")
        self.device = device
        self.dtype = AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for ``bf16``/``fp16``; a no-op context for ``off``."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

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
