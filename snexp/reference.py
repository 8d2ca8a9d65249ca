"""Plain-autograd Switchable Normalization: the test oracle and the benchmark baseline.

Each candidate's statistics are computed directly from the input with ``torch.var_mean`` over
its own set of dimensions (paper eq. 3-5 of arXiv 1806.10779, not the derivation from IN
statistics that the fused kernel uses), so agreement between the two checks the derivation too.
``compat="official"`` follows the authors' released code instead: unbiased per-(n, c) variance,
``var_ln = mean_c(var_in + mu_in^2) - mu_ln^2`` (the same over n for BN), and for (N, C) input
unbiased variances over C (LN) and N (BN). Slow on purpose: every step is a separate tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["switch_norm"]


def _direct(x: Tensor, cand: str, unbiased: bool) -> tuple[Tensor, Tensor]:
    """Mean and variance of one candidate, broadcastable to x, straight from x."""
    n, c = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    if cand == "in":
        dims = spatial
    elif cand == "ln":
        dims = (1,) + spatial
    elif cand == "bn":
        dims = (0,) + spatial
    else:
        g = int(cand[2:])
        xg = x.reshape(n, g, c // g, *x.shape[2:])
        var, mean = torch.var_mean(xg, dim=tuple(range(2, xg.dim())), keepdim=True,
                                   correction=int(unbiased))
        shape = (n, c) + (1,) * len(spatial)
        return (mean.expand(n, g, c // g, *([1] * len(spatial))).reshape(shape),
                var.expand(n, g, c // g, *([1] * len(spatial))).reshape(shape))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=int(unbiased))
    return mean, var


def _official(x: Tensor, cand: str) -> tuple[Tensor, Tensor]:
    """The authors' derivation: every statistic from unbiased per-(n, c) moments."""
    n, c = x.shape[:2]
    spatial = tuple(range(2, x.dim()))
    if not spatial:  # (N, C): their 1d layer, unbiased over C (LN) or over N (BN)
        if cand.startswith("gn"):  # (not in their code) unbiased over each group's C/G
            g = int(cand[2:])
            var, mean = torch.var_mean(x.reshape(n, g, c // g), dim=2, keepdim=True,
                                       correction=1)
            return (mean.expand(n, g, c // g).reshape(n, c),
                    var.expand(n, g, c // g).reshape(n, c))
        var, mean = torch.var_mean(x, dim=1 if cand == "ln" else 0, keepdim=True, correction=1)
        return mean, var
    var_in, mean_in = torch.var_mean(x, dim=spatial, keepdim=True, correction=1)
    if cand == "in":
        return mean_in, var_in
    temp = var_in + mean_in ** 2
    if cand in ("ln", "bn"):
        dim = 1 if cand == "ln" else 0
        mean = mean_in.mean(dim, keepdim=True)
        return mean, temp.mean(dim, keepdim=True) - mean ** 2
    g = int(cand[2:])
    shape = (n, g, c // g) + (1,) * len(spatial)
    mean = mean_in.reshape(shape).mean(2, keepdim=True)
    var = temp.reshape(shape).mean(2, keepdim=True) - mean ** 2
    full = (n, c) + (1,) * len(spatial)
    return mean.expand(shape).reshape(full), var.expand(shape).reshape(full)


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
    momentum: float = 0.1,
    eps: float = 1e-5,
    compat: str = "paper",
    update_running: bool = True,
) -> Tensor:
    """Reference SN forward with autograd; same arguments as :func:`snexp.switch_norm`.

    Returns:
        ``weight * (x - mu) / sqrt(var + eps) + bias`` with mixed statistics, computed in the
        dtype of ``x`` promoted to at least float32. Running buffers are updated in place.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    c = x.shape[1]
    bshape = (1, c) + (1,) * (x.dim() - 2)
    mu = var = 0
    for k, cand in enumerate(candidates):
        if cand == "bn" and not training and running_mean is not None:
            mk, vk = running_mean.view(bshape), running_var.view(bshape)
        elif compat == "official":
            mk, vk = _official(xf, cand)
        else:
            mk, vk = _direct(xf, cand, unbiased=False)
        if cand == "bn" and training and update_running and running_mean is not None:
            with torch.no_grad():
                count = x.numel() // c
                v = vk.detach()
                if compat == "paper" and count > 1:
                    v = v * count / (count - 1)
                running_mean.mul_(1 - momentum).add_(momentum * mk.detach().flatten())
                running_var.mul_(1 - momentum).add_(momentum * v.flatten())
        mu = mu + mean_p[k] * mk
        var = var + var_p[k] * vk
    y = (xf - mu) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.view(bshape)
    if bias is not None:
        y = y + bias.view(bshape)
    return y.to(x.dtype)
