"""Content and style images: a recursive image folder, an embedded scene generator, loaders.

Johnson et al. trained on the 80k images of COCO 2014 train resized to 256x256. Here any folder
of photos works (``--content-dir``); every image is resized (shorter side) and center-cropped
with torchvision transforms. Files that cannot be read are skipped and counted, never a crash;
Pillow's decompression-bomb limit stays on. Without a folder, :class:`SyntheticScenes` draws
scenes in code (gradients, textures, shapes), so everything runs offline.

Every image is read as it is shown (:func:`open_rgb`): turned by its EXIF orientation (phone
photos), 16-bit values scaled to 8 bits (not clipped), palette and grayscale expanded, CMYK
converted, and transparency composited over white.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms

from snexp.runtime.config import ConfigError

__all__ = ["IMAGE_SUFFIXES", "MIN_STYLE_SIZE", "UNREADABLE", "ContentFolder", "SyntheticScenes",
           "check_content_dir", "content_transform", "find_images", "image_files", "image_size",
           "load_image", "open_rgb", "preview_batch"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# What a broken, truncated, non-image or oversized file raises in Pillow.
UNREADABLE = (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError,
               SyntaxError)


MIN_STYLE_SIZE = 16  # smallest side of a style image (VGG16 pools it 3 times before relu4_3)
_CHECKED = 16  # content images fully decoded when a folder is scanned (spread over the folder)


def open_rgb(path: str | Path) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB picture, as a viewer shows it.

    EXIF orientation is applied; 16-bit and 32-bit integer images (``I;16``, ``I``) are scaled
    to 8 bits by their bit depth (``convert("RGB")`` would clip them to white); palette and
    grayscale images are expanded; CMYK is converted; transparent images (RGBA, LA, palette
    with transparency) are composited over white.

    Raises:
        OSError, ValueError, ...: Pillow's errors for unreadable files (:data:`UNREADABLE`).
    """
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img, dtype=np.float64)  # (H, W)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) <= 65535 else (
            float(values.max()))
        img = Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
        img = Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image as shown (EXIF orientation applied), from its header."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def content_transform(size: int) -> transforms.Compose:
    """Resize the shorter side to ``size``, center-crop ``size``x``size``, to a [0, 1] tensor."""
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR,
                          antialias=True),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
    ])


def load_image(path: str | Path, size: int | None = None) -> Tensor:
    """An RGB image as a (3, H, W) tensor in [0, 1]; ``size`` resizes its shorter side.

    Raises:
        ConfigError: The file is missing or unreadable (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image '{path}' not found")
    try:
        img = open_rgb(path)
    except UNREADABLE as exc:
        raise ConfigError(f"cannot read image '{path}' ({type(exc).__name__}: {exc})") from None
    if size is not None:
        img = transforms.Resize(size, antialias=True)(img)
    return transforms.functional.to_tensor(img)


def image_files(root: str | Path) -> list[Path]:
    """Files under ``root`` (recursively, sorted) with an image suffix; nothing is opened."""
    return sorted(p for p in Path(root).rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def check_content_dir(root: str | Path) -> None:
    """Refuse a ``--content-dir`` that is missing or whose sampled images do not decode.

    Cheap enough to run before a run directory is touched: the folder is listed and up to 16
    files spread over it are decoded.

    Raises:
        ConfigError: Not a folder, no image file in it, or none of the sample decodes.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--content-dir {root} is not a folder")
    files = image_files(root)
    if not files:
        raise ConfigError(
            f"--content-dir {root} holds no image ({', '.join(IMAGE_SUFFIXES)}, searched "
            "recursively); point it at a folder of photos such as COCO 2014 train (train2014/)")
    _check_sample(files, root)


