"""Where a ``torch.compile``d SN layer's time goes, against compiled BatchNorm2d (CPU).

    python benchmarks/compiled_overhead.py --shape 4,256,14,14

For each layer (SN, BatchNorm2d; compiled as ``nn.Sequential(layer)`` with ``fullgraph=True``,
static shapes, inductor, as ``python -m snexp.bench`` compiles them) it times one
fwd+bwd step in a loop and then, in as many more steps with the kernels inductor generated for
it wrapped, the part of the step spent inside those kernels; the rest is per-call overhead
(dynamo's guards, AOTAutograd's wrappers, autograd, and the generated Python that allocates
the graphs' buffers and calls the kernels). It also counts the buffers the generated code
allocates per step and the views it makes of them (each ~0.5-1 us of Python per step at small
shapes). This is the diagnosis behind docs/layers.md's note on compiled SN at small shapes;
``python -m snexp.bench`` is the benchmark itself.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from snexp.bench import cpu_description, tune_glibc_malloc
from snexp.norm.factory import make_norm

LAYERS = ("sn", "bn")


def generated_modules() -> dict[str, object]:
    """The Python modules inductor generated (and loaded) for CPU graphs so far, by name."""
    return {name: mod for name, mod in list(sys.modules.items())
            if hasattr(mod, "call") and any(k.startswith("cpp_fused") for k in vars(mod))}


def instrument(modules, tally: dict[str, float]) -> None:
    """Wrap the kernels, the buffer allocator and the view maker of generated modules, adding
    to ``tally`` the seconds spent in kernels (``"kernel_s"``), the buffers allocated
    (``"buffers"``) and the views made of them (``"views"``: an output written into a slice of
    a stack, a returned row)."""
    def timed(fn):
        def call(*args):
            start = time.perf_counter()
            out = fn(*args)
            tally["kernel_s"] += time.perf_counter() - start
            return out
        return call

    def counted(fn, key):
        def call(*args):
            tally[key] += 1
            return fn(*args)
        return call

    for mod in modules:
        names = vars(mod)
        for key, value in list(names.items()):
            if key.startswith("cpp_fused") and callable(value):
                names[key] = timed(value)
            elif key == "empty_strided_cpu":
                names[key] = counted(value, "buffers")
            elif key == "reinterpret_tensor":
                names[key] = counted(value, "views")


def measure(kind: str, shape: tuple[int, ...], steps: int) -> dict[str, float]:
    """Median step time, kernel time, buffers and views per fwd+bwd step of compiled
    ``kind``."""
    before = set(generated_modules())
    # a one-layer model, as snexp.bench compiles it (the same traced harness for both layers)
    layer = torch.compile(torch.nn.Sequential(make_norm(kind, shape[1])), fullgraph=True)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)

    def step():  # a training step, as snexp.bench times it
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)
        x.grad = None

    for _ in range(3):  # compile and warm up
        step()
    tally = {"kernel_s": 0.0, "buffers": 0, "views": 0}
    mods = [m for name, m in generated_modules().items() if name not in before]
    if not mods:  # e.g. TORCHINDUCTOR_CPP_WRAPPER=1: no Python wrapper whose kernels to time
        raise SystemExit(f"error: found no inductor-generated Python module with CPU kernels "
                         f"for compiled {kind}; run without TORCHINDUCTOR_CPP_WRAPPER and on "
                         f"CPU, where inductor emits them")
    times = []
    for _ in range(steps):  # the step itself, before anything is wrapped
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # NOTE: then the instrumented steps, for the kernels' share and the counts only: each
    # wrapper costs a Python call, and SN has more buffers and views to wrap than BN (timed
    # instrumented, SN / BN read ~0.1 higher)
    instrument(mods, tally)
    kernels, buffers, views = [], [], []
    for _ in range(steps):
        tally["kernel_s"], tally["buffers"], tally["views"] = 0.0, 0, 0
        step()
        kernels.append(tally["kernel_s"])
        buffers.append(tally["buffers"])
        views.append(tally["views"])
    step_us = statistics.median(times) * 1e6
    kernel_us = statistics.median(kernels) * 1e6
    return {"step_us": step_us, "kernel_us": kernel_us, "rest_us": step_us - kernel_us,
            "buffers": statistics.median(buffers), "views": statistics.median(views)}


def format_rows(rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one row per layer, plus SN's ratios to BN."""
    lines = ["| compiled layer | fwd+bwd us | in kernels us | rest us | buffers per step | "
             "views per step |", "|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        lines.append(f"| {kind.upper()} | {r['step_us']:.0f} | {r['kernel_us']:.0f} | "
                     f"{r['rest_us']:.0f} | {r['buffers']:.0f} | {r['views']:.0f} |")
    if set(rows) >= {"sn", "bn"}:
        sn, bn = rows["sn"], rows["bn"]
        lines.append("")
        lines.append(f"SN / BN: step {sn['step_us'] / bn['step_us']:.2f}, kernels "
                     f"{sn['kernel_us'] / bn['kernel_us']:.2f}, rest "
                     f"{sn['rest_us'] / bn['rest_us']:.2f}")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape takes N,C,H,W (four positive integers), "
                                         f"got {text!r}")
    return shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=_shape, default=(4, 256, 14, 14),
                        help="input N,C,H,W (default 4,256,14,14)")
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per layer")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
    tuned = tune_glibc_malloc()
    torch.manual_seed(0)
    print(f"# compiled SN and BN at {args.shape}: {cpu_description()}, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
          f"{', glibc malloc tuned' if tuned else ''}\n")
    rows = {kind: measure(kind, args.shape, args.steps) for kind in LAYERS}
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
