"""The SN paper's style-transfer comparison: SN vs IN vs BN, total loss vs step (a PNG).

Luo et al. (SN paper, Sec. 5 / Fig. 7) trained Johnson et al.'s network with each normalizer and
report a lower content+style loss for SN (about 2.1e5) than IN (2.3e5) and BN (2.6e5) after 40k
steps on COCO. This script trains each norm on identical data, seed and steps (same initial
convolution weights, same batches) and plots the total loss per step, smoothed.

    python benchmarks/stylize_norms.py --style starry.jpg --content-dir coco/train2014 \
        --steps 40000 --image-size 256 --device cuda --png norms.png
    python benchmarks/stylize_norms.py --norms "sn, sn(candidates=in+ln), in" --random-vgg

Each of ``--norms`` is an ``snexp.NormSpec`` (a kind with its options), as ``--norm`` of
``python -m stylize.train``.
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from stylize_common import loss_network, style_image
from torch.utils.data import DataLoader

from snexp import NormSpec
from snexp.runtime.device import select_device
from stylize.config import DataConfig
from stylize.loss import PerceptualLoss
from stylize.net import TransformerNet
from stylize.train_loop import build_content


def train_curve(norm: NormSpec, criterion: PerceptualLoss, data, args, device) -> list[float]:
    """Total loss of every step of one norm's run."""
    torch.manual_seed(args.seed)
    net = TransformerNet(norm, width=args.width).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=order)
    curve, batches = [], iter(loader)
    while len(curve) < args.steps:
        x = next(batches, None)
        if x is None:
            batches = iter(loader)
            continue
        x = x.to(device)
        loss = criterion(net(x), x, 0).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(float(loss.detach()))
    return curve


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", default="sn,in,bn",
                        help="comma list of norm specs, e.g. 'sn(candidates=in+ln), in, "
                             "gn(groups=8)' (default: sn,in,bn)")
    parser.add_argument("--style", default=None, help="style image (default: embedded scene)")
    parser.add_argument("--content-dir", default=None, help="photos (default: embedded scenes)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--style-size", type=int, default=256,
                        help="shorter side of the style image (256: the presets' size)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vgg-weights", default=None)
    parser.add_argument("--random-vgg", action="store_true",
                        help="random VGG16 weights: a smoke test, not the paper's losses")
    parser.add_argument("--png", default="stylize_norms.png")
    args = parser.parse_args(argv)
    try:  # commas inside a spec's parentheses stay in it
        norms = [NormSpec.parse(t) for t in re.split(r",(?![^()]*\))", args.norms) if t.strip()]
    except ValueError as exc:
        parser.error(f"--norms {args.norms!r}: {exc}")
    device = select_device(args.device)
    loss_net, label = loss_network(args.vgg_weights, args.random_vgg)
    style, style_label = style_image(args.style, args.style_size)
    criterion = PerceptualLoss(loss_net.to(device), [style.to(device)])
    style_px = "x".join(str(n) for n in style.shape[-2:][::-1])  # width x height
    data, _ = build_content(DataConfig(content_dir=args.content_dir,
                                       image_size=args.image_size,
                                       synthetic_count=max(64, args.steps * args.batch_size)))
    curves = {}
    for spec in norms:
        start = time.perf_counter()
        norm = str(spec)
        curves[norm] = train_curve(spec, criterion, data, args, device)
        tail = curves[norm][-max(1, args.steps // 10):]
        print(f"{norm:>3}: mean total loss over the last {len(tail)} steps "
              f"{sum(tail) / len(tail):.4g} (style image {style_px} px, content "
              f"{args.image_size} px; {time.perf_counter() - start:.0f} s)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for norm, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), smooth(curve, max(1, args.steps // 20)),
                label=norm)
    ax.set_xlabel("step")
    ax.set_ylabel("content + style loss (smoothed)")
    ax.set_yscale("log")
    ax.set_title(f"{label}; style: {style_label} at {style_px} px; content {args.image_size} "
                 f"px, seed {args.seed}",
                 fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"plot written to {args.png}")


if __name__ == "__main__":
    main()
