"""Proposers, or norms inside the ENAS controller, compared on one budget over several seeds.

For every arm and seed, runs ``python -m nas.search`` (same preset, budget and data), then
retrains the best cell it found with ``python -m nas.train`` and reads ``result.json``. Prints,
per arm, mean +- std over seeds of the controller's mean reward in the last search epoch (the
validation accuracy of its sampled cells with the shared weights), of the search's best derived
valid accuracy and of the retrained test accuracy, and writes every number to
``<out>/study.json``. The arms are

- proposers (default): ``--proposers lstm,random,tpe``, child norm ``--norm`` (default bn, in
  the search and the retraining: the SN paper's ENAS child and the setting of the measured
  tables; SN cells with the quick preset's prior are compared in ``nas_norms.py``);
- controller norms (the SN paper's ENAS experiment: SN, a mix of LN and GN, inside the
  controller's LSTM, BN in the child cells): ``--controller-norms sn,ln,gn,none``, the LSTM
  controller with ``controller.norm`` set per arm, child norm ``--norm`` (default bn)::

    python benchmarks/nas_study.py --out runs/nas-study [--seeds 0,1,2]
        [--proposers lstm,random,tpe | --controller-norms sn,ln,gn,none]
        [--search-config quick] [--retrain-config retrain_quick]
        [--search-epochs 8] [--retrain-epochs 6]
        [--search-set KEY=VALUE ...] [--retrain-set KEY=VALUE ...]

Finished runs are kept and reused: a run directory that already holds its result is read, not
rerun, and an interrupted one is resumed, so the study can be stopped and started again. Each
run is a separate process with its own run directory and logs (``<out>/<arm>-s<seed>/``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def _run(module: str, out: Path, args: list[str], done: Path) -> None:
    """Run ``python -m module`` into ``out`` unless ``done`` exists; resume a partial run."""
    if done.exists():
        return
    cmd = [sys.executable, "-m", module, "--out", str(out), *args]
    if (out / "checkpoints" / "last.pt").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
        sys.exit(f"nas_study: {module} stopped early in {out} (its message is above); run the "
                 "same command again to resume the study where it stopped.")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {std:.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/nas-study"),
                        help="study directory (one run directory per proposer and seed)")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default: 0,1,2)")
    parser.add_argument("--proposers", default="lstm,random,tpe",
                        help="comma list of lstm, random, tpe (default: all three)")
    parser.add_argument("--controller-norms", default=None,
                        help="compare these norms inside the LSTM controller instead of "
                             "proposers: comma list of sn, ln, gn, none")
    parser.add_argument("--norm", default="bn",
                        help="norm spec of the child in the search and the retraining, e.g. "
                             "bn or 'sn(prior=bn:4)' (default: bn)")
    parser.add_argument("--search-config", default=None,
                        help="nas.search preset (default: quick; paper scale: enas_cifar10)")
    parser.add_argument("--retrain-config", default=None, help="nas.train preset (default: "
                        "retrain_quick; paper scale: enas_cifar10_final)")
    parser.add_argument("--search-epochs", type=int, default=None,
                        help="search epochs (default: the preset's)")
    parser.add_argument("--retrain-epochs", type=int, default=None,
                        help="retraining epochs (default: the preset's)")
    parser.add_argument("--search-set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to nas.search as --set (repeatable)")
    parser.add_argument("--retrain-set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to nas.train as --set (repeatable)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    proposers = [p.strip() for p in args.proposers.split(",")]
    unknown = sorted(set(proposers) - {"lstm", "random", "tpe"})
    if unknown:
        parser.error(f"unknown proposer(s) {unknown}: choose from lstm, random, tpe")
    arms = {p: ["--controller", p] for p in proposers}  # arm name -> its nas.search flags
    if args.controller_norms is not None:
        from nas.controller import CONTROLLER_NORM_KINDS

        norms = [n.strip() for n in args.controller_norms.split(",")]
        unknown = sorted(set(norms) - set(CONTROLLER_NORM_KINDS))
        if unknown:
            parser.error(f"unknown controller norm(s) {unknown}: choose from "
                         f"{', '.join(CONTROLLER_NORM_KINDS)}")
        arms = {f"lstm-{n}": ["--controller", "lstm", "--set", f"controller.norm={n}"]
                for n in norms}
    search_args = ["--config", args.search_config] if args.search_config else []
    search_args += ["--norm", args.norm] + [a for kv in args.search_set for a in ("--set", kv)]
    if args.search_epochs is not None:
        search_args += ["--epochs", str(args.search_epochs)]
    retrain_args = ["--config", args.retrain_config] if args.retrain_config else []
    retrain_args += ["--norm", args.norm] + [a for kv in args.retrain_set for a in ("--set", kv)]
    if args.retrain_epochs is not None:
        retrain_args += ["--epochs", str(args.retrain_epochs)]

    rows: dict[str, list[dict]] = {}
    for arm, flags in arms.items():
        for seed in seeds:
            base = args.out / f"{arm}-s{seed}"
            search_dir, train_dir = base / "search", base / "retrain"
            best = search_dir / "best_arch.json"
            _run("nas.search", search_dir, [*flags, "--seed", str(seed),
                                            "--study", f"{arm}-s{seed}", *search_args],
                 done=base / "search.done")
            (base / "search.done").touch()
            result = train_dir / "result.json"
            _run("nas.train", train_dir, ["--arch", str(best), "--seed", str(seed),
                                          *retrain_args], done=result)
            found = json.loads(best.read_text())
            summary = search_dir / "search.json"
            rewards = json.loads(summary.read_text())["rewards"] if summary.exists() else []
            trained = json.loads(result.read_text())
            rows.setdefault(arm, []).append({
                "seed": seed, "reward": rewards[-1] if rewards else None, "rewards": rewards,
                "valid_acc": found.get("valid_acc"), "test_acc": trained["test_acc"],
                "params": trained["params"], "arch": trained["arch"]})

    (args.out / "study.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{'arm':9s} {'seeds':>5s} {'last-epoch reward':>20s} {'search valid acc':>20s} "
          f"{'retrained test acc':>20s}")
    for arm, runs in rows.items():
        reward = [r["reward"] for r in runs if r["reward"] is not None]
        valid = [r["valid_acc"] for r in runs if r["valid_acc"] is not None]
        test = [r["test_acc"] for r in runs]
        print(f"{arm:9s} {len(runs):5d} {_mean_std(reward):>20s} {_mean_std(valid):>20s} "
              f"{_mean_std(test):>20s}")
    print(f"(every number: {args.out / 'study.json'})")


if __name__ == "__main__":
    main()
