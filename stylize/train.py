"""``python -m stylize.train``: train a feed-forward style-transfer network with SN.

Johnson et al. (2016) with the normalizers of ``snexp`` (SN by default, as in the SN paper's
style-transfer experiment). Thin: parse the config, check the inputs (style files, VGG16
weights) before anything is written, then run :func:`stylize.train_loop.train`.

Example::

    python -m stylize.train --style starry.jpg                       # quick preset, CPU-sized
    python -m stylize.train --config johnson --style starry.jpg --content-dir coco/train2014
    python -m stylize.train --style a.jpg --style b.jpg --norm in    # a 2-style network
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from snexp.runtime.config import ConfigError, cli_errors, override, parse_args
from snexp.runtime.device import bf16_is_native as bf16_is_fast  # the one check, same name
from snexp.runtime.device import describe_device, select_device
from snexp.runtime.run import Run
from stylize.config import PRESETS, StylizeConfig
from stylize.data import MIN_STYLE_SIZE, check_content_dir, load_image
from stylize.loss import load_vgg16
from stylize.train_loop import train

__all__ = ["FLAGS", "SAFE_KEYS", "bf16_is_fast", "check_inputs", "fit_precision", "main"]

logger = logging.getLogger(__name__)

PROG = "python -m stylize.train"
FLAGS = {
    "--style": "data.styles",
    "--content-dir": "data.content_dir",
    "--image-size": "data.image_size",
    "--style-size": "data.style_size",
    "--norm": "model.norm",
    "--width": "model.width",
    "--epochs": "train.epochs",
    "--steps": "train.steps",
    "--batch-size": "train.batch_size",
    "--lr": "train.lr",
    "--content-weight": "loss.content_weight",
    "--style-weight": "loss.style_weight",
    "--tv-weight": "loss.tv_weight",
    "--vgg-weights": "loss.vgg_weights",
    "--preview-every": "log.preview_every",
}
# Keys that may change on --resume: how long to train, how often to log, where weights live.
SAFE_KEYS = ("train.epochs", "train.steps", "log.*", "loss.vgg_weights", "data.workers")


def check_inputs(cfg: StylizeConfig) -> None:
    """Refuse bad inputs before anything is written.

    No style, a style file that is missing, unreadable or smaller than 16 px on a side, or a
    ``--content-dir`` that is missing, empty or whose sampled images do not decode.
    """
    if not cfg.data.styles:
        raise ConfigError("no style image: pass --style FILE (repeat it to train one network "
                          "on several styles)")
    missing = [p for p in cfg.data.styles if not Path(p).expanduser().is_file()]
    if missing:
        raise ConfigError(f"style image(s) not found: {', '.join(missing)}")
    for path in cfg.data.styles:
        image = load_image(Path(path).expanduser())  # decodes it: ConfigError if it cannot
        height, width = image.shape[-2:]
        if min(height, width) < MIN_STYLE_SIZE:
            raise ConfigError(
                f"style image {path} is {width}x{height} pixels: a style needs at least "
                f"{MIN_STYLE_SIZE} px on each side (the loss network pools it 3 times), and "
                "its strokes and textures are what is learnt; use a picture of the style, "
                "ideally 256 px or more")
    if cfg.data.content_dir is not None:
        check_content_dir(cfg.data.content_dir)


def fit_precision(cfg: StylizeConfig) -> StylizeConfig:
    """``--amp bf16`` where the device computes bf16 natively, else float32 (with a warning).

    The presets ask for bf16 autocast (with the Gram matrices and losses in float32); on a CPU
    without native bf16 it would be emulated and slower than float32, so it is turned off.
    """
    if cfg.runtime.amp != "bf16":
        return cfg
    device = select_device(cfg.runtime.device)
    if bf16_is_fast(device):
        return cfg
    logger.warning("--amp bf16: %s has no native bfloat16, so this run trains in float32 "
                   "(--amp off)", describe_device(device))
    return override(cfg, {"runtime.amp": "off"})


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv``, check the inputs, train, write ``<out>/model.pt``."""
    with cli_errors(PROG):
        cfg = parse_args(StylizeConfig, argv, prog=PROG, description=__doc__.splitlines()[0],
                         flags=FLAGS, presets=PRESETS, default_config="quick")
        check_inputs(cfg)
        cfg = fit_precision(cfg)
        loss_net = load_vgg16(cfg.loss.vgg_weights)
        with Run(cfg, experiment="stylize", safe_keys=SAFE_KEYS, prog=PROG) as run:
            train(run, loss_net)


if __name__ == "__main__":
    main()
