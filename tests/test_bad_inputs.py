"""Bad inputs through the real entry points, each in its own process.

Rule: a user's mistake ends with exit status 2 and one paragraph on stderr naming what was
wrong (never a traceback), and nothing the user had is changed: the whole working folder,
a previous run directory included, is byte for byte what it was (no run directory is left
behind either). Full disks and read-only folders cannot be made here without privileges, so
those two cases patch the one call that would fail, then run the entry point with ``runpy``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fs_snapshot import snapshot
from PIL import Image

from snexp.runtime.marker import write_marker

REPO = Path(__file__).resolve().parents[1]

# Patches for the cases that need a broken disk, then the entry point as `python -m` runs it.
_FULL_DISK = """
import runpy, sys
import snexp.runtime.run.session as core
def full(path, text):
    raise OSError(28, "No space left on device", str(path))
core.write_text_atomic = full
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
_READ_ONLY_APPLY = """
import runpy, sys
import stylize.apply_loop as apply_loop
apply_loop.os.access = lambda path, mode: False  # a read-only folder's answer (root ignores it)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
_READ_ONLY = """
import runpy, sys
import snexp.runtime.run.directory as directory
directory.os.access = lambda path, mode: False  # what a read-only folder answers
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def previous_run(folder: Path) -> None:
    """A finished run directory: stamped, with a checkpoint and a model (fake bytes)."""
    (folder / "prev/checkpoints").mkdir(parents=True)
    write_marker(folder / "prev", "some-experiment", ["model.pt"])
    (folder / "prev/checkpoints/last.pt").write_bytes(b"the previous run's checkpoint")
    (folder / "prev/model.pt").write_bytes(b"the previous run's model")
    (folder / "prev/config.toml").write_text("# the previous run's config\n")


def project_root(folder: Path) -> None:
    (folder / "config.toml").write_text("[project]\nname = 'mine'\n")
    (folder / "src").mkdir()
    (folder / "src/important.py").write_text("print('do not delete me')\n")


def style_image(folder: Path) -> None:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "style.png")


