"""SN's Triton kernels on a GPU: correctness against SN's ATen path, and speed against cuDNN BN.

One process, two parts (about 2 minutes on one H200, most of it compiling kernels)::

    python benchmarks/sn_gpu.py --out sn_gpu.md

1. ``check``: SN layers (2-D, 1-D (N, C), 3-D, sparse; odd sizes, N = 1, H*W = 1,
   channels_last, eval, no affine, ``momentum=None``, LN+BN, a group candidate and
   ``compat="official"`` (ATen mixing between the Triton passes), float64/32/16 and bfloat16)
   run two training or eval steps on the Triton path and on the ATen path
   (``SNEXP_BACKEND=aten``, :mod:`snexp.norm._mixing`'s passes) from the same state; outputs,
   every gradient and the running statistics must agree (max |difference| / max |ATen value|
   under a per-dtype bound), and the Triton path must really have run.
2. ``bench``: at ResNet-50's normalization shapes, batch 32 and 2, float32 and bfloat16 (and
   bfloat16 channels_last at batch 32): the time of one fwd+bwd and of one eval forward of
   SN through the Triton path, of SN through the ATen path, and of ``nn.BatchNorm2d`` (cuDNN),
   timed with CUDA events (median of 5 runs of a loop of ~30 ms each, warm caches), the
   fwd+bwd kernels' own GPU time from the profiler (launch overhead left out), plus the same
   agreement check at every shape.

The markdown table goes to stdout and to ``--out``; the exit status is 1 when an agreement
check failed. ``--check`` runs part 1 only (seconds). Imports only torch, triton and snexp.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import snexp  # noqa: E402
from snexp.norm import _triton  # noqa: E402

SHAPES = ((64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
# max |triton - aten| / max |aten| allowed: full-size outputs (y, dx) are rounded to the input
# dtype once; the small tensors are float32 (float64) sums in a different order
FULL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SMALL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 1e-3}
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


class _Spy:
    """Counts calls of the Triton backend's forward (to prove the Triton path ran)."""

    def __init__(self):
        self.calls = 0
        self._forward = _triton.forward

        def forward(*args, **kwargs):
            self.calls += 1
            return self._forward(*args, **kwargs)

        _triton.forward = forward


def _backend(name: str) -> None:
    os.environ["SNEXP_BACKEND"] = name  # read by snexp on every call


def _randomized(layer: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if not t.is_floating_point() or name.endswith(("radius", "_fixed")):
                continue
            if name in ("running_var", "weight"):  # positive, as trained ones are
                value = torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5
            else:
                value = torch.randn(t.shape, generator=g, dtype=torch.float64)
            t.copy_(value.to(t.dtype))
    return layer


def _step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, training: bool):
    """One step: y and, in training, the gradients of x and of every parameter."""
    if not training:
        with torch.no_grad():
            return layer(x), []
    x = x.detach().requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]
    y = layer(x)
    return y, list(torch.autograd.grad(y, [x, *params], dy))


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def agree(make: Callable[[], nn.Module], x: torch.Tensor, training: bool,
          steps: int = 2) -> tuple[bool, str]:
    """Run ``steps`` steps on the Triton and the ATen path from one state; compare them."""
    dy = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(1),
                     device=x.device, dtype=torch.float32).to(x.dtype)
    spy = _triton_spy
    results = {}
    for name in ("triton", "aten"):
        _backend(name)
        layer = make().train(training)
        before = spy.calls
        for _ in range(steps):
            y, grads = _step(layer, x, dy, training)
        buffers = [b for b in layer.buffers() if b.is_floating_point()]
        results[name] = (y, grads, buffers, spy.calls - before)
    _backend("triton")
    (y, grads, bufs, calls), (yw, grads_w, bufs_w, calls_w) = results["triton"], results["aten"]
    full = FULL[x.dtype]
    small = SMALL[x.dtype if x.dtype == F64 else F32]
    e_y = _error(y, yw)
    e_dx = _error(grads[0], grads_w[0]) if grads else 0.0
    e_small = max([_error(a, b) for a, b in zip(grads[1:] + bufs, grads_w[1:] + bufs_w)],
                  default=0.0)
    ok = (calls == steps and calls_w == 0 and y.dtype == yw.dtype and e_y <= full
          and e_dx <= full and e_small <= small)
    note = "" if calls == steps else f", Triton ran {calls}/{steps} times"
    return ok, f"y {e_y:.1e}, dx {e_dx:.1e}, params/buffers {e_small:.1e}{note}"


