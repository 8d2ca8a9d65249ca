"""The report of ``benchmarks/gpu_check.py``: where it ran, one table row per step, the log
tails of failed steps (from :class:`step_runner.StepResult` values)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from step_runner import REPO, StepResult


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


def report(results: Sequence[StepResult], about: dict[str, str], title: str) -> str:
    """The whole markdown report: where it ran, the table, the log tails of failed steps."""
    parts = [f"# {title}\n", "\n".join(f"- {k}: {v}" for k, v in about.items()) + "\n",
             markdown_table(results)]
    failed = [r for r in results if r.tail]
    if failed:
        parts.append("## Failed steps: the end of their logs\n")
        for r in failed:
            parts.append(f"### {r.name}: {r.status} (`$OUT/{r.log}`)\n\n```text\n{r.tail}\n```\n")
    return "\n".join(parts)


def machine(out: Path, cuda: bool) -> dict[str, str]:
    """Where the steps ran: date, CPU, GPU and library versions, the git commit."""
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
