"""Training throughput of ``stylize`` against pytorch/examples' fast_neural_style, and inference.

Every row trains Johnson et al.'s network on the same batch with the same losses (content
relu2_2, style Grams of relu1_2..relu4_3, weights 1e5 / 1e10, Adam 1e-3), in one process,
interleaved round by round; the ratio is each round's reference time over the row's time
(median and range over the rounds), so machine load shared by both cancels out.

Rows:
- ``reference``: pytorch/examples' training step, rebuilt from its description: IN, 0-255
  pixels, float32, contiguous tensors, the content image through the whole VGG16 (only
  relu2_2 is used), Gram matrices in float32.
- ``stylize ...``: ``stylize.train_loop.train_step`` with ``PerceptualLoss`` (content target
  without a graph, only up to relu2_2), optionally channels-last and bf16 autocast for VGG16
  only (``--amp bf16``, the default where bf16 is native) or for the network too
  (``train.amp_network``); Gram matrices and losses stay float32.

Data loading is not timed (the batch is fixed); on a GPU let ``data.workers`` decode photos.

    python benchmarks/stylize_speed.py --random-vgg --train-size 256 --rounds 5 --rows all
    python benchmarks/stylize_speed.py --random-vgg --device cuda --rows all
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from stylize_common import loss_network, style_image

from snexp.runtime.device import select_device
from stylize.loss import PerceptualLoss, gram_matrix, imagenet_normalize
from stylize.net import TransformerNet
from stylize.train_loop import train_step

# key: (label, norm, channels_last, where bf16 autocast applies: None, "loss" (VGG16), "all")
ROWS = {
    "default": ("stylize default: sn, channels-last, VGG16 in bf16", "sn", True, "loss"),
    "sn-fp32": ("stylize sn, float32, contiguous", "sn", False, None),
    "sn-cl": ("stylize sn, float32, channels-last", "sn", True, None),
    "sn-cl-bf16-all": ("stylize sn, channels-last, network and VGG16 in bf16", "sn", True, "all"),
    "in-default": ("stylize in, as the default", "in", True, "loss"),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Precision:
    """What ``train_step`` needs from a run: autocast and the optimizer step."""

    def __init__(self, device: torch.device, bf16: bool) -> None:
        self.device, self.bf16 = device, bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _reference_step(net, vgg, grams, x, optimizer) -> None:
    """pytorch/examples' step: 0-255 pixels, both images through all of VGG16, float32."""
    x255 = x * 255
    y = net(x255)
    fy = vgg(imagenet_normalize(y / 255))
    fx = vgg(imagenet_normalize(x255 / 255))  # VGG is frozen: no graph, but every layer runs
    content = 1e5 * F.mse_loss(fy.relu2_2, fx.relu2_2)
    style = 1e10 * sum(F.mse_loss(gram_matrix(f), g.expand(len(x), -1, -1))
                       for f, g in zip(fy, grams))
    (content + style).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="default,sn-fp32",
                        help="comma-separated rows besides the reference, or 'all': "
                             + "; ".join(f"{k} ({v[0]})" for k, v in ROWS.items()))
    parser.add_argument("--train-size", type=int, default=256, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (1 step per row)")
    parser.add_argument("--sizes", default="",
                        help="inference sizes, e.g. 256,512 (default or 'none': skip)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier on a shared, oversubscribed CPU)")
    parser.add_argument("--vgg-weights", default=None)
    parser.add_argument("--random-vgg", action="store_true", help="random VGG16 (timing only)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    names = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    vgg, label = loss_network(args.vgg_weights, args.random_vgg)
    vgg = vgg.to(device)
    style, _ = style_image(None, args.train_size)
    criterion = PerceptualLoss(vgg, [style.to(device)])
    grams = criterion.style_grams(0)
    x = torch.rand(args.batch_size, 3, args.train_size, args.train_size, device=device)

    steps = {}
    torch.manual_seed(0)
    ref_net = TransformerNet("in", pixel_scale=1.0).to(device)  # fed 0-255 pixels itself
    ref_opt = torch.optim.Adam(ref_net.parameters(), 1e-3)

    def reference() -> None:
        vgg.to(memory_format=torch.contiguous_format)
        _reference_step(ref_net, vgg, grams, x, ref_opt)

    steps["reference (pytorch/examples)"] = reference
    for key in names:
        name, norm, channels_last, scope = ROWS[key]
        torch.manual_seed(0)
        net = TransformerNet(norm).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=fmt)
        batch = x.contiguous(memory_format=fmt)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        run = _Precision(device, scope is not None)

        def step(net=net, batch=batch, opt=opt, run=run, fmt=fmt, scope=scope) -> None:
            vgg.to(memory_format=fmt)
            train_step(net, criterion, batch, 0, opt, run, amp_network=scope == "all")

        steps[name] = step

    def timed(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    for fn in steps.values():
        timed(fn)  # warm-up (oneDNN primitive caches, allocator)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(timed(fn))
        print(f"round {r + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()),
              flush=True)
    ref = times["reference (pytorch/examples)"]
    print(f"\ndevice {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{label}; training at {args.train_size} px, batch {args.batch_size}, "
          f"{args.rounds} rounds")
    print("| row | img/s (median) | x reference (median, min-max over rounds) |")
    print("|---|---|---|")
    for name, t in times.items():
        ratios = [a / b for a, b in zip(ref, t)]
        print(f"| {name} | {args.batch_size / statistics.median(t):.2f} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    sizes = [int(s) for s in args.sizes.split(",") if s and s.strip().lower() != "none"]
    if sizes:
        _inference(sizes, args.rounds, device)


@torch.no_grad()
def _inference(sizes: list[int], rounds: int, device: torch.device) -> None:
    """Milliseconds per image (batch 1) of SN and IN networks in eval mode."""
    torch.manual_seed(0)
    nets = {n: TransformerNet(n).to(device).eval() for n in ("sn", "in")}
    print("\ninference, batch 1 (ms, median):")
    for size in sizes:
        image = torch.rand(1, 3, size, size, device=device)
        ms: dict[str, list[float]] = {n: [] for n in nets}
        for net in nets.values():
            net(image)
        for _ in range(rounds):
            for n, net in nets.items():
                _sync(device)
                start = time.perf_counter()
                net(image)
                _sync(device)
                ms[n].append(1000 * (time.perf_counter() - start))
        print(f"  {size:>5} px: " + "   ".join(
            f"{n} {statistics.median(v):8.1f} ms" for n, v in ms.items()))


if __name__ == "__main__":
    main()
