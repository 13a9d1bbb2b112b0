"""vit_model vs timm: forward and forward+backward images/s and peak memory, same process/threads.

Each (implementation, case, mode) is timed in alternation with its peer (ours, timm, ours, timm,
...) so machine noise hits both; the median of the repeats is reported with the ratio
ours / timm (goal >= 1.0). Peak memory: CUDA max_memory_allocated on a GPU; on the CPU the
peak RSS growth of a fresh subprocess per measurement.

    python benchmarks/bench_model.py [--device cpu|cuda] [--repeats 5] [--out benchmarks/results/model.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "vit_s16_224": dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=12, num_heads=6),
    "fmnist_28_p4_d192_l6": dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=6, num_heads=3),
}
BATCH = {"cpu": {"vit_s16_224": 8, "fmnist_28_p4_d192_l6": 128}, "cuda": {"vit_s16_224": 128, "fmnist_28_p4_d192_l6": 1024}}


def build(impl: str, kw: dict, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if impl == "ours":
        from vit_model import VisionTransformer, ViTConfig

        model = VisionTransformer(ViTConfig(**kw))
    else:
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        model = TimmViT(**kw)
    return model.to(device)


def time_once(model: torch.nn.Module, x: torch.Tensor, mode: str, iters: int) -> float:
    """Images/s over ``iters`` steps after one warm-up step."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                model(x)
        else:
            model.zero_grad(set_to_none=True)
            model(x).float().logsumexp(-1).mean().backward()

    model.train(mode == "fwd_bwd")
    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return iters * x.shape[0] / (time.perf_counter() - t0)


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_peak(impl: str, case: str, mode: str, device: str, batch: int) -> float:
    """Peak memory (MiB) that one step adds on top of the model and input (run in a fresh process).

    CUDA: max_memory_allocated minus what was allocated before the step. CPU: Linux peak RSS
    (VmHWM, reset through /proc/self/clear_refs) minus RSS before the step."""
    kw = CASES[case]
    model = build(impl, kw, device).train(mode == "fwd_bwd")
    x = torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"], device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _proc_status_kib("VmRSS") * 1024
    with torch.enable_grad() if mode == "fwd_bwd" else torch.no_grad():
        y = model(x)
        if mode == "fwd_bwd":
            y.float().logsumexp(-1).mean().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (_proc_status_kib("VmHWM") * 1024 - base) / 2**20


def peak_memory_child(impl: str, case: str, mode: str, device: str, batch: int) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, case, mode, device, str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        impl, case, mode, device, batch = sys.argv[2:]
        print(measure_peak(impl, case, mode, device, int(batch)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/model.json")
    args = parser.parse_args()
    dev = torch.device(args.device)
    results = []
    for case in args.cases:
        kw = CASES[case]
        batch = BATCH[dev.type][case]
        x = torch.randn(batch, kw["in_chans"], kw["img_size"], kw["img_size"], device=dev)
        models = {impl: build(impl, kw, args.device) for impl in ("ours", "timm")}
        for mode in ("fwd", "fwd_bwd"):
            speeds = {"ours": [], "timm": []}
            for _ in range(args.repeats):
                for impl in ("ours", "timm"):
                    speeds[impl].append(time_once(models[impl], x, mode, args.iters))
            row = {
                "case": case, "mode": mode, "batch": batch,
                "ours_img_s": statistics.median(speeds["ours"]), "timm_img_s": statistics.median(speeds["timm"]),
            }
            row["ratio"] = row["ours_img_s"] / row["timm_img_s"]
            if not args.no_memory:
                row["ours_peak_mib"] = peak_memory_child("ours", case, mode, args.device, batch)
                row["timm_peak_mib"] = peak_memory_child("timm", case, mode, args.device, batch)
            results.append(row)
            mem = f"  peak MiB ours {row['ours_peak_mib']:.0f} / timm {row['timm_peak_mib']:.0f}" if not args.no_memory else ""
            print(f"{case:22s} {mode:8s} batch {batch:5d}  ours {row['ours_img_s']:9.1f} img/s  timm {row['timm_img_s']:9.1f} img/s"
                  f"  ratio {row['ratio']:.3f}{mem}", flush=True)
    import timm

    doc = {
        "benchmark": "vit_model vs timm VisionTransformer",
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "repeats": args.repeats, "iters": args.iters, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
