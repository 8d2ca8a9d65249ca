"""The functional form of Switchable Normalization, and the validation of candidate lists.

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
"""

from __future__ import annotations

from torch import Tensor

from snexp.norm import op

__all__ = ["parse_candidates", "switch_norm"]

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
    running_mean: Tensor | None,
    running_var: Tensor | None,
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
    """Switchable Normalization of ``x`` (N, C, *) with importance probabilities given.

    Args:
        x: input of shape (N, C) or (N, C, *spatial), any float dtype and memory layout.
        weight, bias: affine parameters (C,) or ``None`` for none.
        mean_p, var_p: importance weights (K,) over ``spec.candidates``: points of the
            probability simplex (softmax or sparsestmax outputs). Their gradients are returned
            up to a constant shift, which the softmax/sparsemax Jacobians remove.
        running_mean, running_var: BN-branch running statistics (C,), or ``None`` when "bn" is
            not a candidate.
        candidates: normalized candidate names (:func:`parse_candidates`), e.g.
            ``("in", "ln", "bn")``.
        training: use batch statistics for the BN branch (else the running statistics).
        eps: added to the mixed variance before the square root.
        momentum: PyTorch convention, ``new = (1 - m) * old + m * batch``; ``None`` is a
            cumulative average over ``num_batches_tracked`` batches.
        update_running: blend batch statistics into the running buffers (in place).
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
