"""What each SN layer learned to use: importance weights, tables, the paper's bar figure.

The library half of ``python -m snexp.inspect`` (that module holds the command line; the two
are apart so that ``import snexp``, which imports this one, does not pre-load the module that
``python -m`` runs).

``importance(model)`` returns, per SN layer, the mean and variance weights over its candidates
(softmax for SN, sparsestmax for SSN); ``format_importance`` renders them as a table;
``plot_importance`` draws the stacked-bar figure of the SN paper (one bar per layer, one colour
per candidate); ``log_importance`` writes them to TensorBoard. From the shell:

    python -m snexp.inspect CHECKPOINT [--png FILE]

reads a state dict (or a checkpoint holding one) with :func:`load_weights`: the one safe
``torch.load`` of snexp (``weights_only=True``, plain-language errors), which the runtime's
checkpoints use too.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from snexp.norm.functional import sparsestmax
from snexp.norm.switchable import SwitchNormBase, _SwitchNorm

__all__ = ["Importance", "importance", "importance_from_state_dict", "importance_param_groups",
           "importance_parameters", "format_importance", "load_weights",
           "plot_importance", "log_importance"]


@dataclass(frozen=True)
class Importance:
    """Importance weights of one SN layer.

    Attributes:
        candidates: the layer's candidate names, e.g. ("in", "ln", "bn").
        mean: weight of each candidate's mean (sums to 1).
        var: weight of each candidate's variance (sums to 1).
    """

    candidates: tuple[str, ...]
    mean: tuple[float, ...]
    var: tuple[float, ...]


def importance(model: nn.Module) -> dict[str, Importance]:
    """Importance weights of every SN layer of ``model``, by qualified name.

    Example:
        >>> importance(nn.Sequential(snexp.SwitchNorm2d(8)))["0"].mean
        (0.3333333432674408, 0.3333333432674408, 0.3333333432674408)
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, _SwitchNorm):
            with torch.no_grad():
                was = m.training
                m.training = False  # do not freeze SSN choices while reading them
                mean_p, var_p = m.importance_weights()
                m.training = was
            out[name or type(m).__name__] = Importance(
                m.candidates, tuple(mean_p.tolist()), tuple(var_p.tolist()))
    return out


