"""stylize: feed-forward style transfer (Johnson et al. 2016) with Switchable Normalization.

A transformation network whose normalizers come from ``snexp`` (``stylize.net``), trained
against the perceptual losses of a frozen VGG16 (``stylize.loss``) on content photos or
embedded scenes (``stylize.data``); several styles share one network through style-conditional
norms (``stylize.cond``). Entry points: ``python -m stylize.train``, ``stylize.apply``,
``stylize.tune``.
"""

from stylize.cond import ConditionalAffine, ConditionalSwitchNorm2d, StyleNorm, style_norm_layer
from stylize.config import StylizeConfig
from stylize.data import ContentFolder, SyntheticScenes, load_image
from stylize.loss import (
    Losses,
    PerceptualLoss,
    VGG16Features,
    VGGOutputs,
    gram_matrix,
    imagenet_normalize,
    load_vgg16,
    total_variation,
)
from stylize.net import TransformerNet, style_weights
from stylize.saved import load_model, save_model

__all__ = [
    "ConditionalAffine", "ConditionalSwitchNorm2d", "ContentFolder", "Losses",
    "PerceptualLoss", "StyleNorm", "StylizeConfig", "SyntheticScenes", "TransformerNet",
    "VGG16Features", "VGGOutputs", "gram_matrix", "imagenet_normalize", "load_image",
    "load_model", "load_vgg16", "save_model", "style_norm_layer", "style_weights",
    "total_variation",
]