def _check_sample(files: Sequence[Path], root: str | Path) -> set[int]:
    """Decode up to 16 of ``files`` spread over the list; the indices that fail.

    Raises:
        ConfigError: None of them decodes (truncated or corrupt files).
    """
    n = len(files)
    picks = list(range(n)) if n <= _CHECKED else sorted(
        {i * (n - 1) // (_CHECKED - 1) for i in range(_CHECKED)})
    bad: dict[int, str] = {}
    for i in picks:
        try:
            open_rgb(files[i])
        except UNREADABLE as exc:
            bad[i] = f"{files[i]} ({type(exc).__name__}: {exc})"
    if len(bad) == len(picks):
        raise ConfigError(
            f"--content-dir {root}: none of the {len(picks)} images tried decodes (of {n} "
            f"found), e.g. {next(iter(bad.values()))}; the files are truncated or corrupt. "
            "Point --content-dir at a folder of readable photos")
    if bad:
        logger.warning("content: %d of %d sampled images do not decode and are skipped "
                       "(first: %s)", len(bad), len(picks), next(iter(bad.values())))
    return set(bad)


def find_images(root: str | Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``root`` (recursively, sorted) whose header Pillow can read.

    Returns:
        ``(readable, skipped)``: files with an image suffix that open, and those that do not.
    """
    readable, skipped = [], []
    for path in image_files(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    img.size  # header only: the pixels are decoded when used
            readable.append(path)
        except UNREADABLE:
            skipped.append(path)
    return readable, skipped


class ContentFolder(Dataset):
    """Every image under a folder, as (3, size, size) tensors in [0, 1].

    Files whose header does not parse are skipped when the folder is scanned; a file that
    fails later (e.g. truncated pixel data) is logged and replaced by the next readable one.

    Args:
        files: Image paths (see :func:`find_images`).
        size: Side of the square crops.
    """

    def __init__(self, files: Sequence[Path], size: int) -> None:
        if not files:
            raise ValueError("ContentFolder needs at least one image")
        self.files = list(files)
        self.transform = content_transform(size)
        self.failed: set[int] = set()

    @classmethod
    def scan(cls, root: str | Path, size: int) -> ContentFolder:
        """Scan ``root`` for images and log how many were found and skipped.

        Raises:
            ConfigError: ``root`` does not exist or holds no readable image.
        """
        root = Path(root).expanduser()
        if not root.is_dir():
            raise ConfigError(f"--content-dir {root} is not a folder")
        files, skipped = find_images(root)
        if skipped:
            logger.warning("content: skipped %d unreadable file(s) under %s (first: %s)",
                           len(skipped), root, skipped[0])
        if not files:
            raise ConfigError(
                f"--content-dir {root} holds no readable image ({', '.join(IMAGE_SUFFIXES)}, "
                f"searched recursively; {len(skipped)} unreadable); point it at a folder of "
                "photos such as COCO 2014 train (train2014/)")
        folder = cls(files, size)
        folder.failed |= _check_sample(files, root)  # all failing: refused here, before work
        logger.info("content: %d images under %s", len(files), root)
        return folder

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            if i in self.failed:
                continue
            try:
                return self.transform(open_rgb(self.files[i]))
            except UNREADABLE as exc:
                self.failed.add(i)
                logger.warning("content: skipped unreadable %s (%s); %d skipped while loading",
                               self.files[i], type(exc).__name__, len(self.failed))
        raise ConfigError(f"no image of the content folder decodes ({len(self.files)} files, "
                          f"e.g. {self.files[0]}): they are truncated or corrupt; point "
                          "--content-dir at a folder of readable photos")


class SyntheticScenes(Dataset):
    """Procedurally drawn content images: gradients, textures and shapes, deterministic.

    Image ``i`` depends only on ``(seed, i)``, so runs, resumes and workers agree.

    Args:
        count: Number of images.
        size: Side of the square images.
        seed: Seed of the scene family (use another for held-out images).
    """

    def __init__(self, count: int, size: int, seed: int = 0) -> None:
        self.count, self.size, self.seed = count, size, seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return transforms.functional.to_tensor(self.render(index))

    def render(self, index: int) -> Image.Image:
        """Draw scene ``index`` as a PIL image."""
        rng = random.Random(self.seed * 1_000_003 + index)
        n = self.size
        img = Image.fromarray(self._background(rng, n))
        draw = ImageDraw.Draw(img)
        for _ in range(rng.randint(3, 9)):
            colour = tuple(rng.randint(0, 255) for _ in range(3))
            x0, y0 = rng.uniform(-0.2, 0.9) * n, rng.uniform(-0.2, 0.9) * n
            w, h = rng.uniform(0.1, 0.6) * n, rng.uniform(0.1, 0.6) * n
            kind = rng.choice(("ellipse", "rectangle", "polygon", "line"))
            if kind == "ellipse":
                draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
            elif kind == "rectangle":
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
            elif kind == "polygon":
                pts = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(3, 7)]
                draw.polygon(pts, fill=colour)
            else:
                draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=max(1, n // 40))
        if rng.random() < 0.5:
            img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
        return img

    @staticmethod
    def _background(rng: random.Random, n: int) -> np.ndarray:
        """A two-colour linear gradient with a sine, checker or noise texture, (n, n, 3) uint8."""
        yy, xx = np.mgrid[0:n, 0:n] / max(n - 1, 1)  # (n, n) each, in [0, 1]
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3  # (n, n)
        a, b = (np.array([rng.uniform(0, 1) for _ in range(3)]) for _ in range(2))
        img = a * t[..., None] + b * (1 - t[..., None])  # (n, n, 3)
        kind = rng.choice(("stripes", "checker", "noise"))
        freq = rng.uniform(3, 20)
        if kind == "stripes":
            tex = np.sin(2 * np.pi * freq * (xx * np.cos(angle * 2) + yy * np.sin(angle * 2)))
        elif kind == "checker":
            tex = np.sign(np.sin(np.pi * freq * xx) * np.sin(np.pi * freq * yy))
        else:
            tex = np.random.default_rng(rng.getrandbits(32)).standard_normal((n, n))
        img = img + rng.uniform(0.03, 0.15) * tex[..., None]
        return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def preview_batch(dataset: Dataset, count: int) -> Tensor:
    """The first ``count`` images of a dataset stacked as (count, 3, H, W)."""
    return torch.stack([dataset[i] for i in range(min(count, len(dataset)))])
