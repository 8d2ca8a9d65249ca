"""Shared setup of the stylize benchmarks: the loss network and a style image, offline."""

from __future__ import annotations

import torch

from stylize.data import SyntheticScenes, load_image
from stylize.loss import VGG16Features, load_vgg16


def loss_network(vgg_weights: str | None, random_ok: bool) -> tuple[VGG16Features, str]:
    """VGG16 with ImageNet weights, or (only when asked) random weights; and a label."""
    if random_ok:
        torch.manual_seed(0)
        return VGG16Features(), "VGG16 with RANDOM weights (--random-vgg)"
    return load_vgg16(vgg_weights), "VGG16 (ImageNet)"


def style_image(path: str | None, size: int) -> tuple[torch.Tensor, str]:
    """The style image (3, H, W), or an embedded scene when no file is given."""
    if path:
        return load_image(path, size), path
    return SyntheticScenes(1, size, seed=99)[0], "embedded scene (no --style given)"
