"""Switchable Normalization in C, for the common case; ``snexp.norm._mixing`` does the rest.

Luo et al., arXiv 1806.10779, eq. 3-5. After the per-(n, c) statistics, SN works on (N, C)
tensors (LN/BN statistics, the importance softmax, the mixing and its closed-form backward):
in ATen that is ~100 tiny ops per forward + backward, whose dispatch cost dominates at small
shapes; here it is one C call each way (source: ``snexp.norm._kernel_src``). Where ATen would
run its elementwise ops on one thread (below its grain size, or with one torch thread), the
full-size passes are in that call too (statistics + normalize; gradient sums + dx); above it
ATen's threads do them. The running statistics are blended in the same call.

The library is compiled with the system C compiler on first use (well under a second, no
PyTorch headers), cached in ``$XDG_CACHE_HOME/snexp`` (``~/.cache/snexp``) and loaded with
``ctypes``. It is used on CPU, in eager mode, for candidates among IN/LN/BN with local
statistics; on CUDA, under ``torch.compile``, for GN candidates, ``SyncSwitchNorm``, official
(N, C) statistics, without a compiler or with ``SNEXP_NO_KERNEL=1``, the ATen path runs
instead. Both compute the same equations (the tests compare them to 1e-12 in float64).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from snexp.norm import _mixing
from snexp.norm._kernel_src import SOURCE

__all__: list[str] = []

_CODES = {"in": 0, "ln": 1, "bn": 2}
_BN_FIXED = 3
_P, _I, _D, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_long
_FORWARD_ARGS = [_I, _I, _I, _P, _P, _L, _P, _P, _D, _P, _P, _P, _P, _I, _P, _P, _D, _P, _P, _P,
                 _P, _P, _P, _D, _D]
_BACKWARD_ARGS = [_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _D, _D, _D, _P, _P, _P, _P,
                  _L, _P, _P, _P, _P, _P, _P, _P, _P]
# Below ATen's grain size its elementwise ops run on one thread, and the C loops that fuse
# them (one pass instead of two to five) are faster; above it ATen's threads win, except that
# two threads only caught up with one fused C pass from ~16 grains (2**19 values) on: measured
# on the 2-core development machine, (32, 16..64, 8..32, 8..32) inputs.
_GRAIN = 32768

_lib: object = None  # None: not tried yet; False: unavailable


def _build() -> ctypes.CDLL | bool:
    """Compile (once per source and compiler) and load the library; False where impossible."""
    if os.environ.get("SNEXP_NO_KERNEL", "") not in ("", "0") or sys.platform == "win32":
        return False
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return False
    key = "\0".join((SOURCE, compiler, sys.platform, platform.machine()))
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    target = Path(root) / "snexp" / f"sn_kernel_{tag}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / "sn_kernel.c", Path(tmp) / "sn_kernel.so"
                src.write_text(SOURCE)
                subprocess.run([compiler, "-O3", "-shared", "-fPIC", "-o", str(out), str(src),
                                "-lm"], check=True, capture_output=True, timeout=120)
                os.replace(out, target)  # atomic: concurrent builders race harmlessly
        lib = ctypes.CDLL(str(target))
        for s in ("f", "d"):
            getattr(lib, f"sn_forward_{s}").argtypes = _FORWARD_ARGS
            getattr(lib, f"sn_backward_{s}").argtypes = _BACKWARD_ARGS
        return lib
    except (OSError, subprocess.SubprocessError, AttributeError):
        return False


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or ``None`` when it cannot be built here."""
    global _lib
    if _lib is None:
        _lib = _build()
    return _lib or None


def usable(x: torch.Tensor, spec) -> bool:
    """Whether the C path applies: CPU, eager mode, IN/LN/BN candidates, local statistics."""
    return (x.device.type == "cpu" and not spec.sync and not spec.official_2d
            and all(cand in _CODES for cand in spec.candidates)
            and not torch.compiler.is_compiling() and library() is not None)


_codes_cache: dict[tuple, tuple[ctypes.Array, int]] = {}


def _codes(candidates: tuple[str, ...], fixed_bn: bool) -> int:
    key = (candidates, fixed_bn)
    if key not in _codes_cache:
        codes = [_BN_FIXED if (c == "bn" and fixed_bn) else _CODES[c] for c in candidates]
        arr = (ctypes.c_int * len(codes))(*codes)
        _codes_cache[key] = (arr, ctypes.addressof(arr))
    return _codes_cache[key][1]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _small(numel: int) -> bool:
    """Whether one C pass beats ATen's threads over ``numel`` values (see ``_GRAIN``)."""
    threads = torch.get_num_threads()
    return threads == 1 or numel <= _GRAIN * (16 if threads == 2 else 1)


