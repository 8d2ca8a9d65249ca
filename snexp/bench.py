"""Speed of SN against native normalizers: ``python -m snexp.bench``.

For each input shape, times forward+backward (training mode) and forward (eval mode, no grad)
of SN, SSN, BatchNorm2d, GroupNorm(32), InstanceNorm2d, the plain-autograd reference SN and
``torch.compile``'d SN and BatchNorm2d, and prints each as a ratio to (eager) BatchNorm2d
measured in the same process, plus compiled SN against compiled BatchNorm2d. The first line
names the CPU (model, vector ISA) or GPU, the second the backend SN's passes ran on
(``SNEXP_BACKEND``). Implementations are timed
round-robin (one repetition of each in turn, in a new order every round, so that none
always runs right after the same neighbour) and summarized by the median, so that a noisy
shared machine slows all of them alike. Ratios < 1 mean faster than BatchNorm2d.

On Linux/glibc the benchmark first turns off heap trimming and mmap for buffers up to 32 MiB
(``mallopt``; ``--no-malloc-tune`` keeps the defaults). Without it, whichever op happens to get
a fresh, never-touched buffer pays thousands of page faults, which can cost more than the
kernels being compared. PyTorch's CPU tuning guide recommends jemalloc/tcmalloc for the same
reason.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from snexp import reference
from snexp.norm import _backend
from snexp.norm.factory import make_norm

__all__ = ["DEFAULT_SHAPES", "describe_backend", "format_table", "run_benchmark"]

DEFAULT_SHAPES = ((32, 64, 32, 32), (8, 64, 56, 56), (128, 16, 32, 32), (4, 256, 14, 14))
LAYERS = ("SN", "SSN", "BN", "GN32", "IN", "reference")
COMPILED = ("SN compiled", "BN compiled")  # torch.compile (inductor) of the same layers


class _ReferenceSN(nn.Module):
    """The plain-autograd equations as a module, with the parameters of an SN layer."""

    def __init__(self, sn: nn.Module) -> None:
        super().__init__()
        self.sn = sn

    def forward(self, x):
        s = self.sn
        mean_p, var_p = s.importance_weights()
        return reference.switch_norm(x, s.weight, s.bias, mean_p, var_p, s.running_mean,
                                     s.running_var, candidates=s.candidates,
                                     training=self.training, momentum=s.momentum, eps=s.eps)


def _build(name: str, channels: int, dynamic: bool = False) -> nn.Module:
    if name.endswith(" compiled"):
        # Compiled as a one-layer model, nn.Sequential(layer), so that both layers run inlined
        # in a compiled graph, as inside any compiled model. NOTE: compiled bare, the two are
        # measured in different harnesses: torch.compile traces a torch.nn layer's whole
        # Module.__call__ (BatchNorm2d) but runs any other module's Module.__call__ eagerly
        # and compiles only its forward (SN), Python that a layer inside a model never runs
        # (~0.01-0.02x of compiled BN at (4, 256, 14, 14), torch 2.14.1).
        # dynamic=False: static shapes, not dynamo's default "static first, then symbolic".
        layer = nn.Sequential(_build(name.split()[0], channels))
        return torch.compile(layer, fullgraph=True, dynamic=dynamic)
    if name == "SN":
        return make_norm("sn", channels)
    if name == "SSN":
        return make_norm("ssn", channels)
    if name == "BN":
        return make_norm("bn", channels)
    if name == "GN32":
        return make_norm("gn", channels, groups=min(32, channels))
    if name == "IN":
        return make_norm("in", channels)
    return _ReferenceSN(make_norm("sn", channels))


def cpu_description() -> str:
    """The CPU's model name and vector ISA, e.g. ``'AMD EPYC 9B14, AVX-512 (ATen: AVX512)'``."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags
           else "NEON" if "asimd" in flags else "baseline")
    if "amx_tile" in flags:
        isa += " + AMX"
    aten = torch.backends.cpu.get_cpu_capability()
    return f"{model}, {isa} (ATen kernels: {aten}), {os.cpu_count()} logical CPUs"


