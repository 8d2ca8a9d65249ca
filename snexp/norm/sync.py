"""SyncSwitchNorm: Switchable Normalization whose BN branch pools statistics across ranks.

The SN counterpart of ``nn.SyncBatchNorm`` for DistributedDataParallel. Only the BN candidate
needs other ranks: each rank sends its per-channel sample count, mean and (centered) variance,
derived from the local per-(n, c) statistics, in one all-gather (3 x C numbers per rank), and
every rank pools them with Chan et al.'s formula, so unequal per-rank batch sizes are fine, the
counts stay on the device (no host synchronization) and no digits are lost when |mean| >> std.
The backward all-reduces the BN branch's (2, C) gradient sums. IN, LN and GN statistics are per
sample and stay local. Outside training, without an initialized
process group, or with one rank, it computes exactly what :class:`SwitchNorm2d` does.
"""

from __future__ import annotations

from torch import nn

from snexp.norm.sparse import _Sparse
from snexp.norm.switchable import _SwitchNorm

__all__ = ["SyncSwitchNorm"]


class SyncSwitchNorm(_SwitchNorm):
    """Switchable Normalization with cross-process BN statistics, for (N, C, *) input.

    Args:
        num_features: channel count C.
        *args, **kwargs: as :class:`snexp.SwitchNorm2d`.
        process_group: the ranks to pool over; ``None`` is the default (world) group.

    Example:
        >>> model = SyncSwitchNorm.convert_sync_switchnorm(model)  # before wrapping in DDP
    """

    _ranks = (2, 3, 4, 5)
    _layout = "(N, C, *)"
    _sync = True

    def __init__(self, num_features: int, *args, process_group=None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group

    @classmethod
    def convert_sync_switchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every (dense) SN layer in ``module`` with a SyncSwitchNorm.

        Parameters, buffers and options (the importance prior too) are carried over. Returns
        the converted module (a new object when ``module`` itself is an SN layer). Sparse SN
        layers are refused: their synchronized variant does not exist yet.
        """
        if isinstance(module, _Sparse):
            raise TypeError(f"{type(module).__name__} cannot be synchronized yet; use dense SN "
                            f"('sn') with --sync-norm")
        out = module
        if isinstance(module, _SwitchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.candidates,
                      moving_average=module.moving_average, last_gamma=module.last_gamma,
                      affine=module.affine, compat=module.compat, process_group=process_group,
                      prior=dict(zip(module.candidates, module.prior)),
                      var_prior=dict(zip(module.candidates, module.var_prior)),
                      device=module.mean_weight.device, dtype=module.mean_weight.dtype)
            out.load_state_dict(module.state_dict())
            out.train(module.training)
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_switchnorm(child, process_group))
        return out
