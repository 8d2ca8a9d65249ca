"""Which backend runs SN's passes: the ``SNEXP_BACKEND`` setting (a leaf: the backends read it,
it imports none of them; :func:`snexp.bench.describe_backend` says in words what runs).

``SNEXP_BACKEND`` is one of ``auto`` (default: Triton kernels for CUDA tensors where Triton is
installed, the C++ CPU passes for contiguous float32/float64 CPU tensors, ATen ops for the
rest), ``aten`` (ATen ops everywhere; no C++ build), ``cpu`` (the C++ passes wherever they
apply; a failed build raises instead of falling back) and ``triton`` (the Triton kernels on any
device, e.g. on CPU under ``TRITON_INTERPRET=1``). The (N, C)-sized mixing is the
:mod:`snexp.norm._mixing` code (in C++ with the CPU passes, tested against it), and under
``torch.compile`` the ops decompose into its ATen form whatever the setting.
"""

from __future__ import annotations

import os

__all__ = ["BACKENDS", "setting"]

BACKENDS = ("auto", "aten", "cpu", "triton")


def setting() -> str:
    """The ``SNEXP_BACKEND`` setting, checked (``SNEXP_CPU_KERNEL=0`` still means ``aten``)."""
    value = os.environ.get("SNEXP_BACKEND", "").strip().lower()
    if not value:
        return "aten" if os.environ.get("SNEXP_CPU_KERNEL", "1") == "0" else "auto"
    if value not in BACKENDS:
        raise ValueError(f"SNEXP_BACKEND={value!r} is not a backend of SN; use one of "
                         f"{', '.join(BACKENDS)} (auto picks Triton on CUDA, the C++ passes "
                         f"on CPU, ATen ops elsewhere), or unset it")
    return value
