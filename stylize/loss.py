"""Perceptual losses: VGG16 features, Gram matrices, content, style and total-variation terms.

Johnson et al. (2016), Sec. 3.2-3.3, as in the PyTorch reference (pytorch/examples
``fast_neural_style``): content loss is the MSE of relu2_2 features; style loss is the sum over
relu1_2, relu2_2, relu3_3 and relu4_3 of the MSE between Gram matrices normalized by C*H*W
(eq. 3-5 of Gatys et al. / Johnson et al.); images are normalized with the ImageNet mean and
std before VGG. The style targets are computed once; content targets without autograd and only
up to the content layer (the reference runs the whole VGG on the content and uses relu2_2: the
same loss, about a third of the target's cost). Gram matrices and the losses are computed in
float32 even under bf16/fp16 autocast (autocast would otherwise recast ``bmm`` to low
precision, which at convergence inflated the style loss several-fold).

VGG16 weights are never downloaded here: they come from torchvision's cache
(``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``) or a file given by the user, and a
missing file stops the run with a message that says which file to put where.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snexp.runtime.config import ConfigError

__all__ = ["VGG16_FILE", "VGG16_SHA256_PREFIX", "VGG16_URL", "Losses", "PerceptualLoss",
           "VGG16Features", "VGGOutputs", "default_vgg_path", "gram_matrix",
           "imagenet_normalize", "load_vgg16", "sha256_of", "total_variation"]

logger = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1 file name
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILE
VGG16_SHA256_PREFIX = "397923af"  # torchvision names its files by their SHA-256's first digits
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
# Index of the last layer of each slice in torchvision's vgg16().features.
_SLICES = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}


class VGGOutputs(NamedTuple):
    """The feature maps the losses use (N, C_l, H_l, W_l), in network order."""

    relu1_2: Tensor
    relu2_2: Tensor
    relu3_3: Tensor
    relu4_3: Tensor


class Losses(NamedTuple):
    """Weighted loss terms of one batch (scalars); ``total`` is their sum."""

    content: Tensor
    style: Tensor
    tv: Tensor
    total: Tensor


def imagenet_normalize(x: Tensor) -> Tensor:
    """``(x - mean) / std`` per RGB channel for x in [0, 1] (a new tensor; x is untouched)."""
    mean = torch.tensor(_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _full_precision(x: Tensor) -> contextlib.AbstractContextManager:
    """A block where autocast is off on ``x``'s device (float32 stays float32)."""
    return torch.autocast(x.device.type, enabled=False)


def gram_matrix(features: Tensor) -> Tensor:
    """Gram matrices (N, C, C) of features (N, C, H, W), divided by C*H*W, in float32.

    Computed in float32 also inside a bf16/fp16 autocast region.
    """
    n, c, h, w = features.shape
    with _full_precision(features):
        f = features.float().reshape(n, c, h * w)  # (N, C, HW)
        return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)  # (N, C, C)


def total_variation(y: Tensor) -> Tensor:
    """Mean absolute difference of vertically and horizontally adjacent pixels (anisotropic).

    # NOTE: a mean, not Johnson's sum, so the weight does not depend on the image size.
    """
    dh = (y[:, :, 1:, :] - y[:, :, :-1, :]).abs().mean()
    dw = (y[:, :, :, 1:] - y[:, :, :, :-1]).abs().mean()
    return dh + dw


