"""The data order of a run: seeded DataLoaders, shards per rank, and mid-epoch resume.

:meth:`DataOrder.dataloader` draws the order from the run's seeded generator, seeds the
workers (per rank under torchrun) and gives each rank its shard; :meth:`DataOrder.batches`
skips, after a mid-epoch resume, the batches already used (reloading them in the same order and
putting the RNG states back, so random transforms continue where they stopped). The generator's
state now and at the start of the epoch are saved with every checkpoint (``data_rng``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from snexp.runtime.checkpoint import rng_state, seed_worker, set_rng_state
from snexp.runtime.run.state import RunState

__all__ = ["DataOrder"]

logger = logging.getLogger("snexp.runtime.run")  # one logger for the package


class DataOrder:
    """The order in which a run sees its data, and where in it a resumed run continues.

    Args:
        seed: ``--seed``: seeds the generator and the ``DistributedSampler`` shards.
        device: The run's device (memory is pinned for CUDA).
        rank: This process's rank.
        world_size: The number of ranks training together.
        progress: The run's state; :meth:`batches` counts ``batch_in_epoch`` there.

    Attributes:
        generator: Seeded generator of the data order (give it to DataLoaders).
        samplers: The ``DistributedSampler`` s whose epoch :meth:`begin_epoch` sets.
    """

    def __init__(self, seed: int, device: torch.device, *, rank: int, world_size: int,
                 progress: RunState) -> None:
        self.seed, self.device, self.rank, self.world_size = seed, device, rank, world_size
        self.progress = progress
        self.generator = torch.Generator().manual_seed(seed)
        self.samplers: list[DistributedSampler] = []
        self.epoch_start = self.generator.get_state()  # the generator when the epoch began
        self.skip = 0  # batches to skip on the first batches() after a mid-epoch resume

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
        :meth:`begin_epoch`), so ``batch_size`` is per rank and the effective batch is
        ``batch_size * world_size``; the workers of rank ``r > 0`` mix ``r`` into their seeds
        (:func:`snexp.runtime.checkpoint.seed_worker`), so random transforms differ across ranks
        while :attr:`generator`, and so the data order, advances alike on all of them.
        """
        kwargs.setdefault("pin_memory", self.device.type == "cuda")
        if self.world_size > 1 and "sampler" not in kwargs and "batch_sampler" not in kwargs:
            sampler = DistributedSampler(dataset, self.world_size, self.rank, shuffle=shuffle,
                                         seed=self.seed, drop_last=drop_last)
            self.samplers.append(sampler)
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

    def begin_epoch(self, epoch: int) -> None:
        """Remember the generator at the epoch's start (unless resuming into its middle) and
        give the shard samplers the epoch."""
        if self.skip == 0:
            self.epoch_start = self.generator.get_state()
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The loader's batches for this epoch; after a mid-epoch resume, only the unused ones.

        The skipped batches are loaded again (in the same order, since the loader draws its
        order from :attr:`generator`) and dropped; the global RNG states are put back after
        skipping, so random transforms continue exactly where they stopped.
        """
        skip, self.skip = self.skip, 0
        if skip:
            rng = rng_state(self.device)
            self.generator.set_state(self.epoch_start)
        for index, batch in enumerate(loader):
            if index < skip:
                if index == skip - 1:
                    set_rng_state(rng)
                continue
            self.progress.batch_in_epoch = index + 1
            yield batch

    def checkpoint_fields(self) -> dict[str, Any]:
        """The checkpoint's ``data_rng`` entry: the generator now and at the epoch's start."""
        return {"data_rng": {"now": self.generator.get_state(), "epoch_start": self.epoch_start}}

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Continue the data order where the checkpoint's run stopped."""
        self.skip = int(checkpoint["batch_in_epoch"])
        self.epoch_start = checkpoint["data_rng"]["epoch_start"]
        self.generator.set_state(checkpoint["data_rng"]["now"])
