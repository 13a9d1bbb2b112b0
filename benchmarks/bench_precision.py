"""bf16 autocast vs fp32 on the CPU: training-step images/s per thread for the recipes' models.

``train.precision: auto`` trains in bf16 where the CPU computes it natively (AVX512-BF16, AMX, Arm
BF16) and ``vit_model.layers.attention`` runs PyTorch's CPU flash-attention kernel in fp32 under
autocast, because that one kernel is slow in bf16. This script measures both decisions: a full
training step (forward, cross-entropy, backward, AdamW step; channels-last weights as the pipeline
uses them) on random 28x28 grey batches, for three settings timed in alternation so machine noise
hits all of them:

* ``fp32``: no autocast (the baseline);
* ``bf16``: ``torch.autocast("cpu", bfloat16)`` with the attention kernel in fp32 (what runs);
* ``bf16_attn_bf16``: the same, with the attention kernel left in bf16 (plain
  ``F.scaled_dot_product_attention``).

Prints the median images/s of the repeats and the ratios against fp32 (> 1 = faster), and saves
JSON. On a CPU without native bf16 the bf16 rows show the emulation's cost.

    python benchmarks/bench_precision.py [--threads 1] [--batch 64] [--repeats 5] [--steps 20]
                                         [--out benchmarks/results/precision.json]
"""

from __future__ import annotations

import argparse
import contextlib
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
import vit_model.layers as layers
from pipelines.engine import cpu_has_native_bf16
from vit_model import create_model, to_preferred_memory_format

STEM = dict(stem_strides=[1, 2, 2], num_heads=2, mlp_ratio=2.0, class_token=False, global_pool="avg")
CASES = {  # configs/fashion_mnist_quick.yaml and configs/fashion_mnist_best.yaml, 28x28x1, 10 classes
    "quick-convstem-16-32-64-d64": dict(STEM, stem_channels=[16, 32, 64], embed_dim=64, depth=4),
    "best-convstem-24-48-96-d96": dict(STEM, stem_channels=[24, 48, 96], embed_dim=96, depth=4, num_heads=3,
                                       drop_path_rate=0.1),
}
SETTINGS = ("fp32", "bf16", "bf16_attn_bf16")


@contextlib.contextmanager
def setting(name: str):
    """Autocast (or not) and, for ``bf16_attn_bf16``, the plain SDPA kernel inside the blocks."""
    shared = layers.attention
    if name == "bf16_attn_bf16":
        layers.attention = F.scaled_dot_product_attention
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32"):
            yield
    finally:
        layers.attention = shared


def images_per_second(model, opt, x, y, steps: int, name: str) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        with setting(name):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * x.shape[0] / (time.perf_counter() - start)


def measure(args: dict, batch: int, repeats: int, steps: int) -> dict:
    torch.manual_seed(0)
    first = to_preferred_memory_format(create_model("vit_tiny_convstem_28", **args))
    models = {SETTINGS[0]: first}
    for name in SETTINGS[1:]:  # the same starting weights for every setting
        models[name] = to_preferred_memory_format(create_model("vit_tiny_convstem_28", **args))
        models[name].load_state_dict(first.state_dict())
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for k in SETTINGS:  # warm-up: oneDNN primitive creation, allocator
        images_per_second(models[k], opts[k], x, y, 3, k)
    rates: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for _ in range(repeats):
        for k in SETTINGS:
            rates[k].append(images_per_second(models[k], opts[k], x, y, steps, k))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"args": args, "images_per_s_per_thread": med, "all": rates,
            "ratio_over_fp32": {k: med[k] / med["fp32"] for k in SETTINGS[1:]}}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def step_bench_args(doc: str, out: str, steps: int = 20) -> argparse.Namespace:
    """The options every per-thread training-step benchmark takes (this one, bench_step.py);
    sets torch's thread count."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch of the recipes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--out", default=out)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    return a


def write_results(a: argparse.Namespace, rows: dict, **extra) -> None:
    """``a.out``: the date, versions, machine, the options and ``rows`` (one per case)."""
    out = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpu": cpu_model(), **extra,
           "cpus": os.cpu_count(), "threads": a.threads, "batch": a.batch, "repeats": a.repeats, "steps": a.steps,
           "cases": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


def main() -> None:
    a = step_bench_args(__doc__, "benchmarks/results/precision.json")
    native = cpu_has_native_bf16()
    print(f"CPU {cpu_model()}: native bf16 {'yes' if native else 'no'} (train.precision auto -> "
          f"{'bf16' if native else 'fp32'})", flush=True)
    rows = {}
    for case, args in CASES.items():
        rows[case] = r = measure(args, a.batch, a.repeats, a.steps)
        m, ratio = r["images_per_s_per_thread"], r["ratio_over_fp32"]
        print(f"{case:28s} fp32 {m['fp32']:6.0f} img/s  bf16 {m['bf16']:6.0f} ({ratio['bf16']:.2f}x)  "
              f"bf16 with bf16 attention {m['bf16_attn_bf16']:6.0f} ({ratio['bf16_attn_bf16']:.2f}x)", flush=True)
    write_results(a, rows, native_bf16=native)


if __name__ == "__main__":
    main()
