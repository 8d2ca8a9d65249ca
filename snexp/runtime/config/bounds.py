"""Value ranges of config fields: ``Annotated[float, Range(gt=0)]``, checked as values arrive.

A field declares its range in its type, so the check, ``--help`` and the error message share
one source::

    lr: Annotated[float, Range(gt=0)] = 1e-3  # Adam learning rate
    seed: Annotated[int, Range(ge=0, lt=2**64)] = 0  # seed of every generator

Every ``float`` field, annotated or not, must also be finite (no ``nan``, ``inf``, nor a
literal such as ``1e400`` that overflows to ``inf``, nor beyond float32's range, such as
``1e300``, which becomes ``inf`` in a tensor) unless it says ``Range(finite=False)``: a
learning rate or a loss weight of ``nan`` is always a mistake, and it would stop ``--resume``
(``nan != nan``). :func:`_check_range` is called by :mod:`snexp.runtime.config.resolve` for
every setting of a file, a flag or ``--set``; a violation is a
:class:`~snexp.runtime.config.ConfigError` naming the key, the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Annotated, Any

from snexp.runtime.config.errors import ConfigError

__all__ = ["Range"]


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field: bounds (``None``: open) and finiteness.

    Args:
        gt: Values must be greater than this.
        ge: Values must be at least this.
        lt: Values must be less than this.
        le: Values must be at most this.
        finite: Floats must be finite (the default; ``False`` admits ``nan`` and ``inf``).

    Example:
        >>> Range(gt=0).describe()
        '> 0'
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    finite: bool = True

    def describe(self) -> str:
        """The range in words, e.g. ``'>= 0 and < 2**64'``."""
        bounds = ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
        parts = [f"{op} {_num(v)}" for op, v in bounds if v is not None]
        return " and ".join(parts) or "any number"

    def violated(self, value: float) -> str | None:
        """Why ``value`` is outside the range, or ``None`` when it fits."""
        if isinstance(value, float) and not math.isfinite(value):
            if not self.finite:
                return None
            return "a finite number (not nan or inf; a literal such as 1e400 overflows to inf)"
        if isinstance(value, float) and self.finite and abs(value) > FLOAT32_MAX:
            # finite for Python, inf once it meets a float32 tensor (an lr of 1e300)
            return f"a finite float32 number (at most {FLOAT32_MAX:.4g} in magnitude)"
        ok = ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
              and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))
        return None if ok else self.describe()


def _num(value: float) -> str:
    if isinstance(value, int) and value > 2**32 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**70 else repr(value)


_FINITE = Range()  # what a plain float field gets
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: settings feed float32


@functools.cache
def _full_hints(cls: type) -> dict[str, Any]:
    """Field types of a config dataclass with their ``Annotated`` ranges kept."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _field_type(cls: type, key: str) -> Any:
    """The ``Annotated``-preserving type of the leaf at a dotted key (the key exists)."""
    tp: Any = cls
    for part in key.split("."):
        tp = _full_hints(_strip(tp))[part]
    return tp


def _strip(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _check_range(value: Any, tp: Any, key: str, source: str) -> None:
    """Raise a ConfigError when an already typed ``value`` is outside its field's range."""
    ranges: list[Range] = []
    if typing.get_origin(tp) is Annotated:
        tp, *extras = typing.get_args(tp)
        ranges = [r for r in extras if isinstance(r, Range)]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        return
    if isinstance(value, str) and "\0" in value:  # no path, name or URL holds one
        raise ConfigError(f"{source}: {key} holds a NUL character ({value!r}); remove it")
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        _check_range(value, rest[0], key, source)
    elif origin is tuple and isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_range(item, args[0], f"{key}[{i}]", source)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not ranges and _strip(tp) is float:
        ranges = [_FINITE]
    for allowed in ranges:
        why = allowed.violated(value)
        if why is not None:
            raise ConfigError(f"{source}: {key} must be {why}, got {value!r}")
