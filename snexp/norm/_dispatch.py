"""The one dispatch point of SN's forward and backward: the Triton kernels where they apply,
else the ATen equations of :mod:`snexp.norm._mixing` (with the C++ CPU passes inside them).

Triton is taken for CUDA tensors, or on any device with ``SNEXP_BACKEND=triton`` (e.g. on CPU
under ``TRITON_INTERPRET=1``), and imported only then, so that ``import snexp`` and CPU calls
load no Triton. Kept apart from ``_mixing`` because the Triton backend is generated from
``_mixing``'s (N, C) pieces: the equations import no backend.
"""

from __future__ import annotations

import os

from torch import Tensor

from snexp.norm import _mixing

__all__: list[str] = []


def _triton(x: Tensor):
    """The Triton backend when it takes ``x``, else None."""
    if not (x.is_cuda or os.environ.get("SNEXP_BACKEND") == "triton"):
        return None
    from snexp.norm import _triton

    return _triton if _triton.usable(x) else None


def forward(x, weight, bias, mean_w, var_w, bn_mean, bn_var, *, spec, logits):
    """As :func:`snexp.norm._mixing.forward`, on the backend that takes ``x``."""
    backend = _triton(x) or _mixing
    return backend.forward(x, weight, bias, mean_w, var_w, bn_mean, bn_var, spec=spec,
                           logits=logits)


def backward(saved, x, dy, weight, *, spec, logits, n_total, need):
    """As :func:`snexp.norm._mixing.backward`, on the backend that takes ``x``."""
    backend = _triton(x) or _mixing
    return backend.backward(saved, x, dy, weight, spec=spec, logits=logits, n_total=n_total,
                            need=need)