def _sn(c: int, device, dtype=F32, cls=snexp.SwitchNorm2d, **kw) -> Callable[[], nn.Module]:
    base = _randomized(cls(c, **kw)).to(device=device, dtype=dtype)
    return lambda: copy.deepcopy(base)


def _x(shape, device, dtype, channels_last=False, seed=0) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(seed)
    x = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 2 + 1).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def check(device) -> list[tuple[str, bool, str]]:
    """Part 1: the edge cases, each ``(name, ok, errors)``."""
    cl = True
    cases = [
        ("odd sizes (3, 5, 7, 3)", _sn(5, device), _x((3, 5, 7, 3), device, F32), True),
        ("N = 1", _sn(8, device), _x((1, 8, 5, 5), device, F32), True),
        ("H*W = 1", _sn(12, device), _x((16, 12, 1, 1), device, F32), True),
        ("channels_last", _sn(24, device), _x((4, 24, 9, 9), device, F32, cl), True),
        ("eval", _sn(24, device), _x((4, 24, 9, 9), device, F32), False),
        ("eval, channels_last, bf16", _sn(24, device), _x((4, 24, 9, 9), device, BF16, cl),
         False),
        ("affine=False", _sn(6, device, affine=False), _x((4, 6, 5, 5), device, F32), True),
        ("momentum=None", _sn(6, device, momentum=None), _x((4, 6, 5, 5), device, F32), True),
        ("ln+bn", _sn(6, device, candidates=("ln", "bn")), _x((4, 6, 5, 5), device, F32),
         True),
        ("bn only, eval", _sn(6, device, candidates=("bn",)), _x((4, 6, 5, 5), device, F32),
         False),
        ("gn4 (ATen mixing)", _sn(8, device, candidates=("in", "ln", "bn", "gn4")),
         _x((4, 8, 5, 5), device, F32), True),
        ("compat=official", _sn(6, device, compat="official"), _x((4, 6, 5, 5), device, F32),
         True),
        ("1-D (N, C), official", _sn(6, device, cls=snexp.SwitchNorm1d, compat="official"),
         _x((8, 6), device, F32), True),
        ("3-D", _sn(4, device, cls=snexp.SwitchNorm3d), _x((2, 4, 3, 5, 7), device, F32),
         True),
        ("sparse SN", _sn(6, device, cls=snexp.SparseSwitchNorm2d),
         _x((4, 6, 5, 5), device, F32), True),
        ("float64", _sn(6, device, F64), _x((4, 6, 5, 5), device, F64), True),
        ("float16", _sn(32, device), _x((4, 32, 14, 14), device, F16), True),
        ("bfloat16", _sn(32, device), _x((4, 32, 14, 14), device, BF16), True),
        ("long rows (2, 64, 112, 112)", _sn(64, device), _x((2, 64, 112, 112), device, F32),
         True),
        ("(2, 2048, 7, 7) bf16 channels_last", _sn(2048, device),
         _x((2, 2048, 7, 7), device, BF16, cl), True),
    ]
    out = []
    for name, make, x, training in cases:
        try:
            ok, errors = agree(make, x, training)
        except Exception as exc:  # noqa: BLE001 - a case that raises is a failed case
            ok, errors = False, f"{type(exc).__name__}: {exc}"[:300]
        out.append((name, ok, errors))
        print(f"  {'ok ' if ok else 'BAD'} {name}: {errors}", flush=True)
    return out


