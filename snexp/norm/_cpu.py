"""Build and load the CPU passes of SN (``csrc/switch_norm_cpu.cpp``), safely and cheaply.

The library is built once per source, compiler flags, CPU instruction set (``-march=native``)
and torch version, by ``torch.utils.cpp_extension`` (ninja; ~20-60 s), into
``<root>/snexp_cpu_<hash>/`` where ``<root>`` is ``TORCH_EXTENSIONS_DIR`` or torch's default
``~/.cache/torch_extensions/py<ver>_<cuda>``. The ops appear as ``torch.ops.snexp_cpu.*`` and
are used by :mod:`snexp.norm._mixing` for contiguous float32 or float64 CPU tensors; everything
else runs the same equations in ATen ops.

What gets loaded, and how:

- A later process loads the built library directly (``torch.ops.load_library``): no ninja run,
  no lock, no import of ``torch.utils.cpp_extension``.
- Only a library built from this source by this user is loaded: after a successful build its
  sha256 is written beside it (``<name>.sha256``) and checked before every load; the extension
  root, the build folder and both files must belong to this user and be writable by nobody
  else. Otherwise SN warns once and rebuilds in a private folder
  (``~/.cache/snexp/torch_extensions``), or runs the ATen passes where that is unsafe too.
- Builds are serialized by an OS lock (``flock``) that dies with its holder, so a build killed
  midway never leaves a later process waiting; under it, a leftover ``lock`` file of older
  torch releases (whose file lock waits forever once its holder died) is removed, and the
  folder is cleared of anything not built under our lock.
- torch's "No CUDA runtime is found, using CUDA_HOME=..." message, printed when
  ``cpp_extension`` is imported on a machine without CUDA, is kept out of the console.

``SNEXP_BACKEND=aten`` (or the older ``SNEXP_CPU_KERNEL=0``) skips the build (ATen ops only);
``SNEXP_BACKEND=cpu`` makes a failed build an error. Otherwise, where no C++ compiler is found or
the build fails, the passes fall back to ATen ops with one warning that says why; the tests load
with ``strict=True``, so a broken source fails them instead of passing for a missing compiler.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import stat
import sys
import warnings
from pathlib import Path

import torch

from snexp.norm import _backend

__all__ = ["available", "load", "usable"]

SOURCE = Path(__file__).with_name("csrc") / "switch_norm_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_DTYPES = (torch.float32, torch.float64)
_LOCK = "snexp-build.lock"  # ours (flock); "lock" is torch's own
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    """The CPU's instruction-set flags (a build for one CPU must not run on another)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _name() -> str:
    # "v2": the loader that records hashes; a folder of the earlier loader is never reused
    key = hashlib.sha256(b"v2" + SOURCE.read_bytes() + " ".join(_FLAGS).encode()
                         + _cpu_signature().encode() + torch.__version__.encode())
    return f"snexp_cpu_{key.hexdigest()[:12]}"


def _default_root() -> Path:
    """torch's extension root (``torch.utils.cpp_extension._get_build_directory``'s rule)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    cu = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path.home() / ".cache" / "torch_extensions" / f"{py}_{cu}"


def _private_root() -> Path:
    return Path.home() / ".cache" / "snexp" / "torch_extensions"


def unsafe(path: Path) -> str | None:
    """Why ``path`` must not be trusted (a link, another owner, writable by others), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _no_write_for_others(path: Path) -> None:
    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents writable by this user only, whatever the umask
    (with umask 002 they would be group-writable, and then refused at the next load)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        _no_write_for_others(folder)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(folder: Path, name: str) -> Path | None:
    """The built library in ``folder`` if its recorded sha256 matches and all is private."""
    lib, record = folder / f"{name}.so", folder / f"{name}.sha256"
    if not (lib.is_file() and record.is_file()):
        return None
    if any(unsafe(p) for p in (folder.parent, folder, lib, record)):
        return None
    try:
        return lib if record.read_text().strip() == _sha256(lib) else None
    except OSError:
        return None


