"""The normalizer registry: ``norm_layer``, ``make_norm`` and ``convert_norm``.

The single place where ``nas`` and ``stylize`` get their normalizers, by kind:

=====  =============================================  ====================================
kind   module                                         notes
=====  =============================================  ====================================
sn     SwitchNorm{1,2,3}d                             options: candidates, momentum, prior...
ssn    SparseSwitchNorm{1,2,3}d                       radius via ``snexp.set_sparsity``
bn     nn.BatchNorm{1,2,3}d
in     nn.InstanceNorm{1,2,3}d(affine=True)           per-sample, per-channel
ln     nn.GroupNorm(1, C)                             over C and space, as in the SN paper
gn     nn.GroupNorm(groups, C), ``groups=32``         ``groups`` must divide C
none   nn.Identity
=====  =============================================  ====================================

Models take a ``norm`` argument (a kind string, a :class:`NormSpec`, a callable or ``None``),
resolve it once with :func:`norm_layer`, and call the result as ``norm_layer(channels)``
(torchvision's ``norm_layer`` convention; timm's ``get_norm_layer``). A normalizer with its
options travels as one value, a :class:`NormSpec`, which also reads and prints as text, so that
configs and flags can carry it: ``"sn(momentum=0.003, candidates=in+ln+bn)"``, ``"gn(groups=8)"``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from snexp.norm.sparse import SparseSwitchNorm1d, SparseSwitchNorm2d, SparseSwitchNorm3d
from snexp.norm.switchable import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, _SwitchNorm

__all__ = ["NORM_KINDS", "NormSpec", "norm_layer", "make_norm", "convert_norm"]


def _group_norm(num_features: int, groups: int = 32, **options) -> nn.GroupNorm:
    if num_features % groups:
        raise ValueError(f"gn: groups={groups} does not divide num_features={num_features}; "
                         f"pass groups=G with G dividing {num_features}")
    return nn.GroupNorm(groups, num_features, **options)


def _layer_norm(num_features: int, **options) -> nn.GroupNorm:
    return nn.GroupNorm(1, num_features, **options)


def _check_momentum(kind: str, momentum: object) -> None:
    # NOTE: torch's BatchNorm/InstanceNorm take any momentum; outside [0, 1] running statistics
    # diverge silently, so the registry refuses it as the SN layers do.
    if momentum is not None and not (isinstance(momentum, (int, float))
                                     and not isinstance(momentum, bool)
                                     and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{kind}: momentum must be in [0, 1] (PyTorch convention: the SN "
                         f"authors' 0.9 is our 0.1) or None, got {momentum!r}")


def _instance_norm(cls):
    def build(num_features: int, affine: bool = True, momentum: float | None = 0.1,
              **options) -> nn.Module:
        _check_momentum("in", momentum)
        return cls(num_features, affine=affine, momentum=momentum, **options)
    return build


def _batch_norm(cls):
    def build(num_features: int, momentum: float | None = 0.1, **options) -> nn.Module:
        _check_momentum("bn", momentum)
        return cls(num_features, momentum=momentum, **options)
    return build


def _identity(num_features: int, **options) -> nn.Identity:
    return nn.Identity()


# kind -> builders for dims 1, 2, 3 (one entry when the layer does not depend on dims)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], ...]] = {
    "sn": (SwitchNorm1d, SwitchNorm2d, SwitchNorm3d),
    "ssn": (SparseSwitchNorm1d, SparseSwitchNorm2d, SparseSwitchNorm3d),
    "bn": tuple(_batch_norm(c) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)),
    "in": tuple(_instance_norm(c) for c in
                (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)),
    "ln": (_layer_norm,),
    "gn": (_group_norm,),
    "none": (_identity,),
}
NORM_KINDS: tuple[str, ...] = tuple(_REGISTRY)


def _resolve_kind(kind: str) -> str:
    name = str(kind).strip().lower().replace("-", "").replace("_", "")
    if name not in _REGISTRY:
        raise ValueError(f"unknown norm kind {kind!r}; valid kinds: {', '.join(NORM_KINDS)}")
    return name


_SPEC = re.compile(r"^\s*([A-Za-z_-]+)\s*(?:\((.*)\))?\s*$", re.S)


def _parse_value(text: str) -> Any:
    text = text.strip()
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if "+" in text or low in _CANDIDATE_NAMES or re.fullmatch(r"gn\d+", low):
        return tuple(v.strip() for v in text.split("+") if v.strip())
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


_CANDIDATE_NAMES = ("in", "ln", "bn")


def _canonical(value: Any) -> Any:
    """An option value as the spec stores and prints it: lists as tuples, a mapping such as
    ``prior={"bn": 4.0}`` as its text ``"bn:4"`` (what ``prior=bn:4`` parses to)."""
    if isinstance(value, Mapping):
        items = tuple(f"{k}:{v:g}" if isinstance(v, (int, float)) else f"{k}:{v}"
                      for k, v in value.items())
        return items[0] if len(items) == 1 else items
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """One normalizer as a value: its kind and its layer options.

    Reads and prints as text, ``kind(key=value, ...)``, with tuples written ``a+b``:
    ``NormSpec.parse("sn(momentum=0.003, candidates=in+ln)")``; an SN importance prior is
    ``sn(prior=bn:4)`` (``prior=bn:4+ln:1`` for several; a mapping ``{"bn": 4}`` is stored as
    this text). :func:`norm_layer` resolves it
    once into ``norm_layer(channels)``. Options are checked by the layer when it is built.

    Attributes:
        kind: a registry kind (see the module docstring).
        options: the layer's keyword options, as sorted ``(name, value)`` pairs.

    Example:
        >>> spec = NormSpec.parse("gn(groups=8)")
        >>> spec.layer()(64)
        GroupNorm(8, 64, eps=1e-05, affine=True)
        >>> str(NormSpec("sn", {"momentum": 0.003}))
        'sn(momentum=0.003)'
    """

    kind: str = "sn"
    options: tuple[tuple[str, Any], ...] = ()

    def __init__(self, kind: str = "sn", options: Mapping[str, Any] | None = None,
                 **more: Any) -> None:
        merged = {**dict(options or {}), **more}
        merged = {k: _canonical(v) for k, v in merged.items()}
        object.__setattr__(self, "kind", _resolve_kind(kind))
        object.__setattr__(self, "options", tuple(sorted(merged.items())))

    @classmethod
    def parse(cls, text: str | NormSpec) -> NormSpec:
        """Read ``"kind"`` or ``"kind(key=value, ...)"``; ``a+b`` is a tuple, ``none`` None."""
        if isinstance(text, NormSpec):
            return text
        match = _SPEC.match(str(text))
        if not match:
            raise ValueError(f"norm spec {text!r}: write kind(key=value, ...), e.g. "
                             f"'sn(momentum=0.003, candidates=in+ln+bn)' or 'gn(groups=8)'")
        options = {}
        for part in filter(str.strip, (match.group(2) or "").split(",")):
            key, eq, value = part.partition("=")
            if not eq or not key.strip().isidentifier():
                raise ValueError(f"norm spec {text!r}: option {part.strip()!r} is not "
                                 f"key=value")
            options[key.strip()] = _parse_value(value)
        return cls(match.group(1), options)

    def layer(self, dims: int = 2) -> Callable[[int], nn.Module]:
        """The ``norm_layer(channels)`` callable (see :func:`norm_layer`)."""
        return norm_layer(self.kind, dims, **dict(self.options))

    def __str__(self) -> str:
        def fmt(v: Any) -> str:
            return "+".join(map(str, v)) if isinstance(v, tuple) else str(v)
        inner = ", ".join(f"{k}={fmt(v)}" for k, v in self.options)
        return f"{self.kind}({inner})" if inner else self.kind


def norm_layer(norm: str | NormSpec | Callable[..., nn.Module] | None = "sn", dims: int = 2,
               **options) -> Callable[[int], nn.Module]:
    """Resolve ``norm`` once into a callable ``norm_layer(num_features) -> nn.Module``.

    Args:
        norm: a kind (see module docstring), a :class:`NormSpec` or its text
            (``"sn(momentum=0.003)"``), a class or callable taking the channel count first
            (options are bound with ``functools.partial``), or ``None`` for no norm.
        dims: spatial rank of the input: 1 for (N, C, L) or (N, C), 2 for images, 3 for video.
        **options: keyword options of the layer (e.g. ``candidates``, ``groups``, ``momentum``).

    Returns:
        A callable taking ``num_features``.

    Example:
        >>> layer = norm_layer("gn", groups=8)
        >>> layer(64)
        GroupNorm(8, 64, eps=1e-05, affine=True)
    """
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    if isinstance(norm, str) and "(" in norm:
        norm = NormSpec.parse(norm)
    if isinstance(norm, NormSpec):
        options = {**dict(norm.options), **options}
        norm = norm.kind
    if norm is None:
        builder = _identity
    elif isinstance(norm, str):
        builders = _REGISTRY[_resolve_kind(norm)]
        builder = builders[dims - 1] if len(builders) == 3 else builders[0]
    elif callable(norm):
        builder = norm
    else:
        raise TypeError(f"norm must be a kind string, a callable or None, got {norm!r}")
    return functools.partial(builder, **options) if options else builder


def make_norm(kind: str | Callable[..., nn.Module] | None, num_features: int, dims: int = 2,
              **options) -> nn.Module:
    """Build one normalization layer by kind.

    Args:
        kind: "sn", "ssn", "bn", "in", "ln", "gn" or "none" (or a callable, or ``None``).
        num_features: channel count C.
        dims: 1, 2 or 3 (see :func:`norm_layer`).
        **options: layer options, e.g. ``groups=8`` for "gn" or ``candidates=("ln", "bn")``.

    Returns:
        The layer.

    Example:
        >>> make_norm("sn", 64)
        SwitchNorm2d(64, eps=1e-05, momentum=0.1, candidates=('in', 'ln', 'bn'))
    """
    return norm_layer(kind, dims, **options)(num_features)


_BN_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
            nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3,
            SwitchNorm1d: 1, SwitchNorm2d: 2, SwitchNorm3d: 3}


def _dims_of(module: nn.Module, default: int) -> int | None:
    for cls, d in _BN_DIMS.items():
        if isinstance(module, cls):
            return d
    if isinstance(module, (nn.GroupNorm, nn.SyncBatchNorm, _SwitchNorm)):
        return default
    return None


def convert_norm(model: nn.Module, to: str = "sn", *, dims: int = 2, **options) -> nn.Module:
    """Replace every BatchNorm/InstanceNorm/GroupNorm/SN layer of ``model`` by kind ``to``.

    Weight and bias are copied when both layers have them; running statistics are copied from
    layers that track them to layers that have them (e.g. BN -> SN with a BN candidate).

    Args:
        model: any module, e.g. ``torchvision.models.resnet50()``; changed in place.
        to: the target kind (see :func:`make_norm`).
        dims: the spatial rank used for layers that do not tell theirs (GroupNorm).
        **options: options of the new layers, e.g. ``compat="official"``.

    Returns:
        The converted model (a new object only when ``model`` itself is a norm layer).

    Example:
        >>> net = convert_norm(torchvision.models.resnet18(), "sn")
    """
    _resolve_kind(to)
    d = _dims_of(model, dims)
    if d is not None:
        return _convert_one(model, to, d, options)
    for name, child in model.named_children():
        new = convert_norm(child, to, dims=dims, **options)
        if new is not child:
            setattr(model, name, new)
    return model


def _convert_one(old: nn.Module, to: str, dims: int, options: dict) -> nn.Module:
    channels = old.num_channels if isinstance(old, nn.GroupNorm) else old.num_features
    ref = next(iter(old.parameters()), None)
    if ref is None:
        ref = next(iter(old.buffers()), torch.zeros(()))
    new = make_norm(to, channels, dims, **options).to(device=ref.device)
    with torch.no_grad():
        for name in ("weight", "bias"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                dst.copy_(src.reshape(dst.shape))
        for name in ("running_mean", "running_var"):
            src, dst = getattr(old, name, None), getattr(new, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                dst.copy_(src.reshape(dst.shape))
    new.train(old.training)
    return new
