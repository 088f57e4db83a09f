"""torch.distributed plumbing for examples/train_inpainting.py: the process group from torchrun's environment,
SyncBatchNorm (PyTorch's on GPUs, a gloo version on the CPU), cross-rank averages.

The script runs as one plain process (no RANK/WORLD_SIZE in the environment) or under torchrun, which sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process it starts; the process group then uses
NCCL on GPUs and gloo on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: Optional[str] = None  # None: a plain single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def setup(device: torch.device) -> tuple[DistEnv, torch.device]:
    """Join the process group when started by torchrun, and pick this rank's device: ``cuda`` (no index) means
    ``cuda:LOCAL_RANK`` under torchrun. Returns (environment, device)."""
    if not launched_by_torchrun():
        return DistEnv(), device
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, local_rank, world, backend), device


def teardown(env: DistEnv) -> None:
    if env.initialized and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def mean_over_ranks(values: Dict[str, float], env: DistEnv) -> Dict[str, float]:
    """Average a dict of floats over the ranks (every rank must call it, with the same keys)."""
    if not env.initialized or env.world_size == 1:
        return dict(values)
    keys = list(values)  # the same order on every rank: the callers build the dicts identically
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if env.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.cpu().tolist())}


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): y = sum_r x_r on every rank; the backward sums the ranks' gradients,
    so each rank's x gets d(sum_k L_k)/dy, as PyTorch's SyncBatchNorm backward does."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g)
        return g


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with batch statistics over all ranks, for CPU tensors under gloo (``nn.SyncBatchNorm`` accepts
    GPU tensors only). Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``; in eval mode, or
    without a process group of more than one rank, it is ``nn.BatchNorm2d``.

    Training mode: the per-channel sum and element count are all-reduced (mean), then the sum of squared
    deviations from that mean (biased variance, a two-pass formula as accurate as the single-process one),
    both through a differentiable all-reduce; statistics in float32 whatever the input dtype. Running
    statistics are updated as ``nn.BatchNorm2d`` does with the global batch (unbiased running variance)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum(dim=(0, 2, 3)), xf.new_tensor([x.numel() // c])])
        total = _AllReduceSum.apply(local)
        count = total[c].detach()
        mean = total[:c] / count
        d = xf - mean.view(1, c, 1, 1)
        var = _AllReduceSum.apply((d * d).sum(dim=(0, 2, 3))) / count
        y = d * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var.detach() * (count / (count - 1).clamp_min(1))  # tensors: no host sync, no graph break
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``module`` synchronised over the ranks: ``nn.SyncBatchNorm`` on CUDA,
    :class:`GlooSyncBatchNorm` elsewhere. Parameters are moved, not copied, so ``requires_grad`` (the frozen
    encoder BN of fine-tuning) and the optimizer's parameter order survive; eval/train modes are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_gloo(module)


def _convert_gloo(module: nn.Module) -> nn.Module:
    out = module
    if type(module) is nn.BatchNorm2d:
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            if module.track_running_stats:
                out.running_mean, out.running_var = module.running_mean, module.running_var
                out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_gloo(child))
    return out
