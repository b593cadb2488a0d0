"""Worker functions for the DistributedDataParallel tests, in a module of their own so that a spawned process imports
only what it needs (torch and fxsparse, not the test module with its model zoo)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def train_sparse_under_ddp(rank: int, world: int, port: int, queue) -> None:
    """Sparsify 2:4, keep the masks, train 10 SGD steps under DDP on rank-specific data; report whether every masked
    weight is still 2:4, and the weights (as lists, so the queue needs no shared memory once this process ends)."""
    import fxsparse
    from fxsparse import passes
    from fxsparse.sparse import NM, Eligibility, keep_masks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
        result = fxsparse.compile(model, torch.randn(4, 32),
                                  [passes.Sparsify("2:4", eligible=Eligibility(min_rows=1, min_inputs=1))])
        module = result.module
        ddp = nn.parallel.DistributedDataParallel(module)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        keep_masks(module, result.plan, opt)
        generator = torch.Generator().manual_seed(rank)  # each rank its own data: gradients differ before all-reduce
        for _ in range(10):
            opt.zero_grad()
            ddp(torch.randn(8, 32, generator=generator)).pow(2).mean().backward()
            opt.step()
        params = dict(module.named_parameters())
        holds = all(NM(2, 4).holds(params[name], entry["layout"]) for name, entry in result.plan.masks.items())
        queue.put((rank, holds and len(result.plan.masks) == 2, {n: p.tolist() for n, p in params.items()}))
    finally:
        dist.destroy_process_group()
