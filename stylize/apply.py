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

from collections.abc import Sequence
from pathlib import Path

from snexp.runtime.config import ConfigError, cli_errors, parse_args
from snexp.runtime.device import select_device
from stylize.apply_loop import MIN_INPUT_SIZE, ApplyConfig, apply_files, resolve_style
from stylize.saved import load_model

__all__ = ["ApplyConfig", "FLAGS", "main", "resolve_style"]

PROG = "python -m stylize.apply"
FLAGS = {f"--{name.replace('_', '-')}": name for name in ApplyConfig.__dataclass_fields__}


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
            from stylize.export import export_model  # only --export needs it

            if Path(cfg.export).exists() and not cfg.overwrite:
                raise ConfigError(f"{cfg.export} exists; pass --overwrite to replace it")
            try:
                path = export_model(net, cfg.export, style)
            except OSError as exc:  # a full disk, a read-only folder
                raise ConfigError(f"cannot write {cfg.export}: {exc.strerror or exc}; free "
                                  "space or choose a writable place for --export") from None
            print(f"exported to {path}")
            return
        if cfg.input is None or cfg.output is None:
            raise ConfigError("--input PATH and --output PATH are required (or --export FILE)")
        if cfg.tile is not None and (cfg.tile < 16 or (
                cfg.overlap is not None and not 0 <= cfg.overlap < cfg.tile)):
            raise ConfigError(f"--tile must be >= 16 and --overlap in [0, tile), got "
                              f"{cfg.tile} and {cfg.overlap}")
        if cfg.size is not None and cfg.size < MIN_INPUT_SIZE:
            raise ConfigError(f"--size {cfg.size}: the network needs at least {MIN_INPUT_SIZE} "
                              "px on the longest side (it downsamples by 4); pass a larger "
                              "--size, or leave it out to work at the input's own size")
        device = select_device(cfg.device)
        net.to(device)
        done, unreadable = apply_files(net, style, cfg, device)
        print(f"stylized {done} image(s) into {cfg.output}"
              + (f"; skipped {len(unreadable)} unreadable (truncated or corrupt) file(s), "
                 f"e.g. {unreadable[0]}" if unreadable else ""))


if __name__ == "__main__":
    main()
