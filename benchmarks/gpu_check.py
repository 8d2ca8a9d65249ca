"""One command that runs the project's GPU paths and summarizes them in one table.

On a machine with one CUDA GPU (about 8 minutes in all)::

    python benchmarks/gpu_check.py --out gpu-check

runs, each as its own process with its own timeout, writing its log and outputs under ``--out``:

- ``python -m snexp.bench --device cuda``, float32 (first) and bfloat16 (last: the step the
  budget may cut): SN against cuDNN BatchNorm, eager and ``torch.compile``d (how to ask for the
  compiled runs is read from its ``--help``);
- ``benchmarks/sn_gpu.py``: SN's Triton kernels against SN's ATen path (agreement over edge
  cases and ResNet-50 shapes) and against cuDNN BN (fwd+bwd and eval time), its table in
  ``<out>/sn_gpu.md``;
- the SN/BN step-time ratio of the NAS child and controller (``benchmarks/nas_search.py``);
- ``nas.train`` for a few steps, the same under ``torchrun --nproc-per-node=1`` with
  ``--sync-norm`` (NCCL on CUDA), and an NCCL probe: a one-rank NCCL group, an all-reduce and a
  ``SyncSwitchNorm`` step;
- a short ``stylize.train`` at 256 px with ``--amp bf16``, then ``stylize.apply --export``;
- a short ``nas.search`` with ``--amp bf16 --compile``.

A failed or timed-out step is recorded with the tail of its log and the check goes on; steps
past the time budget (``--budget``) are skipped. The table (step, command, status, key figure,
seconds) is printed and written to ``<out>/gpu_check.md``, every result to
``<out>/results.json``; the exit status is 1 when a step failed. ``--device cpu --tiny`` runs
the same steps at the smallest sizes on CPU (the tests do): the bf16 benchmark, the Triton
kernels' check and the NCCL probe are skipped there, and ``--amp bf16``/``--compile`` (and the
bench's compiled rows) are left out.

The check imports neither ``snexp`` nor ``nas``/``stylize`` (only its NCCL probe does, in its
own step), so a broken package shows up as failed steps in the table, not as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# A fixed 5-node cell pair (flat list: per node in_1, op_1, in_2, op_2; normal cell, then the
# reduction cell), so that nas.train does not depend on nas.search having worked.
ARCH = "0,0,1,4,1,1,0,2,2,3,1,0,3,4,0,1,4,0,5,2,0,3,1,0,1,2,2,1,0,4,3,0,2,1,4,3,5,0,1,4"
TAIL_LINES = 25
Figure = Callable[[str, Path], str]  # (log text, the check's output folder) -> key figure


@dataclass(frozen=True)
class Step:
    """One command of the check: ``skip`` is a reason not to run it, ``needs`` a file an
    earlier step makes, ``note`` is appended to the key figure."""

    name: str
    argv: tuple[str, ...]
    timeout_s: float
    figure: Figure
    skip: str = ""
    needs: str = ""
    note: str = ""
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    """What one step did; ``status`` is ``ok``, ``failed (rc N)``, ``timeout (T s)`` or
    ``skipped``, and ``seconds`` is ``None`` for a step that did not run."""

    name: str
    command: str
    status: str
    figure: str
    seconds: float | None
    log: str = ""
    tail: str = ""


# -- key figures ----------------------------------------------------------------------------


def _lines(pattern: str, log: str) -> list[str]:
    return [m.group(0).strip() for m in re.finditer(pattern, log, re.M)]


def bench_figure(log: str, out: Path) -> str:
    """SN's summary lines of ``snexp.bench`` (``SN: median fwd+bwd ratio 0.79, eval ...``)."""
    return "; ".join(_lines(r"^SN\b[^\n:]*:.*ratio.*$", log))


def nas_ratio_figure(log: str, out: Path) -> str:
    """``child step 1.11, controller step 1.14`` from ``benchmarks/nas_search.py``."""
    found = _lines(r"SN/BN time ratio:[^(\n]*", log)
    return found[-1].removeprefix("SN/BN time ratio:").strip() if found else ""


def epoch_figure(log: str, out: Path) -> str:
    """The last ``epoch i/n: ...`` summary of ``nas.search`` or ``nas.train``."""
    found = re.findall(r"epoch \d+/\d+: (.*)$", log, re.M)
    return found[-1].strip() if found else ""


