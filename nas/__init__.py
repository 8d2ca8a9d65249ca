"""nas: ENAS-style architecture search with snexp normalizers inside the searched cells.

Pham et al., "Efficient Neural Architecture Search via Parameter Sharing" (ICML 2018, arXiv
1802.03268), micro search space. The searched cells' norms come from one ``snexp.NormSpec``
(``--norm``; SN by default), so a search can compare SN against BN and inspect what each layer
learned to use.

``python -m nas.search`` searches, ``python -m nas.train --arch best_arch.json`` retrains,
``python -m nas.draw ARCH`` draws cells (``nas.draw`` is imported on use, not here, so that
``python -m nas.draw`` runs without runpy's double-import warning).
"""

from nas.cells import FixedCell, SearchCell
from nas.child import ChildNet, ChildOutput
from nas.config import (
    ChildConfig,
    OptimConfig,
    RetrainConfig,
    RetrainSettings,
    SearchConfig,
    SearchSettings,
)
from nas.controller import Controller, ControllerConfig, Policy
from nas.data import DataConfig, Splits, build_splits, make_shapes
from nas.ops import OPS
from nas.proposers import (
    Proposer,
    RandomProposer,
    Reinforce,
    TPEProposer,
    arch_distributions,
    arch_params,
    build_proposer,
)
from nas.rank_zero import RankZeroProposer
from nas.search_loop import SearchResult, evaluate, run_search
from nas.space import PRIMITIVES, Architecture, parse_arch
from nas.train_loop import RetrainResult, count_flops, count_params, load_arch, retrain

__all__ = [
    "OPS", "PRIMITIVES", "Architecture", "ChildConfig", "ChildNet", "ChildOutput",
    "Controller", "ControllerConfig", "DataConfig", "FixedCell", "OptimConfig", "Policy",
    "Proposer", "RandomProposer", "RankZeroProposer", "Reinforce", "RetrainConfig",
    "RetrainResult", "RetrainSettings", "SearchCell", "SearchConfig", "SearchResult",
    "SearchSettings", "Splits", "TPEProposer", "arch_distributions", "arch_params",
    "build_proposer", "build_splits", "count_flops", "count_params", "evaluate", "load_arch",
    "make_shapes", "parse_arch", "retrain", "run_search",
]
