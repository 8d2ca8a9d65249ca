"""What a training step needs from a run: device, wrapping, precision, optimizer steps, data.

:meth:`~_Training.prepare` moves a model to the run's device (channels-last if asked), wraps
it in DistributedDataParallel under torchrun (after ``--sync-norm``) and ``torch.compile``s it
if asked; :meth:`~_Training.autocast` and :meth:`~_Training.optimizer_step` apply ``--amp``
(bf16 autocast, or fp16 with a GradScaler); :meth:`~_Training.dataloader` draws the data order
from the run's generator, seeds its workers (per rank under torchrun) and shards the data
across ranks.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from snexp.runtime import distributed
from snexp.runtime.checkpoint import seed_worker
from snexp.runtime.config import RuntimeConfig

logger = logging.getLogger("snexp.runtime.run")  # one logger for the package

_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Training:
    """Device, precision and data of :class:`snexp.runtime.run.Run` (a mixin; ``Run`` sets the
    state)."""

    runtime: RuntimeConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int
    world_size: int
    generator: torch.Generator
    scaler: torch.amp.GradScaler
    _samplers: list[DistributedSampler]

    def prepare(self, model: torch.nn.Module, *,
                find_unused_parameters: bool = False) -> torch.nn.Module:
        """Move a model to the device (channels-last if asked) and ``torch.compile`` it if asked.

        Under torchrun, the model is wrapped in DistributedDataParallel, after ``--sync-norm``
        turned its SN/BN layers into synchronized ones (in place: build the optimizer after
        this call). Train the returned module; :meth:`attach` the one you built (or either:
        wrappers are unwrapped), so checkpoints hold plain state dict keys. Pass
        ``find_unused_parameters=True`` when a step uses only some parameters (weight
        sharing); see :func:`snexp.runtime.distributed.wrap_model`.
        """
        model = model.to(self.device)
        if self.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model = distributed.wrap_model(model, self.device, sync_norm=self.runtime.sync_norm,
                                       find_unused_parameters=find_unused_parameters)
        if self.runtime.compile:
            model = torch.compile(model)
        return model

    def to_device(self, data: Any) -> Any:
        """Tensors (also inside lists, tuples and dicts) moved to the device, non-blocking."""
        if isinstance(data, torch.Tensor):
            data = data.to(self.device, non_blocking=True)
            if self.runtime.channels_last and data.dim() == 4 and data.is_floating_point():
                data = data.contiguous(memory_format=torch.channels_last)
            return data
        if isinstance(data, Mapping):
            return type(data)((k, self.to_device(v)) for k, v in data.items())
        if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
            return type(data)(*(self.to_device(v) for v in data))
        if isinstance(data, (list, tuple)):
            return type(data)(self.to_device(v) for v in data)
        return data

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for ``--amp bf16|fp16``; a no-op context for ``--amp off``."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimizer_step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad_norm: float | None = None,
        parameters: Iterable[torch.Tensor] | None = None,
    ) -> float | None:
        """Backward (scaled for fp16), optional gradient clipping, step, then zero the grads.

        Args:
            loss: Scalar loss.
            optimizer: The optimizer to step.
            clip_grad_norm: Clip the total gradient norm to this (after unscaling).
            parameters: Parameters to clip (default: the optimizer's).

        Returns:
            The gradient norm before clipping, when clipping; else ``None``.
        """
        self.scaler.scale(loss).backward()
        norm = None
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)
            params = parameters or [p for g in optimizer.param_groups for p in g["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm))
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def dataloader(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> DataLoader:
        """A DataLoader whose order comes from :attr:`generator` and whose workers are seeded.

        Memory is pinned when training on CUDA. Workers are not persistent, so a resumed run
        reseeds them exactly as the uninterrupted run did. Under torchrun each rank reads its
        own shard (a ``DistributedSampler`` seeded with ``--seed``, its epoch set by
        :meth:`epochs`), so ``batch_size`` is per rank and the effective batch is
        ``batch_size * world_size``; the workers of rank ``r > 0`` mix ``r`` into their seeds
        (:func:`snexp.runtime.checkpoint.seed_worker`), so random transforms differ across ranks
        while
        :attr:`generator`, and so the data order, advances alike on all of them.
        """
        kwargs.setdefault("pin_memory", self.device.type == "cuda")
        if self.world_size > 1 and "sampler" not in kwargs and "batch_sampler" not in kwargs:
            sampler = DistributedSampler(dataset, self.world_size, self.rank, shuffle=shuffle,
                                         seed=self.runtime.seed, drop_last=drop_last)
            self._samplers.append(sampler)
            kwargs["sampler"], shuffle = sampler, False
            logger.info("data: %d ranks x batch %d = effective batch %d; each rank reads %d of "
                        "%d samples per epoch", self.world_size, batch_size,
                        batch_size * self.world_size, len(sampler), len(dataset))
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=num_workers,
            drop_last=drop_last,
            generator=self.generator,
            worker_init_fn=functools.partial(seed_worker, rank=self.rank),
            **kwargs,
        )
