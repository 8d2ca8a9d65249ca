"""SN cells vs BN cells in the quick search: seeds x data sets, in parallel, one table.

Runs ``python -m nas.search`` (the ``quick`` preset, its full budget unless ``--epochs``) for
every arm x data set x seed, each as its own process with one thread (``--jobs`` at a time),
and writes ``<out>/report.md``: per arm and data set, the derived valid accuracy of every
epoch (mean +- std over seeds), the final and the best derived accuracy, the mean child loss
over steps 351-400 per seed, the SN importance at the end (BN's share of the mean / variance
weights) and the wall time of each run.
The arms:

- ``sn-prior``: the quick preset as it is: SN in every norm of the cells with the importance
  priors ``bn:4`` on the mean weights and ``bn:6`` on the variance weights
  (``sn(prior=bn:4, var_prior=bn:6)``), importance logits at 10x lr without the L2 term
  (docs/nas.md);
- ``bn``: ``--norm bn`` (the SN paper's ENAS child);
- ``sn-uniform``: SN cells as the SN paper starts them (equal importance, logits at the
  common lr with the L2 term): ``--norm sn --set train.importance_lr_mult=1
  --set train.importance_l2=true``;
- ``sn-prior4`` and ``sn-prior6`` (only when asked for): one prior on both rows,
  ``--norm 'sn(prior=bn:4)'`` (the earlier default; BN share 0.965) and ``'sn(prior=bn:6)'``
  (0.995), which barely lets the importance move (docs/nas.md).

The data sets: ``embedded`` (the default) and ``shapes``, the 1,800-image folder
``nas.data.write_shapes_folder(<out>/shapes-1800, 1800)`` (written once) with
``--dataset imagefolder``::

    python benchmarks/nas_norms.py --out runs/nas-norms --jobs 16
        [--arms sn-prior,bn,sn-uniform[,sn-prior4,sn-prior6]] [--data embedded,shapes]
        [--seeds 0,1,2]
        [--epochs N] [--set KEY=VALUE ...] [--time-limit SECONDS] [--report-only]

Finished runs (``search.json`` present) are read, not rerun; an interrupted one resumes from
its checkpoint. ``--time-limit`` stops every run still going after that many seconds (SIGINT:
each finishes its step, writes a checkpoint and exits) and reports; the same command later
resumes them. ``--report-only`` runs nothing and tabulates whatever the run folders hold
(unfinished runs from their TensorBoard logs). Each run's output is in
``<out>/logs/<data>-<arm>-s<seed>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ARMS = {
    "sn-prior": [],
    "bn": ["--norm", "bn"],
    "sn-uniform": ["--norm", "sn", "--set", "train.importance_lr_mult=1",
                   "--set", "train.importance_l2=true"],
    "sn-prior4": ["--norm", "sn(prior=bn:4)"],
    "sn-prior6": ["--norm", "sn(prior=bn:6)"],
}
DEFAULT_ARMS = ("sn-prior", "bn", "sn-uniform")
DATA = ("embedded", "shapes")
SHAPES_IMAGES = 1800
LOSS_WINDOW = (351, 400)  # steps whose mean loss is reported ("loss at step 400")


@dataclass(frozen=True)
class Job:
    """One search: its name, run directory and ``nas.search`` arguments."""

    name: str
    data: str
    arm: str
    seed: int
    out: Path
    argv: tuple[str, ...]


def plan(out: Path, arms: list[str], data: list[str], seeds: list[int], extra: list[str]
         ) -> list[Job]:
    """Every run of the grid, in the order they start (seeds outermost: a time limit leaves
    every arm with the same seeds done)."""
    jobs = []
    for seed in seeds:
        for name in data:
            where = ([] if name == "embedded" else
                     ["--dataset", "imagefolder", "--data-root", str(out / "shapes-1800")])
            for arm in arms:
                tag = f"{name}-{arm}-s{seed}"
                jobs.append(Job(tag, name, arm, seed, out / name / f"{arm}-s{seed}", (
                    "--seed", str(seed), "--study", tag, *where, *ARMS[arm], *extra)))
    return jobs


def _run(job: Job, logs: Path, procs: dict, stopping: threading.Event) -> None:
    """Run one search (resuming a partial one) with one thread; record its wall time."""
    if (job.out / "search.json").exists() or stopping.is_set():
        return
    cmd = [sys.executable, "-m", "nas.search", "--out", str(job.out), *job.argv]
    if (job.out / "checkpoints" / "last.pt").exists():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    with open(logs / f"{job.name}.log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # our Ctrl-C reaches it through us
        procs[job.name] = proc
        rc = proc.wait()
    timing = logs / f"{job.name}.time.json"
    spent = json.loads(timing.read_text())["wall_s"] if timing.exists() else 0.0
    timing.write_text(json.dumps({"wall_s": spent + time.time() - start, "rc": rc}) + "\n")
    print(f"{job.name}: exit {rc} after {time.time() - start:.0f} s", flush=True)


def run_all(jobs: list[Job], out: Path, workers: int, time_limit: float | None) -> None:
    """Run ``jobs``, ``workers`` at a time; stop them all (SIGINT) at ``time_limit`` s."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if any(j.data == "shapes" for j in jobs) and not (out / "shapes-1800").exists():
        from nas.data import write_shapes_folder

        write_shapes_folder(out / "shapes-1800", SHAPES_IMAGES)
    procs: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()

    def stop(*_) -> None:
        stopping.set()
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # the run checkpoints and exits

    timer = threading.Timer(time_limit, stop) if time_limit else None
    if timer:
        timer.start()
    previous = signal.signal(signal.SIGINT, stop)
    previous_term = signal.signal(signal.SIGTERM, stop)
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda j: _run(j, logs, procs, stopping), jobs))
    finally:
        if timer:
            timer.cancel()
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


