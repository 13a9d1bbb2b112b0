"""Two real processes over gloo (torch.distributed, no Ray): ranks stop together on a non-finite loss."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from pipelines.config import load_config
from pipelines.engine import NonFiniteLossError, build_optimizer, build_scheduler, train_one_epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False))
        with torch.no_grad():
            model[1].weight.copy_(torch.tensor([[1e38], [-1e38]]))
        ddp = DistributedDataParallel(model)
        cfg = load_config(None, ["train.lr=1e-6", "train.label_smoothing=0", "train.epochs=1"]).train
        opt = build_optimizer(ddp, cfg)
        sched = build_scheduler(opt, cfg, 4)
        ok = (torch.ones(1, 1, 1, 1), torch.tensor([0]))
        # logits (+2e38, -2e38) against label 1: the loss overflows to inf, its gradient stays finite
        overflow = (torch.full((1, 1, 1, 1), 2.0), torch.tensor([1]))
        batches = [ok, ok, overflow if rank == 1 else ok, ok]
        try:
            train_one_epoch(ddp, batches, opt, sched, cfg, device=torch.device("cpu"), epoch=0)
            results[rank] = "finished"
        except NonFiniteLossError as exc:
            results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def test_ranks_stop_together_on_a_rank_local_non_finite_loss():
    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.start_processes(_worker, args=(_free_port(), results), nprocs=2, join=False, start_method="spawn")
        for p in ctx.processes:
            p.join(timeout=120)
        alive = [p.pid for p in ctx.processes if p.is_alive()]
        for p in ctx.processes:
            p.kill()
        assert not alive, "a rank hung in a collective"
        assert set(results.keys()) == {0, 1}, dict(results)
        assert results[1].startswith("non-finite loss inf at epoch 0, step 2"), results[1]
        assert results[0].startswith("non-finite loss on another rank at epoch 0, step 2"), results[0]
