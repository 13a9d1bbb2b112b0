"""The training step's bookkeeping on the CPU: AdamW and the EMA update, before and after.

A training step of the recipes' models is forward + backward (most of it), then gradient clipping,
the optimizer step and the EMA update. With ~64 small parameter tensors the last two are a loop of
small ops per tensor unless they run as one kernel:

* ``adamw``: ``torch.optim.AdamW`` as PyTorch picks it for CPU tensors (the per-parameter loop;
  what ``pipelines.engine.build_optimizer`` built on the CPU before) vs ``fused=True`` (what it
  builds now, torch >= 2.4);
* ``ema``: one ``mul_``/``add_`` pair per tensor (the previous ``ModelEma.update``) vs
  ``ModelEma.update`` now (one ``torch._foreach_lerp_`` over all tensors);
* ``step``: the whole training step as ``pipelines.engine.train_one_epoch`` runs it (autocast as
  ``train.precision: auto`` resolves here, cross-entropy, backward, clip-norm measurement, AdamW,
  EMA) with the previous and the current optimizer + EMA, on the same weights and batches, timed
  in alternation so machine noise hits both.

Prints milliseconds per call (median of the repeats) and the ratios (> 1 = faster now), saves JSON.

    python benchmarks/bench_step.py [--threads 1] [--batch 64] [--repeats 5] [--steps 20]
                                    [--out benchmarks/results/step.json]
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_precision import CASES, step_bench_args, write_results  # benchmarks/ is the script's directory

from pipelines.engine import ModelEma, auto_precision, autocast_context, param_groups
from vit_model import create_model, to_preferred_memory_format


class PerTensorEma(ModelEma):
    """The previous update: one mul_/add_ pair per floating-point tensor (the baseline)."""

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        decay = self.decay_at(step)
        current = model.state_dict()
        for name, ema_v in self.module.state_dict().items():
            if ema_v.is_floating_point():
                ema_v.mul_(decay).add_(current[name].detach().to(ema_v.dtype), alpha=1.0 - decay)
            else:
                ema_v.copy_(current[name])


def ms_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def alternate(fns: dict[str, Callable[[], object]], repeats: int, calls: int) -> dict[str, float]:
    """Median ms per call of each function, the functions timed in turn ``repeats`` times."""
    for fn in fns.values():  # warm-up: oneDNN primitives, allocator
        ms_per_call(fn, 3)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(ms_per_call(fn, calls))
    return {k: statistics.median(v) for k, v in times.items()}


def measure(args: dict, batch: int, repeats: int, steps: int) -> dict:
    torch.manual_seed(0)
    before = to_preferred_memory_format(create_model("vit_tiny_convstem_28", **args)).train()
    now = copy.deepcopy(before)
    setups = {
        "before": (before, torch.optim.AdamW(param_groups(before, 0.05), lr=1e-3), PerTensorEma(before, 0.999)),
        "now": (now, torch.optim.AdamW(param_groups(now, 0.05), lr=1e-3, fused=True), ModelEma(now, 0.999)),
    }
    device = torch.device("cpu")
    precision = auto_precision(device)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def train_step(model, opt, ema):
        def run():
            with autocast_context(precision, device):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            opt.step()
            ema.update(model, step=1000)
        return run

    step = alternate({k: train_step(*s) for k, s in setups.items()}, repeats, steps)
    # the optimizer and EMA alone, on the gradients the last step left
    adamw = alternate({k: s[1].step for k, s in setups.items()}, repeats, steps * 5)
    ema = alternate({k: (lambda m=s[0], e=s[2]: e.update(m, step=1000)) for k, s in setups.items()},
                    repeats, steps * 5)
    return {"args": args, "precision": precision, "ms": {"step": step, "adamw": adamw, "ema": ema},
            "speedup": {part: t["before"] / t["now"] for part, t in (("step", step), ("adamw", adamw), ("ema", ema))}}


def main() -> None:
    a = step_bench_args(__doc__, "benchmarks/results/step.json")
    rows = {}
    for case, args in CASES.items():
        rows[case] = r = measure(args, a.batch, a.repeats, a.steps)
        ms, up = r["ms"], r["speedup"]
        print(f"{case:28s} ({r['precision']}) step {ms['step']['before']:6.1f} -> {ms['step']['now']:6.1f} ms "
              f"({up['step']:.3f}x)  AdamW {ms['adamw']['before']:.2f} -> {ms['adamw']['now']:.2f} ms "
              f"({up['adamw']:.1f}x)  EMA {ms['ema']['before']:.2f} -> {ms['ema']['now']:.3f} ms "
              f"({up['ema']:.1f}x)", flush=True)
    write_results(a, rows)


if __name__ == "__main__":
    main()
