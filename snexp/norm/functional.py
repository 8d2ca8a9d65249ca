"""SN's functional API (as ``torch.nn.functional``): switch_norm, sparsemax, sparsestmax, and
the validation of candidate lists.

Follows Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization"
(arXiv 1806.10779), eq. 3-5. :func:`switch_norm` calls the one SN op,
``torch.ops.snexp.switch_norm`` (:mod:`snexp.norm.op`; in eager mode its eager form, the same
code without dispatcher round trips), whose equations are in :mod:`snexp.norm._mixing`:
per-(n, c) instance statistics are computed once from the input and every other candidate
(LN, GN, BN) is derived from them on small (N, C) tensors:

    mu_ln  = mean_c mu_in,     var_ln = mean_c var_in + mean_c (mu_in - mu_ln)^2
    mu_bn  = mean_n mu_in,     var_bn = mean_n var_in + mean_n (mu_in - mu_bn)^2
    mu     = sum_k p_k mu_k,   var    = sum_k q_k var_k
    y      = weight * (x - mu) / sqrt(var + eps) + bias

(the centered form of ``var_ln = mean_c(var_in + mu_in^2) - mu_ln^2``; the same value without
the cancellation). ``snexp.reference`` holds the plain-autograd equations that the tests
compare against.
NOTE: the variance takes a second, centered read of the input: a one-pass sum of squares loses
every digit when |mean| >> std.

:func:`sparsemax` and :func:`sparsestmax` turn importance logits into sparse importance weights
(Shao et al., "SSN: Learning Sparse Switchable Normalization via SparsestMax", CVPR 2019; the
layers are in :mod:`snexp.norm.sparse`). Every name here is also exported from ``snexp``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snexp.norm import op

__all__ = ["parse_candidates", "sparsemax", "sparsestmax", "switch_norm"]

_BASE_CANDIDATES = ("in", "ln", "bn")


def parse_candidates(candidates: tuple[str, ...] | list[str],
                     num_features: int) -> tuple[str, ...]:
    """Validate and normalize an ordered tuple of candidate normalizers.

    Args:
        candidates: any ordered subset of ``"in"``, ``"ln"``, ``"bn"`` and ``"gn<G>"``
            (group statistics with ``G`` groups, ``G`` dividing ``num_features``).
        num_features: the channel count ``C`` of the layer.

    Returns:
        The candidates as lower-case strings, in the given order.

    Raises:
        TypeError: ``candidates`` is a string (``"in+ln"``), not a sequence of names.
        ValueError: an unknown or repeated name, none at all, or a group count that does not
            divide ``num_features``.

    Example:
        >>> parse_candidates(["LN", "gn8"], 64)
        ('ln', 'gn8')
    """
    if isinstance(candidates, str):
        raise TypeError(f"candidates must be a tuple of names such as ('in', 'ln', 'bn'), "
                        f"got the string {candidates!r}")
    out = tuple(str(c).strip().lower() for c in candidates)
    if not out:
        raise ValueError("candidates must name at least one of 'in', 'ln', 'bn', 'gn<G>'")
    for c in out:
        if c in _BASE_CANDIDATES:
            continue
        if c.startswith("gn") and c[2:].isdigit() and int(c[2:]) > 0:
            groups = int(c[2:])
            if num_features % groups:
                raise ValueError(f"candidate {c!r}: {groups} groups do not divide "
                                 f"num_features={num_features}")
            continue
        raise ValueError(f"unknown candidate {c!r}; valid: 'in', 'ln', 'bn', 'gn<G>' "
                         f"(e.g. 'gn32')")
    if len(set(out)) != len(out):
        raise ValueError(f"candidates must not repeat a name, got {out}")
    return out


def switch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean_p: Tensor,
    var_p: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    candidates: tuple[str, ...],
    training: bool,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    update_running: bool = True,
    num_batches_tracked: Tensor | None = None,
    compat: str = "paper",
    logits: bool = False,
    group: str = "",
) -> Tensor:
    """Switchable Normalization of ``x`` (N, C, *) with the importance weights given.

    The functional form of :class:`snexp.SwitchNorm2d` (which calls it with its parameters and
    buffers); no option is checked here beyond the input's rank, as ``torch.nn.functional``.

    Args:
        x: input of shape (N, C) or (N, C, *spatial), any float dtype and memory layout.
        weight, bias: affine parameters (C,), or ``None`` for none.
        mean_p, var_p: importance weights (K,) of the means and of the variances, one per
            candidate in the order of ``candidates``: points of the probability simplex
            (softmax or :func:`sparsestmax` outputs), or their logits with ``logits=True``.
            Their gradients are returned up to a constant shift, which the softmax/sparsemax
            Jacobians remove.
        running_mean, running_var: the BN candidate's running statistics (C,); ``None``
            (the default) when "bn" is not a candidate. Updated in place while training.
        candidates: validated candidate names (:func:`parse_candidates`), e.g.
            ``("in", "ln", "bn")``.
        training: use batch statistics for the BN candidate (else the running statistics).
        eps: added to the mixed variance before the square root. Default 1e-5.
        momentum: PyTorch convention, ``new = (1 - m) * old + m * batch``; ``None`` is a
            cumulative average over ``num_batches_tracked`` batches. Default 0.1.
        update_running: blend batch statistics into the running buffers (in place) while
            training. Default ``True``.
        num_batches_tracked: counter used when ``momentum`` is ``None`` (already incremented).
        compat: "paper": the equations exactly, the running variance updated with the
            unbiased batch variance (as ``nn.BatchNorm2d``); "official": the authors' code
            (unbiased per-(n, c) variance in every derivation, running variance as is).
        logits: ``mean_p`` and ``var_p`` are logits: their softmax is taken inside (as
            :class:`snexp.SwitchNorm2d` does, without two more autograd nodes).
        group: name of the process group whose ranks pool the BN statistics
            (``ProcessGroup.group_name``; SyncSwitchNorm), ``""`` for the local batch.

    Returns:
        The normalized tensor, same shape, dtype and layout as ``x``.

    Raises:
        ValueError: ``x`` has fewer than two dimensions.

    Example:
        >>> x = torch.randn(8, 16, 4, 4)
        >>> p = torch.full((3,), 1 / 3)  # equal IN, LN and BN shares
        >>> y = switch_norm(x, None, None, p, p, torch.zeros(16), torch.ones(16),
        ...                 candidates=("in", "ln", "bn"), training=True)
        >>> y.shape
        torch.Size([8, 16, 4, 4])
    """
    if x.dim() < 2:
        raise ValueError(f"switch_norm expects input of shape (N, C, *), got {tuple(x.shape)}")
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)  # (N, C, 1)
    official = compat == "official"
    update = None
    if training and update_running and running_mean is not None:
        update = (num_batches_tracked, -1.0 if momentum is None else float(momentum))
    y = op.switch_norm(x, weight, bias, mean_p, var_p, running_mean, running_var,
                       ",".join(candidates), float(eps), bool(training), bool(logits), official,
                       official and squeeze, group, update)
    return y.squeeze(-1) if squeeze else y


def sparsemax(z: Tensor) -> Tensor:
    """Euclidean projection of ``z`` onto the probability simplex, along the last dim.

    Martins & Astudillo, "From Softmax to Sparsemax" (ICML 2016): like softmax it returns a
    point of the simplex, but one with exact zeros.

    Args:
        z: logits of shape (..., K).

    Returns:
        Weights of the same shape, non-negative, summing to one along the last dim.

    Example:
        >>> sparsemax(torch.tensor([1.0, 0.2, -1.0]))
        tensor([0.9000, 0.1000, 0.0000])
    """
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cs = zs.cumsum(-1)
    support = (1 + k * zs > cs).sum(-1, keepdim=True)  # size of the support, >= 1
    tau = (cs.gather(-1, support - 1) - 1) / support.to(z.dtype)
    return torch.clamp(z - tau, min=0)


def sparsestmax(z: Tensor, radius: Tensor | float) -> Tensor:
    """SparsestMax of logits ``z`` along the last dim, with sphere radius ``radius`` in [0, 1].

    With ``w = sparsemax(z)`` and ``u`` uniform over the support of ``w``: if
    ``||w - u|| < radius``, ``w`` is pushed out to the sphere of that radius around ``u`` and
    projected back onto the simplex (which shrinks the support), and the step repeats.
    Branch-free (no host synchronization): at most ``K - 1`` rounds, each of which either
    leaves ``w`` unchanged or shrinks its support. Rows of a batch are independent (an SSN
    layer takes its mean and variance logits in one call).

    Args:
        z: logits of shape (..., K).
        radius: 0 gives :func:`sparsemax`; 1 a one-hot vector (unless the logits are exactly
            tied).

    Returns:
        Weights of the same shape, on the probability simplex along the last dim.

    Example:
        >>> sparsestmax(torch.tensor([1.0, 0.5, -1.0]), 1.0)
        tensor([1., 0., 0.])
    """
    r = torch.as_tensor(radius, dtype=z.dtype, device=z.device)
    w = sparsemax(z)
    for _ in range(z.shape[-1] - 1):
        inside = w > 0
        k = inside.sum(-1, keepdim=True)
        u = inside.to(z.dtype) / k
        d = w - u
        dist = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
        # NOTE: a point exactly at the centre (tied logits) has no direction to move in; it
        # stays put until training breaks the tie.
        push = (dist < r) & (k > 1) & (dist > 0)
        moved = sparsemax(u + r * d / dist.clamp_min(torch.finfo(z.dtype).tiny))
        w = torch.where(push, moved, w)
    return w