def _scalars(tb: Path, tag: str) -> list[tuple[int, float]]:
    if not tb.exists():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    last = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run may repeat steps
    return sorted(last.items())


def read_run(job: Job) -> dict | None:
    """What a run folder holds: per-epoch derived accuracy, loss at step 400, wall time..."""
    if not job.out.exists():
        return None
    summary_file = job.out / "search.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    losses = dict(_scalars(job.out / "tb", "child/loss"))
    if summary is not None and summary.get("derived"):
        derived = summary["derived"]
    else:
        derived = [v for _, v in _scalars(job.out / "tb", "search/derive_acc")]
    lo, hi = LOSS_WINDOW
    window = [losses[s] for s in range(lo, hi + 1) if s in losses]
    timing = job.out.parent.parent / "logs" / f"{job.name}.time.json"
    imp = (summary or {}).get("importance") or {}
    shared = imp.get("shared") or {}

    def lowest(row: str) -> float | None:
        shares = [op[row]["bn"] for op in imp.get("ops", []) if op.get(row)]
        return min(shares) if shares else None

    return {
        "finished": summary is not None, "derived": derived,
        "final": derived[-1] if summary is not None and derived else None,
        "best": summary["best_valid_acc"] if summary else (max(derived) if derived else None),
        "loss400": statistics.mean(window) if len(window) == hi - lo + 1 else None,
        "steps": max(losses, default=0),
        "wall_s": json.loads(timing.read_text())["wall_s"] if timing.exists() else None,
        # BN's share of the mean and of the variance weights
        "bn_shared": tuple((shared.get(row) or {}).get("bn") for row in ("mean", "var")),
        "bn_min_op": (lowest("mean"), lowest("var")),
    }


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f} (n={len(values)})"


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _pair(values: tuple[float | None, float | None]) -> str:
    """``mean / var`` shares, ``-`` where neither is known."""
    if all(v is None for v in values):
        return "-"
    return " / ".join(_fmt(v) for v in values)


