"""Draw an architecture's normal and reduction cells as graphs (matplotlib, no graphviz).

Nodes are placed in columns by depth (inputs ``c_{k-2}``, ``c_{k-1}`` on the left, the output
``c_{k}`` on the right); every edge is an arrow labelled with its op; loose-end nodes feed the
output (concatenation, then the 1x1 projection). ``python -m nas.draw ARCH --png cells.png``
draws any architecture that ``nas.train --arch`` accepts. :func:`save_importance` draws which
normalizer each op of a derived cell leans to (``importance.png`` beside ``cells.png``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from nas.space import Architecture, parse_arch  # noqa: E402
from snexp.runtime.checkpoint import write_file_atomic  # noqa: E402

__all__ = ["draw_cells", "draw_importance", "save_cells", "save_importance"]

_COLORS = {"sep_conv_3x3": "#1f77b4", "sep_conv_5x5": "#9467bd", "avg_pool_3x3": "#2ca02c",
           "max_pool_3x3": "#d62728", "identity": "#7f7f7f"}


def _layout(arch: Architecture, reduction: bool) -> dict[int, tuple[float, float]]:
    depth = {0: 0, 1: 0}
    for k, (a, _, b, _) in enumerate(arch.cell(reduction)):
        depth[k + 2] = 1 + max(depth[a], depth[b])
    out_depth = 1 + max(depth.values())
    columns: dict[int, list[int]] = {}
    for node, d in depth.items():
        columns.setdefault(d, []).append(node)
    pos = {}
    for d, nodes in columns.items():
        for i, node in enumerate(nodes):
            lift = 0.3 * (-1) ** d if len(nodes) == 1 and d else 0.0  # unclutter chains
            pos[node] = (float(d), (len(nodes) - 1) / 2 - i + lift)
    pos[-1] = (float(out_depth), 0.0)  # the output
    return pos


def _draw_cell(ax: plt.Axes, arch: Architecture, reduction: bool) -> None:
    pos = _layout(arch, reduction)
    names = {0: "c_{k-2}", 1: "c_{k-1}", -1: "c_{k}"}
    for node, inp, op in arch.edges(reduction):
        (x0, y0), (x1, y1) = pos[inp], pos[node]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={
            "arrowstyle": "->", "color": _COLORS.get(op, "black"), "lw": 1.5,
            "shrinkA": 14, "shrinkB": 14, "connectionstyle": "arc3,rad=0.08"})
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, op, fontsize=7, ha="center", va="center",
                color=_COLORS.get(op, "black"), bbox={"fc": "white", "ec": "none", "pad": 0.5})
    for node in arch.loose_ends(reduction):
        (x0, y0), (x1, y1) = pos[node], pos[-1]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={
            "arrowstyle": "->", "color": "#bbbbbb", "lw": 1, "shrinkA": 14, "shrinkB": 14})
    for node, (x, y) in pos.items():
        color = "#ffe08a" if node in (0, 1) else "#a6d8f0" if node >= 2 else "#c7e9c0"
        ax.text(x, y, f"${names[node]}$" if node in names else str(node), ha="center",
                va="center", fontsize=9, bbox={"boxstyle": "round", "fc": color, "ec": "gray"})
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.6, max(xs) + 0.6)
    ax.set_ylim(min(ys) - 0.8, max(ys) + 0.8)
    ax.set_title("reduction cell" if reduction else "normal cell")
    ax.axis("off")


def draw_cells(arch: Architecture, *, title: str | None = None) -> Figure:
    """A figure with the normal cell on top and the reduction cell below."""
    fig, axes = plt.subplots(2, 1, figsize=(8, 7))
    for ax, reduction in zip(axes, (False, True)):
        _draw_cell(ax, arch, reduction)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


_CANDIDATE_COLORS = {"in": "#e377c2", "ln": "#ff7f0e", "bn": "#1f77b4"}


def draw_importance(report: dict, *, title: str | None = None) -> Figure:
    """Stacked bars of the mean (left) and variance (right) weights of each derived op with
    SN layers and of the shared norms (:func:`nas.op_importance.op_importance`'s report)."""
    from nas.op_importance import op_label

    rows = [(op_label(op), op) for op in report["ops"] if op["mean"] is not None]
    rows.append(("shared norms (stem, calibration, reductions, outputs)", report["shared"]))
    rows = [(label, row) for label, row in rows if row["mean"] is not None]
    cands = report["candidates"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * len(rows)), sharey=True)
    for ax, which in zip(axes, ("mean", "var")):
        left = [0.0] * len(rows)
        for c in cands:
            widths = [row[which][c] for _, row in rows]
            ax.barh(range(len(rows)), widths, left=left, color=_CANDIDATE_COLORS.get(c),
                    label=c.upper())
            left = [a + b for a, b in zip(left, widths)]
        ax.set_xlim(0, 1)
        ax.set_title(f"{which} weights")
    axes[0].set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    axes[0].invert_yaxis()  # shared y axis: the first op on top in both panels
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to a PNG file through snexp's recorded writer: never half-written, and in
    a run directory listed as the run's output (so ``--overwrite`` replaces it)."""
    path = Path(path)
    try:
        write_file_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def save_cells(arch: Architecture, path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``arch`` into a PNG file (written next to it and renamed, so never half-written)."""
    return _save(draw_cells(arch, title=title), path)


def save_importance(report: dict, path: str | Path, *, title: str | None = None) -> Path:
    """Draw an op-importance report (:func:`draw_importance`) into a PNG file, as
    :func:`save_cells` does."""
    return _save(draw_importance(report, title=title), path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nas.draw",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("arch", help="best_arch.json, the architecture string or a flat list")
    parser.add_argument("--png", default="cells.png", help="output file (default: cells.png)")
    args = parser.parse_args(argv)
    try:
        arch = parse_arch(args.arch)
    except ValueError as exc:
        print(f"python -m nas.draw: error: {exc}", file=sys.stderr)
        return 2
    print(save_cells(arch, args.png, title=str(arch) if len(str(arch)) < 120 else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