def tune_glibc_malloc() -> bool:
    """Keep freed heap memory for reuse (no trimming, no mmap below 32 MiB); glibc only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 2**31 - 1)) and bool(
            libc.mallopt(m_mmap_threshold, 32 * 2**20))
    except (OSError, AttributeError):
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def run_benchmark(shapes=DEFAULT_SHAPES, *, device: str = "cpu", dtype=torch.float32,
                  repeats: int = 25, layers=LAYERS, channels_last: bool = False,
                  dynamic: bool = False, min_time: float = 0.0) -> list[dict]:
    """Time every layer on every shape; returns one row per (shape, layer).

    Each shape gets ``repeats`` rounds, and more while its rounds have taken less than
    ``min_time`` seconds in all. Each row: shape, layer, train_ms and eval_ms (medians),
    train_ratio and eval_ratio (to BatchNorm2d on the same shape), rounds.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen).to(dev, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=gen).to(dev, dtype)
        if any(name.endswith(" compiled") for name in layers):
            # NOTE: each shape compiles afresh, with static shapes, as a layer inside a compiled
            # model is; otherwise dynamo's automatic dynamic shapes recompile the second and
            # later shapes with symbolic sizes (slower code for both SN and BN).
            torch._dynamo.reset()
        mods = {name: _build(name, shape[1], dynamic).to(dev) for name in layers}
        xg = x.detach().clone().requires_grad_()

        def train_step(m):
            # as a training step: gradients set to None first (optimizer.zero_grad's default),
            # so that backward stores them instead of adding to the last step's
            m.zero_grad(set_to_none=True)
            m.train()
            y = m(xg)
            y.backward(dy)
            xg.grad = None

        def eval_step(m):
            m.eval()
            with torch.no_grad():
                m(x)

        times = {(n, k): [] for n in layers for k in ("train", "eval")}
        for m in mods.values():  # warm-up (allocator, thread pools, autotuning)
            for _ in range(2):
                train_step(m)
                eval_step(m)
        order = list(mods)
        shuffle = random.Random(0).shuffle
        # NOTE: a time floor, not only a count: at small shapes a round takes ~10 ms, and
        # 25-30 samples of a step that a neighbour's aftermath slows by up to 2x gave compiled
        # SN / compiled BN anywhere in 1.08-1.32 between runs; 200 rounds, 1.12-1.16.
        rounds, start = 0, time.perf_counter()
        while rounds < repeats or time.perf_counter() - start < min_time:
            rounds += 1
            # NOTE: a fresh order every round. A layer timed right after a slow eager one (the
            # reference, SSN) pays ~0.1-0.5 ms more at the small shape; in a fixed order the
            # same layer always paid it (compiled SN, listed after the reference, measured
            # 1.8x compiled BN; with the two compiled layers swapped, 0.8x).
            shuffle(order)
            for n in order:
                m = mods[n]
                times[(n, "train")].append(_timed(lambda: train_step(m), dev))
                times[(n, "eval")].append(_timed(lambda: eval_step(m), dev))
        med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
        for n in layers:
            rows.append({"shape": shape, "layer": n, "rounds": rounds,
                         "train_ms": med[(n, "train")], "eval_ms": med[(n, "eval")],
                         "train_ratio": med[(n, "train")] / med[("BN", "train")],
                         "eval_ratio": med[(n, "eval")] / med[("BN", "eval")]})
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of ratios to BatchNorm2d, plus the median SN ratio over shapes."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    by = {(r["shape"], r["layer"]): r for r in rows}
    head = "| shape | rounds | BN fwd+bwd ms | "
    head += " | ".join(f"{n} fwd+bwd" for n in layers if n != "BN")
    head += " | " + " | ".join(f"{n} eval" for n in layers if n != "BN") + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in shapes:
        cells = [f"{by[(s, n)]['train_ratio']:.2f}" for n in layers if n != "BN"]
        cells += [f"{by[(s, n)]['eval_ratio']:.2f}" for n in layers if n != "BN"]
        lines.append(f"| {tuple(s)} | {by[(s, 'BN')]['rounds']} | "
                     f"{by[(s, 'BN')]['train_ms']:.2f} | " + " | ".join(cells)
                     + " |")
    summary = []
    for n in layers:
        if n == "BN":
            continue
        tr = statistics.median(by[(s, n)]["train_ratio"] for s in shapes)
        ev = statistics.median(by[(s, n)]["eval_ratio"] for s in shapes)
        summary.append(f"{n}: median fwd+bwd ratio {tr:.2f}, eval ratio {ev:.2f}")
    if ("SN compiled" in layers) and ("BN compiled" in layers):
        rel = [by[(s, "SN compiled")]["train_ms"] / by[(s, "BN compiled")]["train_ms"]
               for s in shapes]
        rel_eval = [by[(s, "SN compiled")]["eval_ms"] / by[(s, "BN compiled")]["eval_ms"]
                    for s in shapes]
        summary.append(f"SN compiled / BN compiled: median fwd+bwd ratio "
                       f"{statistics.median(rel):.2f}, eval ratio "
                       f"{statistics.median(rel_eval):.2f}")
    return "\n".join(lines) + "\n\n" + "\n".join(summary)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v)
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"a shape is N,C,H,W with positive sizes, got {text!r}")
    return shape