def ddp_figure(log: str, out: Path) -> str:
    """The epoch summary and whether NCCL said anything (the step sets ``NCCL_DEBUG=INFO``)."""
    nccl = "NCCL initialized" if "NCCL INFO" in log else "NCCL not initialized"
    return f"{epoch_figure(log, out)}; {nccl}"


def triton_figure(log: str, out: Path) -> str:
    """``SN (Triton) / cuDNN BN: median fwd+bwd ratio 1.05 ...; 20 checks, 0 failed``."""
    ratio = _lines(r"^SN \(Triton\) / cuDNN BN: .*$", log)
    checks = _lines(r"^\d+ checks, \d+ failed.*$", log)
    return "; ".join(line.removeprefix("SN (Triton) / cuDNN BN: ") for line in ratio + checks)


def probe_figure(log: str, out: Path) -> str:
    found = _lines(r"^NCCL probe: .*$", log)
    return found[-1].removeprefix("NCCL probe: ") if found else ""


def file_figure(relative: str) -> Figure:
    """The size of a file the step wrote under the output folder."""
    def figure(log: str, out: Path) -> str:
        path = out / relative
        return f"{relative}: {path.stat().st_size / 1e6:.2f} MB" if path.is_file() else (
            f"no {relative}")
    return figure


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


# -- the plan -------------------------------------------------------------------------------


def help_options(help_text: str) -> set[str]:
    """The ``--long`` options an ``argparse`` help text names."""
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", help_text))


