"""Does SN adapt to the batch size? BN, GN, SN (and IN, LN, SSN) from 32 images down to 2.

The SN paper's central claim (Luo et al. 2018, arXiv 1806.10779, Table 1 and Fig. 4) at CPU
scale: for every normalizer, batch size and seed, one small ResNet (:mod:`batch_size_run`) is
trained on the same images with the linearly scaled learning rate, then tested; SN's learned
importance is read per layer and averaged over layers. Prints a table of test accuracy (mean
+- std over seeds) and of SN's importance, and writes::

    <out>/study.json                  every run: test_acc, curves, importance, lr, steps, ...
    <out>/accuracy.png                test accuracy vs batch size, one line per norm
    <out>/importance.png              SN's mean/var importance (averaged over layers) per batch
    <out>/<norm>-b<batch>-s<seed>/    each run's directory (config.toml, tb/, checkpoints/,
                                      result.json); ``-d<K>`` is added with ``--devices K``;
                                      <norm> is the spec's text, e.g. ``gn-groups=8``

::

    python benchmarks/batch_size_study.py --out runs/batch-study --quick   # <= 10 min, 2 cores
    python benchmarks/batch_size_study.py --out runs/batch-study --seeds 0,1
    python benchmarks/batch_size_study.py --norms "sn(candidates=ln+bn), gn(groups=4)" --quick

Each arm of ``--norms`` is an ``snexp.NormSpec``: a kind with its options. GN's default of 32
groups does not divide the 16 channels of the first stage, so the presets' GN arm is
``gn(groups=8)``.

Finished runs (with ``result.json``) are read, not rerun, and interrupted ones resumed from
their last checkpoint, so the study can be stopped (Ctrl-C) and started again; a run directory
made with other settings is refused, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from batch_size_report import draw_figures, format_tables, summarize
from batch_size_run import RunConfig, train

from nas.data import build_splits
from snexp import NORM_KINDS, NormSpec
from snexp.runtime.checkpoint import write_text_atomic
from snexp.runtime.config import (
    CONFIG_FILE,
    ConfigError,
    cli_errors,
    flatten,
    load_config,
    override,
    resolve_config,
)
from snexp.runtime.run import Run, RunStopped

PROG = "python benchmarks/batch_size_study.py"
RESULT_FILE = "result.json"
QUICK = {"norms": "bn,gn(groups=8),sn", "batch_sizes": "32,8,2", "epochs": 2}  # full grid's runs
FULL = {"norms": "bn,gn(groups=8),sn,in,ln", "batch_sizes": "32,16,8,4,2", "epochs": 2}


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{name} {text!r}: give a comma list of integers") from None
    if not values or (min(values) < 1 and name != "seeds"):
        raise ConfigError(f"--{name} {text!r}: give a comma list of integers >= 1")
    return values


def _norms(text: str) -> list[NormSpec]:
    """A comma list of norm specs; commas inside a spec's parentheses stay in it."""
    parts = [p.strip() for p in re.split(r",(?![^()]*\))", text) if p.strip()]
    try:
        specs = [NormSpec.parse(p) for p in parts]
    except ValueError as exc:
        raise ConfigError(f"--norms {text!r}: {exc}") from None
    if not specs:
        raise ConfigError(f"--norms {text!r}: give a comma list of norm specs, e.g. "
                          f"{FULL['norms']}")
    return specs


# everyday flags -> keys of RunConfig (each has a --set equivalent)
FLAGS = {
    "--epochs": ("train.epochs", "passes over the training images"),
    "--devices": ("train.devices", "normalization batches per optimizer step (ghost batches)"),
    "--base-lr": ("train.base_lr", "lr = base_lr * batch * devices / base_batch"),
    "--base-batch": ("train.base_batch", "the batch that gets --base-lr"),
    "--importance-lr-mult": ("train.importance_lr_mult", "lr factor of SN's importance logits"),
    "--width": ("model.width", "channels of the first stage"),
    "--dataset": ("data.dataset", "embedded, cifar10, cifar100 or imagefolder"),
    "--data-root": ("data.root", "folder of the CIFAR files or of the image folder"),
    "--device": ("runtime.device", "auto, cpu, cuda, cuda:N"),
}
GRID_KEYS = ("model.norm", "train.batch_size", "runtime.seed", "runtime.out")
# old keys now part of an arm's spec (read from old config.toml files, refused on --set)
_SPEC_KEYS = {"model.gn_groups": "gn(groups=G)"}


