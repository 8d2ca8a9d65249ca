"""Stylizing images with a trained network: whole, or in tiles; optional colour preservation.

Tiling (for images too large to stylize at once): every normalizer of the network, in eval
mode, is a per-(sample, channel) affine map ``y = a x + b`` whose coefficients depend on the
whole image's statistics (IN/LN terms) or on running statistics (BN terms). One pass over the
image (downscaled to ``stats_size`` if larger) records ``a`` and ``b`` of every norm; each tile
then reuses them, so a tile computes exactly the untiled result except within the network's
reach (its receptive field's radius, :attr:`TransformerNet.reach`: 58 px at 5 blocks) of its
inner edges. Neighbouring tiles overlap by ``2 * reach + 4`` px by default; each tile's output
gets weight 0 within ``reach`` of an inner edge and a short linear ramp in the middle of the
overlap, so every pixel comes only from tiles that saw all of its receptive field: tiled and
whole outputs agree up to float rounding (when the statistics were measured at full size). A
smaller overlap is allowed, with a warning: seams may show. Tiles start at multiples of 4 to
keep the stride-2 grids aligned.

Colour preservation follows Gatys et al., "Preserving Color in Neural Artistic Style Transfer"
(2016), luminance-only transfer: the stylized image's luminance with the content's chroma
(YCbCr, ITU-R BT.601).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stylize.net import TransformerNet

__all__ = ["default_overlap", "preserve_color", "stylize", "tile_starts"]

logger = logging.getLogger(__name__)

# RGB -> YCbCr (BT.601, no offsets)
_YCC = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],
                     [0.5, -0.418688, -0.081312]])


def preserve_color(content: Tensor, stylized: Tensor) -> Tensor:
    """The stylized luminance with the content's chroma, both (N, 3, H, W) in [0, 1].

    Example:
        >>> out = preserve_color(photo, net(photo).clamp(0, 1))  # doctest: +SKIP
    """
    m = _YCC.to(content.device, torch.float32)
    ycc_c = torch.einsum("ij,njhw->nihw", m, content.float())  # (N, 3, H, W)
    ycc_s = torch.einsum("ij,njhw->nihw", m, stylized.float())
    ycc = torch.cat([ycc_s[:, :1], ycc_c[:, 1:]], 1)
    rgb = torch.einsum("ij,njhw->nihw", torch.linalg.inv(m), ycc)
    return rgb.clamp(0, 1).to(stylized.dtype)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets (multiples of 4) of tiles covering ``length`` pixels.

    The last tile runs to the end (it may be up to 3 pixels longer than ``tile``).
    """
    if length <= tile:
        return [0]
    step = max(4, (tile - overlap) // 4 * 4)
    last = (length - tile) // 4 * 4
    starts = list(range(0, last, step))
    return starts + [last]


def default_overlap(net: TransformerNet) -> int:
    """The overlap that makes tiles exact: ``2 * reach + 4`` px, a multiple of 4 (120 px)."""
    return -(-(2 * net.reach + 4) // 4) * 4


def _ramp(length: int, start: int, end: int, total: int, overlap: int, margin: int,
          device) -> Tensor:
    """Blend weights (length,) of a tile along one axis.

    At each inner edge: 0 for ``margin`` px (output the tile cannot compute exactly), then a
    linear ramp up to 1 over the rest of the overlap but ``margin`` px.
    """
    k = max(1, overlap - 2 * margin)
    ramp = torch.arange(1, k + 1, device=device, dtype=torch.float32) / (k + 1)
    edge = torch.cat([torch.zeros(margin, device=device), ramp])[:length]
    w = torch.ones(length, device=device)
    if start > 0:
        w[:len(edge)] = edge
    if end < total:
        w[length - len(edge):] = torch.minimum(w[length - len(edge):], edge.flip(0))
    return w


def _norms(net: nn.Module) -> list[nn.Module]:
    return [m.norm for m in net.modules()
            if isinstance(getattr(m, "norm", None), nn.Module)
            and not isinstance(m.norm, nn.Identity)]


@contextlib.contextmanager
def _hooked(net: nn.Module, hook) -> Iterator[None]:
    """``hook`` as a forward hook on every norm of ``net`` while the block runs."""
    handles = [m.register_forward_hook(hook) for m in _norms(net)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _recorder(maps: dict[int, tuple[Tensor, Tensor]]):
    """A hook recording each norm's per-(n, c) affine map (a, b): least squares, input->output."""

    def hook(module, args, out):
        x, y = args[0].double(), out.double()
        xc = x - x.mean((2, 3), keepdim=True)
        yc = y - y.mean((2, 3), keepdim=True)
        var = xc.pow(2).mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        a = torch.where(var > 0, (xc * yc).mean((2, 3), keepdim=True) / var.clamp_min(1e-300),
                        torch.zeros_like(var))
        b = y.mean((2, 3), keepdim=True) - a * x.mean((2, 3), keepdim=True)
        maps[id(module)] = (a.float(), b.float())

    return hook


def _replayer(maps: dict[int, tuple[Tensor, Tensor]]):
    """A hook replacing each norm's output by its recorded affine map of the tile's input."""

    def hook(module, args, out):
        a, b = maps[id(module)]
        return (args[0] * a.to(args[0].dtype) + b.to(args[0].dtype)).to(out.dtype)

    return hook


@torch.no_grad()
def stylize(net: TransformerNet, image: Tensor, style: int | Tensor | None = None, *,
            tile: int | None = None, overlap: int | None = None,
            stats_size: int = 1024) -> Tensor:
    """Stylize ``image`` (N, 3, H, W) in [0, 1]; the result has the same size, in [0, 1].

    Args:
        net: The trained network (put in eval mode here).
        image: The content images.
        style: Style index or weights (S,) for a multi-style network; ``None``: style 0.
        tile: Tile side in pixels; ``None`` stylizes the whole image at once.
        overlap: Pixels by which neighbouring tiles overlap; ``None``: :func:`default_overlap`
            (exact tiles; halved to fit when ``tile`` is too small for it, with a warning).
            Below ``2 * net.reach + 1`` tiles may show seams (a warning says so).
        stats_size: With tiles, the longest side at which the normalization statistics are
            measured (the image is downscaled to it when larger).
    """
    net.eval()
    n, _, h, w = image.shape
    if tile is None or (h <= tile and w <= tile):
        return net(image, style).clamp(0, 1)
    exact = 2 * net.reach + 1
    if overlap is None:
        overlap = default_overlap(net)
        if overlap >= tile - 4:
            overlap = tile // 2 // 4 * 4
    if tile < 16 or not 0 <= overlap < tile:
        raise ValueError(f"tile must be >= 16 and overlap in [0, tile), got {tile}, {overlap}")
    if overlap < exact:
        logger.warning("tiles overlap by %d px, less than the %d px this network needs (its "
                       "reach is %d px each side): seams may show; use --tile above %d and "
                       "leave --overlap unset", overlap, exact, net.reach,
                       default_overlap(net) + 4)
    margin = net.reach if overlap >= exact else overlap // 4
    small = image
    if max(h, w) > stats_size:
        scale = stats_size / max(h, w)
        small = F.interpolate(image, size=(max(16, round(h * scale)), max(16, round(w * scale))),
                              mode="bilinear", antialias=True, align_corners=False)
    maps: dict[int, tuple[Tensor, Tensor]] = {}
    with _hooked(net, _recorder(maps)):
        net(small, style)
    out = torch.zeros(n, 3, h, w, device=image.device)
    weight = torch.zeros(1, 1, h, w, device=image.device)
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    with _hooked(net, _replayer(maps)):
        for i, y0 in enumerate(rows):
            y1 = h if i == len(rows) - 1 else y0 + tile
            wy = _ramp(y1 - y0, y0, y1, h, overlap, margin, image.device)
            for j, x0 in enumerate(cols):
                x1 = w if j == len(cols) - 1 else x0 + tile
                wx = _ramp(x1 - x0, x0, x1, w, overlap, margin, image.device)
                blend = (wy[:, None] * wx[None, :])[None, None]  # (1, 1, th, tw)
                piece = net(image[:, :, y0:y1, x0:x1], style).float()
                out[:, :, y0:y1, x0:x1] += piece * blend
                weight[:, :, y0:y1, x0:x1] += blend
    return (out / weight).clamp(0, 1).to(image.dtype)