def read_help(argv: Sequence[str]) -> str:
    """``argv --help`` run from the repository ("" if it cannot run)."""
    try:
        done = subprocess.run([*argv, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def plan(out: Path, inputs: dict[str, str], *, cuda: bool, tiny: bool,
         bench_help: str) -> list[Step]:
    """The steps of the check, in the order they run.

    Args:
        out: The output folder (each run writes into its own subfolder).
        inputs: ``style`` image, ``vgg`` weights file ("" for torchvision's cache), ``vgg_note``
            and ``error`` (why they could not be made) from :func:`prepare_inputs`.
        cuda: Run on the GPU; otherwise CPU, where GPU-only steps are skipped and ``--amp``
            and ``--compile`` left out.
        tiny: The smallest sizes (seconds per step), instead of short GPU-sized runs.
        bench_help: ``python -m snexp.bench --help``: how to ask it for compiled runs.
    """
    device = ["--device", "cuda" if cuda else "cpu"]
    amp = ["--amp", "bf16"] if cuda else []
    no_amp = "" if cuda else "CPU: without --amp bf16"
    bench, bench_note, compiled = bench_argv(bench_help, cuda=cuda, tiny=tiny)
    ratio = [PY, "benchmarks/nas_search.py", *device,
             *(["--layers", "1", "--filters", "4", "--nodes", "2", "--batch", "4", "--steps",
                "2", "--rounds", "1", "--samples", "2"] if tiny else
               ["--batch", "160", "--rounds", "5"])]
    nas_common = ["--epochs", "1", *_sets(f"train.steps_per_epoch={3 if tiny else 40}"),
                  *(_sets("child.layers=1", "child.filters=4", "train.batch_size=8",
                          "data.limit=64", "data.valid_size=32", "data.embedded_train=200",
                          "data.embedded_test=40", "train.eval_batch_size=40") if tiny else
                    _sets("data.embedded_train=4000", "data.embedded_test=1000"))]
    nas_train = ["-m", "nas.train", *device, "--arch", ARCH, *nas_common]
    search = [PY, "-m", "nas.search", *device, *amp, *(["--compile"] if cuda else []),
              *nas_common,
              *(_sets("child.num_nodes=2", "data.valid_limit=32", "controller.train_steps=1",
                      "controller.num_aggregate=2", "search.derive_samples=2",
                      "search.derive_final=2", "search.reward_batch_size=16") if tiny else
                _sets("controller.train_steps=3", "search.derive_samples=5",
                      "search.derive_final=10")),
              "--out", str(out / "nas-search")]
    vgg = ["--vgg-weights", inputs["vgg"]] if inputs.get("vgg") else []
    stylize = [PY, "-m", "stylize.train", *device, *amp, "--style", inputs.get("style", ""),
               *vgg,
               *(["--image-size", "32", "--style-size", "32", "--steps", "3", "--batch-size",
                  "2", "--width", "0.125", "--preview-every", "3",
                  *_sets("data.synthetic_count=8", "data.preview_count=2", "model.blocks=1")]
                 if tiny else
                 ["--image-size", "256", "--style-size", "256", "--steps", "40",
                  "--batch-size", "4", "--preview-every", "40",
                  *_sets("data.synthetic_count=160")]),
               "--out", str(out / "stylize")]
    export = [PY, "-m", "stylize.apply", *device, "--model", str(out / "stylize" / "model.pt"),
              "--export", str(out / "stylize.pt2")]
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    slow = 3.0 if tiny and not cuda else 1.0  # the tiny CPU mode runs on slow shared cores
    bench_time = 300 if compiled else 120  # compiling SN and BN for every shape takes long
    return [
        Step("bench fp32", (*bench,), bench_time * slow, bench_figure, note=bench_note),
        Step("SN Triton kernels", (PY, "benchmarks/sn_gpu.py", *device, "--out",
                                   str(out / "sn_gpu.md")), 240, triton_figure,
             skip="" if cuda else "needs CUDA (the tests run the kernels in Triton's "
                                  "interpreter)"),
        Step("NAS SN/BN step ratio", (*ratio,), 120 * slow, nas_ratio_figure),
        Step("nas.train", (PY, *nas_train, "--out", str(out / "nas-train")), 120 * slow,
             epoch_figure),
        Step("torchrun nas.train --sync-norm",
             (*torchrun, *nas_train, "--sync-norm", "--out", str(out / "nas-train-ddp")),
             150 * slow, ddp_figure, env={"NCCL_DEBUG": "INFO"}),
        Step("NCCL probe", (*torchrun, "benchmarks/gpu_check.py", "--nccl-probe"), 90,
             probe_figure, skip="" if cuda else "NCCL needs CUDA"),
        Step("stylize.train", (*stylize,), 150 * slow, stylize_figure,
             skip=inputs.get("error", ""),
             note="; ".join(n for n in (no_amp, inputs.get("vgg_note", "")) if n)),
        Step("stylize.apply --export", (*export,), 90 * slow, file_figure("stylize.pt2"),
             needs=str(out / "stylize" / "model.pt")),
        Step("nas.search", (*search,), 180 * slow, epoch_figure,
             note="" if cuda else "CPU: without --amp bf16 --compile"),
        # last: with its compiled rows the second benchmark is the step the budget may cut
        Step("bench bf16", (*bench, "--dtype", "bfloat16"), bench_time, bench_figure,
             skip="" if cuda else "a GPU check: needs CUDA", note=bench_note),
    ]


def bench_argv(bench_help: str, *, cuda: bool, tiny: bool) -> tuple[list[str], str, bool]:
    """``snexp.bench``'s command, a note and whether it compiles, from its ``--help``.

    A bench that times compiled SN/BN by default (``--no-compile`` offered) keeps them on CUDA
    and skips them on CPU, where compiling takes minutes; one with a ``--compile`` flag gets it
    on CUDA; one with neither is eager only, and the note says so.
    """
    argv = [PY, "-m", "snexp.bench", "--device", "cuda" if cuda else "cpu"]
    argv += ["--shape", "2,8,8,8", "--repeats", "3"] if tiny else []
    offered = help_options(bench_help)
    if "--no-compile" in offered:
        return (argv, "", True) if cuda else (argv + ["--no-compile"], "CPU: --no-compile", False)
    if "--compile" in offered:
        return (argv + ["--compile"], "", True) if cuda else (argv, "CPU: eager only", False)
    return argv, "this snexp.bench times no compiled runs: eager only", False

# -- running --------------------------------------------------------------------------------


def prepare_inputs(folder: Path) -> dict[str, str]:
    """A style image and, unless torchvision's cache holds VGG16, random VGG16 weights.

    Uses only torch, torchvision, numpy and pillow. ``error`` says why something failed.
    """
    try:
        import numpy as np
        import torch
        import torchvision
        from PIL import Image

        folder.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:256, 0:256] / 256.0  # (H, W) each
        waves = np.stack([np.sin(14 * x + 5 * y), np.sin(11 * y - 7 * x * x),
                          np.cos(17 * x * y)], axis=-1)  # (H, W, 3) in [-1, 1]
        style = folder / "style.png"
        Image.fromarray(((waves + 1) * 127.5).astype(np.uint8)).save(style)
        cached = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
        if cached.is_file():
            return {"style": str(style), "vgg": "", "vgg_note": f"VGG16: {cached}"}
        torch.manual_seed(0)
        features = torchvision.models.vgg16(weights=None).features
        vgg = folder / "vgg16-random.pth"
        torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg)
        return {"style": str(style), "vgg": str(vgg),
                "vgg_note": "random VGG16 weights (none in torchvision's cache): losses "
                            "meaningless, timing valid"}
    except Exception as exc:  # noqa: BLE001 - recorded in the table, the check goes on
        return {"error": f"inputs not made: {type(exc).__name__}: {exc}", "vgg_note": ""}


