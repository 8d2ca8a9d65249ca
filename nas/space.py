"""The micro search space of ENAS (Pham et al. 2018, arXiv 1802.03268, Sec. 2.3): architectures.

A cell has two input nodes (0: the output of the cell two back, 1: of the previous cell) and
``B`` computed nodes ``2 .. B+1``. Computed node ``i`` picks two earlier nodes ``a, b < i`` and
one operation for each, and adds the two results. An :class:`Architecture` is a normal cell and a
reduction cell from the same space plus the ordered ``PRIMITIVES`` its op indices refer to.

Encodings (all round-trip):

- flat integer list, ENAS's ``arc`` order: per node ``[in_1, op_1, in_2, op_2]``, normal cell
  first, then the reduction cell (``8 * B`` integers);
- readable string: ``normal: [(sep_conv_3x3, 0), (identity, 1) | ...] reduce: [...]``, one
  ``|``-separated entry per node, each entry the node's two ``(op, input)`` pairs;
- JSON: op names (not indices) with the primitives, so a file stays valid when ``PRIMITIVES``
  grows (it only ever grows at the end).

This module needs no torch; ``nas.ops`` holds the modules behind the names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PRIMITIVES", "Architecture", "Cell", "parse_arch"]

# Ordered operation names; only append (indices in saved flat lists refer to this order).
PRIMITIVES: tuple[str, ...] = (
    "sep_conv_3x3",
    "sep_conv_5x5",
    "avg_pool_3x3",
    "max_pool_3x3",
    "identity",
)
JSON_FORMAT = 1
Cell = tuple[tuple[int, int, int, int], ...]  # per node (in_1, op_1, in_2, op_2)


def _check_cell(name: str, cell: Any, primitives: Sequence[str]) -> Cell:
    if not isinstance(cell, (tuple, list)) or not cell:
        raise ValueError(f"{name} cell must be a non-empty sequence of nodes, got {cell!r}")
    out = []
    for k, node in enumerate(cell):
        index = k + 2  # computed nodes are numbered after the two inputs
        if not isinstance(node, (tuple, list)) or len(node) != 4:
            raise ValueError(
                f"{name} cell, node {index}: expected (in_1, op_1, in_2, op_2), got {node!r}"
            )
        for slot, value in enumerate(node):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} cell, node {index}: {value!r} is not an integer")
            if slot % 2 == 0 and not 0 <= value < index:
                raise ValueError(
                    f"{name} cell, node {index}: input {value} is invalid; node {index} can "
                    f"only use nodes 0..{index - 1} (0 and 1 are the cell inputs)"
                )
            if slot % 2 == 1 and not 0 <= value < len(primitives):
                raise ValueError(
                    f"{name} cell, node {index}: op index {value} is invalid; valid indices "
                    f"are 0..{len(primitives) - 1} ({', '.join(primitives)})"
                )
        out.append(tuple(node))
    return tuple(out)


@dataclass(frozen=True)
class Architecture:
    """A normal and a reduction cell of the micro space; immutable and validated on creation.

    Args:
        normal: Per computed node ``(in_1, op_1, in_2, op_2)``; node ``i`` (from 2) may use
            inputs ``0 .. i-1``; ops index ``primitives``.
        reduce: The reduction cell, same format and number of nodes.
        primitives: The op names the indices refer to (default :data:`PRIMITIVES`).

    Raises:
        ValueError: A bad input index, op index, node shape, or cells of different sizes.

    Example:
        >>> arch = Architecture.from_flat([0, 0, 1, 4] * 2 + [1, 2, 0, 3] * 2)
        >>> str(arch)[:48]
        'normal: [(sep_conv_3x3, 0), (identity, 1) | (se'
    """

    normal: Cell
    reduce: Cell
    primitives: tuple[str, ...] = field(default=PRIMITIVES)

    def __post_init__(self) -> None:
        prims = tuple(self.primitives)
        if not prims or len(set(prims)) != len(prims):
            raise ValueError(f"primitives must be distinct op names, got {prims!r}")
        object.__setattr__(self, "primitives", prims)
        object.__setattr__(self, "normal", _check_cell("normal", self.normal, prims))
        object.__setattr__(self, "reduce", _check_cell("reduce", self.reduce, prims))
        if len(self.normal) != len(self.reduce):
            raise ValueError(
                f"normal and reduce cells need the same number of nodes, got "
                f"{len(self.normal)} and {len(self.reduce)}"
            )

    @property
    def num_nodes(self) -> int:
        """``B``, the computed nodes per cell."""
        return len(self.normal)

    def cell(self, reduction: bool) -> Cell:
        """The reduction cell if ``reduction`` else the normal cell."""
        return self.reduce if reduction else self.normal

    def edges(self, reduction: bool) -> list[tuple[int, int, str]]:
        """``(node, input, op_name)`` for both inputs of every computed node, in order."""
        out = []
        for k, (a, op_a, b, op_b) in enumerate(self.cell(reduction)):
            out += [(k + 2, a, self.primitives[op_a]), (k + 2, b, self.primitives[op_b])]
        return out

    def loose_ends(self, reduction: bool) -> list[int]:
        """Computed nodes that no other node uses: concatenated into the cell output."""
        used = {n for a, _, b, _ in self.cell(reduction) for n in (a, b)}
        return [i for i in range(2, self.num_nodes + 2) if i not in used]

    # -- flat list -------------------------------------------------------------------------

    def to_flat(self) -> list[int]:
        """ENAS's ``arc``: ``[in_1, op_1, in_2, op_2]`` per node, normal then reduce."""
        return [v for cell in (self.normal, self.reduce) for node in cell for v in node]

    @classmethod
    def from_flat(
        cls, values: Sequence[int], primitives: Sequence[str] = PRIMITIVES
    ) -> Architecture:
        """Inverse of :meth:`to_flat`; the length must be a positive multiple of 8."""
        values = list(values)
        if not values or len(values) % 8:
            raise ValueError(
                f"a flat architecture has 8 integers per node (4 per cell), got {len(values)}"
            )
        half = len(values) // 2
        cells = [
            tuple(tuple(values[s + i : s + i + 4]) for i in range(0, half, 4)) for s in (0, half)
        ]
        return cls(cells[0], cells[1], tuple(primitives))

    # -- string ----------------------------------------------------------------------------

    def _cell_str(self, reduction: bool) -> str:
        nodes = [
            f"({self.primitives[oa]}, {a}), ({self.primitives[ob]}, {b})"
            for a, oa, b, ob in self.cell(reduction)
        ]
        return "[" + " | ".join(nodes) + "]"

    def __str__(self) -> str:
        return f"normal: {self._cell_str(False)} reduce: {self._cell_str(True)}"

    @classmethod
    def from_string(cls, text: str, primitives: Sequence[str] = PRIMITIVES) -> Architecture:
        """Parse the form printed by ``str(arch)``; op names are looked up in ``primitives``."""
        match = re.fullmatch(r"\s*normal:\s*\[(.*)\]\s*reduce:\s*\[(.*)\]\s*", text, re.S)
        if not match:
            raise ValueError(
                "an architecture string looks like 'normal: [(sep_conv_3x3, 0), (identity, 1) "
                f"| ...] reduce: [...]', got {text[:80]!r}"
            )
        cells = []
        for name, body in zip(("normal", "reduce"), match.groups()):
            nodes = []
            for k, entry in enumerate(body.split("|")):
                pairs = re.findall(r"\(\s*([A-Za-z0-9_]+)\s*,\s*(-?\d+)\s*\)", entry)
                if len(pairs) != 2:
                    raise ValueError(
                        f"{name} cell, node {k + 2}: expected two '(op, input)' pairs, got "
                        f"{entry.strip()!r}"
                    )
                nodes.append(
                    tuple(v for op, i in pairs for v in (int(i), _op_index(op, primitives)))
                )
            cells.append(tuple(nodes))
        return cls(cells[0], cells[1], tuple(primitives))

    # -- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with op names, the primitives, the flat list and the string."""
        def named(reduction: bool) -> list[list[list[Any]]]:
            return [
                [[self.primitives[oa], a], [self.primitives[ob], b]]
                for a, oa, b, ob in self.cell(reduction)
            ]

        return {
            "format": JSON_FORMAT,
            "primitives": list(self.primitives),
            "normal": named(False),
            "reduce": named(True),
            "flat": self.to_flat(),
            "string": str(self),
        }

    def to_json(self, **extra: Any) -> str:
        """JSON text of :meth:`to_dict` plus ``extra`` keys (e.g. ``valid_acc``)."""
        return json.dumps({**self.to_dict(), **extra}, indent=2) + "\n"

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], primitives: Sequence[str] = PRIMITIVES
    ) -> Architecture:
        """Inverse of :meth:`to_dict`; ops are matched by name against ``primitives``."""
        if not isinstance(data, dict) or "normal" not in data or "reduce" not in data:
            raise ValueError("architecture JSON needs 'normal' and 'reduce' keys")
        cells = []
        for name in ("normal", "reduce"):
            if not isinstance(data[name], list) or not data[name]:
                raise ValueError(f"'{name}' must be a non-empty list of nodes "
                                 f"[[op, input], [op, input]], got {data[name]!r}")
            nodes = []
            for k, node in enumerate(data[name]):
                try:
                    (op_a, a), (op_b, b) = node
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{name} cell, node {k + 2}: expected [[op, input], [op, input]], "
                        f"got {node!r}"
                    ) from None
                nodes.append((a, _op_index(op_a, primitives), b, _op_index(op_b, primitives)))
            cells.append(tuple(nodes))
        return cls(cells[0], cells[1], tuple(primitives))

    @classmethod
    def from_json(cls, text: str, primitives: Sequence[str] = PRIMITIVES) -> Architecture:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
        except RecursionError:  # json recurses per level: a hand-made 50,000-deep nesting
            raise ValueError("not an architecture: its JSON is nested too deeply") from None
        return cls.from_dict(data, primitives)


