"""The batch-size study's report: the summary over seeds, the two tables and the figures.

:func:`summarize` groups the runs of ``study.json`` by (norm, batch size): test accuracy mean
and std over seeds and, for SN/SSN, the importance averaged over layers and seeds;
:func:`format_tables` prints them; :func:`draw_figures` draws test accuracy against the batch
size (one line per norm) and SN's importance per batch size as stacked bars, as in the SN
paper's Fig. 4.
"""

from __future__ import annotations

import statistics
from pathlib import Path

__all__ = ["draw_figures", "format_tables", "summarize"]


def _label(norm: str) -> str:
    """A norm spec's text for a legend: the kind in capitals, its options as written."""
    kind, bracket, rest = norm.partition("(")
    return kind.upper() + bracket + rest


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: list[dict]) -> dict:
    """Per (norm, batch size): test accuracy mean/std/seeds and, for SN/SSN, the importance
    averaged over layers and seeds."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["norm"], r["batch_size"]), []).append(r)
    out = []
    for (norm, size), runs in groups.items():
        mean, std = _mean_std([r["test_acc"] for r in runs])
        row = {"norm": norm, "batch_size": size, "seeds": len(runs), "test_acc_mean": mean,
               "test_acc_std": std}
        imps = [r["importance"] for r in runs if r.get("importance")]
        if imps:
            row["importance"] = {which: {c: statistics.mean(i[which][c] for i in imps)
                                         for c in imps[0][which]} for which in ("mean", "var")}
        out.append(row)
    return {"rows": out}


def format_tables(summary: dict) -> str:
    """The accuracy table (norm x batch size) and the importance table (per batch size)."""
    rows = summary["rows"]
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    sizes = sorted({r["batch_size"] for r in rows}, reverse=True)
    cell = {(r["norm"], r["batch_size"]): r for r in rows}
    first = max([5, *map(len, norms)])  # the specs' texts, "gn(groups=8)"
    lines = ["test accuracy, mean +- std over seeds (number of seeds)",
             "norm".ljust(first) + "".join(f"{'batch ' + str(s):>22s}" for s in sizes)]
    for norm in norms:
        cells = [cell.get((norm, s)) for s in sizes]
        lines.append(norm.ljust(first) + "".join(
            f"{r['test_acc_mean']:.3f} +- {r['test_acc_std']:.3f} ({r['seeds']})".rjust(22)
            if r else "-".rjust(22) for r in cells))
    for norm in norms:
        with_imp = [cell[(norm, s)] for s in sizes if "importance" in cell.get((norm, s), {})]
        if not with_imp:
            continue
        cands = list(with_imp[0]["importance"]["mean"])
        lines += ["", f"{norm} importance averaged over layers and seeds",
                  f"{'batch':>5s}  " + " ".join(f"mean:{c:<4s}" for c in cands) + "  " +
                  " ".join(f"var:{c:<5s}" for c in cands)]
        for r in with_imp:
            imp = r["importance"]
            lines.append(f"{r['batch_size']:5d}  " +
                         " ".join(f"{imp['mean'][c]:9.3f}" for c in cands) + "  " +
                         " ".join(f"{imp['var'][c]:9.3f}" for c in cands))
    return "\n".join(lines)


def draw_figures(summary: dict, out: Path) -> list[Path]:
    """``accuracy.png`` (test accuracy vs batch size per norm) and ``importance.png`` (SN's
    importance per batch size, the paper's bars); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    written = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for norm in dict.fromkeys(r["norm"] for r in rows):
        pts = sorted((r["batch_size"], r["test_acc_mean"], r["test_acc_std"])
                     for r in rows if r["norm"] == norm)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=_label(norm))
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.invert_xaxis()
    ax.set_xlabel("images per normalization batch")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    written.append(out / "accuracy.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    switch = [r for r in rows if "importance" in r]
    norms = list(dict.fromkeys(r["norm"] for r in switch))
    if norms:
        fig, axes = plt.subplots(len(norms), 2, figsize=(9, 3 * len(norms)), squeeze=False)
        for row, norm in zip(axes, norms):
            mine = sorted((r for r in switch if r["norm"] == norm),
                          key=lambda r: -r["batch_size"])
            for ax, which in zip(row, ("mean", "var")):
                bottom = [0.0] * len(mine)
                for cand in mine[0]["importance"][which]:
                    vals = [r["importance"][which][cand] for r in mine]
                    ax.bar(range(len(mine)), vals, bottom=bottom, label=cand.upper())
                    bottom = [b + v for b, v in zip(bottom, vals)]
                ax.set_xticks(range(len(mine)), [str(r["batch_size"]) for r in mine])
                ax.set_ylim(0, 1)
                ax.set_title(f"{_label(norm)} {which} importance (avg over layers)")
                ax.set_xlabel("images per normalization batch")
            row[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(out / "importance.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