def describe_backend(x: torch.Tensor) -> str:
    """Which passes SN runs for tensors like ``x`` in eager mode, in words."""
    from snexp.norm import _cpu

    if _backend.setting() not in ("aten", "cpu"):
        try:
            from snexp.norm import _triton
        except ImportError:
            _triton = None
        if _triton is not None and _triton.usable(x):
            return "Triton kernels"
    if _cpu.usable(x):
        return "C++ CPU passes and (N, C) mixing (snexp_cpu)"
    return "ATen ops"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snexp.bench", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--shape", action="append", type=_parse_shape, metavar="N,C,H,W",
                        help="benchmark this shape (repeatable; default: the standard suite)")
    parser.add_argument("--repeats", type=int, default=25,
                        help="timed rounds per shape, at least (default 25)")
    parser.add_argument("--min-time", type=float, default=2.0, metavar="SECONDS",
                        help="keep adding rounds until a shape's rounds took this long "
                             "(default 2; 0: exactly --repeats rounds)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-malloc-tune", action="store_true",
                        help="keep glibc's default heap trimming (noisier CPU timings)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile'd SN and BN rows (compiling takes minutes)")
    parser.add_argument("--dynamic", action="store_true",
                        help="compile with dynamic=True (symbolic shapes; default: static)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if not 0 <= args.min_time < float("inf"):
        parser.error(f"--min-time must be 0 or more seconds (finite), got {args.min_time}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA device; use --device cpu",
              file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tuned = False if args.no_malloc_tune else tune_glibc_malloc()
    layers = LAYERS if args.no_compile else LAYERS + COMPILED
    rows = run_benchmark(args.shape or DEFAULT_SHAPES, device=args.device, dtype=dtype,
                         repeats=args.repeats, channels_last=args.channels_last, layers=layers,
                         dynamic=args.dynamic, min_time=args.min_time)
    name = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
            else f"{cpu_description()}, {torch.get_num_threads()} torch threads")
    print(f"# snexp.bench: torch {torch.__version__}, {name}, {args.dtype}"
          f"{', channels_last' if args.channels_last else ''}"
          f"{', glibc malloc tuned' if tuned else ''}; ratios to BatchNorm2d "
          f"(lower is faster)\n")
    shape = (args.shape or DEFAULT_SHAPES)[0]
    probe = torch.zeros(shape, device=args.device, dtype=dtype)
    if args.channels_last:
        probe = probe.contiguous(memory_format=torch.channels_last)
    print(f"# SN backend (SNEXP_BACKEND={_backend.setting()}): eager {describe_backend(probe)}"
          f"; compiled: inductor over the decomposed ATen equations"
          f"{' (dynamic=True)' if args.dynamic else ''}\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