def _op_index(name: Any, primitives: Sequence[str]) -> int:
    if name not in primitives:
        raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(primitives)}")
    return list(primitives).index(name)


def parse_arch(spec: str, primitives: Sequence[str] = PRIMITIVES) -> Architecture:
    """An architecture from what a user types: a JSON file, the string form or a flat list.

    Args:
        spec: A path to a ``.json`` file (e.g. ``best_arch.json``), the ``str(arch)`` form, or
            a flat list such as ``"[0, 0, 1, 4, ...]"``, ``"0,0,1,4,..."`` or ENAS's own
            space-separated arc string (``"0 2 0 0 0 4 ..."``, as in its scripts).
        primitives: The op names known to this code.

    Returns:
        The validated architecture.

    Raises:
        ValueError: The text is none of those, the file is missing or invalid; the message
            says which and why.
    """
    from pathlib import Path

    text = spec.strip()
    if text.startswith("normal"):
        return Architecture.from_string(text, primitives)
    # A flat list, negative numbers included: the architecture's own check names a bad one.
    if re.fullmatch(r"\[?\s*-?\d+([\s,]+-?\d+)*\s*\]?", text):
        return Architecture.from_flat([int(v) for v in re.findall(r"-?\d+", text)], primitives)
    path = Path(text).expanduser()
    # os.path answers False for a name too long to be a file (Path.is_file raises).
    if text.startswith(("[", "{")) and not os.path.exists(path):  # JSON typed in
        if text[0] == "{":
            return Architecture.from_json(text, primitives)
        raise ValueError(f"architecture {text[:60]!r}: a flat architecture is a list of "
                         "integers, 8 per node, such as '[0, 0, 1, 4, ...]'")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "not found"
        raise ValueError(
            f"architecture '{spec[:80]}': file {what}; pass a best_arch.json file, the string "
            "'normal: [...] reduce: [...]' or a flat list of integers"
        )
    try:
        return Architecture.from_json(path.read_text(encoding="utf-8"), primitives)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"architecture file '{path}': {exc}") from None