class VGG16Features(nn.Module):
    """Frozen VGG16 ``features`` up to relu4_3, returning :class:`VGGOutputs`.

    Args:
        state_dict: Weights of torchvision's ``vgg16`` (keys ``features.N.*``) or of its
            ``features`` alone (``N.*``); ``None`` leaves them random (only for timing).

    The module stays in eval mode and never needs gradients for its parameters.
    """

    def __init__(self, state_dict: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        from torchvision.models import vgg16

        layers = vgg16(weights=None).features[: _SLICES["relu4_3"] + 1]
        if state_dict is not None:
            wanted = layers.state_dict().keys()
            found = {k.removeprefix("features."): v for k, v in state_dict.items()}
            missing = [k for k in wanted if k not in found]
            if missing:
                raise ValueError(f"not VGG16 weights: missing {', '.join(missing[:4])}")
            layers.load_state_dict({k: found[k] for k in wanted})
        bounds = [0] + [i + 1 for i in _SLICES.values()]
        self.slices = nn.ModuleList(layers[a:b] for a, b in zip(bounds, bounds[1:]))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG16Features:
        return super().train(False)  # a loss network never trains

    def forward(self, x: Tensor) -> VGGOutputs:
        outs = []
        for part in self.slices:
            x = part(x)
            outs.append(x)
        return VGGOutputs(*outs)

    def feature(self, x: Tensor, layer: str) -> Tensor:
        """Only the feature ``layer`` (e.g. "relu2_2"): the slices after it are not run."""
        for name, part in zip(VGGOutputs._fields, self.slices):
            x = part(x)
            if name == layer:
                return x
        raise ValueError(f"unknown VGG16 layer {layer!r}; one of {', '.join(VGGOutputs._fields)}")


def default_vgg_path() -> Path:
    """Where torchvision caches VGG16: ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def sha256_of(path: str | Path) -> str:
    """The hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_vgg16(path: str | Path | None = None) -> VGG16Features:
    """The VGG16 loss network with ImageNet weights, read with ``weights_only=True``.

    A file whose SHA-256 does not begin with torchvision's ``397923af`` loads with a warning
    naming it: other VGG16 weights (or random ones) give other losses.

    Args:
        path: A weights file; ``None`` uses torchvision's cache (:func:`default_vgg_path`).

    Raises:
        ConfigError: The file is missing or is not VGG16 weights; the message says which file
            to put where. There is no fallback to random weights.
    """
    file = Path(path).expanduser() if path is not None else default_vgg_path()
    if not file.is_file():
        given = f"--vgg-weights {path} does not exist" if path is not None else (
            "no VGG16 weights in torchvision's cache")
        raise ConfigError(
            f"{given}. The style and content losses need ImageNet-trained VGG16 weights, and "
            f"nothing is downloaded at run time. Put torchvision's file {VGG16_FILE} (from "
            f"{VGG16_URL}) at {default_vgg_path()} (torchvision's cache; set TORCH_HOME to move "
            "it), or pass --vgg-weights FILE. On a machine with internet, "
            "python -c \"import torchvision; torchvision.models.vgg16(weights='DEFAULT')\" "
            "puts it there.")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        net = VGG16Features(state)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ConfigError(f"cannot use {file} as VGG16 weights ({reason}); it should be "
                          f"torchvision's {VGG16_FILE} ({VGG16_URL})") from None
    digest = sha256_of(file)
    if not digest.startswith(VGG16_SHA256_PREFIX):
        logger.warning(
            "the VGG16 weights in %s are not torchvision's %s: their SHA-256 begins %s, not %s. "
            "Losses (and every loss figure in the README) assume torchvision's ImageNet VGG16; "
            "a different or random VGG trains a different stylization", file, VGG16_FILE,
            digest[:8], VGG16_SHA256_PREFIX)
    logger.info("loss network: VGG16 from %s (SHA-256 %s...)", file, digest[:8])
    return net


class PerceptualLoss(nn.Module):
    """Weighted content, style and total-variation losses against fixed style targets.

    Args:
        loss_net: Maps ImageNet-normalized images to a NamedTuple with fields ``relu1_2``,
            ``relu2_2``, ``relu3_3``, ``relu4_3`` (:class:`VGG16Features`; tests pass a small
            network with the same fields).
        styles: One style image per style, (3, H, W) or (1, 3, H, W) in [0, 1].
        content_weight, style_weight, tv_weight: Weights of the three terms.
        content_layer: The feature compared for the content loss.

    Example:
        >>> criterion = PerceptualLoss(load_vgg16(), [style])  # doctest: +SKIP
        >>> losses = criterion(net(x), x, style=0)  # doctest: +SKIP
    """

    def __init__(self, loss_net: nn.Module, styles: Sequence[Tensor], *,
                 content_weight: float = 1e5, style_weight: float = 1e10,
                 tv_weight: float = 0.0, content_layer: str = "relu2_2") -> None:
        super().__init__()
        if not styles:
            raise ValueError("PerceptualLoss needs at least one style image")
        self.loss_net = loss_net
        self.content_weight, self.style_weight = content_weight, style_weight
        self.tv_weight, self.content_layer = tv_weight, content_layer
        self.layers: tuple[str, ...] = ()
        with torch.no_grad():
            for s, image in enumerate(styles):
                image = image.unsqueeze(0) if image.dim() == 3 else image
                feats = loss_net(imagenet_normalize(image))
                self.layers = tuple(feats._fields)
                for name, f in zip(feats._fields, feats):
                    self.register_buffer(f"gram_{s}_{name}", gram_matrix(f))  # (1, C, C)
        self.num_styles = len(styles)

    def style_grams(self, style: int) -> list[Tensor]:
        """The target Gram matrices (1, C, C) of style ``style``, one per layer."""
        return [getattr(self, f"gram_{style}_{name}") for name in self.layers]

    def content_target(self, content: Tensor) -> Tensor:
        """The content layer's features of the content images, without autograd.

        Only the slices up to the content layer run when the loss network offers
        ``feature(x, layer)`` (:class:`VGG16Features` does).
        """
        with torch.no_grad():
            x = imagenet_normalize(content)
            feature = getattr(self.loss_net, "feature", None)
            if feature is not None:
                return feature(x, self.content_layer)
            return getattr(self.loss_net(x), self.content_layer)

    def terms(self, output: Tensor, content: Tensor, style: int) -> tuple[Tensor, Tensor]:
        """Unweighted content and style losses, float32 (used for tuning objectives)."""
        target = self.content_target(content)
        feats = self.loss_net(imagenet_normalize(output))
        with _full_precision(output):
            content_loss = F.mse_loss(getattr(feats, self.content_layer).float(),
                                      target.float())
            style_loss = sum(
                F.mse_loss(gram_matrix(f), g.expand(f.shape[0], -1, -1))
                for f, g in zip(feats, self.style_grams(style)))
        return content_loss, style_loss

    def forward(self, output: Tensor, content: Tensor, style: int = 0) -> Losses:
        content_loss, style_loss = self.terms(output, content, style)
        with _full_precision(output):
            content_loss = self.content_weight * content_loss
            style_loss = self.style_weight * style_loss
            tv = (self.tv_weight * total_variation(output.float()) if self.tv_weight
                  else output.new_zeros((), dtype=torch.float32))
            return Losses(content_loss, style_loss, tv, content_loss + style_loss + tv)