@contextlib.contextmanager
def build_lock(folder: Path):
    """Hold an exclusive OS lock on ``folder`` (released by the kernel if the holder dies)."""
    import fcntl

    fd = os.open(folder / _LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


class _NoCudaHomeNotice(logging.Filter):
    """Drops cpp_extension's "No CUDA runtime is found, using CUDA_HOME=..." notice, logged
    at its import on every CPU-only machine with a CUDA toolkit (by SN's build and by
    inductor's CPU code generation alike): nothing there needs CUDA, so users need not see it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaHomeNotice())


def _build(folder: Path, name: str, verbose: bool) -> Path:
    """Build under the lock (clearing anything not built under it) and record the hash."""
    make_private_dirs(folder)
    with build_lock(folder):
        lib = _verified(folder, name)
        if lib is not None:  # another process built it while we waited
            return lib
        for entry in folder.iterdir():
            # a library without a matching record (a killed build, or planted) is never
            # trusted, nor its objects; older torch's "lock" file would wait forever
            if entry.name == _LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        from torch.utils import cpp_extension

        cpp_extension.load(name, [str(SOURCE)], extra_cflags=_FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False,
                           build_directory=str(folder), verbose=verbose)
        lib = folder / f"{name}.so"
        tmp = folder / f"{name}.sha256.tmp"
        tmp.write_text(_sha256(lib) + "\n")
        for path in (lib, tmp):
            _no_write_for_others(path)
        os.replace(tmp, folder / f"{name}.sha256")
        return lib


def _choose_root(root: Path) -> Path | None:
    """``root``, or a private one (with a warning) where ``root`` is not safe; None: ATen."""
    reason = next(filter(None, (unsafe(p) for p in (root, root / _name()))), None)
    if reason is None:
        return root
    private = _private_root()
    make_private_dirs(private)
    fallback = unsafe(private) or unsafe(private / _name())
    where = (f"builds its own copy in {private} instead" if fallback is None else
             f"runs its ATen passes instead ({fallback})")
    warnings.warn(f"snexp: not loading SN's C++ CPU passes from {root}: {reason}. Anyone who "
                  f"can write there could plant a library that this process would run, so SN "
                  f"{where}. Point TORCH_EXTENSIONS_DIR at a folder only you can write to "
                  f"(chmod go-w) to share one build between your processes.", stacklevel=4)
    return private if fallback is None else None


def load(*, strict: bool = False, verbose: bool = False) -> bool:
    """Load the C++ passes (building them the first time); True when ``torch.ops.snexp_cpu``
    is there.

    Args:
        strict: raise instead of warning when a compiler exists but the build fails.
        verbose: show the compiler's output.

    Raises:
        RuntimeError: with ``strict``, a compiler exists but the build or load failed.
    """
    if "loaded" in _state:
        if _state.get("error") and (strict or _backend.setting() == "cpu"):
            raise RuntimeError(_state["error"])
        return bool(_state["loaded"])
    _state["loaded"] = False
    if _backend.setting() in ("aten", "triton"):
        return False
    strict = strict or _backend.setting() == "cpu"
    name = _name()
    root = _default_root()
    lib = _verified(root / name, name)
    if lib is None:
        if _compiler() is None:
            if _backend.setting() == "cpu":
                _state["error"] = ("snexp: SNEXP_BACKEND=cpu asks for SN's C++ CPU passes, but "
                                   "no C++ compiler is found (install g++, or unset it)")
                raise RuntimeError(_state["error"])
            warnings.warn("snexp: no C++ compiler found; SN's CPU passes run as ATen ops "
                          "(slower). Install g++ to build snexp/norm/csrc/switch_norm_cpu.cpp.",
                          stacklevel=3)
            return False
        chosen = _choose_root(root)
        if chosen is None:
            return False
        try:
            lib = _build(chosen / name, name, verbose)
        except Exception as e:
            _state["error"] = (f"snexp: building {SOURCE} failed ({type(e).__name__}: {e}); "
                               f"SN's CPU passes run as ATen ops (slower). SNEXP_BACKEND=aten "
                               f"skips the build.")
            if strict:
                raise RuntimeError(_state["error"]) from e
            warnings.warn(_state["error"], stacklevel=3)
            return False
    if not hasattr(torch.ops.snexp_cpu, "in_stats"):  # cpp_extension.load may have loaded it
        torch.ops.load_library(str(lib))
    _state["loaded"] = True
    return True


def available() -> bool:
    """Whether the C++ passes are loaded (building them on first call)."""
    return load()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the C++ passes apply: plain, contiguous float32/float64 CPU tensors of one
    dtype (traced ones, e.g. under ``torch.compile``, take the ATen ops, which inductor fuses).
    """
    # called a few times per SN call: plain loops and attribute checks, no generator
    x = tensors[0]
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype not in _DTYPES:
        return False
    dtype = x.dtype
    for t in tensors:
        if t.dtype != dtype or not t.is_contiguous():
            return False
    return _state.get("loaded") is True or available()
