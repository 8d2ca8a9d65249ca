"""Checkpoint files and reproducibility state: atomic save, safe load, RNG capture, seeding.

A checkpoint is one dict of plain containers and tensors, written atomically (a uniquely named
temporary file, fsync, ``os.replace``) and read with ``torch.load(weights_only=True)``: a SIGKILL
at any moment leaves the previous checkpoint intact, and loading never executes code. The RNG
helpers capture python, numpy (its bit_generator state, with the key as a tensor so that
``weights_only`` reads it) and torch CPU/CUDA/MPS generators, so that a resumed run draws the
same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from snexp.norm.importance import load_weights
from snexp.runtime.config import ConfigError
from snexp.runtime.files import has_credentials, replace_atomic
from snexp.runtime.marker import record_output

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "rank_seed", "rng_state", "save_checkpoint",
           "seed_everything", "seed_worker", "set_rng_state", "unwrap_model", "write_file_atomic",
           "write_text_atomic"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1  # bump when the checkpoint layout changes


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(obj: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` atomically: temporary file, fsync, ``os.replace``.

    If the process dies at any moment, ``path`` holds either the old or the new checkpoint,
    never a torn one. The temporary file has a unique name (``.last.pt.<random>.tmp``), so two
    writers never write into one file; a run removes those a killed write left behind. Inside a
    run directory the file is listed as the run's output (:mod:`snexp.runtime.marker`). The
    file gets the umask's permissions, owner-only if its ``config`` holds a password.

    Raises:
        OSError: The write failed; a full disk too, which ``torch.save`` itself reports as a
            ``RuntimeError`` (:func:`snexp.runtime.files.replace_atomic`).

    Args:
        obj: Plain containers, numbers, strings and tensors (what ``weights_only`` loads).
        path: Destination file.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    config = obj.get("config")
    private = isinstance(config, Mapping) and has_credentials(repr(config))  # lists too
    replace_atomic(path, lambda f: torch.save(obj, f), binary=True, private=private)
    _fsync_dir(path.parent)
    record_output(path)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (unique temporary file, fsync, ``os.replace``).

    Inside a run directory the file is listed as the run's output (:mod:`snexp.runtime.marker`).
    A text holding a password (a storage URL) is written owner-only.
    """
    replace_atomic(path, lambda f: f.write(text), binary=False, private=has_credentials(text))
    record_output(path)


def write_file_atomic(path: str | Path, write: Callable[[IO[Any]], object], *,
                      binary: bool = True) -> Path:
    """Write ``path`` by calling ``write(file)``, atomically, and list it as the run's output.

    The recorded writer for files other than checkpoints and text (a figure:
    ``write_file_atomic(p, lambda f: fig.savefig(f, format="png"))``): written as
    :func:`save_checkpoint` writes, so ``--overwrite`` knows it is snexp's.
    """
    path = Path(path)
    replace_atomic(path, write, binary=binary)
    record_output(path)
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``: it never executes code.

    Args:
        path: Checkpoint file.
        map_location: Where tensors go (default CPU; ``load_state_dict`` moves them on).

    Returns:
        The checkpoint dict.

    Raises:
        ConfigError: The file is missing, a folder, empty, torn, not a dict, or holds objects
            other than plain data and tensors (a pickled object that would run code is
            refused, not loaded): :func:`snexp.norm.importance.load_weights`'s checks.
    """
    try:
        obj = load_weights(path, map_location=map_location)  # the layers' one safe torch.load
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint '{path}' is a {type(obj).__name__}, not a dict")
    return obj


def unwrap_model(obj: Any) -> Any:
    """The plain module inside torch.compile and (Distributed)DataParallel wrappers."""
    parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while True:
        if isinstance(obj, parallel):
            obj = obj.module
        elif isinstance(obj, torch.nn.Module) and isinstance(
            getattr(obj, "_orig_mod", None), torch.nn.Module
        ):
            obj = obj._orig_mod
        else:
            return obj


# ----------------------------------------------------------------------------- RNG, seeds


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and all GPUs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank`` derived from ``seed``: ``seed`` itself on rank 0.

    Other ranks get a 64-bit seed mixed from both by numpy's ``SeedSequence``, distinct per
    ``(seed, rank)`` and the same on every call.

    Args:
        seed: A non-negative seed (a DataLoader worker's ``torch.initial_seed()``).
        rank: The process's rank under torchrun (0 in a single process).
    """
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: seed python and numpy from the worker's torch seed.

    Torch seeds each worker from the loader's generator; python and numpy would otherwise
    repeat the parent's state in every worker. Under torchrun every rank's loader draws from a
    generator seeded alike (the data order must agree), so its workers would repeat the same
    random crops and flips on every rank: pass ``rank`` (``functools.partial(seed_worker,
    rank=r)``) and rank ``r > 0`` first reseeds torch with :func:`rank_seed`. Rank 0 keeps
    torch's seed, so a single process draws what it always did. Workers also ignore SIGINT, so
    Ctrl-C reaches only the main process, which stops gracefully.

    Args:
        worker_id: The worker's index (the DataLoader passes it; unused).
        rank: This process's rank (default 0).
    """
    # NOTE: torch.utils.data.get_worker_info().seed still shows torch's unmixed seed.
    if rank:
        torch.manual_seed(rank_seed(torch.initial_seed(), rank))
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The state of every random generator a run draws from, as weights_only-loadable data."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np_state,  # bit_generator state; the key as a tensor, which weights_only reads
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_as_tuple(state["python"]))
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"])
    np_state["state"]["key"] = np_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda is not None:
        logger.warning("CUDA RNG state not restored: the checkpoint was written on other GPUs")
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