def _one_pass(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the full-size passes over ``t`` run in C (else in ATen, multi-threaded)."""
    return t.dtype == dtype and t.is_contiguous() and _small(t.numel())


def forward(x, weight, bias, mean_w, var_w, bn_mean, bn_var, *, spec, logits, update=None):
    """As ``snexp.norm._mixing.forward``; ``update`` = (running_mean, running_var, factor,
    unbiased) blends the BN batch statistics into the running buffers here (then no batch
    statistics are returned), as ``snexp.norm.functional.switch_norm`` would."""
    n, c = x.shape[:2]
    m = math.prod(x.shape[2:])
    dt = torch.promote_types(x.dtype, torch.float32)
    denom = m - 1 if (spec.unbiased_in and m > 1) else m
    mw, vw, rm, rv, w, b = (t if t is None or (t.dtype == dt and t.is_contiguous())
                            else t.to(dt).contiguous()
                            for t in (mean_w, var_w, bn_mean, bn_var, weight, bias))
    batch_norm = "bn" in spec.candidates and rm is None
    run = (None, None, 0.0, 1.0)
    if (update is not None and batch_norm and update[0].dtype == dt == update[1].dtype
            and update[0].is_contiguous() and update[1].is_contiguous()):
        scale = n * m / (n * m - 1) if (update[3] and n * m > 1) else 1.0
        run = (update[0].data_ptr(), update[1].data_ptr(), float(update[2]), scale)
    batch = torch.empty((2, c), dtype=dt) if (batch_norm and run[0] is None) else None
    ab = None
    if _one_pass(x, dt):  # statistics, mixing and normalize in one call
        mu, var = torch.empty((2, n, c), dtype=dt).unbind()
        y = torch.empty_like(x)
        src = x
    else:  # ATen's threads for the full-size passes
        mu, var, y = _mixing.centered(x)  # var: the rows' L2 norms until the call
        src = None
        if not (y.is_contiguous() and _small(y.numel())):
            ab = torch.empty((2,) + tuple(mu.shape) + (1,) * (x.dim() - 2), dtype=dt)
    step = n * c * dt.itemsize
    fn = _lib.sn_forward_f if dt == torch.float32 else _lib.sn_forward_d
    if fn(n, c, len(spec.candidates), _codes(spec.candidates, rm is not None), _ptr(src), m,
          mu.data_ptr(), var.data_ptr(), float(denom), _ptr(rm), _ptr(rv), mw.data_ptr(),
          vw.data_ptr(), int(logits), _ptr(w), _ptr(b), spec.eps, _ptr(ab),
          None if ab is None else ab.data_ptr() + step, None if ab is not None else y.data_ptr(),
          _ptr(batch), *run):
        raise MemoryError("snexp SN kernel: out of memory for its work buffer")
    if run[0] is not None:  # written in place behind autograd's back: tell it
        torch.autograd.graph.increment_version(update[0])
        torch.autograd.graph.increment_version(update[1])
    if ab is not None:
        y = _mixing.normalize(y, *ab.unbind())
    return y, batch, (n * m if batch_norm else 0), (mu, var, mw, vw, rm, rv)


def backward(saved, x, dy, weight, *, spec, logits, n_total, need):
    """As ``snexp.norm._mixing.backward``."""
    mu, var, mw, vw, rm, rv = saved
    n, c = mu.shape
    m = math.prod(x.shape[2:])
    dt = mu.dtype
    denom = m - 1 if (spec.unbiased_in and m > 1) else m
    w = weight if weight is None or weight.dtype == dt else weight.to(dt)
    k = len(spec.candidates)
    # one tensor each: gradients that shared a storage would alias once accumulated in .grad
    dweight, dbias, dmean_w, dvar_w = (torch.empty(size, dtype=dt) if need[i] else None
                                       for i, size in ((1, c), (2, c), (3, k), (4, k)))
    s1 = s2 = dx = apq = src = grad = None
    if _one_pass(x, dt) and _one_pass(dy, dt):  # sums, mixing and dx in one call
        dx = torch.empty_like(x) if need[0] else None
        src, grad = x, dy
    else:
        s1, s2 = _mixing.grad_sums(dy, x, mu)
        if need[0]:
            apq = torch.empty((3, n, c) + (1,) * (x.dim() - 2), dtype=dt)
    step = n * c * dt.itemsize
    fn = _lib.sn_backward_f if dt == torch.float32 else _lib.sn_backward_d
    if fn(n, c, k, _codes(spec.candidates, rm is not None), mu.data_ptr(), var.data_ptr(),
          _ptr(rm), _ptr(rv), mw.data_ptr(), vw.data_ptr(), int(logits), _ptr(w), spec.eps,
          float(m), float(denom), _ptr(s1), _ptr(s2), _ptr(src), _ptr(grad), m,
          _ptr(dweight), _ptr(dbias), _ptr(dmean_w), _ptr(dvar_w),
          *((None,) * 3 if apq is None else (apq.data_ptr() + i * step for i in range(3))),
          _ptr(dx)):
        raise MemoryError("snexp SN kernel: out of memory for its work buffer")
    if apq is not None:
        dx = _mixing.input_grad(x, dy, *apq.unbind())
    return dx, dweight, dbias, dmean_w, dvar_w
