"""``python -m stylize.tune``: search style weight, learning rate and norm kind with Optuna.

Example::

    python -m stylize.tune --style starry.jpg --trials 30 --steps 200
    python -m stylize.tune --style starry.jpg --norms "sn(candidates=ln+bn), in, gn(groups=8)"
    python -m stylize.tune --style starry.jpg --storage study.db --out runs/tune-w2  # 2nd worker
    python -m stylize.tune --out runs/tune-w2 --resume     # after Ctrl-C/SIGTERM: go on
    optuna-dashboard sqlite:///runs/stylize-tune/<run>/optuna.db               # Pareto front

Thin: parse, check the inputs before anything is written, run :func:`stylize.tune_loop.tune`.
"""

from __future__ import annotations

from collections.abc import Sequence

from snexp.runtime.config import cli_errors, parse_args
from snexp.runtime.run import Run
from snexp.runtime.study import check_study_storage
from stylize.config import PRESETS
from stylize.loss import load_vgg16
from stylize.train import FLAGS as TRAIN_FLAGS
from stylize.train import check_inputs
from stylize.tune_loop import SAFE_KEYS, TuneConfig, check_overwrite, tune

__all__ = ["FLAGS", "main"]

PROG = "python -m stylize.tune"
FLAGS = {
    # not --norm: each trial's model.norm is one of --norms
    **{k: v for k, v in TRAIN_FLAGS.items() if not k.startswith(("--preview", "--norm"))},
    "--norms": "tune.norms",
    "--trials": "tune.trials",
    "--trial-steps": "tune.steps",
    "--study": "tune.study",
    "--storage": "tune.storage",
}


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv``, check the inputs, run this worker's trials."""
    with cli_errors(PROG):
        cfg = parse_args(TuneConfig, argv, prog=PROG, description=__doc__.splitlines()[0],
                         flags=FLAGS, presets=PRESETS, default_config="tune")
        check_inputs(cfg)
        check_overwrite(cfg)
        check_study_storage(cfg.tune.storage, cfg.tune.study)
        loss_net = load_vgg16(cfg.loss.vgg_weights)
        with Run(cfg, experiment="stylize-tune", safe_keys=SAFE_KEYS, prog=PROG) as run:
            tune(run, loss_net)


if __name__ == "__main__":
    main()
