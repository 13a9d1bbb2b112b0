"""Channels-last vs NCHW weights for the conv-stem families: training-step images/s per thread.

The pipeline turns models with overlapping convolutions (conv stems, CCT tokenizers) channels-last
(``vit_model.to_preferred_memory_format``, applied by the training worker, the inference actors
and the packaged model). This script measures what that buys: a full training step (forward,
cross-entropy, backward, AdamW step) on random 28x28 grey batches, the same model and input in
both layouts, timed in alternation (nchw, channels_last, nchw, ...) so machine noise hits both;
the median of the repeats and the ratio channels_last / nchw (> 1 = faster). Patchify-only models
(plain ViT, Swin, T2T) are left unchanged by the pipeline and are not measured here.

    python benchmarks/bench_layout.py [--threads 1] [--batch 64] [--repeats 5] [--steps 30]
                                      [--out benchmarks/results/layout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vit_model import create_model, to_preferred_memory_format

CASES = {  # the quick recipe's model and the CCT of the family table (README), 28x28x1, 10 classes
    "convstem-16-32-64-d64": ("vit_tiny_convstem_28", dict(stem_channels=[16, 32, 64], stem_strides=[1, 2, 2],
                                                            embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0,
                                                            class_token=False, global_pool="avg")),
    "cct-32-64-d64": ("cct_7_3x1_28", dict(stem_channels=[32], stem_strides=[1, 1], embed_dim=64, depth=4,
                                           num_heads=2, mlp_ratio=2.0)),
}


def steps_per_second(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                     steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - start)


def measure(name: str, args: dict, batch: int, repeats: int, steps: int) -> dict:
    torch.manual_seed(0)
    models = {"nchw": create_model(name, **args)}
    models["channels_last"] = to_preferred_memory_format(create_model(name, **args))
    models["channels_last"].load_state_dict(models["nchw"].state_dict())
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for k in models:  # warm-up: oneDNN primitive creation, allocator
        steps_per_second(models[k], opts[k], x, y, 3)
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for k in models:
            rates[k].append(steps_per_second(models[k], opts[k], x, y, steps) * batch)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"model": name, "args": args, "images_per_s_per_thread": med, "all": rates,
            "ratio_channels_last_over_nchw": med["channels_last"] / med["nchw"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch of the quick recipe")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results/layout.json")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    rows = {}
    for case, (name, args) in CASES.items():
        rows[case] = r = measure(name, args, a.batch, a.repeats, a.steps)
        m = r["images_per_s_per_thread"]
        print(f"{case:24s} nchw {m['nchw']:7.0f} img/s  channels_last {m['channels_last']:7.0f} img/s  "
              f"ratio {r['ratio_channels_last_over_nchw']:.3f}x", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "threads": a.threads, "batch": a.batch, "repeats": a.repeats, "steps": a.steps,
           "cases": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
