"""One command that runs the project's GPU paths and summarizes them in one table.

On a machine with one CUDA GPU (about 8 minutes in all)::

    python benchmarks/gpu_check.py --out gpu-check
    python benchmarks/gpu_check.py --device cpu --tiny --out dry   # the same steps, tiny, on CPU
    python benchmarks/gpu_check.py --plan                          # the commands, run nothing

runs the commands of :data:`STEPS`, each as its own process with its own timeout, writing its
log and outputs under ``--out``: the style image and VGG16 file (``gpu_inputs.py``),
``snexp.bench`` in float32 (first) and bfloat16 (last: the step the budget may cut), SN's
Triton kernels (``sn_gpu.py``), the NAS SN/BN step ratio (``nas_search.py``), ``nas.train``,
the same under torchrun with ``--sync-norm``, an NCCL probe (``nccl_probe.py``), a 256 px
``stylize.train`` in bf16 and ``stylize.apply --export``, and ``nas.search`` with bf16 and
``--compile``. Every flag is written out here; ``tests/benchmarks/test_gpu_check.py`` checks
each command against its program's parser.

A failed or timed-out step is recorded with the tail of its log and the check goes on; steps
past the time budget (``--budget``) are skipped. The table (step, command, status, key figure,
seconds) is printed and written to ``<out>/gpu_check.md``, every result to
``<out>/results.json``; the exit status is 1 when a step failed. The CPU dry run skips the
bf16 bench and the Triton kernels, probes gloo in place of NCCL and leaves out ``--amp bf16``,
``--compile`` and the bench's compiled rows. The check itself imports no package of the
project, so a broken package shows up as failed steps, not as a traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from step_report import machine, markdown_table, report
from step_runner import Spec, Step, expand, file_size, lines, run_steps, show

# A fixed 5-node cell pair (flat list: per node in_1, op_1, in_2, op_2; normal cell, then the
# reduction cell), so that nas.train does not depend on nas.search having worked.
ARCH = "0,0,1,4,1,1,0,2,2,3,1,0,3,4,0,1,4,0,5,2,0,3,1,0,1,2,2,1,0,4,3,0,2,1,4,3,5,0,1,4"
TORCHRUN = "-m torch.distributed.run --standalone --nproc-per-node=1"
TINY_SLOWER = 3  # the CPU dry run's timeouts: tiny sizes, but slow shared cores

bench_figure = lines(r"^SN\b[^\n:]*:.*ratio.*$")
triton_figure = lines(r"^(?:SN \(Triton\) / cuDNN BN: )?(median fwd\+bwd ratio.*|\d+ checks, "
                      r"\d+ failed.*)$")
nas_ratio_figure = lines(r"SN/BN time ratio:([^(\n]*)", last=True)
epoch_figure = lines(r"epoch \d+/\d+: (.*)$", last=True)


def ddp_figure(log: str, out: Path) -> str:
    """The epoch summary and whether NCCL said anything (the step sets ``NCCL_DEBUG=INFO``)."""
    nccl = "NCCL initialized" if "NCCL INFO" in log else "NCCL not initialized"
    return f"{epoch_figure(log, out)}; {nccl}"


def stylize_figure(log: str, out: Path) -> str:
    """Steps and seconds from the ``training N step(s)`` to the ``model written`` log line."""
    stamp = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\b.*"
    start = re.search(stamp + r"training (\d+) step", log, re.M)
    end = re.search(stamp + r"model written", log, re.M)
    if not (start and end):
        return ""
    fmt = "%Y-%m-%d %H:%M:%S"
    secs = time.mktime(time.strptime(end[1], fmt)) - time.mktime(time.strptime(start[1], fmt))
    return f"{start[2]} steps in {secs:.0f} s (log clock)"


_NAS_GPU = ("--epochs 1 --set train.steps_per_epoch=40 --set data.embedded_train=4000 "
            "--set data.embedded_test=1000")
_NAS_TINY = ("--epochs 1 --set train.steps_per_epoch=3 --set child.layers=1 "
             "--set child.filters=4 --set train.batch_size=8 --set data.limit=64 "
             "--set data.valid_size=32 --set data.embedded_train=200 "
             "--set data.embedded_test=40 --set train.eval_batch_size=40")
_STYLE = "--style $OUT/inputs/style.png --vgg-weights $OUT/inputs/vgg16.pth"
_GPU_ONLY = "a GPU check: needs CUDA"

STEPS: tuple[Spec, ...] = (
    Spec("prepare inputs", "benchmarks/gpu_inputs.py", "--out $OUT/inputs", "--out $OUT/inputs",
         60, lines(r"^inputs: (.*)$")),
    Spec("bench fp32", "-m snexp.bench", "--device cuda",
         "--device cpu --shape 2,8,8,8 --repeats 3 --min-time 0 --no-compile", 300, bench_figure,
         tiny_note="CPU: --no-compile"),
    Spec("SN Triton kernels", "benchmarks/sn_gpu.py", "--device cuda --out $OUT/sn_gpu.md", None,
         240, triton_figure,
         tiny_note="needs CUDA (the tests run the kernels in Triton's interpreter)"),
    Spec("NAS SN/BN step ratio", "benchmarks/nas_search.py",
         "--device cuda --batch 160 --rounds 5",
         "--device cpu --layers 1 --filters 4 --nodes 2 --batch 4 --steps 2 --rounds 1 "
         "--samples 2", 120, nas_ratio_figure),
    Spec("nas.train", "-m nas.train",
         f"--device cuda --arch {ARCH} {_NAS_GPU} --out $OUT/nas-train",
         f"--device cpu --arch {ARCH} {_NAS_TINY} --out $OUT/nas-train", 120, epoch_figure),
    Spec("torchrun nas.train --sync-norm", "-m nas.train",
         f"--device cuda --arch {ARCH} {_NAS_GPU} --sync-norm --out $OUT/nas-train-ddp",
         f"--device cpu --arch {ARCH} {_NAS_TINY} --sync-norm --out $OUT/nas-train-ddp", 150,
         ddp_figure, launcher=TORCHRUN, env=(("NCCL_DEBUG", "INFO"),)),
    Spec("NCCL probe", "benchmarks/nccl_probe.py", "--device cuda --out $OUT/nccl_probe.json",
         "--device cpu --out $OUT/nccl_probe.json", 90, lines(r"^NCCL probe: (.*)$", last=True),
         launcher=TORCHRUN, tiny_note="CPU: gloo in place of NCCL"),
    Spec("stylize.train", "-m stylize.train",
         f"--device cuda --amp bf16 {_STYLE} --image-size 256 --style-size 256 --steps 40 "
         "--batch-size 4 --preview-every 40 --set data.synthetic_count=160 --out $OUT/stylize",
         f"--device cpu {_STYLE} --image-size 32 --style-size 32 --steps 3 --batch-size 2 "
         "--width 0.125 --preview-every 3 --set data.synthetic_count=8 "
         "--set data.preview_count=2 --set model.blocks=1 --out $OUT/stylize", 150,
         stylize_figure, needs="$OUT/inputs/vgg16.pth", tiny_note="CPU: without --amp bf16"),
    Spec("stylize.apply --export", "-m stylize.apply",
         "--device cuda --model $OUT/stylize/model.pt --export $OUT/stylize.pt2",
         "--device cpu --model $OUT/stylize/model.pt --export $OUT/stylize.pt2", 90,
         file_size("stylize.pt2"), needs="$OUT/stylize/model.pt"),
    Spec("nas.search", "-m nas.search",
         f"--device cuda --amp bf16 --compile {_NAS_GPU} --set controller.train_steps=3 "
         "--set search.derive_samples=5 --set search.derive_final=10 --out $OUT/nas-search",
         f"--device cpu {_NAS_TINY} --set child.num_nodes=2 --set data.valid_limit=32 "
         "--set controller.train_steps=1 --set controller.num_aggregate=2 "
         "--set search.derive_samples=2 --set search.derive_final=2 "
         "--set search.reward_batch_size=16 --out $OUT/nas-search", 180, epoch_figure,
         tiny_note="CPU: without --amp bf16 --compile"),
    # last: with its compiled rows the second benchmark is the step the budget may cut
    Spec("bench bf16", "-m snexp.bench", "--device cuda --dtype bfloat16", None, 300,
         bench_figure, tiny_note=_GPU_ONLY),
)


def plan(out: Path, *, tiny: bool) -> list[Step]:
    """The steps of the check in the order they run: on the GPU, or the CPU dry run."""
    return expand(STEPS, out, tiny=tiny, slower=TINY_SLOWER)


def _refuse_bad_lines(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs the steps at GPU sizes, far beyond the 8 minutes of the "
                     "check; add --tiny for the CPU dry run of the same steps")
    if args.tiny and args.device == "cuda":
        parser.error("--tiny is the CPU dry run: use it with --device cpu")
    if args.plan:
        return
    if args.out is not None and args.out.exists() and (
            not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} exists and is not an empty folder; the check writes "
                     "its runs there and replaces nothing, so give a new or empty folder")
    if args.device == "cuda":
        try:
            import torch

            have = torch.cuda.is_available()
        except ImportError:
            have = False
        if not have:
            parser.error("--device cuda: no CUDA device here; run the CPU dry run with "
                         "--device cpu --tiny, or the check on a machine with a GPU")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description="Run the GPU paths (bench, Triton kernels, NAS, style transfer, "
                    "torchrun/NCCL, export) and summarize them in one table (about 8 minutes "
                    "on one GPU).")
    parser.add_argument("--out", type=Path, default=None,
                        help="new or empty folder for logs, runs and gpu_check.md "
                             "(default: a fresh temporary folder)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu with --tiny to check the steps themselves")
    parser.add_argument("--tiny", action="store_true",
                        help="smallest sizes: seconds per step (the CPU dry run)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all steps; later ones are skipped past it "
                             "(default 450: 8 minutes with start-up and a last stop; 1800 "
                             "with --device cpu)")
    parser.add_argument("--plan", action="store_true",
                        help="print the steps' commands, timeouts and skips; run nothing")
    args = parser.parse_args(argv)
    _refuse_bad_lines(parser, args)
    cuda = args.device == "cuda"
    if args.plan:
        out = Path("/gpu-check-out")  # shown as $OUT
        for step in plan(out, tiny=args.tiny):
            why = f"  [skipped: {step.skip}]" if step.skip else ""
            print(f"{step.name} ({step.timeout_s:.0f} s): {show(step.argv, out)}{why}")
        return 0
    out = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else (450.0 if cuda else 1800.0)
    results = run_steps(plan(out, tiny=args.tiny), out, time.monotonic() + budget)
    text = report(results, machine(out, cuda), "GPU check (`python benchmarks/gpu_check.py`)")
    (out / "gpu_check.md").write_text(text)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print("\n" + markdown_table(results) + f"\nreport: {out / 'gpu_check.md'}")
    return 1 if any(r.status.startswith(("failed", "timeout")) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
