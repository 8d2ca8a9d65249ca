"""The inputs of the GPU check's style-transfer steps: a style image and VGG16 weights.

::

    python benchmarks/gpu_inputs.py --out DIR

writes ``DIR/style.png`` (a 256 px pattern of waves) and ``DIR/vgg16.pth``: a link to
torchvision's cached ImageNet VGG16 where the cache has it, else random VGG16 weights from a
fixed seed (the losses are then meaningless, the timing valid). Prints one line saying which:
``inputs: ...``. Imports only torch, torchvision, numpy and pillow, so that the check's
inputs do not depend on the packages it checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet weights, as its cache names them


def style_image(path: Path) -> None:
    """A 256 x 256 RGB pattern with strokes at several scales (a stand-in style)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:256, 0:256] / 256.0  # (H, W) each
    waves = np.stack([np.sin(14 * x + 5 * y), np.sin(11 * y - 7 * x * x),
                      np.cos(17 * x * y)], axis=-1)  # (H, W, 3) in [-1, 1]
    Image.fromarray(((waves + 1) * 127.5).astype(np.uint8)).save(path)


def vgg_weights(path: Path) -> str:
    """Link ``path`` to the cached VGG16 or write random weights there; says which."""
    import torch
    import torchvision

    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if cached.is_file():
        path.symlink_to(cached)
        return f"VGG16: {cached}"
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return "random VGG16 weights (none in torchvision's cache): losses meaningless, timing valid"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_inputs.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for style.png and vgg16.pth (made if missing)")
    args = parser.parse_args(argv)
    if (args.out / "style.png").exists() or (args.out / "vgg16.pth").exists():
        parser.error(f"--out {args.out} already holds style.png or vgg16.pth; give a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    style_image(args.out / "style.png")
    print(f"inputs: {vgg_weights(args.out / 'vgg16.pth')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