def _parser() -> argparse.ArgumentParser:
    defaults = flatten(RunConfig())
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=Path("runs/batch-study"),
                        help="study directory (default: runs/batch-study)")
    parser.add_argument("--quick", action="store_true",
                        help=f"reduced grid: norms {QUICK['norms']}, batch sizes "
                             f"{QUICK['batch_sizes']}, {QUICK['epochs']} epochs (runs of the full "
                             "grid)")
    parser.add_argument("--norms", help=f"comma list of norm specs: kinds {', '.join(NORM_KINDS)} "
                                        "with options as in gn(groups=8) "
                                        f"(default: {FULL['norms']})")
    parser.add_argument("--batch-sizes", help="comma list of images per normalization batch "
                                              f"(default: {FULL['batch_sizes']})")
    parser.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
    for flag, (key, text) in FLAGS.items():
        default = FULL["epochs"] if key == "train.epochs" else defaults[key]
        parser.add_argument(flag, dest=key, metavar=key.rpartition(".")[2].upper(),
                            help=f"{text} (default: {default}; --set {key}=...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any key of a run's config.toml, e.g. data.embedded_train=2000 "
                             f"(repeatable; not {', '.join(GRID_KEYS)}, which the grid sets)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1; see the README: tiny batches run "
                             "slower with more threads, much slower on a busy machine)")
    parser.add_argument("--no-figures", action="store_true", help="skip the two PNG figures")
    return parser


def build_configs(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[RunConfig]]:
    """Parse the command line into one :class:`RunConfig` per (seed, norm, batch size).

    Settings are layered as in every entry point: defaults (the full grid's epochs, or
    ``--quick``'s) < flags < ``--set``; the grid then sets norm, batch size, seed and directory.

    Raises:
        ConfigError: A bad flag value, with what is allowed.
    """
    args = _parser().parse_args(argv)
    preset = QUICK if args.quick else FULL
    norms = _norms(args.norms or preset["norms"])
    sizes = _ints(args.batch_sizes or preset["batch_sizes"], "batch-sizes")
    seeds = _ints(args.seeds, "seeds")
    fixed = [s for s in args.set if s.split("=", 1)[0].strip() in GRID_KEYS]
    if fixed:
        raise ConfigError(f"--set {fixed[0]}: the grid sets {', '.join(GRID_KEYS)}; use "
                          "--norms, --batch-sizes, --seeds and --out")
    old = [s for s in args.set if s.split("=", 1)[0].strip() in _SPEC_KEYS]
    if old:
        key = old[0].split("=", 1)[0].strip()
        raise ConfigError(f"--set {old[0]}: {key} is now an option of the norm spec; write it "
                          f"in --norms, e.g. --norms bn,{_SPEC_KEYS[key]},sn")
    values = vars(args)
    sets = [f"train.epochs={preset['epochs']}", "runtime.checkpoint_every=1000"]
    sets += [f"{key}={values[key]}" for key, _ in FLAGS.values() if values[key] is not None]
    base = resolve_config(RunConfig, sets=sets + args.set)
    configs = []
    for seed in seeds:
        for norm in norms:
            for size in sizes:
                name = run_name(norm, size, seed, base.train.devices)
                configs.append(override(base, {
                    "model.norm": norm, "train.batch_size": size, "runtime.seed": seed,
                    "runtime.out": str(args.out / name)}))
    return args, configs