def junk_file(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text("my own data, not a database\n")


def sn_checkpoints(folder: Path) -> None:
    import snexp

    state = torch.nn.Sequential(snexp.SwitchNorm2d(8)).state_dict()
    torch.save({k: v for k, v in state.items() if not k.endswith("var_weight")},
               folder / "missing.pt")
    torch.save(state, folder / "sn.pt")
    (folder / "zero.pt").write_bytes(b"")


def images(folder: Path) -> None:
    """A 1x1 and a 1000x3 picture, a folder of truncated photos, and a small model."""
    from stylize.config import ModelConfig
    from stylize.saved import save_model
    from stylize.train_loop import build_network

    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    Image.new("RGB", (1000, 3)).save(folder / "strip.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(folder / "photo.png")
    (folder / "photos").mkdir()
    whole = (folder / "photo.png").read_bytes()
    for i in range(3):
        (folder / f"photos/p{i}.png").write_bytes(whole[: len(whole) // 3])
    save_model(folder / "model.pt", build_network(ModelConfig(width=0.25, blocks=1), 1),
               styles=["style"])


def bad_arch(folder: Path) -> None:
    (folder / "arch.json").write_text('{"normal": 5}')


def symlinked_run(folder: Path) -> None:
    previous_run(folder)
    (folder / "link").symlink_to(folder / "prev")


def planted_lock(folder: Path) -> None:
    """The attack of issue 20: a run folder holding only a link from its lock to a victim."""
    (folder / "victim.txt").write_text("KEEP\n")
    (folder / "runs/lk").mkdir(parents=True)
    (folder / "runs/lk/.snexp-lock").symlink_to("../../victim.txt")


def nul_config(folder: Path) -> None:
    (folder / "nul.toml").write_text('[runtime]\nout = "runs/a\\u0000b"\n')


def deep_arch(folder: Path) -> None:
    (folder / "deep.json").write_text("[" * 50_000 + "]" * 50_000)


def hand_made_models(folder: Path) -> None:
    """model.pt files edited by hand: an unknown norm, a negative width, styles as a number."""
    images(folder)
    good = torch.load(folder / "model.pt", weights_only=True)
    for name, change in (("zz", {"norm": "zz"}), ("width", {"width": -1.0}),
                         ("styles", {"styles": 5})):
        torch.save({**good, **change}, folder / f"{name}.pt")


@dataclass(frozen=True)
class Case:
    module: str
    args: tuple[str, ...]
    message: str  # expected in stderr (whitespace-normalized)
    setup: tuple[Callable[[Path], None], ...] = ()
    patch: str | None = None
    in_loop: bool = False  # found while the run builds its data: a log line may come first


FAST = ("--device", "cpu")
CASES = {
    # What the README promises for every entry point: unknown key, wrong type, invalid choice,
    # missing file.
    "unknown-key": Case("nas.search", ("--set", "train.lrr=1"),
                        "unknown key 'train.lrr'; did you mean 'train.lr_min' or 'train.lr_max'?"),
    "wrong-type": Case("nas.search", ("--epochs", "three"),
                       "--epochs: train.epochs expects an integer, got 'three'"),
    "invalid-choice": Case("nas.search", ("--norm", "sm"),
                           "child.norm: unknown norm kind 'sm'; valid kinds: sn, ssn, bn, in, "
                           "ln, gn, none"),
    "missing-config": Case("nas.search", ("--config", "nope.toml"),
                           "config file 'nope.toml' not found"),
    # A norm spec whose options the layer refuses, or a norm the controller cannot take.
    "norm-groups": Case("nas.search", ("--norm", "gn(groups=3)"),
                        "child.norm 'gn(groups=3)': groups=3 must divide filters=16 (every width "
                        "of the child is a multiple of filters); write --norm 'gn(groups=4)'"),
    "controller-norm-bn": Case("nas.search", ("--set", "controller.norm=bn"),
                               "controller.norm 'bn': the LSTM normalizes one sample at a time, "
                               "so its norm is one of none, ln, gn, sn"),
    # Values outside their range, before anything starts.
    "negative-lr": Case("nas.search", ("--set", "train.lr_max=-1"), "lr_max"),
    "overflowing-lr": Case("nas.search", ("--set", "train.lr_max=1e400"),
                           "train.lr_max must be a finite number"),
    "nan-lr": Case("stylize.train", ("--style", "style.png", "--lr", "nan"),
                   "train.lr must be a finite number", (style_image,)),
    "size-zero": Case("nas.search", ("--set", "data.size=0"), "data.size must be >= 1, got 0"),
    "seed-beyond-64-bits": Case("nas.train", ("--seed", str(2**64)),
                                "runtime.seed must be >= 0 and < 2**64"),
    # Storages.
    "storage-not-a-db": Case("nas.search", ("--storage", "notadb.db"),
                             "notadb.db exists but is not a SQLite database",
                             (junk_file("notadb.db"),)),
    "storage-unknown-url": Case("stylize.tune", ("--style", "style.png", "--storage",
                                                 "foo://bar"),
                                "'foo' is not a database SQLAlchemy knows", (style_image,)),
    # Run directories: nothing the user made is deleted, the previous run survives a typo.
    "overwrite-project-root": Case("nas.search", ("--out", ".", "--overwrite"),
                                   "has no .snexp-run stamp, so it is not a run directory",
                                   (project_root,)),
    "overwrite-symlink": Case("nas.search", ("--out", "link", "--overwrite"),
                              "is a symbolic link", (symlinked_run,)),
    "overwrite-with-bad-storage": Case("nas.search", ("--out", "prev", "--overwrite",
                                                      "--storage", "foo://bar"),
                                       "'foo' is not a database", (previous_run,)),
    "overwrite-with-missing-style": Case("stylize.train", ("--out", "prev", "--overwrite",
                                                           "--style", "stlye.png"),
                                         "style image(s) not found: stlye.png",
                                         (previous_run,)),
    "overwrite-with-typo-in-content-dir": Case(
        "stylize.train", ("--out", "prev", "--overwrite", "--style", "style.png",
                          "--content-dir", "photso"),
        "--content-dir photso", (previous_run, style_image)),
    "overwrite-with-missing-dataset": Case("nas.search", ("--out", "prev", "--overwrite",
                                                          "--dataset", "cifar10",
                                                          "--data-root", "nowhere"),
                                           "cifar10 not found in 'nowhere'", (previous_run,)),
    "resume-without-checkpoint": Case("nas.search", ("--out", "nowhere", "--resume"),
                                      "cannot resume: nowhere does not exist"),
    "read-only-out": Case("nas.search", ("--out", "run"), "is not writable", patch=_READ_ONLY),
    "full-disk": Case("nas.search", ("--out", "run"), "No space left on device",
                      patch=_FULL_DISK),
    # Files given to the tools.
    "arch-json-not-a-cell": Case("nas.train", ("--arch", "arch.json"),
                                 "architecture JSON needs 'normal' and 'reduce' keys",
                                 (bad_arch,)),
    "style-1x1": Case("stylize.train", ("--style", "dot.png"), "dot.png is 1x1 pixels",
                      (images,)),
    "content-truncated": Case("stylize.train", ("--style", "photo.png", "--content-dir",
                                                "photos"),
                              "the files are truncated or corrupt", (images,)),
    "apply-1x1": Case("stylize.apply", ("--model", "model.pt", "--input", "dot.png",
                                        "--output", "out.png"),
                      "--input dot.png is 1x1 pixels", (images,)),
    "apply-1000x3": Case("stylize.apply", ("--model", "model.pt", "--input", "strip.png",
                                           "--output", "out.png"),
                         "--input strip.png is 1000x3 pixels", (images,)),
    "apply-output-without-extension": Case("stylize.apply", ("--model", "model.pt", "--input",
                                                             "photo.png", "--output", "out"),
                                           "is not an image file extension", (images,)),
    "apply-zero-byte-model": Case("stylize.apply", ("--model", "zero.pt", "--input", "style.png",
                                                    "--output", "out.png"),
                                  "zero.pt' is empty (0 bytes)", (sn_checkpoints, style_image)),
    "sn-empty-candidates": Case("stylize.train", ("--style", "style.png", "--set",
                                                  "model.candidates=[]"),
                                "candidates must name at least one of", (style_image,)),
    "sn-unknown-candidate": Case("stylize.train", ("--style", "style.png", "--set",
                                                   "model.candidates=in,xx"),
                                 "unknown candidate 'xx'", (style_image,)),
    "sn-unknown-candidate-in-spec": Case("stylize.train", ("--style", "style.png", "--norm",
                                                           "sn(candidates=in+xx)"),
                                         "unknown candidate 'xx'", (style_image,)),
    "gn-groups-not-dividing": Case("stylize.train", ("--style", "style.png", "--norm",
                                                     "gn(groups=5)"),
                                   "gn groups=5 must divide the widths [32, 64, 128]; set "
                                   "model.norm=gn(groups=G) with G dividing them",
                                   (style_image,)),
    "norm-spec-unclosed": Case("stylize.train", ("--style", "style.png", "--norm", "sn(momentum"),
                               "model.norm: norm spec 'sn(momentum'", (style_image,)),
    "inspect-zero-byte": Case("snexp.inspect", ("zero.pt",), "zero.pt' is empty (0 bytes)",
                              (sn_checkpoints,)),
    "inspect-png-missing-folder": Case("snexp.inspect", ("sn.pt", "--png", "nodir/x.png"),
                                       "folder 'nodir' does not exist", (sn_checkpoints,)),
    # Issue 20: links planted in a run folder, settings beyond float32, names the file system
    # cannot hold, JSON nested too deep, hand-edited model files, stray spellings.
    "planted-lock-link": Case("nas.search", ("--out", "runs/lk"),
                              "runs/lk/.snexp-lock is a symbolic link (to ../../victim.txt); "
                              "snexp never writes through links", (planted_lock,)),
    "lr-beyond-float32": Case("nas.search", ("--set", "train.lr_max=1e300"),
                              "train.lr_max must be a finite float32 number"),
    "out-with-nul": Case("nas.search", ("--config", "nul.toml"),
                         "runtime.out holds a NUL character", (nul_config,)),
    "out-300-characters": Case("nas.search", ("--out", "r" * 300),
                               "is 300 bytes long, more than the 255 the file system allows"),
    "arch-nested-50000-deep": Case("nas.train", ("--arch", "deep.json"),
                                   "its JSON is nested too deeply", (deep_arch,)),
    "arch-negative-op": Case("nas.train", ("--arch", "[0,0,1,-4,0,0,1,4]"),
                             "op index -4 is invalid"),
    "arch-json-list-not-a-file": Case("nas.train", ("--arch", "[[0,0],[1,4]]"),
                                      "a flat architecture is a list of integers"),
    "model-unknown-norm": Case("stylize.apply", ("--model", "zz.pt", "--input", "photo.png",
                                                 "--output", "out.png"),
                               "zz.pt' is not a usable stylize model", (hand_made_models,)),
    "model-negative-width": Case("stylize.apply", ("--model", "width.pt", "--input",
                                                   "photo.png", "--output", "out.png"),
                                 "its width is -1.0, not a number in (0, 64]",
                                 (hand_made_models,)),
    "model-styles-a-number": Case("stylize.apply", ("--model", "styles.pt", "--input",
                                                    "photo.png", "--output", "out.png"),
                                  "its styles is 5, not a non-empty list of names",
                                  (hand_made_models,)),
    "model-a-folder": Case("stylize.apply", ("--model", "prev", "--input", "style.png",
                                             "--output", "out.png"),
                           "'prev' is a folder, not a checkpoint or model file; did you mean "
                           "'prev/model.pt'?", (previous_run, style_image)),
    "apply-read-only-output": Case("stylize.apply", ("--model", "model.pt", "--input",
                                                     "photo.png", "--output", "out/x.png"),
                                   "is not writable (read-only folder or file system)",
                                   (images,), patch=_READ_ONLY_APPLY),
    "apply-size-zero": Case("stylize.apply", ("--model", "model.pt", "--input", "photo.png",
                                              "--output", "out.png", "--size", "0"),
                            "--size 0: the network needs at least 16 px", (images,)),
    "apply-size-negative": Case("stylize.apply", ("--model", "model.pt", "--input", "photo.png",
                                                  "--output", "out.png", "--size", "-5"),
                                "--size -5: the network needs at least 16 px", (images,)),
    "storage-empty": Case("nas.search", ("--storage", ""), "--storage is empty"),
    "study-empty": Case("nas.search", ("--study", ""), "--study is empty"),
    "epochs-arabic-digit": Case("nas.search", ("--epochs", "\u0661"),
                                "--epochs: train.epochs expects an integer, got '\u0661'"),
    "inspect-missing-keys": Case("snexp.inspect", ("missing.pt",),
                                 "layer '0' has mean_weight but no var_weight", (sn_checkpoints,)),
}


# One case per kind runs in the fast suite; each case starts a Python with torch (~4 s).
FAST_CASES = ("seed-beyond-64-bits", "storage-not-a-db", "overwrite-project-root",
              "overwrite-with-typo-in-content-dir", "full-disk", "inspect-zero-byte",
              "planted-lock-link", "lr-beyond-float32", "model-unknown-norm",
              "apply-read-only-output", "overwrite-with-missing-dataset")


@pytest.mark.parametrize("name", [
    name if name in FAST_CASES else pytest.param(name, marks=pytest.mark.slow) for name in CASES
])
def test_a_bad_input_is_one_paragraph_and_changes_nothing(name, tmp_path):
    case = CASES[name]
    for make in case.setup:
        make(tmp_path)
    before = snapshot(tmp_path)
    args = [*case.args, *(FAST if case.module != "snexp.inspect" else ())]
    command = ([sys.executable, "-c", case.patch, case.module, *args] if case.patch
               else [sys.executable, "-m", case.module, *args])
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"})
    stderr = " ".join(proc.stderr.split())
    # Status 2, one message naming the mistake, no traceback.
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    prefix = f"python -m {case.module}: error: "
    assert stderr.startswith(prefix) or (case.in_loop and prefix in stderr), stderr
    assert case.message in stderr, stderr
    # Nothing the user had changed (a replaced run is put back), no run directory left behind.
    assert snapshot(tmp_path) == before