def importance_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The importance logits of every layer on the SN op in ``model``, each parameter once.

    That is ``mean_weight``/``var_weight`` of the SN layers, and the logits of any other
    :class:`snexp.SwitchNormBase` (stylize's conditional SN keeps one set per style).

    Example:
        >>> [tuple(p.shape) for p in importance_parameters(snexp.SwitchNorm2d(8))]
        [(3,), (3,)]
    """
    found: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, SwitchNormBase):
            for p in m.importance_logits():
                found.setdefault(id(p), p)
    return list(found.values())


def importance_param_groups(model: nn.Module, *, lr: float | None = None, lr_scale: float = 1.0,
                            weight_decay: float | None = None) -> list[dict]:
    """Optimizer parameter groups with the SN importance logits in a group of their own.

    The SN paper trains the logits like every other weight (same lr, same weight decay); a
    larger lr or no weight decay on them lets the importance move within a short run.

    Args:
        model: any module; parameters that do not require gradients are left out.
        lr: the base learning rate; the logits' group gets ``lr * lr_scale``. ``None``: no
            ``lr`` key (the optimizer's default applies to both; use ``lr_mult``).
        lr_scale: the logits' learning-rate factor, also stored as the group's ``lr_mult``
            (the other group's is 1) for loops that set each group's lr from a schedule.
        weight_decay: the logits' weight decay (``0``: none); ``None``: the optimizer's.

    Returns:
        ``[{"params": others, "lr_mult": 1.0, ...}, {"params": logits, "lr_mult": lr_scale,
        ...}]``; the second group is left out when the model has no SN layer.

    Example:
        >>> groups = importance_param_groups(model, lr=0.1, lr_scale=10, weight_decay=0)
        >>> opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-4)
    """
    if not lr_scale >= 0:
        raise ValueError(f"lr_scale must be >= 0, got {lr_scale!r}")
    if weight_decay is not None and not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0 or None, got {weight_decay!r}")
    logits = {id(p) for p in importance_parameters(model)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in logits]
    mine = [p for p in model.parameters() if p.requires_grad and id(p) in logits]
    groups: list[dict] = [{"params": rest, "lr_mult": 1.0}]
    if lr is not None:
        groups[0]["lr"] = lr
    if mine:
        group = {"params": mine, "lr_mult": float(lr_scale)}
        if lr is not None:
            group["lr"] = lr * lr_scale
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups


def load_weights(path: str | Path, *, map_location: str | torch.device = "cpu") -> object:
    """Read a file saved by ``torch.save`` with ``weights_only=True``: it never executes code.

    Args:
        path: a state dict, checkpoint or model file.
        map_location: where tensors go (default CPU; ``load_state_dict`` moves them on).

    Returns:
        The saved object (tensors in plain containers).

    Raises:
        ValueError: the file is missing, a folder, empty, torn, not a PyTorch file, or holds
            objects other than plain data and tensors (a pickled object that would run code is
            refused, not loaded); the message names the file and the reason.

    Example:
        >>> torch.save(nn.Sequential(snexp.SwitchNorm2d(8)).state_dict(), "sn.pt")
        >>> importance_from_state_dict(load_weights("sn.pt"))["0"].candidates
        ('in', 'ln', 'bn')
    """
    path = Path(path)
    if path.is_dir():
        inside = [p for p in (path / "model.pt", path / "checkpoints" / "last.pt") if p.is_file()]
        hint = f"; did you mean '{inside[0]}'?" if inside else ""
        raise ValueError(f"'{path}' is a folder, not a checkpoint or model file{hint}")
    if not path.is_file():
        raise ValueError(f"checkpoint '{path}' not found")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint '{path}' is empty (0 bytes): its write was cut short or "
                         "it is the wrong file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # no forbidden object: a file that is not a checkpoint at all
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            reason = detail.group(1) if detail else str(exc).splitlines()[0]
            raise ValueError(
                f"checkpoint '{path}' is unreadable or truncated ({reason})") from None
        raise ValueError(
            f"checkpoint '{path}' holds objects other than tensors and plain data "
            f"({found.group(1)}), so it is refused: loading it could run arbitrary code"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise ValueError(f"checkpoint '{path}' is unreadable or truncated ({reason})") from None


def _find_state_dict(obj) -> Mapping[str, torch.Tensor]:
    """The first mapping in a checkpoint that holds SN logits (searching nested dicts)."""
    if isinstance(obj, Mapping):
        if any(str(k).endswith("mean_weight") for k in obj):
            return obj
        for value in obj.values():
            found = _find_state_dict(value)
            if found:
                return found
    return {}


def importance_from_state_dict(state: Mapping) -> dict[str, Importance]:
    """Importance weights of every SN layer in a saved state dict (or checkpoint dict).

    Layers saved by snexp name their candidates in their extra state; logits without it are
    read in the authors' order ([IN, LN, BN], or [LN, BN] for two).

    Raises:
        ValueError: A layer's ``var_weight`` is missing or has another length than its
            ``mean_weight`` (an incomplete or edited state dict).
    """
    sd = _find_state_dict(state)
    out = {}
    for key in sd:
        if not key.endswith("mean_weight"):
            continue
        prefix = key[: -len("mean_weight")]
        name = prefix.rstrip(".").removeprefix("module.")
        k = sd[key].numel()
        extra = sd.get(prefix + "_extra_state")
        if isinstance(extra, Mapping) and "candidates" in extra:
            cands = tuple(extra["candidates"])
        else:
            cands = ("in", "ln", "bn") if k == 3 else ("ln", "bn")[:k]
        weights = []
        for logits_key, fixed_key in (("mean_weight", "mean_fixed"), ("var_weight", "var_fixed")):
            if prefix + logits_key not in sd:
                raise ValueError(f"layer '{name}' has mean_weight but no {logits_key}: the "
                                 "state dict is incomplete (not all of an SN layer was saved)")
            logits = sd[prefix + logits_key].float().flatten()
            if logits.numel() != k:
                raise ValueError(f"layer '{name}': {logits_key} holds {logits.numel()} logits, "
                                 f"mean_weight {k}; the state dict is inconsistent")
            fixed = sd.get(prefix + fixed_key)
            if fixed is not None and float(fixed.sum()) > 0:
                w = fixed.float()
            elif prefix + "radius" in sd:
                w = sparsestmax(logits, sd[prefix + "radius"].float())
            else:
                w = torch.softmax(logits, 0)
            weights.append(tuple(w.tolist()))
        out[name] = Importance(cands, weights[0], weights[1])
    return out


def format_importance(imp: Mapping[str, Importance]) -> str:
    """A plain-text table: one row per layer, mean and variance weight per candidate."""
    cands = sorted({c for v in imp.values() for c in v.candidates},
                   key=lambda c: ("in", "ln", "bn").index(c) if c in ("in", "ln", "bn") else 3)
    width = max([len("layer")] + [len(n) for n in imp])
    head = f"{'layer':<{width}}  " + "  ".join(f"mean:{c:<4}" for c in cands) + "  " + \
        "  ".join(f"var:{c:<5}" for c in cands)
    lines = [head, "-" * len(head)]
    for name, v in imp.items():
        def cell(values, c):
            return f"{values[v.candidates.index(c)]:>9.3f}" if c in v.candidates else " " * 9
        lines.append(f"{name:<{width}}  " + "  ".join(cell(v.mean, c) for c in cands) + "  " +
                     "  ".join(cell(v.var, c) for c in cands))
    return "\n".join(lines)


def _figure(imp: Mapping[str, Importance]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(imp)
    cands = sorted({c for v in imp.values() for c in v.candidates})
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * len(names) + 2), 6), sharex=True)
    for ax, which in zip(axes, ("mean", "var")):
        bottom = [0.0] * len(names)
        for c in cands:
            vals = [getattr(imp[n], which)[imp[n].candidates.index(c)]
                    if c in imp[n].candidates else 0.0 for n in names]
            ax.bar(range(len(names)), vals, bottom=bottom, label=c.upper())
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel(f"{which} importance")
        ax.set_ylim(0, 1)
    axes[0].legend(loc="upper right", ncol=len(cands))
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


def plot_importance(imp: Mapping[str, Importance], path: str) -> None:
    """Save the stacked-bar figure (one bar per layer, one colour per candidate) to ``path``."""
    import matplotlib.pyplot as plt

    fig = _figure(imp)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_importance(writer, model: nn.Module, step: int, *, prefix: str = "sn_importance",
                   figure: bool = True) -> None:
    """Write every SN layer's weights to TensorBoard (scalars, plus the bar figure).

    Tags: ``{prefix}/{layer}/mean_{candidate}`` and ``.../var_{candidate}``; the figure under
    ``{prefix}/figure``.
    """
    imp = importance(model)
    for name, v in imp.items():
        for i, c in enumerate(v.candidates):
            writer.add_scalar(f"{prefix}/{name}/mean_{c}", v.mean[i], step)
            writer.add_scalar(f"{prefix}/{name}/var_{c}", v.var[i], step)
    if figure and imp:
        writer.add_figure(f"{prefix}/figure", _figure(imp), step)
