"""The architecture proposer of a data-parallel search: it lives on rank 0, its decisions are
broadcast.

Under ``torchrun`` every rank trains the same shared child on its own shard of a batch (DDP
averages the gradients), so every rank must run the same sampled architecture in each step.
One proposer (the LSTM controller, random search or TPE with its Optuna study) exists, on
rank 0; :class:`BroadcastProposer` stands in for it on every rank: ``ask``, ``train_sample``
and ``derive`` return rank 0's architectures on all ranks (one object broadcast, as flat
lists), ``tell`` updates rank 0's proposer with rewards all ranks computed together
(:func:`nas.search_loop.evaluate` sums the ranks' counts) and hands its metrics to all.

# NOTE: proposing on rank 0 alone (rather than one proposer per rank kept in step) is the
# simplest design that is right for all three proposers: TPE's trials live in a shared
# storage, which exactly one process may write; and the controller's samples draw from rank
# 0's RNG exactly as a single process's do, so a K-rank search with ``--sync-norm`` proposes
# what one process with the K-times batch proposes (tests/nas/test_nas_ddp.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from nas.proposers import Proposer
from nas.space import PRIMITIVES, Architecture
from snexp.runtime import distributed

__all__ = ["BroadcastProposer"]


class BroadcastProposer:
    """A :class:`~nas.proposers.Proposer` whose decisions rank 0's proposer makes for all ranks.

    Every method is collective: all ranks call it at the same point with the same arguments.

    Args:
        inner: The proposer on rank 0; ``None`` on the other ranks.
        name: The proposer's name (``lstm``, ``random``, ``tpe``), known on every rank.
        primitives: The op names of the architectures' flat encoding.

    Example:
        >>> proposer = build_proposer(...) if run.is_main else None  # doctest: +SKIP
        >>> proposer = BroadcastProposer(proposer, name=cfg.controller.kind)  # doctest: +SKIP
    """

    def __init__(self, inner: Proposer | None, *, name: str,
                 primitives: tuple[str, ...] = PRIMITIVES) -> None:
        if (inner is None) == distributed.is_main_process():
            raise ValueError("BroadcastProposer: give the proposer on rank 0 and None elsewhere")
        self.inner, self.name, self.primitives = inner, name, tuple(primitives)

    def _agreed(self, propose: Callable[[Proposer], list[Architecture]]) -> list[Architecture]:
        flat = [a.to_flat() for a in propose(self.inner)] if self.inner is not None else None
        return [Architecture.from_flat(f, self.primitives)
                for f in distributed.broadcast_object(flat)]

    def ask(self, n: int) -> list[Architecture]:
        """``n`` architectures to reward, proposed on rank 0."""
        return self._agreed(lambda p: p.ask(n))

    def train_sample(self, n: int) -> list[Architecture]:
        """``n`` architectures to train the shared weights with, sampled on rank 0."""
        return self._agreed(lambda p: p.train_sample(n))

    def derive(self, n: int) -> list[Architecture]:
        """Rank 0's candidates of the derive step (a TPE proposer may give fewer than ``n``)."""
        return self._agreed(lambda p: p.derive(n))

    def tell(self, archs: Sequence[Architecture], rewards: Sequence[float]) -> dict[str, float]:
        """Update rank 0's proposer; every rank gets its metrics."""
        metrics = self.inner.tell(archs, rewards) if self.inner is not None else None
        return distributed.broadcast_object(metrics)

    def state_dict(self) -> dict[str, Any]:
        """Rank 0's proposer state (the one checkpoints hold); empty on the other ranks."""
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore rank 0's proposer; the other ranks hold none."""
        if self.inner is not None:
            self.inner.load_state_dict(state)
