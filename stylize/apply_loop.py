"""The work of ``python -m stylize.apply``: which files to stylize, checked before anything is
written, and the loop that stylizes them one by one (tiled inference: :mod:`stylize.infer`).

:func:`apply_files` takes a loaded network and an :class:`ApplyConfig`; ``stylize/apply.py``
parses the command line, loads the model and calls it (or exports the model instead).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.functional import to_pil_image

from snexp.runtime.config import ConfigError
from snexp.runtime.files import replace_atomic
from stylize.data import UNREADABLE, find_images, image_size, load_image
from stylize.infer import preserve_color, stylize

__all__ = ["ApplyConfig", "MIN_INPUT_SIZE", "apply_files", "resolve_style"]


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


MIN_INPUT_SIZE = 16  # smallest side of an input image (and smallest --size)


def _pairs(cfg: ApplyConfig) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """The (input, output) files, and a folder's inputs found unreadable (skipped)."""
    src, dst = Path(cfg.input), Path(cfg.output)
    if src.is_dir():
        files, skipped = find_images(src)
        # An --output folder inside --input holds earlier results: never stylize them again.
        ours = [f for f in files if f.resolve().is_relative_to(dst.resolve())]
        files = [f for f in files if f not in ours]
        if ours:
            print(f"ignoring {len(ours)} file(s) in the output folder {dst}, which lies inside "
                  f"--input {src}")
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
    unreadable = _check_images(pairs, skip_unreadable=src.is_dir())
    pairs = [(s, d) for s, d in pairs if s not in unreadable]
    if not pairs:
        raise ConfigError(f"--input {src} holds no readable image")
    existing = [str(d) for _, d in pairs if d.exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(f"output exists: {', '.join(existing[:3])}"
                          f"{' ...' if len(existing) > 3 else ''}; pass --overwrite to replace")
    for folder in sorted({d.parent for _, d in pairs}):
        _check_writable(folder)
    return pairs, unreadable


def _check_writable(folder: Path) -> None:
    """Refuse, before anything is written, an output folder that cannot be written."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {folder}: {existing} is not writable (read-only folder or "
                          "file system); choose a folder you can write to. Nothing was written")


def _check_images(pairs: Sequence[tuple[Path, Path]], *, skip_unreadable: bool) -> list[Path]:
    """Refuse, before any output is written, inputs too small to stylize and outputs whose
    extension names no image format; return the unreadable inputs a folder skips."""
    unreadable = []
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
            if skip_unreadable:
                unreadable.append(src)
                continue
            raise ConfigError(f"cannot read image '{src}' ({type(exc).__name__}: {exc})"
                              ) from None
        if min(width, height) < MIN_INPUT_SIZE:
            raise ConfigError(
                f"--input {src} is {width}x{height} pixels: stylize.apply needs at least "
                f"{MIN_INPUT_SIZE} px on each side (the network downsamples by 4 and its "
                "brush strokes are tens of pixels wide); nothing was written")
    return unreadable


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
    options = {"quality": 95} if dst.suffix.lower() in (".jpg", ".jpeg") else {}
    image_format = Image.registered_extensions()[dst.suffix.lower()]
    # atomically: a full disk or a kill never leaves half an image (nor writes through a link)
    replace_atomic(dst, lambda f: picture.save(f, format=image_format, **options), binary=True)


def apply_files(net: nn.Module, style: int | torch.Tensor | None, cfg: ApplyConfig,
                device: torch.device) -> tuple[int, list[Path]]:
    """Stylize ``cfg.input`` (a file or a folder) into ``cfg.output``.

    Every input and output is checked before the first image is written (:func:`_pairs`); a
    folder's truncated images are skipped and counted, as training does.

    Returns:
        The number of images written and the inputs skipped as unreadable.

    Raises:
        ConfigError: a bad input or output, or a write that failed (with how many were written).
    """
    pairs, unreadable = _pairs(cfg)
    done = 0
    for src, dst in pairs:
        try:
            _stylize_file(net, src, dst, style, cfg, device)
        except ConfigError:  # decoding failed past the header: a truncated file
            if not Path(cfg.input).is_dir():
                raise
            unreadable.append(src)  # a folder: skip and count it, as training does
            continue
        except OSError as exc:
            raise ConfigError(
                f"cannot write {dst}: {exc.strerror or exc}; {done} of {len(pairs)} "
                "image(s) were written before it. Free space or choose a writable "
                "--output, then run again (with --overwrite to replace those)") from None
        done += 1
    return done, unreadable
