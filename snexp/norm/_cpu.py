"""Build and load the CPU passes of SN (``csrc/switch_norm_cpu.cpp``) with PyTorch's tools.

``torch.utils.cpp_extension.load`` compiles the C++ file once per source, compiler flags and
CPU instruction set (built for this CPU: ``-march=native``) into PyTorch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), then loads it from there
(well under a second). The first build takes ~20-60 s. The ops appear as
``torch.ops.snexp_cpu.*`` and are used by :mod:`snexp.norm._mixing` for contiguous float32 or
float64 CPU tensors; everything else runs the same equations in ATen ops.

``SNEXP_CPU_KERNEL=0`` skips the build (ATen ops only). Where no C++ compiler is found, or the
build fails, the passes fall back to ATen ops with one warning that says why; the tests load
with ``strict=True``, so a broken source fails them instead of passing for a missing compiler.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

__all__ = ["available", "load", "usable"]

SOURCE = Path(__file__).with_name("csrc") / "switch_norm_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    """The CPU's instruction-set flags (a build for one CPU must not run on another)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def load(*, strict: bool = False, verbose: bool = False) -> bool:
    """Build (first time) and load the C++ passes; True when ``torch.ops.snexp_cpu`` is there.

    Args:
        strict: raise instead of warning when a compiler exists but the build fails.
        verbose: show the compiler's output.

    Raises:
        RuntimeError: with ``strict``, a compiler exists but the build or load failed.
    """
    if strict and _state.get("error"):
        raise RuntimeError(_state["error"])
    if "loaded" in _state:
        return bool(_state["loaded"])
    if os.environ.get("SNEXP_CPU_KERNEL", "1") == "0":
        _state["loaded"] = False
        return False
    if _compiler() is None:
        warnings.warn("snexp: no C++ compiler found; SN's CPU passes run as ATen ops "
                      "(slower). Install g++ to build snexp/norm/csrc/switch_norm_cpu.cpp.",
                      stacklevel=3)
        _state["loaded"] = False
        return False
    from torch.utils import cpp_extension

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode()
                         + _cpu_signature().encode() + torch.__version__.encode())
    name = f"snexp_cpu_{key.hexdigest()[:12]}"
    try:
        cpp_extension.load(name, [str(SOURCE)], extra_cflags=_FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False,
                           verbose=verbose)
    except Exception as e:
        _state["loaded"] = False
        _state["error"] = (f"snexp: building {SOURCE} failed ({type(e).__name__}: {e}); SN's "
                           f"CPU passes run as ATen ops (slower). SNEXP_CPU_KERNEL=0 skips the "
                           f"build.")
        if strict:
            raise RuntimeError(_state["error"]) from e
        warnings.warn(_state["error"], stacklevel=3)
        return False
    _state["loaded"] = True
    return True


def available() -> bool:
    """Whether the C++ passes are loaded (building them on first call)."""
    return load()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the C++ passes apply: contiguous float32/float64 CPU tensors of one dtype."""
    x = tensors[0]
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if not all(t.is_contiguous() and t.dtype == x.dtype for t in tensors):
        return False
    return available()