def _show(argv: Sequence[str], out: Path) -> str:
    text = shlex.join(argv).replace(str(out), "$OUT")
    return text.replace(shlex.quote(PY), "python", 1) if argv and argv[0] == PY else text


def _stop(proc: subprocess.Popen) -> None:
    """Stop a step's process group (torchrun's workers too): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, out: Path, deadline: float) -> StepResult:
    """Run one step (its own process group, log in ``<out>/logs``) and read its key figure.

    A failure's key figure is the last line of its log; ``tail`` keeps the last lines.
    """
    command = _show(step.argv, out)

    def skipped(reason: str) -> StepResult:
        return StepResult(step.name, command, "skipped", reason, None)

    if step.skip:
        return skipped(step.skip)
    if step.needs and not Path(step.needs).is_file():
        return skipped(f"no {_show([step.needs], out)} (an earlier step failed)")
    left = deadline - time.monotonic()
    if left < 10:
        return skipped("out of the time budget (--budget)")
    timeout = min(step.timeout_s, left)
    log = out / "logs" / (re.sub(r"[^\w.]+", "_", step.name).strip("_") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(step.argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env=os.environ | step.env, start_new_session=True)
        try:
            rc = proc.wait(timeout)
            status = "ok" if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = f"timeout ({timeout:.0f} s)"
        except BaseException:  # Ctrl-C: take the step's processes down with the check
            _stop(proc)
            raise
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if status == "ok":
        try:
            figure = step.figure(text, out)
        except Exception as exc:  # noqa: BLE001 - a figure is a summary, never a failure
            figure = f"(figure unreadable: {type(exc).__name__}: {exc})"
        figure = "; ".join(part for part in (figure, step.note) if part)
        tail = ""
    else:
        figure = lines[-1].strip()[:160] if lines else "(empty log)"
        tail = "\n".join(lines[-TAIL_LINES:])
    return StepResult(step.name, command, status, figure, seconds,
                      str(log.relative_to(out)), tail)


# -- the report -----------------------------------------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown_table(results: Sequence[StepResult]) -> str:
    """One markdown table: step, command, status, key figure, seconds."""
    rows = ["| step | command | status | key figure | seconds |", "|---|---|---|---|---|"]
    for r in results:
        secs = "-" if r.seconds is None else f"{r.seconds:.1f}"
        rows.append(f"| {_cell(r.name)} | `{_cell(r.command)}` | {_cell(r.status)} | "
                    f"{_cell(r.figure)} | {secs} |")
    return "\n".join(rows) + "\n"


def report(results: Sequence[StepResult], about: dict[str, str]) -> str:
    """The whole markdown report: where it ran, the table, the log tails of failed steps."""
    parts = ["# GPU check (`python benchmarks/gpu_check.py`)\n",
             "\n".join(f"- {k}: {v}" for k, v in about.items()) + "\n", markdown_table(results)]
    failed = [r for r in results if r.tail]
    if failed:
        parts.append("## Failed steps: the end of their logs\n")
        for r in failed:
            parts.append(f"### {r.name}: {r.status} (`$OUT/{r.log}`)\n\n```text\n{r.tail}\n```\n")
    return "\n".join(parts)


def machine(out: Path, cuda: bool) -> dict[str, str]:
    """Where the check ran: date, CPU, GPU and library versions, the git commit."""
    about = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "output folder ($OUT)": str(out),
             "python": platform.python_version()}
    cpu = re.search(r"^model name\s*:\s*(.*)$", _read("/proc/cpuinfo"), re.M)
    about["CPU"] = f"{cpu[1] if cpu else platform.processor()}, {os.cpu_count()} cores"
    try:
        import torch

        about["torch"] = torch.__version__
        if cuda and torch.cuda.is_available():
            nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else "-"
            about["GPU"] = (f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, "
                            f"cuDNN {torch.backends.cudnn.version()}, NCCL "
                            + (".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)))
    except Exception as exc:  # noqa: BLE001 - the report still gets written
        about["torch"] = f"not importable: {exc}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout
        about["commit"] = head + (" with uncommitted changes" if dirty.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return about


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def probe_collectives(device) -> tuple[bool, str]:
    """In a joined process group: one all-reduce and a ``SyncSwitchNorm`` fwd+bwd on ``device``.

    Returns whether both came out right, and a one-line summary.
    """
    import torch
    import torch.distributed as dist

    import snexp

    world = dist.get_world_size()
    ones = torch.ones(3, device=device)
    dist.all_reduce(ones)
    norm = snexp.SyncSwitchNorm(8).to(device)
    x = torch.randn(4, 8, 16, 16, device=device, requires_grad=True)
    norm(x).square().mean().backward()
    summed, finite = bool((ones == world).all()), bool(torch.isfinite(x.grad).all())
    return summed and finite, (f"{world} rank(s): all_reduce {'ok' if summed else 'WRONG'}, "
                               f"SyncSwitchNorm fwd+bwd {'finite' if finite else 'NOT finite'}")


def nccl_probe() -> int:
    """Run under torchrun: join an NCCL group on ``cuda:LOCAL_RANK`` and probe it."""
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    try:
        ok, summary = probe_collectives(device)
        torch.cuda.synchronize(device)
    finally:
        dist.destroy_process_group()
    version = torch.cuda.nccl.version()
    version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    print(f"NCCL probe: NCCL {version}, {summary}", flush=True)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description="Run the GPU paths (bench, NAS, style transfer, torchrun/NCCL, export) and "
                    "summarize them in one table (about 8 minutes on one GPU).")
    parser.add_argument("--out", type=Path, default=None,
                        help="new or empty folder for logs, runs and gpu_check.md "
                             "(default: a fresh temporary folder)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu with --tiny to check the steps themselves")
    parser.add_argument("--tiny", action="store_true",
                        help="smallest sizes: seconds per step (a CPU dry run)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all steps; later ones are skipped past it "
                             "(default 450: 8 minutes with start-up and a last stop; 1800 "
                             "with --device cpu)")
    parser.add_argument("--nccl-probe", action="store_true",
                        help="(run by the check under torchrun) the NCCL probe step alone")
    args = parser.parse_args(argv)
    if args.nccl_probe:
        return nccl_probe()
    cuda = args.device == "cuda"
    if not cuda and not args.tiny:
        parser.error("--device cpu runs the steps at GPU sizes, far beyond the 8 minutes of the "
                     "check; add --tiny for the CPU dry run of the same steps")
    if args.out is not None and args.out.exists() and (
            not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} exists and is not an empty folder; the check writes "
                     "its runs there and replaces nothing, so give a new or empty folder")
    if cuda:
        try:
            import torch

            have = torch.cuda.is_available()
        except ImportError:
            have = False
        if not have:
            parser.error("--device cuda: no CUDA device here; run the CPU dry run with "
                         "--device cpu --tiny, or the check on a machine with a GPU")
    out = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else (450.0 if cuda else 1800.0)
    deadline = time.monotonic() + budget

    start = time.monotonic()
    inputs = prepare_inputs(out / "inputs")
    results = [StepResult("prepare inputs", "(in the check: style image, VGG16 file)",
                          "failed" if "error" in inputs else "ok",
                          inputs.get("error") or inputs["vgg_note"], time.monotonic() - start)]
    steps = plan(out, inputs, cuda=cuda, tiny=args.tiny,
                 bench_help=read_help([PY, "-m", "snexp.bench"]))
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.name} ...", flush=True)
        result = run_step(step, out, deadline)
        results.append(result)
        secs = "" if result.seconds is None else f" ({result.seconds:.0f} s)"
        print(f"    {result.status}{secs}: {result.figure}", flush=True)
    text = report(results, machine(out, cuda))
    (out / "gpu_check.md").write_text(text)
    (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    print("\n" + markdown_table(results) + f"\nreport: {out / 'gpu_check.md'}")
    return 1 if any(r.status.startswith(("failed", "timeout")) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
