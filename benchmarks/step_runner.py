"""Run a list of commands, each in its own process with its own timeout, and report them.

The engine of ``benchmarks/gpu_check.py``: a :class:`Spec` is a step as written (program,
flags on the GPU and in the CPU dry run, timeout, how to read its key figure), a :class:`Step`
the command :func:`expand` makes of it; :func:`run_steps` runs them in order within one time
budget, records a failed or timed-out step with the end of its log and goes on
(``step_report.py`` writes the table). Imports no package of the project, so a broken package
shows up as failed steps, not as a traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TAIL_LINES = 25
Figure = Callable[[str, Path], str]  # (log text, the output folder) -> key figure


def lines(pattern: str, *, last: bool = False) -> Figure:
    """A key figure: the log lines matching ``pattern`` (its first group where it has one),
    joined with "; ", or only the last of them."""
    regex = re.compile(pattern, re.M)

    def figure(log: str, out: Path) -> str:
        found = [(m.group(1) if regex.groups else m.group(0)).strip()
                 for m in regex.finditer(log)]
        return "; ".join(found[-1:] if last else found)
    return figure


def file_size(relative: str) -> Figure:
    """A key figure: the size of a file the step wrote under the output folder."""
    def figure(log: str, out: Path) -> str:
        path = out / relative
        return f"{relative}: {path.stat().st_size / 1e6:.2f} MB" if path.is_file() else (
            f"no {relative}")
    return figure


@dataclass(frozen=True)
class Step:
    """One command: ``skip`` is a reason not to run it, ``needs`` a file an earlier step
    makes, ``note`` is appended to the key figure, ``env`` is added to the environment."""

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


@dataclass(frozen=True)
class Spec:
    """One step as written: ``python [launcher] program flags``, ``$OUT`` the output folder.

    ``tiny`` holds the flags of the CPU dry run; ``None`` skips the step there, for reason
    ``tiny_note`` (otherwise a note on what the dry run leaves out). ``timeout_s`` is the GPU
    run's; :func:`expand` gives the dry run ``slower`` times as much.
    """

    name: str
    program: str
    gpu: str
    tiny: str | None
    timeout_s: float
    figure: Figure
    launcher: str = ""
    needs: str = ""
    tiny_note: str = ""
    env: tuple[tuple[str, str], ...] = ()


def _words(text: str, out: Path) -> list[str]:
    return [word.replace("$OUT", str(out)) for word in shlex.split(text)]


def expand(specs: Sequence[Spec], out: Path, *, tiny: bool, slower: float = 1) -> list[Step]:
    """The commands of ``specs`` with ``$OUT`` filled in: their GPU flags or, with ``tiny``,
    those of the CPU dry run."""
    steps = []
    for s in specs:
        flags = s.tiny if tiny else s.gpu
        argv = (PY, *_words(s.launcher, out), *_words(s.program, out), *_words(flags or "", out))
        skip = s.tiny_note if tiny and s.tiny is None else ""
        steps.append(Step(s.name, argv, s.timeout_s * (slower if tiny else 1), s.figure,
                          skip=skip, needs=_words(s.needs, out)[0] if s.needs else "",
                          note=s.tiny_note if tiny and not skip else "", env=dict(s.env)))
    return steps


def show(argv: Sequence[str], out: Path) -> str:
    """The command as the table shows it: ``python``, and ``$OUT`` for the output folder."""
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
    command = show(step.argv, out)

    def skipped(reason: str) -> StepResult:
        return StepResult(step.name, command, "skipped", reason, None)

    if step.skip:
        return skipped(step.skip)
    if step.needs and not Path(step.needs).is_file():
        return skipped(f"no {show([step.needs], out)} (an earlier step failed)")
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
    kept = [line for line in text.splitlines() if line.strip()]
    if status != "ok":
        figure = kept[-1].strip()[:160] if kept else "(empty log)"
        return StepResult(step.name, command, status, figure, seconds, str(log.relative_to(out)),
                          "\n".join(kept[-TAIL_LINES:]))
    try:
        figure = step.figure(text, out)
    except Exception as exc:  # noqa: BLE001 - a figure is a summary, never a failure
        figure = f"(figure unreadable: {type(exc).__name__}: {exc})"
    figure = "; ".join(part for part in (figure, step.note) if part)
    return StepResult(step.name, command, status, figure, seconds, str(log.relative_to(out)))


def run_steps(steps: Sequence[Step], out: Path, deadline: float) -> list[StepResult]:
    """Run every step in order, printing each one's outcome; a failure does not stop the rest."""
    results = []
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.name} ...", flush=True)
        result = run_step(step, out, deadline)
        results.append(result)
        secs = "" if result.seconds is None else f" ({result.seconds:.0f} s)"
        print(f"    {result.status}{secs}: {result.figure}", flush=True)
    return results
