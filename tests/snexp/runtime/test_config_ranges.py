"""Value ranges of config fields (``Range``), finite floats, and resuming a config with nan."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pytest

from snexp.runtime.config import ConfigError, Range, RuntimeConfig, flatten, resolve_config
from snexp.runtime.run.resume import check_resumable, plain_values


@dataclass(frozen=True)
class Opt:
    lr: Annotated[float, Range(gt=0)] = 0.1  # learning rate
    keep: Annotated[float, Range(gt=0, le=1)] = 0.5  # keep probability
    size: Annotated[int, Range(ge=1)] = 32  # image side
    decay: float = 0.9  # a plain float: finite only
    floor: Annotated[float, Range(finite=False)] | None = None  # may be -inf or nan
    betas: tuple[Annotated[float, Range(ge=0, lt=1)], ...] = (0.9, 0.99)  # per item


@dataclass(frozen=True)
class Cfg:
    opt: Opt = field(default_factory=Opt)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


@pytest.mark.parametrize("setting, message", [
    ("opt.lr=-1", "--set opt.lr=-1: opt.lr must be > 0, got -1.0"),
    ("opt.lr=0", "--set opt.lr=0: opt.lr must be > 0, got 0.0"),
    ("opt.lr=1e400", "--set opt.lr=1e400: opt.lr must be a finite number (not nan or inf; a "
                     "literal such as 1e400 overflows to inf), got inf"),
    ("opt.decay=nan", "--set opt.decay=nan: opt.decay must be a finite number (not nan or inf; "
                      "a literal such as 1e400 overflows to inf), got nan"),
    ("opt.keep=1.5", "--set opt.keep=1.5: opt.keep must be > 0 and <= 1, got 1.5"),
    ("opt.size=0", "--set opt.size=0: opt.size must be >= 1, got 0"),
    ("opt.betas=0.9,1.0", "--set opt.betas=0.9,1.0: opt.betas[1] must be >= 0 and < 1, got 1.0"),
    ("runtime.seed=18446744073709551616", "--set runtime.seed=18446744073709551616: "
     "runtime.seed must be >= 0 and < 2**64, got 18446744073709551616"),
    ("runtime.seed=-1", "--set runtime.seed=-1: runtime.seed must be >= 0 and < 2**64, got -1"),
])
def test_values_outside_a_range_are_refused_naming_key_and_range(setting, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(Cfg, sets=[setting])
    assert str(info.value) == message


def test_values_inside_ranges_and_opted_out_non_finite_floats_pass(tmp_path):
    cfg = resolve_config(Cfg, sets=["opt.lr=1e-5", "opt.keep=1", "opt.floor=-inf",
                                    "runtime.seed=18446744073709551615"])
    assert (cfg.opt.lr, cfg.opt.keep, cfg.opt.floor) == (1e-5, 1.0, -math.inf)
    assert math.isnan(resolve_config(Cfg, sets=["opt.floor=nan"]).opt.floor)
    # A TOML file is checked like a flag.
    path = Path(tmp_path) / "c.toml"
    path.write_text("[opt]\nlr = -0.5\n")
    with pytest.raises(ConfigError, match=r"c.toml: opt.lr must be > 0, got -0.5"):
        resolve_config(Cfg, files=[path])


def test_a_config_holding_nan_can_be_resumed():
    # nan != nan, yet a run whose config holds nan (where allowed) resumes.
    cfg = resolve_config(Cfg, sets=["opt.floor=nan"])
    checkpoint = {"format": 1, "config": plain_values(flatten(cfg)), "step": 0, "epoch": 0,
                  "batch_in_epoch": 0, "best": None, "state": {}, "objects": {}, "scaler": {},
                  "rng": {}, "data_rng": {}}
    check_resumable(checkpoint, cfg, Path("last.pt"), folder=Path("run"), safe_keys=())
    changed = resolve_config(Cfg, sets=["opt.floor=1"])
    with pytest.raises(ConfigError, match=r"opt.floor \(nan -> 1.0\)"):
        check_resumable(checkpoint, changed, Path("last.pt"), folder=Path("run"), safe_keys=())


def test_a_checkpoint_missing_keys_is_refused_on_resume():
    cfg = resolve_config(Cfg)
    checkpoint = {"format": 1, "config": plain_values(flatten(cfg)), "step": 3}
    with pytest.raises(ConfigError) as info:
        check_resumable(checkpoint, cfg, Path("run/last.pt"), folder=Path("run"), safe_keys=())
    assert str(info.value) == (
        "cannot resume from run/last.pt: the checkpoint lacks epoch, batch_in_epoch, best, "
        "state, objects, scaler, rng, data_rng, so it was not written by a complete snexp run; "
        "start a new run with another --out"
    )


@pytest.mark.parametrize("name", ["nas.config:SearchConfig", "nas.config:RetrainConfig",
                                  "stylize.config:StylizeConfig", "stylize.tune_loop:TuneConfig"])
def test_every_experiment_default_is_inside_its_range(name):
    # The defaults in code pass the same checks as a user's values.
    import importlib

    from snexp.runtime.config import override

    module, cls = name.split(":")
    config = getattr(importlib.import_module(module), cls)()
    assert override(config, flatten(config)) == config
