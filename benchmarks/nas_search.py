"""Speed of the ENAS search with SN vs BN in the child, measured in one process.

Times, for each ``--norm`` kind on the same sampled architectures and the same random images:

- child train steps/s: forward + backward + SGD step of the weight-sharing child, one sampled
  architecture per step (the inner loop of ``nas.search``);
- controller steps/s: one REINFORCE update of ``num_aggregate`` architectures, each rewarded on
  one minibatch with the shared child (the controller phase of ``nas.search``).

Kinds are measured in alternating rounds and the median round is kept, so a noisy shared
machine hurts both alike. Prints a table and the SN/BN time ratios::

    python benchmarks/nas_search.py [--layers 6 --filters 20 --batch 32 --device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from nas.child import ChildNet
from nas.controller import ControllerConfig
from nas.proposers import RandomProposer, Reinforce
from snexp import NormSpec
from snexp.runtime.run import select_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norms", default="sn,bn",
                        help="child norm kinds or specs without commas, e.g. sn,bn,'gn(groups=4)' "
                             "(default: sn,bn)")
    parser.add_argument("--layers", type=int, default=6, help="normal cells (ENAS search: 6)")
    parser.add_argument("--filters", type=int, default=20, help="first-stage width (ENAS: 20)")
    parser.add_argument("--nodes", type=int, default=5, help="computed nodes per cell")
    parser.add_argument("--batch", type=int, default=32, help="images per step (ENAS: 160)")
    parser.add_argument("--steps", type=int, default=5, help="child steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per kind")
    parser.add_argument("--samples", type=int, default=10, help="architectures per update")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    torch.manual_seed(0)
    kinds = [k.strip() for k in args.norms.split(",")]
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    archs = RandomProposer(args.nodes, seed=0).ask(args.steps)
    setups = {}
    for kind in kinds:
        net = ChildNet(10, norm_layer=NormSpec.parse(kind).layer(), layers=args.layers,
                       filters=args.filters, num_nodes=args.nodes).to(device).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        agent = Reinforce(ControllerConfig(num_aggregate=args.samples), args.nodes, device)
        setups[kind] = (net, opt, agent)

    def child_round(kind: str) -> float:
        net, opt, _ = setups[kind]
        _sync(device)
        start = time.perf_counter()
        for arch in archs:
            loss = nn.functional.cross_entropy(net(x, arch).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
        _sync(device)
        return (time.perf_counter() - start) / len(archs)

    def controller_round(kind: str) -> float:
        net, _, agent = setups[kind]
        _sync(device)
        start = time.perf_counter()
        sampled = agent.ask(args.samples)
        with torch.no_grad():
            rewards = [float((net(x, a).logits.argmax(1) == y).float().mean()) for a in sampled]
        agent.tell(sampled, rewards)
        _sync(device)
        return time.perf_counter() - start

    for kind in kinds:  # warm-up (allocator, kernels, lazy init)
        child_round(kind)
        controller_round(kind)
    times: dict[str, dict[str, list[float]]] = {k: {"child": [], "ctrl": []} for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            times[kind]["child"].append(child_round(kind))
            times[kind]["ctrl"].append(controller_round(kind))
    med = {k: {part: statistics.median(v) for part, v in t.items()} for k, t in times.items()}
    print(f"device {device}, threads {torch.get_num_threads()}, child {args.layers} layers x "
          f"{args.filters} filters, B={args.nodes}, batch {args.batch}")
    width = max(6, *map(len, kinds))
    print(f"{'norm':{width}s} {'child steps/s':>14s} {'controller steps/s':>19s}")
    for kind in kinds:
        print(f"{kind:{width}s} {1 / med[kind]['child']:14.2f} {1 / med[kind]['ctrl']:19.2f}")
    if "sn" in med and "bn" in med:
        print(f"SN/BN time ratio: child step {med['sn']['child'] / med['bn']['child']:.2f}, "
              f"controller step {med['sn']['ctrl'] / med['bn']['ctrl']:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
