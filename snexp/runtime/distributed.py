"""Data-parallel training across processes: torchrun's environment, collectives, DDP wrapping.

``torchrun`` starts one process per device and tells each its place through environment
variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``).
:func:`init_from_env` joins the process group they describe (NCCL on CUDA, gloo on CPU); the
other helpers are no-ops in a single process, so code calls them unconditionally. Every
collective here (:func:`barrier`, :func:`broadcast_object`, :func:`all_gather_object`,
:func:`all_reduce`) must be reached by all ranks in the same order.

:func:`wrap_model` applies PyTorch's DistributedDataParallel (Li et al., VLDB 2020): every rank
holds the same weights, reads its own shard, and gradients are averaged in the backward pass.
With ``sync_norm`` the BN statistics become global first: SN layers turn into
:class:`snexp.SyncSwitchNorm` (the BN branch of Luo et al., ICLR 2019, Eq. 4, pooled over all
ranks), BN layers into ``nn.SyncBatchNorm``.

:class:`ShardedSampler` deals each rank its share of one order that all ranks agree on (drawn
from a generator seeded alike), so K ranks with batch B take the steps of one process with
batch K*B; :func:`broadcast_buffers` gives every rank rank 0's buffers (running statistics)
before an evaluation whose counts are then summed with :func:`all_reduce`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from snexp.norm.sync import SyncSwitchNorm
from snexp.runtime.config import ConfigError

__all__ = ["ShardedSampler", "all_gather_object", "all_reduce", "barrier", "broadcast_buffers",
           "broadcast_object", "destroy", "env_world_size", "init_from_env", "is_distributed",
           "is_main_process", "local_rank", "place_model", "rank", "rank_device", "sync_norms",
           "world_size", "wrap_model"]

logger = logging.getLogger(__name__)


def env_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 when not under torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Whether this is rank 0, the one that writes files, logs and shows progress bars."""
    return rank() == 0


