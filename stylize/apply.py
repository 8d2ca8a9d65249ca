"""``python -m stylize.apply``: stylize photos with a trained model, or export the model.

Example::

    python -m stylize.apply --model runs/stylize/x/model.pt --input photo.jpg --output out.jpg
    python -m stylize.apply --model model.pt --input photos/ --output styled/ --tile 512
    python -m stylize.apply --model model.pt --style-mix 0.5,0.5 --input a.jpg --output b.jpg
    python -m stylize.apply --model model.pt --export model.onnx

The output always has the input's size. ``--size N`` makes the network work at N pixels on the
longest side (larger N: finer brush strokes relative to the image), then resizes back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_pil_image

from snexp.runtime.config import ConfigError, cli_errors, parse_args
from snexp.runtime.device import select_device
from stylize.data import UNREADABLE, find_images, image_size, load_image
from stylize.export import export_model
from stylize.infer import preserve_color, stylize
from stylize.saved import load_model

__all__ = ["ApplyConfig", "FLAGS", "main", "resolve_style"]

PROG = "python -m stylize.apply"


@dataclass(frozen=True)
class ApplyConfig:
    """python -m stylize.apply."""

    model: str | None = None  # model.pt written by python -m stylize.train
    input: str | None = None  # an image file or a folder of images (searched recursively)
    output: str | None = None  # the output file, or folder when --input is a folder
    size: int | None = None  # longest side the network works at; none: the input's own
    style_index: int | None = None  # which style of a multi-style model (none: style 0)
    style_mix: tuple[float, ...] = ()  # weights blending the styles, e.g. 0.5,0.5
    preserve_color: bool = False  # keep the content's colours (luminance-only transfer)
    tile: int | None = None  # stylize in tiles of this many pixels (large images)
    overlap: int | None = None  # tile overlap in pixels; none: the network's, 2 x reach + 4
    export: str | None = None  # write the model as .onnx or .pt2 instead of stylizing
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    overwrite: bool = False  # replace existing output files


FLAGS = {f"--{name.replace('_', '-')}": name for name in ApplyConfig.__dataclass_fields__}


def resolve_style(num_styles: int, names: Sequence[str], index: int | None,
                  mix: Sequence[float]) -> int | torch.Tensor | None:
    """The style argument of the network from ``--style-index`` / ``--style-mix`` (``a,b``)."""
    if index is not None and mix:
        raise ConfigError("give --style-index or --style-mix, not both")
    if index is not None and not 0 <= index < num_styles:
        raise ConfigError(f"--style-index {index}: the model has {num_styles} style(s): "
                          + ", ".join(f"{i}={n}" for i, n in enumerate(names)))
    if not mix:
        return index
    if (len(mix) != num_styles or not all(math.isfinite(m) for m in mix) or min(mix) < 0
            or sum(mix) <= 0):
        raise ConfigError(f"--style-mix needs {num_styles} finite non-negative weights with a "
                          f"positive sum (styles: {', '.join(names)}), got {list(mix)}")
    weights = torch.tensor(mix, dtype=torch.float32)
    return weights / weights.sum()


def _pairs(cfg: ApplyConfig) -> list[tuple[Path, Path]]:
    src, dst = Path(cfg.input), Path(cfg.output)
    if src.is_dir():
        files, skipped = find_images(src)
        if not files:
            raise ConfigError(f"--input {src} holds no readable image")
        if skipped:
            print(f"skipping {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
        pairs = [(f, dst / f.relative_to(src)) for f in files]
    elif src.is_file():
        if dst.is_dir():
            dst = dst / src.name
        pairs = [(src, dst)]
    else:
        raise ConfigError(f"--input {src} does not exist")
    _check_images(pairs)
    existing = [str(d) for _, d in pairs if d.exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(f"output exists: {', '.join(existing[:3])}"
                          f"{' ...' if len(existing) > 3 else ''}; pass --overwrite to replace")
    return pairs


MIN_INPUT_SIZE = 16  # smallest side of an input image


def _check_images(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Refuse, before any output is written, inputs too small to stylize and outputs whose
    extension names no image format."""
    known = Image.registered_extensions()
    for _, dst in pairs:
        if dst.suffix.lower() not in known:
            raise ConfigError(
                f"--output {dst}: '{dst.suffix or '(no extension)'}' is not an image file "
                "extension, so the format to write is unknown; name the file e.g. out.jpg or "
                "out.png (or pass an existing folder)")
    for src, _ in pairs:
        try:
            width, height = image_size(src)
        except UNREADABLE as exc:
            raise ConfigError(f"cannot read image '{src}' ({type(exc).__name__}: {exc})"
                              ) from None
        if min(width, height) < MIN_INPUT_SIZE:
            raise ConfigError(
                f"--input {src} is {width}x{height} pixels: stylize.apply needs at least "
                f"{MIN_INPUT_SIZE} px on each side (the network downsamples by 4 and its "
                "brush strokes are tens of pixels wide); nothing was written")


def _stylize_file(net, src: Path, dst: Path, style, cfg: ApplyConfig, device) -> None:
    image = load_image(src).unsqueeze(0).to(device)  # (1, 3, H, W)
    h, w = image.shape[-2:]
    work = image
    if cfg.size is not None and cfg.size != max(h, w):
        scale = cfg.size / max(h, w)
        work = F.interpolate(image, size=(max(5, round(h * scale)), max(5, round(w * scale))),
                             mode="bilinear", antialias=True, align_corners=False)
    out = stylize(net, work, style, tile=cfg.tile, overlap=cfg.overlap)
    if out.shape[-2:] != image.shape[-2:]:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    if cfg.preserve_color:
        out = preserve_color(image, out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    picture: Image.Image = to_pil_image(out[0].mul(255).round().to(torch.uint8).cpu())
    picture.save(dst, **({"quality": 95} if dst.suffix.lower() in (".jpg", ".jpeg") else {}))


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv``; stylize ``--input`` into ``--output``, or write ``--export``."""
    with cli_errors(PROG):
        cfg = parse_args(ApplyConfig, argv, prog=PROG, description=__doc__.splitlines()[0],
                         flags=FLAGS)
        if cfg.model is None:
            raise ConfigError("--model FILE is required (the model.pt of a training run)")
        net, meta = load_model(cfg.model)
        style = resolve_style(net.num_styles, meta["styles"], cfg.style_index, cfg.style_mix)
        if cfg.export is not None:
            if Path(cfg.export).exists() and not cfg.overwrite:
                raise ConfigError(f"{cfg.export} exists; pass --overwrite to replace it")
            path = export_model(net, cfg.export, style)
            print(f"exported to {path}")
            return
        if cfg.input is None or cfg.output is None:
            raise ConfigError("--input PATH and --output PATH are required (or --export FILE)")
        if cfg.tile is not None and (cfg.tile < 16 or (
                cfg.overlap is not None and not 0 <= cfg.overlap < cfg.tile)):
            raise ConfigError(f"--tile must be >= 16 and --overlap in [0, tile), got "
                              f"{cfg.tile} and {cfg.overlap}")
        device = select_device(cfg.device)
        net.to(device)
        pairs = _pairs(cfg)
        for src, dst in pairs:
            _stylize_file(net, src, dst, style, cfg, device)
        print(f"stylized {len(pairs)} image(s) into {cfg.output}")


if __name__ == "__main__":
    main()
