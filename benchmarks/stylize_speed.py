"""Speed of style transfer with SN vs IN: training images/s and inference milliseconds.

Both norms are measured in the same process, interleaved (round-robin, medians), so the ratio
is meaningful on a noisy machine. Training = one full step (network, VGG16 losses, backward,
Adam); the loss network's weights do not change the timing, so ``--random-vgg`` is fine here.
Target of the issue: SN training throughput >= 0.9x IN's.

    python benchmarks/stylize_speed.py --random-vgg --sizes 256,512,1024 --train-size 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from stylize_common import loss_network, style_image

from snexp.runtime.device import select_device
from stylize.loss import PerceptualLoss
from stylize.net import TransformerNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", default="sn,in", help="norm kinds to compare (first = base)")
    parser.add_argument("--sizes", default="256,512,1024", help="inference image sizes")
    parser.add_argument("--train-size", type=int, default=256, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--vgg-weights", default=None)
    parser.add_argument("--random-vgg", action="store_true", help="random VGG16 (timing only)")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    norms = args.norms.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    loss_net, label = loss_network(args.vgg_weights, args.random_vgg)
    style, _ = style_image(None, args.train_size)
    criterion = PerceptualLoss(loss_net.to(device), [style.to(device)])
    torch.manual_seed(0)
    nets = {n: TransformerNet(n).to(device) for n in norms}
    opts = {n: torch.optim.Adam(nets[n].parameters(), 1e-3) for n in norms}
    x = torch.rand(args.batch_size, 3, args.train_size, args.train_size, device=device)

    def train_step(n: str) -> float:
        _sync(device)
        t = time.perf_counter()
        loss = criterion(nets[n](x), x, 0).total
        loss.backward()
        opts[n].step()
        opts[n].zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t

    train_times = {n: [] for n in norms}
    for n in norms:
        train_step(n)  # warm-up
    for _ in range(args.repeats):
        for n in norms:
            train_times[n].append(train_step(n))
    infer = {(n, s): [] for n in norms for s in sizes}
    with torch.no_grad():
        for s in sizes:
            image = torch.rand(1, 3, s, s, device=device)
            for n in norms:
                nets[n].eval()(image)  # warm-up
            for _ in range(args.repeats):
                for n in norms:
                    _sync(device)
                    t = time.perf_counter()
                    nets[n](image)
                    _sync(device)
                    infer[n, s].append(time.perf_counter() - t)
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"loss network: {label}, {args.repeats} rounds, medians")
    print(f"training at {args.train_size} px, batch {args.batch_size} (images/s; ratio to "
          f"{norms[-1]}):")
    ips = {n: args.batch_size / statistics.median(train_times[n]) for n in norms}
    for n in norms:
        print(f"  {n:>4}: {ips[n]:8.2f} img/s   x{ips[n] / ips[norms[-1]]:.2f}")
    print(f"inference, batch 1 (ms; ratio to {norms[-1]}):")
    for s in sizes:
        ms = {n: 1000 * statistics.median(infer[n, s]) for n in norms}
        print(f"  {s:>5} px: " + "   ".join(
            f"{n} {ms[n]:9.1f} ms x{ms[n] / ms[norms[-1]]:.2f}" for n in norms))


if __name__ == "__main__":
    main()
