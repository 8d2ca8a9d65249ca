"""nas: ENAS-style architecture search with snexp normalizers inside the searched cells.

Pham et al., "Efficient Neural Architecture Search via Parameter Sharing" (ICML 2018, arXiv
1802.03268), micro search space. The searched cells' norms come from one ``snexp.NormSpec``
(``--norm``; SN by default), so a search can compare SN against BN and inspect what each layer
learned to use.

``python -m nas.search`` searches, ``python -m nas.train --arch best_arch.json`` retrains,
``python -m nas.draw ARCH`` draws cells (``nas.draw`` is imported on use, not here, so that
``python -m nas.draw`` runs without runpy's double-import warning).

The names below are re-exported lazily (PEP 562): ``from nas import run_search`` imports the
search loop (and optuna) then, so that ``python -m nas.train`` loads neither.
"""

from __future__ import annotations

import importlib
from typing import Any

# submodule -> the public names it defines
_MODULES = {
    "cells": ("FixedCell", "SearchCell"),
    "child": ("ChildNet", "ChildOutput"),
    "config": ("ChildConfig", "OptimConfig", "RetrainConfig", "RetrainSettings", "SearchConfig",
               "SearchSettings"),
    "controller": ("Controller", "ControllerConfig", "Policy"),
    "data": ("DataConfig", "Splits", "build_splits", "make_shapes"),
    "ops": ("OPS",),
    "proposers": ("Proposer", "RandomProposer", "Reinforce", "TPEProposer", "arch_distributions",
                  "arch_params", "build_proposer"),
    "broadcast_proposer": ("BroadcastProposer",),
    "search_loop": ("SearchResult", "evaluate", "run_search"),
    "space": ("PRIMITIVES", "Architecture", "parse_arch"),
    "train_loop": ("RetrainResult", "count_flops", "count_params", "load_arch", "retrain"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # AttributeError lets ``from nas import draw`` import the submodule
        raise AttributeError(f"module 'nas' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nas.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
