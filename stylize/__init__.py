"""stylize: feed-forward style transfer (Johnson et al. 2016) with Switchable Normalization.

A transformation network whose normalizers come from ``snexp`` (``stylize.net``), trained
against the perceptual losses of a frozen VGG16 (``stylize.loss``) on content photos or
embedded scenes (``stylize.data``); several styles share one network through style-conditional
norms (``stylize.cond``). Entry points: ``python -m stylize.train``, ``stylize.apply``,
``stylize.tune``.

The names below are re-exported lazily (PEP 562), so that ``python -m stylize.apply`` loads
only what applying a saved model needs (no loss network, no run machinery, no optuna).
"""

from __future__ import annotations

import importlib
from typing import Any

# submodule -> the public names it defines
_MODULES = {
    "cond": ("ConditionalAffine", "ConditionalSwitchNorm2d", "StyleNorm", "style_norm_layer"),
    "config": ("StylizeConfig",),
    "data": ("ContentFolder", "SyntheticScenes", "load_image"),
    "loss": ("Losses", "PerceptualLoss", "VGG16Features", "VGGOutputs", "gram_matrix",
             "imagenet_normalize", "load_vgg16", "total_variation"),
    "net": ("TransformerNet", "style_weights"),
    "saved": ("load_model", "save_model"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # AttributeError lets ``from stylize import apply`` import the submodule
        raise AttributeError(f"module 'stylize' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"stylize.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
