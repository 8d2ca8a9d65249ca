"""``python -m nas.search``: ENAS micro search with snexp norms in the cells (thin entry point).

Parses the config (defaults < ``--config`` presets from ``configs/nas`` < flags < ``--set``),
opens the run directory and calls :func:`nas.search_loop.run_search`. ``--help`` lists every key.
"""

from __future__ import annotations

from collections.abc import Sequence

from nas.config import COMMON_FLAGS, PRESETS, SearchConfig
from nas.data import check_data
from nas.search_loop import run_search
from snexp.runtime.config import cli_errors, parse_args
from snexp.runtime.run import Run
from snexp.runtime.study import check_study_storage

PROG = "python -m nas.search"
FLAGS = {
    **COMMON_FLAGS,
    "--controller": "controller.kind",
    "--storage": "search.storage",
    "--study": "search.study",
}
# May change on --resume: a longer search, a different derive budget or logging.
SAFE_KEYS = ("train.epochs", "search.derive_final", "search.importance_every", "data.workers")


def main(argv: Sequence[str] | None = None) -> None:
    """Run a search from the command line."""
    with cli_errors(PROG):
        cfg = parse_args(SearchConfig, argv, prog=PROG, description=__doc__.splitlines()[0],
                         flags=FLAGS, presets=PRESETS, default_config="quick")
        # inputs are checked before --out is touched
        check_study_storage(cfg.search.storage, cfg.search.study)
        check_data(cfg.data)
        with Run(cfg, experiment="nas-search", safe_keys=SAFE_KEYS, prog=PROG) as run:
            run_search(run)


if __name__ == "__main__":
    main()
