"""Device selection: ``--device auto|cpu|cuda|cuda:N|mps`` with friendly refusals."""

from __future__ import annotations

import torch

from snexp.runtime.config import ConfigError

__all__ = ["describe_device", "select_device"]


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
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)
