"""Datasets of the search and the retraining: embedded shapes, CIFAR-10/100, image folders.

``embedded`` (the default) is generated in code, offline and deterministic from ``data.seed``:
32x32 RGB images of ten shape classes (disk, ring, square, square outline, plus, bar, stripes,
checker, triangle, target), each drawn once at a random position, size and rotation, in a
random colour on a random background of contrasting colour, with Gaussian pixel noise. The
class is in the local shape only (position, colour and orientation are random), so a linear
classifier on pixels stays near chance while a small CNN learns it
(``python benchmarks/nas_embedded.py`` measures both).

CIFAR comes from torchvision (files in ``data.root``; downloaded only with
``data.download=true``); ``imagefolder`` reads any folder of class sub-folders (``train/`` and
``test/`` or ``val/`` inside it when present, or class folders beside ``test/``). Class indices
come from the training folder alone (sorted names); a test folder may lack classes, and a test
class that training lacks is refused. The training set is split into train and valid with a
seeded permutation (``valid_size``: a share, ENAS's 5k of 50k is 0.1, or a count); the test
split is used only by ``nas.train``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2

from snexp.runtime.config import ConfigError, Range

__all__ = ["Cutout", "DataConfig", "ImageTensors", "Splits", "build_splits", "check_data",
           "make_shapes", "write_shapes_folder"]

_STATS = {  # per-channel mean and std used to standardize inputs
    "embedded": ((0.5, 0.5, 0.5), (0.3, 0.3, 0.3)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# NOTE: an earlier "x" class was a plus turned by 45 degrees, the same shape under the uniform
# rotation; "bar" (one arm of the plus) replaced it so that every class is separable.
SHAPES = ("disk", "ring", "square", "outline", "plus", "bar", "stripes", "checker", "triangle",
          "target")


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split and augmented."""

    dataset: Literal["embedded", "cifar10", "cifar100", "imagefolder"] = "embedded"  # source
    root: str = "data"  # folder of CIFAR files or of the image folder
    download: bool = False  # download CIFAR into root when missing
    # training images held out for validation: a share if < 1, else a count (ENAS: 5000 of 50k)
    valid_size: float = 0.1
    limit: int | None = None  # cap the training images (smoke runs); none: all
    valid_limit: int | None = None  # cap the validation images; none: all
    seed: int = 0  # seed of the embedded images and of the train/valid split
    embedded_train: int = 12000  # embedded images generated for train + valid
    embedded_test: int = 2000  # embedded test images
    size: Annotated[int, Range(ge=1)] = 32  # image side (embedded and imagefolder)
    augment: bool = True  # random crop (padding 4) and horizontal flip of training images
    cutout: int = 0  # cutout square side on training images (0: off; ENAS retraining 16)
    workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        if not (0 < self.valid_size < 1 or (self.valid_size >= 1
                                            and float(self.valid_size).is_integer())):
            raise ValueError(f"valid_size must be a share in (0, 1) or a whole count >= 1, got "
                             f"{self.valid_size}")
        if self.size < 1 or self.embedded_train < 2 or self.embedded_test < 1:
            raise ValueError(f"size and embedded_test must be >= 1 and embedded_train >= 2, got "
                             f"{self.size}, {self.embedded_test}, {self.embedded_train}")
        for name in ("cutout", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("limit", "valid_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {value}")


class Cutout:
    """Zero a random ``length`` x ``length`` square (clipped at the border) of a CHW tensor."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = (int(torch.randint(0, s, ()).item()) for s in (h, w))
        half = self.length // 2
        out = img.clone()
        out[..., max(0, cy - half) : cy + half, max(0, cx - half) : cx + half] = 0
        return out


class ImageTensors(Dataset):
    """Images held as a uint8 tensor ``(N, C, H, W)`` with labels; returns float CHW + label."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


@dataclass(frozen=True)
class Splits:
    """The datasets of one experiment."""

    train: Dataset  # augmented
    valid: Dataset  # not augmented
    test: Dataset  # not augmented
    train_full: Dataset  # train + valid, augmented (retraining)
    num_classes: int
    in_channels: int


def make_shapes(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` embedded images (uint8 ``(n, 3, size, size)``) and labels, from ``seed`` alone."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(SHAPES), (n,), generator=g)

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    s = size / 32
    cx, cy = (s * (9 + 14 * u(n, 1, 1)) for _ in range(2))
    r, angle = s * (6 + 4 * u(n, 1, 1)), 2 * math.pi * u(n, 1, 1)
    bg = u(n, 3, 1, 1)
    fg = torch.remainder(bg + 0.35 + 0.3 * u(n, 3, 1, 1), 1.0)  # every channel contrasts
    noise = 0.1 * torch.randn(n, 3, size, size, generator=g)
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    dx, dy = axis.view(1, 1, -1) - cx, axis.view(1, -1, 1) - cy  # (n, 1, W), (n, H, 1)
    px = torch.cos(angle) * dx + torch.sin(angle) * dy  # rotated coordinates, (n, H, W)
    py = -torch.sin(angle) * dx + torch.cos(angle) * dy
    mask = torch.zeros(n, size, size)
    for k, shape in enumerate(SHAPES):
        idx = (labels == k).nonzero().flatten()
        mask[idx] = _shape_mask(shape, px[idx], py[idx], r[idx]).float()
    images = bg + mask[:, None] * (fg - bg) + noise  # (n, 3, H, W)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def write_shapes_folder(root: str | Path, n: int, seed: int = 0, test_share: float = 0.1) -> Path:
    """Save ``n`` embedded images as PNGs in ``root/train/<class>/`` and ``root/test/<class>/``.

    A small image folder to try ``--dataset imagefolder`` on, e.g.
    ``python -c "from nas.data import write_shapes_folder as w; w('data/shapes', 1800)"``.
    Refuses a ``root`` that exists, so nothing is overwritten.
    """
    from PIL import Image

    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} exists; pass a new folder")
    images, labels = make_shapes(n, seed)
    n_test = round(test_share * n)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        folder = root / ("test" if i < n_test else "train") / SHAPES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return root


def _shape_mask(shape: str, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    d = torch.sqrt(px**2 + py**2)
    ax, ay = px.abs(), py.abs()
    inside, disk, w = torch.maximum(ax, ay) <= r, d <= r, r / 3.5
    if shape == "disk":
        return disk
    if shape == "ring":
        return disk & (d >= r - w)
    if shape == "square":
        return inside
    if shape == "outline":
        return inside & (torch.maximum(ax, ay) >= r - w)
    if shape == "plus":
        return inside & ((ax <= w / 1.5) | (ay <= w / 1.5))
    if shape == "bar":
        return inside & (ay <= w / 1.5)
    if shape == "stripes":
        return inside & (torch.remainder(py + r, 2 * w) < w)
    if shape == "checker":
        return inside & ((torch.remainder(px + r, 2 * w) < w) ^ (torch.remainder(py + r, 2 * w)
                                                                   < w))
    if shape == "triangle":
        return (py >= -r / 2) & (py <= r) & (ax <= (py + r / 2) * 0.7)
    return disk & (torch.remainder(d, 2 * w) < w)  # target: concentric rings


def _transforms(cfg: DataConfig, *, train: bool, size: int, cutout: int) -> Callable:
    mean, std = _STATS[cfg.dataset]
    steps: list[Any] = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    if train and cfg.augment:
        steps += [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()]
    steps.append(v2.Normalize(mean, std))
    if train and cutout:
        steps.append(Cutout(cutout))
    return v2.Compose(steps)


def _split(n: int, valid_size: float, seed: int) -> tuple[list[int], list[int]]:
    valid = max(1, round(valid_size * n)) if valid_size < 1 else int(valid_size)
    if not 0 < valid < n:
        raise ConfigError(
            f"data.valid_size={valid_size:g} must leave training images: between 1 and the {n} "
            "training images minus one, or a share such as 0.1"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[valid:], order[:valid]


def _cap(indices: Sequence[int], limit: int | None) -> list[int]:
    return list(indices[:limit]) if limit is not None else list(indices)


_CIFAR_FILES = {  # the extracted python version: its folder and the files torchvision reads
    "cifar10": ("cifar-10-batches-py", ("data_batch_1", "data_batch_2", "data_batch_3",
                                        "data_batch_4", "data_batch_5", "test_batch")),
    "cifar100": ("cifar-100-python", ("train", "test")),
}


def _cifar_missing(cfg: DataConfig, why: str) -> ConfigError:
    folder = _CIFAR_FILES[cfg.dataset][0]
    return ConfigError(
        f"{cfg.dataset} not found in '{cfg.root}' ({why}). Put the extracted python "
        f"version of the dataset at '{Path(cfg.root) / folder}' (from "
        f"https://www.cs.toronto.edu/~kriz/), point --data-root at its parent folder, or "
        f"allow the download with --set data.download=true"
    )


def check_data(cfg: DataConfig) -> None:
    """Refuse missing data before the run directory is touched (entry points call it).

    Checks what can be seen without reading the images: CIFAR's files (unless
    ``data.download``), an image folder's layout. :func:`build_splits` checks the rest.

    Raises:
        ConfigError: What is missing and where to put it.
    """
    if cfg.dataset in _CIFAR_FILES and not cfg.download:
        folder, names = _CIFAR_FILES[cfg.dataset]
        missing = [n for n in names if not (Path(cfg.root) / folder / n).is_file()]
        if missing:
            raise _cifar_missing(cfg, f"no {Path(cfg.root) / folder / missing[0]}")
    elif cfg.dataset == "imagefolder":
        _folder_layout(cfg)


def _load_cifar(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(cfg.root, train=train, download=cfg.download)
    except RuntimeError as exc:
        raise _cifar_missing(cfg, str(exc)) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return images, torch.tensor(ds.targets)


def build_splits(cfg: DataConfig, *, cutout: int | None = None) -> Splits:
    """Build train/valid/test datasets for ``cfg``.

    Args:
        cfg: The data settings.
        cutout: Cutout side for the training images (default ``cfg.cutout``).

    Returns:
        The splits; ``train`` and ``valid`` partition the training set with a seeded
        permutation, capped by ``cfg.limit`` and ``cfg.valid_limit``.

    Raises:
        ConfigError: Missing files or an impossible split, with what to do about it.
    """
    cut = cfg.cutout if cutout is None else cutout
    if cfg.dataset == "imagefolder":
        return _image_folder(cfg, cut)
    if cfg.dataset == "embedded":
        train_x, train_y = make_shapes(cfg.embedded_train, cfg.seed, cfg.size)
        test_x, test_y = make_shapes(cfg.embedded_test, cfg.seed + 1_000_003, cfg.size)
        classes = len(SHAPES)
    else:
        (train_x, train_y), (test_x, test_y) = _load_cifar(cfg, True), _load_cifar(cfg, False)
        classes = 10 if cfg.dataset == "cifar10" else 100
    size = train_x.shape[-1]
    augmented = ImageTensors(train_x, train_y, _transforms(cfg, train=True, size=size, cutout=cut))
    plain = ImageTensors(train_x, train_y, _transforms(cfg, train=False, size=size, cutout=0))
    test = ImageTensors(test_x, test_y, _transforms(cfg, train=False, size=size, cutout=0))
    train_idx, valid_idx = _split(len(train_y), cfg.valid_size, cfg.seed)
    train_idx, valid_idx = _cap(train_idx, cfg.limit), _cap(valid_idx, cfg.valid_limit)
    return Splits(
        Subset(augmented, train_idx), Subset(plain, valid_idx), test,
        Subset(augmented, train_idx + valid_idx), classes, int(train_x.shape[1]),
    )


class _Folder(datasets.ImageFolder):
    """An image folder labelled with given class indices (the training folder's)."""

    def __init__(self, root: str, index: dict[str, int], **kwargs: Any) -> None:
        self.index = index
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return list(self.index), dict(self.index)


def _class_folders(path: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    return sorted(e.name for e in path.iterdir() if e.is_dir() and e.name not in exclude
                  and not e.name.startswith("."))


def _folder_layout(cfg: DataConfig) -> tuple[Path, Path | None, list[str]]:
    """The training folder, the test folder (or ``None``) and the classes of an image folder."""
    root = Path(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"imagefolder: '{root}' is not a folder (set --data-root DIR)")
    test_root = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir():
        train_root, classes = root / "train", _class_folders(root / "train")
    else:  # class folders at the root; test/ and val/ beside them are splits, not classes
        train_root, classes = root, _class_folders(root, ("test", "val"))
    if not classes:
        raise ConfigError(f"imagefolder '{train_root}': no class sub-folders (expected "
                          "<root>/<class>/<image> or <root>/train/<class>/<image>)")
    if test_root is not None:
        unknown = [n for n in _class_folders(test_root) if n not in classes]
        if unknown:
            raise ConfigError(
                f"imagefolder: '{test_root}' holds classes that the training folder "
                f"'{train_root}' lacks: {', '.join(unknown)}; a network cannot learn them. "
                f"Add their training images or move them out of '{test_root}'")
    return train_root, test_root, classes


def _image_folder(cfg: DataConfig, cut: int) -> Splits:
    train_root, test_root, classes = _folder_layout(cfg)
    index = {name: i for i, name in enumerate(classes)}  # training classes, everywhere
    resize = [v2.Resize(cfg.size), v2.CenterCrop(cfg.size)]

    def folder(path: Path, train: bool, c: int, test: bool = False) -> datasets.ImageFolder:
        tail = _transforms(cfg, train=train, size=cfg.size, cutout=c)
        try:  # a test folder may lack classes
            return _Folder(str(path), index, transform=v2.Compose([*resize, tail]),
                           allow_empty=test)
        except (FileNotFoundError, RuntimeError) as exc:
            raise ConfigError(f"imagefolder '{path}': {exc}") from None

    augmented, plain = folder(train_root, True, cut), folder(train_root, False, 0)
    n = len(augmented)
    if test_root is not None:
        test: Dataset = folder(test_root, False, 0, test=True)
        if len(test) == 0:
            raise ConfigError(f"imagefolder '{test_root}': no images in its class folders")
        pool = list(range(n))
    else:  # NOTE: no test/ folder: a seeded tenth of the images becomes the test split.
        rest, held = _split(n, 0.1, cfg.seed + 1)
        test, pool = Subset(plain, held), rest
    train_pos, valid_pos = _split(len(pool), cfg.valid_size, cfg.seed)
    train_idx = _cap([pool[i] for i in train_pos], cfg.limit)
    valid_idx = _cap([pool[i] for i in valid_pos], cfg.valid_limit)
    return Splits(
        Subset(augmented, train_idx), Subset(plain, valid_idx), test,
        ConcatDataset([Subset(augmented, train_idx), Subset(augmented, valid_idx)]),
        len(classes), 3,
    )