def _time_us(fn: Callable[[], object]) -> float:
    """Median over 5 runs of a ~30 ms loop of ``fn``, per call, in microseconds."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    end.synchronize()
    per = start.elapsed_time(end) / 3
    n = int(min(200, max(3, 30.0 / max(per, 1e-3))))
    runs = []
    for _ in range(5):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) / n * 1e3)
    return statistics.median(runs)


def _kernel_us(fn: Callable[[], object], iters: int = 5) -> float | None:
    """GPU time of ``fn``'s kernels alone (their durations summed, gaps left out), per call,
    from the profiler: what is left when the host's launch overhead is hidden (CUDA graphs,
    a busy stream). ``None`` where the profiler cannot see the GPU."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        total = 0.0
        for event in prof.key_averages():
            total += getattr(event, "self_device_time_total",
                             getattr(event, "self_cuda_time_total", 0.0))
        return total / iters if total > 0 else None
    except Exception:  # noqa: BLE001 - a figure we can do without
        return None


def _train_fn(layer, x, dy):
    params = [p for p in layer.parameters() if p.requires_grad]
    x = x.detach().requires_grad_()

    def step():
        torch.autograd.grad(layer(x), [x, *params], dy)
    return step


def _eval_fn(layer, x):
    def step():
        with torch.no_grad():
            layer(x)
    return step


def bench(device, batches=(32, 2), budget: float = 150.0,
          errors: list[str] | None = None) -> list[dict]:
    """Part 2: one row per (batch, shape, dtype, layout); rows past ``budget`` seconds are
    left out (the note says how many); a configuration that raises is appended to
    ``errors`` and left out of the table."""
    errors = [] if errors is None else errors
    configs = [(b, s, dt, False) for dt in (F32, BF16) for b in batches for s in SHAPES]
    configs += [(32, s, BF16, True) for s in SHAPES if 32 in batches]
    rows = []
    deadline = time.monotonic() + budget
    for i, (b, (c, h, w), dt, cl) in enumerate(configs):
        if time.monotonic() > deadline:
            print(f"  budget of {budget:.0f} s spent: {len(configs) - i} configurations left "
                  f"out", flush=True)
            break
        shape = (b, c, h, w)
        row = {"shape": shape, "dtype": str(dt).removeprefix("torch."),
               "layout": "channels_last" if cl else "NCHW"}
        try:
            x = _x(shape, device, dt, cl)
            dy = _x(shape, device, dt, cl, seed=1)
            make = _sn(c, device)
            row["ok"], row["errors"] = agree(make, x, True, steps=1)
            sn, bn = make(), nn.BatchNorm2d(c).to(device)
            for mode in ("train", "eval"):
                sn.train(mode == "train")
                bn.train(mode == "train")
                for name, layer, backend in (("bn", bn, "triton"), ("sn", sn, "triton"),
                                             ("aten", sn, "aten")):
                    _backend(backend)
                    fn = _train_fn(layer, x, dy) if mode == "train" else _eval_fn(layer, x)
                    row[f"{name}_{mode}"] = _time_us(fn)
                    if mode == "train" and name != "aten":
                        row[f"{name}_kernels"] = _kernel_us(fn)
        except Exception as exc:  # noqa: BLE001 - one configuration, not the whole run
            print(f"  {shape} {row['dtype']} {row['layout']}: ERROR {type(exc).__name__}: "
                  f"{exc}"[:400], flush=True)
            errors.append(f"{shape} {row['dtype']} {row['layout']}: {type(exc).__name__}")
            continue
        finally:
            _backend("triton")
        rows.append(row)
        print(f"  {shape} {row['dtype']} {row['layout']}: SN/BN fwd+bwd "
              f"{row['sn_train'] / row['bn_train']:.2f}, eval "
              f"{row['sn_eval'] / row['bn_eval']:.2f} ({'ok' if row['ok'] else 'MISMATCH'}: "
              f"{row['errors']})", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| shape | dtype | layout | BN fwd+bwd us | SN/BN fwd+bwd | SN/BN kernels only | "
            "SN-ATen/BN fwd+bwd | BN eval us | SN/BN eval | SN-ATen/BN eval | "
            "Triton vs ATen (max rel. diff) |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        sn_k, bn_k = r.get("sn_kernels"), r.get("bn_kernels")
        kernels = f"{sn_k / bn_k:.2f}" if sn_k and bn_k else "-"
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['layout']} | {r['bn_train']:.0f} | "
            f"{r['sn_train'] / r['bn_train']:.2f} | {kernels} | "
            f"{r['aten_train'] / r['bn_train']:.2f} | "
            f"{r['bn_eval']:.0f} | {r['sn_eval'] / r['bn_eval']:.2f} | "
            f"{r['aten_eval'] / r['bn_eval']:.2f} | {'ok' if r['ok'] else 'MISMATCH'}: "
            f"{r['errors']} |")
    train = [r["sn_train"] / r["bn_train"] for r in rows]
    evals = [r["sn_eval"] / r["bn_eval"] for r in rows]
    kernels = [r["sn_kernels"] / r["bn_kernels"] for r in rows
               if r.get("sn_kernels") and r.get("bn_kernels")]
    lines.append("")
    lines.append(f"SN (Triton) / cuDNN BN: median fwd+bwd ratio {statistics.median(train):.2f} "
                 f"(max {max(train):.2f}), eval ratio {statistics.median(evals):.2f} "
                 f"(max {max(evals):.2f})"
                 + (f", kernels-only fwd+bwd ratio {statistics.median(kernels):.2f} "
                    f"(max {max(kernels):.2f})" if kernels else ""))
    return "\n".join(lines) + "\n"


