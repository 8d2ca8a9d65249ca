"""``python -m nas.train --arch best_arch.json``: retrain a searched cell from scratch (thin).

Parses the config (defaults < ``--config`` presets from ``configs/nas`` < flags < ``--set``),
opens the run directory and calls :func:`nas.train_loop.retrain`; reports test top-1,
parameters and FLOPs. ``--help`` lists every key.
"""

from __future__ import annotations

from collections.abc import Sequence

from nas.config import COMMON_FLAGS, PRESETS, RetrainConfig
from nas.data import check_data
from nas.train_loop import load_arch, retrain
from snexp.runtime.config import cli_errors, parse_args
from snexp.runtime.run import Run

PROG = "python -m nas.train"
FLAGS = {"--arch": "retrain.arch", **COMMON_FLAGS}
SAFE_KEYS = ("train.epochs", "retrain.eval_every", "data.workers")


def main(argv: Sequence[str] | None = None) -> None:
    """Retrain an architecture from the command line."""
    with cli_errors(PROG):
        cfg = parse_args(RetrainConfig, argv, prog=PROG, description=__doc__.splitlines()[0],
                         flags=FLAGS, presets=PRESETS, default_config="retrain_quick")
        # A bad --arch is refused before the run starts; --resume takes the run's own.
        arch = None if cfg.runtime.resume else load_arch(cfg.retrain.arch)
        check_data(cfg.data)
        with Run(cfg, experiment="nas-train", safe_keys=SAFE_KEYS, prog=PROG) as run:
            retrain(run, arch)


if __name__ == "__main__":
    main()