def init_from_env(device: torch.device, *, timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes, unless one exists or ``WORLD_SIZE`` is 1.

    Args:
        device: This rank's device; CUDA uses the NCCL backend, anything else gloo.
        timeout_s: How long a collective may wait for the other ranks.

    Returns:
        Whether this call created the group (the caller then destroys it when done).

    Raises:
        ConfigError: The torchrun variables are incomplete.
    """
    if not dist.is_available() or dist.is_initialized() or env_world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} not set: "
                          "start distributed runs with torchrun (torchrun --nproc-per-node=K "
                          "-m PACKAGE.MODULE ...)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives use the current device
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return True


def destroy(owned: bool) -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce(values: Sequence[float], device: torch.device, op: str = "sum") -> list[float]:
    """Element-wise ``sum`` or ``max`` of a few numbers over all ranks (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Overwrite every buffer of ``model`` (running statistics...) with rank ``src``'s, in place.

    After a training step each rank's running statistics hold its own last batch (DDP
    broadcasts rank 0's only at the next forward); call this on all ranks before they evaluate
    shares of a set, so every share sees the model that rank 0 checkpoints. A no-op in a
    single process.
    """
    if not is_distributed():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src)


class ShardedSampler(Sampler[int]):
    """This rank's share of an order that every rank draws alike: every ``world_size``-th index.

    ``sampler`` must yield the same indices on every rank, e.g. a ``RandomSampler`` drawing from
    a generator seeded alike on all ranks (:attr:`snexp.runtime.run.Run.generator`). The order is
    drawn
    in full and rank ``r`` keeps positions ``r, r + K, r + 2K, ...``; the last ``len % K``
    indices are dropped so that all ranks take the same number of steps. Step ``i`` of K ranks
    with batch ``B`` then covers exactly the indices of step ``i`` of one process with batch
    ``K * B`` reading ``sampler`` unsharded.

    Args:
        sampler: The shared order (drawn once per epoch, when iteration starts).
        rank: This rank (default: :func:`rank`).
        world_size: The number of ranks (default: :func:`world_size`).

    Example:
        >>> order = RandomSampler(dataset, num_samples=n, generator=run.generator)
        >>> loader = run.dataloader(dataset, batch_size=16, sampler=ShardedSampler(order))
    """

    def __init__(self, sampler: Sampler[int] | Sequence[int], rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.sampler = sampler
        many = is_distributed()
        self.rank = rank if rank is not None else dist.get_rank() if many else 0
        self.world_size = (world_size if world_size is not None
                           else dist.get_world_size() if many else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")

    def __iter__(self) -> Iterator[int]:
        # A generator: the shared order is drawn at the first next(), as RandomSampler draws.
        order = list(self.sampler)
        usable = len(order) - len(order) % self.world_size
        yield from order[self.rank:usable:self.world_size]

    def __len__(self) -> int:
        return len(self.sampler) // self.world_size


def sync_norms(model: nn.Module, device: torch.device) -> nn.Module:
    """Make batch statistics global: SN -> SyncSwitchNorm, BN -> SyncBatchNorm (on GPUs).

    Returns the converted model (the same object unless ``model`` itself is a norm layer). Do
    it before building the optimizer: converted layers have new parameter objects.
    """
    model = SyncSwitchNorm.convert_sync_switchnorm(model)
    if device.type != "cpu":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    synced = (SyncSwitchNorm, nn.SyncBatchNorm)
    local = sorted({type(m).__name__ for m in model.modules() if not isinstance(m, synced)
                    and getattr(m, "running_mean", None) is not None})
    if local:
        # NOTE: nn.SyncBatchNorm runs on GPUs only, and conditional norms have no synced form.
        logger.warning("--sync-norm: %s layers keep per-rank batch statistics on %s",
                       ", ".join(local), device.type)
    return model


def wrap_model(model: nn.Module, device: torch.device, *, sync_norm: bool = False,
               find_unused_parameters: bool = False) -> nn.Module:
    """``model`` (already on ``device``) in DistributedDataParallel; unchanged in one process.

    Args:
        model: The plain module on this rank's device.
        device: This rank's device (CUDA: one device per process).
        sync_norm: First convert the norms with :func:`sync_norms`.
        find_unused_parameters: DDP's option of that name, for models whose forward uses only
            some parameters (a weight-sharing network running one sampled architecture); all
            ranks must then use the same ones in a step. Costs a graph traversal per step.

    Returns:
        The module to train; checkpoints keep the inner one
        (``snexp.runtime.checkpoint.unwrap_model``).
    """
    if sync_norm:
        model = sync_norms(model, device)
    if not is_distributed():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=find_unused_parameters)


def rank_device(spec: str) -> torch.device:
    """The device of this rank under torchrun: ``cuda:LOCAL_RANK`` for ``auto``/``cuda``, or cpu.

    Raises:
        ConfigError: ``cuda:N`` or ``mps`` was asked for, or there are fewer GPUs than local ranks.
    """
    if spec.startswith("cuda:"):
        raise ConfigError(f"--device {spec} under torchrun: each process uses cuda:LOCAL_RANK; "
                          "pass --device cuda (or auto) and pick GPUs with CUDA_VISIBLE_DEVICES")
    if spec == "mps":
        raise ConfigError("--device mps under torchrun: distributed training runs on CUDA or cpu")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: CUDA is not available (torch {torch.__version__}); "
                          "use --device cpu or auto")
    index, count = local_rank(), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"LOCAL_RANK={index} but this node has {count} CUDA device(s): start "
                          f"at most {count} processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", index)


def place_model(model: torch.nn.Module, device: torch.device, *, channels_last: bool = False,
                sync_norm: bool = False, compile: bool = False,
                find_unused_parameters: bool = False) -> torch.nn.Module:
    """Move a model to the device (channels-last if asked) and ``torch.compile`` it if asked.

    Under torchrun, the model is wrapped in DistributedDataParallel, after ``sync_norm``
    (``--sync-norm``) turned its SN/BN layers into synchronized ones (in place: build the
    optimizer after this call). Train the returned module; checkpoint the one you built (or
    either: wrappers are unwrapped), so checkpoints hold plain state dict keys. Pass
    ``find_unused_parameters=True`` when a step uses only some parameters (weight sharing);
    see :func:`wrap_model`.
    """
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = wrap_model(model, device, sync_norm=sync_norm,
                                   find_unused_parameters=find_unused_parameters)
    if compile:
        model = torch.compile(model)
    return model