def run_name(norm: NormSpec | str, batch_size: int, seed: int, devices: int = 1) -> str:
    """The run directory's name inside the study directory: the spec's text without brackets,
    commas and spaces (``gn(groups=8)`` -> ``gn-groups=8``; a bare kind is itself)."""
    arm = re.sub(r"[^\w.+=-]+", "-", str(NormSpec.parse(norm))).strip("-")
    return f"{arm}-b{batch_size}-s{seed}" + (f"-d{devices}" if devices > 1 else "")


def _settings(cfg: RunConfig) -> dict:
    return {k: v for k, v in flatten(cfg).items() if not k.startswith("runtime.")
            or k in ("runtime.seed",)}


def plan(cfg: RunConfig) -> str:
    """What to do with a run: ``reuse``, ``resume``, ``restart`` (begun, no checkpoint) or
    ``new``.

    Raises:
        ConfigError: The directory holds a run with other settings, or is not a run directory.
    """
    folder = Path(cfg.runtime.out)
    if not folder.exists() or not any(folder.iterdir()):
        return "new"
    saved = folder / CONFIG_FILE
    if not saved.is_file():
        raise ConfigError(f"{folder} exists but holds no {CONFIG_FILE}, so it is not a run of "
                          "this study; move it away or choose another --out")
    old, new = _settings(load_config(RunConfig, saved)), _settings(cfg)
    def shown(value: object) -> str:
        return str(value) if isinstance(value, NormSpec) else repr(value)

    diff = [f"{k}: {shown(old.get(k))} -> {shown(v)}" for k, v in new.items() if old.get(k) != v]
    if diff:
        raise ConfigError(f"{folder} holds a run made with other settings ({'; '.join(diff)}); "
                          "rerun with the settings it was made with, or choose another --out")
    if (folder / RESULT_FILE).is_file():
        return "reuse"
    return "resume" if (folder / "checkpoints" / "last.pt").is_file() else "restart"


def run_one(cfg: RunConfig, what: str, splits) -> dict:
    """Train (or resume) one run and write its ``result.json``; returns the record."""
    folder = Path(cfg.runtime.out)
    cfg = override(cfg, {"runtime.resume": what == "resume",
                         "runtime.overwrite": what == "restart"})
    print(f"$ {folder.name} ({what})", flush=True)
    with Run(cfg, experiment="batch-size-study", prog=PROG) as run:
        result = train(run, splits)
    record = {"norm": str(cfg.model.norm), "batch_size": cfg.train.batch_size,
              "devices": cfg.train.devices, "seed": cfg.runtime.seed, "dir": folder.name,
              **result}
    write_text_atomic(folder / RESULT_FILE, json.dumps(record, indent=1) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> None:
    with cli_errors(PROG):
        args, configs = build_configs(argv)
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: give 1 or more")
        torch.set_num_threads(args.threads)
        plans = [plan(cfg) for cfg in configs]  # every directory checked before any work
        splits = build_splits(configs[0].data) if set(plans) != {"reuse"} else None
        records = []
        for cfg, what in zip(configs, plans):
            folder = Path(cfg.runtime.out)
            if what == "reuse":
                records.append(json.loads((folder / RESULT_FILE).read_text()))
                continue
            try:
                records.append(run_one(cfg, what, splits))
            except RunStopped as exc:
                print(f"{PROG}: {exc}\nThe study stopped in {folder}; run the same command "
                      "again to resume it there (finished runs are kept).", file=sys.stderr)
                sys.exit(exc.exit_code)
        summary = summarize(records)
        (args.out / "study.json").write_text(json.dumps(
            {"runs": records, "summary": summary["rows"],
             "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                         "device": configs[0].runtime.device}}, indent=1) + "\n")
        print("\n" + format_tables(summary))
        if not args.no_figures:
            for path in draw_figures(summary, args.out):
                print(f"figure: {path}")
        print(f"(every number: {args.out / 'study.json'})")


if __name__ == "__main__":
    main()
