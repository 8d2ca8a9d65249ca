"""A collective-communication probe: join a process group, all-reduce, one SyncSwitchNorm step.

Run under torchrun, one process per GPU::

    python -m torch.distributed.run --standalone --nproc-per-node=1 \\
        benchmarks/nccl_probe.py --out probe.json

joins an NCCL group on ``cuda:LOCAL_RANK`` (``--device cpu``: a gloo group, the CPU dry run
of the same calls), all-reduces a tensor of ones and runs a ``SyncSwitchNorm`` forward and
backward; prints ``NCCL probe: ...`` and writes the result to ``--out`` (rank 0). Exit status
1 when the sum or the gradient is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # snexp from this checkout

import snexp  # noqa: E402


def probe_collectives(device: torch.device) -> tuple[bool, str]:
    """In a joined process group: one all-reduce and a ``SyncSwitchNorm`` fwd+bwd on ``device``.

    Returns whether both came out right, and a one-line summary.
    """
    world = dist.get_world_size()
    ones = torch.ones(3, device=device)
    dist.all_reduce(ones)
    norm = snexp.SyncSwitchNorm(8).to(device)
    x = torch.randn(4, 8, 16, 16, device=device, requires_grad=True)
    norm(x).square().mean().backward()
    summed, finite = bool((ones == world).all()), bool(torch.isfinite(x.grad).all())
    return summed and finite, (f"{world} rank(s): all_reduce {'ok' if summed else 'WRONG'}, "
                               f"SyncSwitchNorm fwd+bwd {'finite' if finite else 'NOT finite'}")


def _backend(device: torch.device) -> str:
    if device.type == "cpu":
        return "gloo"
    version = torch.cuda.nccl.version()
    return "NCCL " + (".".join(map(str, version)) if isinstance(version, tuple) else str(version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/nccl_probe.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: NCCL on cuda:LOCAL_RANK (default); cpu: gloo")
    parser.add_argument("--out", type=Path, default=None, help="write the result here (.json)")
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        parser.error("run it under torchrun: python -m torch.distributed.run --standalone "
                     "--nproc-per-node=1 benchmarks/nccl_probe.py")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        ok, summary = probe_collectives(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rank = dist.get_rank()
    finally:
        dist.destroy_process_group()
    line = f"{_backend(device)}, {summary}"
    print(f"NCCL probe: {line}", flush=True)
    if args.out is not None and rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"ok": ok, "summary": line}) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
