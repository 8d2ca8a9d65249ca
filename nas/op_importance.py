"""Which normalizer each op of a cell leans to: SN importance per node input op.

For an architecture and a network holding SN norms (the weight-sharing child after a search,
or the fixed network after retraining), :func:`op_importance` reads, for every node input op of
the normal and the reduction cell (e.g. node 2, slot 0, ``sep_conv_3x3`` on ``c_{k-1}``), the
mean and variance weights of the SN layers inside that op, averaged over the op's layers and
over the cell positions of that kind (each position owns its modules). Ops without a norm
(pooling, identity) are listed with ``None`` weights. ``shared`` averages the norms outside the
cells' ops, which every architecture uses: stem, factorized reductions, input calibration and
each search cell's output norm. The result is plain JSON data (``best_arch.json``,
``search.json``, ``result.json``); :func:`nas.draw.save_importance` draws it.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from nas.cells import FixedCell, SearchCell
from nas.space import Architecture
from snexp import Importance, importance

__all__ = ["format_op_importance", "op_importance", "op_label"]


def _op_modules(net: nn.Module, arch: Architecture) -> Iterator[tuple[tuple, nn.Module]]:
    """``((cell kind, node, slot, input, op name), module)`` of every op ``arch`` runs in
    ``net`` (a :class:`nas.child.ChildNet`), one per cell position."""
    reduce_at = getattr(net, "reduce", {})
    for index, cell in enumerate(net.cells):
        if isinstance(cell, FixedCell):
            reduction = cell.reduction
        elif isinstance(cell, SearchCell):
            reduction = str(index) in reduce_at
        else:  # pragma: no cover - ChildNet holds only these two
            continue
        kind = "reduce" if reduction else "normal"
        for k, (a, op_a, b, op_b) in enumerate(arch.cell(reduction)):
            for slot, (inp, op) in enumerate(((a, op_a), (b, op_b))):
                name = arch.primitives[op]
                if isinstance(cell, FixedCell):
                    module = cell.ops[2 * k + slot]
                else:
                    module = cell.ops[f"{k + 2}_{slot}_{inp}"][name]
                yield (kind, k + 2, slot, inp, name), module


def _average(layers: list[Importance]) -> dict[str, dict[str, float]] | None:
    if not layers:
        return None
    cands = layers[0].candidates
    return {which: {c: sum(getattr(v, which)[i] for v in layers) / len(layers)
                    for i, c in enumerate(cands)} for which in ("mean", "var")}


def _leans_to(weights: dict[str, dict[str, float]] | None) -> str | None:
    if weights is None:
        return None
    both = {c: weights["mean"][c] + weights["var"][c] for c in weights["mean"]}
    if max(both.values()) - min(both.values()) < 1e-6:
        return "even"  # the uniform start: no candidate leads
    return max(both, key=both.__getitem__)


def op_importance(net: nn.Module, arch: Architecture) -> dict | None:
    """The SN importance of every node input op of ``arch`` in ``net``.

    Args:
        net: a :class:`nas.child.ChildNet`, weight-sharing (then ``arch`` picks the ops) or
            fixed (``arch`` is the one it was built with).
        arch: the architecture whose ops are read.

    Returns:
        ``None`` when ``net`` has no SN layer, else ``{"candidates": [...], "ops": [{"cell",
        "node", "slot", "input", "op", "layers", "mean", "var", "leans_to"}, ...], "shared":
        {"layers", "mean", "var", "leans_to"}}``; ``mean``/``var`` map each candidate to its
        weight, averaged over the op's SN layers and the cell positions of its kind.
    """
    everything = importance(net)
    if not everything:
        return None
    by_id = {id(m): name for name, m in net.named_modules()}
    in_ops: set[str] = set()
    for cell in net.cells:
        prefix = by_id[id(cell.ops)]
        in_ops |= {name for name in everything if name.startswith(prefix + ".")}
    grouped: dict[tuple, list[Importance]] = {}
    for key, module in _op_modules(net, arch):
        grouped.setdefault(key, []).extend(importance(module).values())
    ops = []
    for (kind, node, slot, inp, name), layers in sorted(
            grouped.items(), key=lambda item: (item[0][0] != "normal", *item[0][1:3])):
        weights = _average(layers)
        ops.append({"cell": kind, "node": node, "slot": slot, "input": inp, "op": name,
                    "layers": len(layers), "mean": weights and weights["mean"],
                    "var": weights and weights["var"], "leans_to": _leans_to(weights)})
    shared = [v for name, v in everything.items() if name not in in_ops]
    weights = _average(shared)
    return {"candidates": list(next(iter(everything.values())).candidates), "ops": ops,
            "shared": {"layers": len(shared), "mean": weights and weights["mean"],
                       "var": weights and weights["var"], "leans_to": _leans_to(weights)}}


def op_label(op: dict) -> str:
    """``"normal node 2.0: sep_conv_3x3 on c_{k-1}"``: one op of a report, as text."""
    source = {0: "c_{k-2}", 1: "c_{k-1}"}.get(op["input"], f"node {op['input']}")
    return f"{op['cell']} node {op['node']}.{op['slot']}: {op['op']} on {source}"


def format_op_importance(report: dict) -> str:
    """A text table of :func:`op_importance`: one line per op with norms, then the shared."""
    cands = report["candidates"]
    head = " ".join(f"{c:>5s}" for c in cands)
    lines = [f"{'op':54s} leans  mean: {head}  var: {head}"]
    rows = [(op_label(op), op) for op in report["ops"] if op["mean"] is not None]
    rows.append(("shared norms (stem, calibration, reductions, outputs)", report["shared"]))
    for label, row in rows:
        if row["mean"] is None:
            continue
        mean = " ".join(f"{row['mean'][c]:5.3f}" for c in cands)
        var = " ".join(f"{row['var'][c]:5.3f}" for c in cands)
        lines.append(f"{label:54s} {row['leans_to']:>5s}  mean: {mean}  var: {var}")
    return "\n".join(lines)