def report(jobs: list[Job]) -> str:
    """The markdown report of every run in ``jobs`` that left a folder."""
    rows: dict[tuple[str, str], list[tuple[int, dict]]] = {}
    for job in jobs:
        found = read_run(job)
        if found is not None:
            rows.setdefault((job.data, job.arm), []).append((job.seed, found))
    lines = ["# SN cells vs BN cells in the quick search (benchmarks/nas_norms.py)", "",
             "sn-prior: SN cells, importance priors bn:4 (mean weights) and bn:6 (variance "
             "weights), logits at 10x lr, no L2 (the quick preset); bn: --norm bn; "
             "sn-uniform: SN cells from equal importance (the SN paper's start); sn-prior4, "
             "sn-prior6: one prior bn:4 or bn:6 on both. Accuracy: best of the derive step's "
             "architectures on the valid split with the shared weights.", ""]
    if not rows:
        return "\n".join(lines + ["No run folders yet."]) + "\n"
    for data in dict.fromkeys(j.data for j in jobs):
        arms = [(arm, rows[(d, arm)]) for d, arm in rows if d == data]
        if not arms:
            continue
        epochs = max(len(r["derived"]) for _, runs in arms for _, r in runs)
        lines += [f"## {data}: derived valid accuracy per epoch (mean ± std over seeds)", ""]
        if not epochs:
            lines.append("No epoch finished yet.")
        else:
            lines += ["| arm | " + " | ".join(str(e + 1) for e in range(epochs)) + " |",
                      "|---|" + "---|" * epochs]
        for arm, runs in arms if epochs else []:
            cells = [_ms([r["derived"][e] for _, r in runs if len(r["derived"]) > e])
                     for e in range(epochs)]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines += ["", f"## {data}: per run", "",
                  "| arm | seed | finished | steps | final derived acc | best derived acc | "
                  f"loss, steps {LOSS_WINDOW[0]}-{LOSS_WINDOW[1]} | BN share (mean / var "
                  "weights): shared norms | BN share: lowest op | wall (min) |", "|---" * 10 + "|"]
        for arm, runs in arms:
            for seed, r in sorted(runs, key=lambda sr: sr[0]):
                wall = None if r["wall_s"] is None else r["wall_s"] / 60
                lines.append(
                    f"| {arm} | {seed} | {'yes' if r['finished'] else 'no'} | {r['steps']} | "
                    f"{_fmt(r['final'])} | {_fmt(r['best'])} | {_fmt(r['loss400'])} | "
                    f"{_pair(r['bn_shared'])} | {_pair(r['bn_min_op'])} | "
                    f"{_fmt(wall, '.1f')} |")
            finals = [r["final"] for _, r in runs if r["final"] is not None]
            losses = [r["loss400"] for _, r in runs if r["loss400"] is not None]
            lines.append(f"| {arm} | all | | | {_ms(finals)} | "
                         f"{_ms([r['best'] for _, r in runs if r['best'] is not None])} | "
                         f"{_ms(losses)} | | | |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/nas-norms"))
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma list of {', '.join(ARMS)} (default: "
                             f"{','.join(DEFAULT_ARMS)})")
    parser.add_argument("--data", default=",".join(DATA),
                        help="comma list of embedded, shapes (default: both)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list (default: 0,1,2)")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="runs at a time, one thread each (default: CPU cores - 1)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="search epochs (default: the quick preset's 12)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every nas.search as --set (repeatable)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop (checkpoint) every run still going after this long")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; tabulate what the run folders hold")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    data = [d.strip() for d in args.data.split(",") if d.strip()]
    if sorted(set(arms) - set(ARMS)) or sorted(set(data) - set(DATA)):
        parser.error(f"--arms takes {', '.join(ARMS)}; --data takes {', '.join(DATA)}; got "
                     f"{args.arms!r}, {args.data!r}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: a comma list of integers, got {args.seeds!r}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    extra = [a for kv in args.set for a in ("--set", kv)]
    if args.epochs is not None:
        extra += ["--epochs", str(args.epochs)]
    jobs = plan(args.out, arms, data, seeds, extra)
    if not args.report_only:
        run_all(jobs, args.out, args.jobs, args.time_limit)
    text = report(jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text)
    print(text + f"(written to {args.out / 'report.md'})")


if __name__ == "__main__":
    main()