_triton_spy: _Spy


def main(argv: list[str] | None = None) -> int:
    global _triton_spy
    parser = argparse.ArgumentParser(prog="python benchmarks/sn_gpu.py", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write the report here (.md)")
    parser.add_argument("--check", action="store_true", help="the agreement checks only")
    parser.add_argument("--device", default="cuda", choices=("cuda",),
                        help="the GPU (cuda, the current device)")
    parser.add_argument("--batches", default="32,2", help="batch sizes of the bench")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds for the bench; later configurations are left out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not _triton.usable(torch.empty(1, 1, device="cuda")):
        parser.error("needs a CUDA GPU and an importable Triton")
    device = torch.device("cuda")
    _triton_spy = _Spy()
    _backend("triton")
    started = time.monotonic()
    props = torch.cuda.get_device_properties(device)
    import triton

    about = (f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, "
             f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    print(f"# SN Triton kernels on {about}\n\n## check", flush=True)
    checks = check(device)
    failed = [name for name, ok, _ in checks if not ok]
    report = [f"# SN's Triton kernels: `python benchmarks/sn_gpu.py`\n\n- {about}\n",
              "## Agreement with the ATen path\n",
              "| case | ok | max diff / max value |", "|---|---|---|",
              *(f"| {n} | {'ok' if ok else 'FAILED'} | {e} |" for n, ok, e in checks), ""]
    if not args.check:
        print("\n## bench", flush=True)
        errors: list[str] = []
        rows = bench(device, tuple(int(b) for b in args.batches.split(",")), args.budget,
                     errors)
        failed += [str(r["shape"]) for r in rows if not r["ok"]] + errors
        text = table(rows) if rows else "(no configuration measured)\n"
        print("\n" + text)
        report += ["## Time against cuDNN BatchNorm2d (CUDA events, warm caches)\n", text]
    summary = (f"{len(checks)} checks, {len(failed)} failed" + (f": {failed}" if failed else "")
               + f"; {time.monotonic() - started:.0f} s")
    report.append(f"\n{summary}\n")
    print(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
