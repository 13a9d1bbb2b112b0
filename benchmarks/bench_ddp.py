"""What synchronising gradients costs two 1-CPU training workers: DDP vs independent processes.

The recipes train with 2 Ray Train workers x 1 CPU, each wrapping the model in
``DistributedDataParallel`` (gloo on the CPU). On the 2-core machine the pipeline reaches ~0.6-0.7 of
twice a lone process's images/s; this script measures how much of that is the gradient
synchronisation itself, without Ray: ``--world`` processes (``torch.multiprocessing``, gloo on
127.0.0.1, one intra-op thread each) run the pipeline's training step (bf16 autocast where the CPU
computes it natively, as ``train.precision: auto``; cross-entropy, backward, gradient clipping at
1.0, AdamW) on random 28x28 batches, for these settings, timed in alternation so the host's drift
hits all of them:

* ``independent``: every process trains its own copy, no communication (the baseline: what the
  cores give to data-parallel training if synchronising were free);
* ``ddp``: ``DistributedDataParallel`` with its defaults (what Ray Train's ``prepare_model`` does);
* ``flat_allreduce``: no wrapper; after backward, one ``all_reduce`` of all gradients flattened
  into one buffer (the least communication a synchronous step can do);
* ``independent_b2x`` and ``ddp_b2x``: the same two at twice the per-worker batch (half the
  synchronisations per image).

Prints the median images/s per process and the ratios against ``independent`` at the same batch
(< 1 = slower), and saves JSON.

    python benchmarks/bench_ddp.py [--world 2] [--batch 64] [--repeats 5] [--images 1920]
                                   [--out benchmarks/results/ddp.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_precision import CASES, cpu_model  # the recipes' models

from pipelines.engine import cpu_has_native_bf16
from vit_model import create_model, to_preferred_memory_format

SETTINGS = {  # name: (sync, batch multiplier)
    "independent": ("none", 1),
    "ddp": ("ddp", 1),
    "flat_allreduce": ("flat", 1),
    "independent_b2x": ("none", 2),
    "ddp_b2x": ("ddp", 2),
}
BASELINE = {"ddp": "independent", "flat_allreduce": "independent", "ddp_b2x": "independent_b2x"}


def _step(model, opt, x, y, sync: str, world: int, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sync == "flat":
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def _worker(rank: int, world: int, port: int, args: dict, batch: int, repeats: int, images: int, bf16: bool,
            queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        runs = {}
        for name, (sync, mult) in SETTINGS.items():
            torch.manual_seed(0)
            model = to_preferred_memory_format(create_model("vit_tiny_convstem_28", **args)).train()
            if sync == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            b = batch * mult
            g = torch.Generator().manual_seed(rank)
            x, y = torch.randn(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g)
            runs[name] = (model, opt, x, y, sync, max(1, images // b))
        for model, opt, x, y, sync, _ in runs.values():  # warm-up: oneDNN primitives, allocator, DDP buckets
            for _ in range(3):
                _step(model, opt, x, y, sync, world, bf16)
        rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for _ in range(repeats):
            for name, (model, opt, x, y, sync, steps) in runs.items():
                dist.barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    _step(model, opt, x, y, sync, world, bf16)
                rates[name].append(steps * x.shape[0] / (time.perf_counter() - start))
        queue.put((rank, rates))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: dict, world: int, batch: int, repeats: int, images: int, bf16: bool) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, batch, repeats, images, bf16, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    per_rank = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a benchmark process exited with code {p.exitcode}")
    # images/s per process: the mean over ranks of each repeat, then the median over repeats
    mean_rates = {name: [statistics.fmean(per_rank[r][name][i] for r in per_rank) for i in range(repeats)]
                  for name in SETTINGS}
    med = {name: statistics.median(v) for name, v in mean_rates.items()}
    return {"args": args, "images_per_s_per_process": med, "all": mean_rates,
            "ratio_over_independent": {name: med[name] / med[base] for name, base in BASELINE.items()},
            "b2x_over_b1x": {"independent": med["independent_b2x"] / med["independent"],
                             "ddp": med["ddp_b2x"] / med["ddp"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="processes, one intra-op thread each")
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch of the recipes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=1920, help="images per process per timed repeat")
    parser.add_argument("--out", default="benchmarks/results/ddp.json")
    a = parser.parse_args()
    bf16 = cpu_has_native_bf16()
    print(f"CPU {cpu_model()}, {os.cpu_count()} CPUs; {a.world} processes x 1 thread, "
          f"{'bf16' if bf16 else 'fp32'} (train.precision auto)", flush=True)
    rows = {}
    for case, args in CASES.items():
        rows[case] = r = measure(args, a.world, a.batch, a.repeats, a.images, bf16)
        m, ratio = r["images_per_s_per_process"], r["ratio_over_independent"]
        print(f"{case:28s} batch {a.batch}: independent {m['independent']:5.0f} img/s per process, "
              f"ddp {m['ddp']:5.0f} ({ratio['ddp']:.2f}x), flat all-reduce {m['flat_allreduce']:5.0f} "
              f"({ratio['flat_allreduce']:.2f}x); batch {2 * a.batch}: independent {m['independent_b2x']:5.0f}, "
              f"ddp {m['ddp_b2x']:5.0f} ({ratio['ddp_b2x']:.2f}x; {r['b2x_over_b1x']['ddp']:.2f}x ddp at "
              f"batch {a.batch})", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": cpu_model(), "cpus": os.cpu_count(),
           "world": a.world, "batch": a.batch, "precision": "bf16" if bf16 else "fp32", "repeats": a.repeats,
           "images_per_repeat": a.images, "cases": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
