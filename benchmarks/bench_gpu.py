"""GPU readiness: ViT training images/s, MFU and peak memory — ours vs timm, torch.compile and
fused AdamW on and off, in one run.

Needs torch >= 2.4 and this repository's ``vit_model`` only: no Ray, no MLflow (the GPU machine
has neither). timm is used when it is importable; without it timm's rows are skipped with a note.

Every configuration trains the same architecture (default ``vit_base_patch16_224``: ViT-B/16,
224x224 RGB, 1000 classes) on synthetic data that lives on the device, with bf16 autocast
(``torch.autocast(device_type, dtype=torch.bfloat16)``; weights and optimizer state stay fp32),
cross-entropy, ``AdamW`` and ``zero_grad(set_to_none=True)``. A step = forward + backward +
optimizer step. Configurations, in this order (the first is the baseline of every ratio)::

    ours  eager     AdamW default (foreach)     <- baseline
    ours  eager     AdamW fused=True
    ours  compiled  AdamW default / fused       (torch.compile(model), default mode)
    timm  ...       the same four

Timing: ``--warmup`` steps first (they include torch.compile's compilation, reported as
``warmup_s``), then ``torch.cuda.synchronize()``, ``--steps`` steps, ``synchronize()`` again;
images/s = steps x batch / elapsed. Peak memory: ``torch.cuda.max_memory_allocated()`` over the
timed steps (reset after warm-up, so it holds weights + gradients + AdamW state + the step's
activations). The CPU has neither, so there it is reported as null.

FLOPs: training FLOPs per image = 3 x forward FLOPs (backward ~ 2 x forward). Forward FLOPs come
from ``vit_model.flops_per_image`` (``--flops analytic``, default: 2 x multiply-adds of every
matmul and convolution, attention included; norms, softmax, GELU and the optimizer not counted),
or from ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass of our model
(``--flops counter``). The JSON says which. The two agree on CUDA; on the CPU torch's counter
has no formula for SDPA's CPU kernel and misses the attention matmuls (ViT-B/16: 33.7 vs 35.1
GFLOPs). ViT-B/16 at 224: 35.1 GFLOPs forward, 105.4 GFLOPs per trained image. MFU = images/s x training FLOPs per image / peak.

Peak: dense (not sparse) bf16 tensor-core TFLOPS looked up from the device name in
:data:`PEAK_BF16_TFLOPS` (vendor datasheets, cited there), or ``--peak-tflops``. Unknown device
or CPU: MFU is reported as n/a (null).

    python benchmarks/bench_gpu.py                               # CUDA: 8 configurations
    python benchmarks/bench_gpu.py --batch-size 256 --steps 50 --peak-tflops 989
    python benchmarks/bench_gpu.py --device cpu --model vit_tiny_patch16_224 --steps 2 --batch-size 2   # smoke

Writes ``benchmarks/results/gpu.json`` (or ``--out``) and prints one line per configuration with
its ratio to our eager baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vit_model import config_from_name, create_model, flops_per_image  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOPS), matched in order against torch.cuda.get_device_name().
# Vendor datasheets quote bf16 "with sparsity" (2:4 structured) as the headline figure; the dense
# peak (what a ViT uses) is half of it. Sources:
#   H100 / H200: https://www.nvidia.com/en-us/data-center/h100/  and .../h200/ (product pages,
#     datasheet tables: BF16 Tensor Core 1,979 TFLOPS SXM, 1,671 NVL, 1,513 PCIe, "with sparsity")
#   A100: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
#     (BF16 Tensor Core 312 TFLOPS | 624 with sparsity; same for 40 GB / 80 GB, SXM / PCIe)
#   L4: https://www.nvidia.com/en-us/data-center/l4/ (BF16 Tensor Core 242.5 TFLOPS with sparsity)
#   L40S: https://www.nvidia.com/en-us/data-center/l40s/ (BF16 Tensor Core 362.05 | 733 with sparsity)
#   A10: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/datasheet-new/nvidia-a10-datasheet.pdf
#     (BF16 Tensor Core 125 TFLOPS | 250 with sparsity)
#   B200: https://www.nvidia.com/en-us/data-center/hgx/ (HGX B200, FP16/BF16 Tensor Core 4.5 PFLOPS
#     per GPU with sparsity -> 2,250 dense)
# Anything else (A10G, consumer cards, AMD): pass --peak-tflops from your vendor's datasheet.
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    (r"\bGH200\b", 989.0, "NVIDIA GH200 (H200-class GPU): 1,979 TFLOPS bf16 with sparsity / 2"),
    (r"\bH200 NVL\b", 835.0, "NVIDIA H200 NVL datasheet: 1,671 TFLOPS bf16 with sparsity / 2"),
    (r"\bH200\b", 989.0, "NVIDIA H200 SXM datasheet: 1,979 TFLOPS bf16 with sparsity / 2"),
    (r"\bH100 NVL\b", 835.0, "NVIDIA H100 NVL datasheet: 1,671 TFLOPS bf16 with sparsity / 2"),
    (r"\bH100 PCIe\b", 756.0, "NVIDIA H100 PCIe datasheet: 1,513 TFLOPS bf16 with sparsity / 2"),
    (r"\bH100\b", 989.0, "NVIDIA H100 SXM datasheet: 1,979 TFLOPS bf16 with sparsity / 2"),
    (r"\bB200\b", 2250.0, "NVIDIA HGX B200: 4.5 PFLOPS bf16 per GPU with sparsity / 2"),
    (r"\bA100\b", 312.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity)"),
    (r"\bL40S\b", 362.0, "NVIDIA L40S datasheet: 362.05 TFLOPS bf16 dense (733 with sparsity)"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: 242.5 TFLOPS bf16 with sparsity / 2"),
    (r"\bA10\b", 125.0, "NVIDIA A10 datasheet: 125 TFLOPS bf16 dense (250 with sparsity)"),
]

BASELINE = ("ours", False, False)  # (impl, compiled, fused): our model, eager, default AdamW


def lookup_peak(device_name: str) -> tuple[float | None, str]:
    """(dense bf16 TFLOPS, source) for a CUDA device name; (None, why) when not in the table."""
    for pattern, tflops, source in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops, source
    return None, f"{device_name!r} is not in PEAK_BF16_TFLOPS; pass --peak-tflops"


def timm_version() -> str | None:
    try:
        import timm
    except ImportError:
        return None
    return timm.__version__


def build_model(impl: str, name: str) -> torch.nn.Module:
    if impl == "ours":
        return create_model(name)
    import timm

    return timm.create_model(name, pretrained=False)


def forward_flops(name: str, method: str, device: torch.device) -> float:
    """Forward FLOPs per image of our model ``name`` (see the module doc)."""
    cfg = config_from_name(name)
    if method == "analytic":
        return float(flops_per_image(cfg))
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(name).to(device).eval()
    x = torch.randn(1, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    del model
    return float(counter.get_total_flops())


def fused_adamw(params, fused: bool) -> torch.optim.Optimizer:
    # fused=None keeps torch's default (the foreach implementation on CUDA and CPU in 2.4+);
    # fused=True exists for CUDA since 2.0 and for the CPU since 2.4.
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=True if fused else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_compiler() -> None:
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and hasattr(dynamo, "reset"):
        dynamo.reset()


def run_config(impl: str, compiled: bool, fused: bool, args: argparse.Namespace, device: torch.device,
               train_flops: float, peak_tflops: float | None) -> dict:
    """Build, warm up and time one configuration; a dict row (status ok / skipped / failed)."""
    row: dict = {"impl": impl, "compiled": compiled, "fused_adamw": fused,
                 "optimizer": "AdamW(fused=True)" if fused else "AdamW (default: foreach)"}
    if impl == "timm" and timm_version() is None:
        return {**row, "status": "skipped", "reason": "timm is not installed (pip install timm)"}
    torch.manual_seed(0)
    model = opt = step_model = None
    try:
        model = build_model(impl, args.model).to(device).train()
        row["params"] = sum(p.numel() for p in model.parameters())
        try:
            opt = fused_adamw(model.parameters(), fused)
        except (RuntimeError, TypeError, ValueError) as exc:  # e.g. fused AdamW on an unsupported device
            return {**row, "status": "skipped", "reason": f"AdamW(fused=True) unavailable here: {exc}"}
        step_model = torch.compile(model) if compiled else model
        cfg = config_from_name(args.model)
        x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
        y = torch.randint(0, cfg.num_classes, (args.batch_size,), device=device)

        def step() -> torch.Tensor:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(step_model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync(device)
        row["warmup_s"] = round(time.perf_counter() - t0, 3)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync(device)
        elapsed = time.perf_counter() - t0
    except Exception as exc:  # report and go on: one broken configuration must not hide the others
        return {**row, "status": "failed", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        model = opt = step_model = None  # free this configuration before the next one
        gc.collect()
        if compiled:
            reset_compiler()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ips = args.steps * args.batch_size / elapsed
    row.update({
        "status": "ok", "seconds": round(elapsed, 4), "step_ms": round(1000 * elapsed / args.steps, 3),
        "images_per_s": round(ips, 2), "loss": round(float(loss.detach()), 4),
        "achieved_tflops": round(ips * train_flops / 1e12, 3),
        "mfu": round(ips * train_flops / (peak_tflops * 1e12), 6) if peak_tflops else None,
        "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    })
    return row


def configurations(args: argparse.Namespace, device: torch.device) -> list[tuple[str, bool, bool]]:
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[
        args.compile if args.compile != "auto" else ("both" if device.type == "cuda" else "off")]
    fused_modes = {"both": [False, True], "on": [True], "off": [False]}[args.fused]
    impls = ["ours"] + ([] if args.no_timm else ["timm"])
    return [(impl, c, f) for impl in impls for c in compile_modes for f in fused_modes]


def fmt_row(row: dict) -> str:
    label = f"{row['impl']:<4} {'compiled' if row['compiled'] else 'eager':<8} {'fused' if row['fused_adamw'] else 'foreach':<7}"
    if row["status"] != "ok":
        return f"{label}: {row['status']} ({row['reason']})"
    mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "n/a"
    mem = f"{row['peak_memory_mib']:,.0f} MiB" if row["peak_memory_mib"] is not None else "n/a"
    ratio = f"{row['ratio_vs_baseline']:.3f}x" if row.get("ratio_vs_baseline") is not None else "n/a"
    return (f"{label}: {row['images_per_s']:,.1f} img/s ({row['step_ms']:.1f} ms/step), MFU {mfu}, "
            f"peak {mem}, warm-up {row['warmup_s']:.1f} s, {ratio} ours-eager-foreach")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="vit_base_patch16_224", help="a vit_model name that timm also knows")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 on CUDA, 2 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 on CUDA, 2 on the CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on CUDA, 1 on the CPU)")
    p.add_argument("--compile", choices=["auto", "both", "on", "off"], default="auto",
                   help="torch.compile rows: auto = both on CUDA, off on the CPU (inductor's C++ build is slow there)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off")
    p.add_argument("--fused", choices=["both", "on", "off"], default="both", help="AdamW(fused=True) rows")
    p.add_argument("--no-fused", dest="fused", action="store_const", const="off", help="same as --fused off")
    p.add_argument("--no-timm", action="store_true", help="only our model")
    p.add_argument("--flops", choices=["analytic", "counter"], default="analytic",
                   help="forward FLOPs from vit_model.flops_per_image or torch's FlopCounterMode")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device (overrides the table)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu.json"))
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (128 if cuda else 2)
    args.steps = args.steps or (30 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    if min(args.batch_size, args.steps) < 1 or args.warmup < 0:
        p.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda but torch.cuda.is_available() is False; use --device cpu for a smoke run")
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast (the optimizer, the loss)
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops, "--peak-tflops"
    elif device.type == "cuda":
        peak, peak_source = lookup_peak(device_name)
    else:
        peak, peak_source = None, "no bf16 tensor-core peak for a CPU: MFU n/a"

    fwd = forward_flops(args.model, args.flops, device)
    train_flops = 3.0 * fwd
    doc: dict = {
        "benchmark": "ViT training step (bf16 autocast): images/s, MFU, peak memory; ours vs timm; compile / fused AdamW",
        "device": {"type": device.type, "name": device_name,
                   "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
                   "cpu_count": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "timm": timm_version()},
        "settings": {"model": args.model, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                     "precision": "bf16 autocast (fp32 weights and AdamW state)", "data": "synthetic, on the device",
                     "compile_mode": "torch.compile(model), default mode", "torch_threads": torch.get_num_threads()},
        "flops": {"method": {"analytic": "vit_model.flops_per_image (2 x MACs of matmuls + convs)",
                             "counter": "torch.utils.flop_counter.FlopCounterMode, one forward of our model"}[args.flops],
                  "forward_per_image": fwd, "train_per_image": train_flops, "train_multiplier": 3},
        "peak_bf16_tflops": {"value": peak, "source": peak_source, "dense": True},
        "baseline": "ours, eager, AdamW default (foreach)",
        "load_average_at_start": list(os.getloadavg()),
        "notes": [],
    }
    if timm_version() is None and not args.no_timm:
        doc["notes"].append("timm is not installed: its rows are skipped (pip install timm to compare)")
    if device.type != "cuda":
        doc["notes"].append("CPU smoke run: MFU and peak memory are n/a; images/s only shows the script works")

    rows = []
    for impl, compiled, fused in configurations(args, device):
        row = run_config(impl, compiled, fused, args, device, train_flops, peak)
        rows.append(row)
        base = next((r for r in rows if (r["impl"], r["compiled"], r["fused_adamw"]) == BASELINE and r["status"] == "ok"), None)
        if row["status"] == "ok" and base is not None:
            row["ratio_vs_baseline"] = round(row["images_per_s"] / base["images_per_s"], 3)
        print(fmt_row(row), flush=True)
    doc["results"] = rows
    doc["load_average_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up; "
          f"train FLOPs/image {train_flops / 1e9:.1f} G ({args.flops}); peak {peak if peak else 'n/a'} TFLOPS ({peak_source})")
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
