"""Every vit_model family vs its reference implementation: forward and forward+backward images/s
and peak memory, same process, same threads.

Families and references (the same architectures the parity tests check, built here by small
builder functions; see tests/test_vit_parity.py, test_hybrid.py, test_t2t.py, test_swin.py):

    vit     vit_model.VisionTransformer      timm.models.vision_transformer.VisionTransformer
    hybrid  conv stem (Xiao et al.)          timm VisionTransformer with HybridEmbed(ConvStem)
    hybrid  CCT                              vit_pytorch.cct.CCT
    t2t     vit-pytorch layout (token_dim=None, config_from_vit_pytorch)  vit_pytorch.t2t.T2TViT
    swin    vit_model.SwinTransformer        timm.models.swin_transformer.SwinTransformer

Each (case, mode) is timed in alternation (ours, reference, ours, reference, ...) so machine
noise hits both; the median of the repeats is reported with the ratio ours / reference (the
project's goal is >= 0.95 for every family; this script only reports). Both models are in the
same mode (eval for ``fwd``, under no_grad; train for ``fwd_bwd``), get the same input tensor and
run in float32.

Attention kernels: ours runs its default, fused attention (F.scaled_dot_product_attention).
The references run their own defaults: timm's ViT (and the conv-stem hybrid) also use SDPA;
timm's Swin uses its eager path (its fused path is behind timm's "experimental" flag, off by
default); vit-pytorch (CCT, T2T) computes attention eagerly (einsum / matmul + softmax). The
JSON records which one each reference used. Regularisation that is active in train mode
(dropout, attention dropout, stochastic depth) is set in the reference to our config's values,
so a ``fwd_bwd`` step does the same work in both (vit-pytorch's CCT class would otherwise
default to attention dropout 0.1 and stochastic depth 0.1; ours default to 0).

Each row also records the 1-minute load average before and after its timing: a value well above
the thread count means other work shared the CPU and the row's numbers are noise.

Peak memory: CUDA max_memory_allocated on a GPU; on the CPU the peak RSS growth of a fresh
subprocess per measurement (one step on top of the model and input).

    python benchmarks/bench_model.py [--device cpu|cuda] [--cases NAME ...] [--repeats 5] [--iters 3]
                                     [--no-memory] [--out benchmarks/results/model.json]

benchmarks/results/model_families.json (2-core CPU, ~7 minutes on a quiet machine):

    python benchmarks/bench_model.py --device cpu --repeats 3 --iters 2 --out benchmarks/results/model_families.json
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
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vit_model import ArchConfig, ViTConfig, build_model, config_from_name, flops_per_image
from vit_model.hybrid import stem_plan
from vit_model.t2t import config_from_vit_pytorch

# ------------------------------------------------------------------------------ reference builders


def ref_timm_vit(cfg: ViTConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    return TimmViT(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                   embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                   qkv_bias=cfg.qkv_bias, class_token=cfg.class_token, global_pool=cfg.global_pool,
                   drop_rate=cfg.drop_rate, pos_drop_rate=cfg.pos_drop_rate, proj_drop_rate=cfg.proj_drop_rate,
                   attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate)


def ref_timm_convstem(cfg) -> nn.Module:
    """timm's ViT with ConvStem (k×k conv-BN-ReLU per stem width, then a 1×1 conv) in HybridEmbed."""
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    from timm.models.vision_transformer_hybrid import ConvStem

    n = len(cfg.stem_channels)
    backbone = ConvStem(in_chans=cfg.in_chans, depth=n + 1, channels=cfg.stem_channels + (cfg.embed_dim,),
                        kernel_size=(cfg.stem_kernel,) * n + (1,), stride=cfg.stem_strides + (1,), padding="")
    return TimmViT(img_size=cfg.img_size, patch_size=1, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                   embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                   qkv_bias=cfg.qkv_bias, class_token=cfg.class_token, global_pool=cfg.global_pool,
                   drop_rate=cfg.drop_rate, pos_drop_rate=cfg.pos_drop_rate, proj_drop_rate=cfg.proj_drop_rate,
                   attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path_rate,
                   embed_layer=partial(HybridEmbed, backbone=backbone, proj=False))


def ref_vit_pytorch_cct(cfg) -> nn.Module:
    """vit-pytorch's CCT class (64 hidden stem channels, a max-pool after every conv)."""
    from vit_pytorch.cct import CCT

    (plan,) = {(s.kernel, s.stride, s.padding) for s in stem_plan(cfg)}
    assert set(cfg.stem_channels) <= {64} and cfg.stem_pool_kernel > 0, "not expressible by vit_pytorch.cct.CCT"
    k, s, p = plan
    return CCT(img_size=cfg.img_size, n_input_channels=cfg.in_chans, n_conv_layers=len(cfg.stem_strides),
               kernel_size=k, stride=s, padding=p, pooling_kernel_size=cfg.stem_pool_kernel,
               pooling_stride=cfg.stem_pool_stride, pooling_padding=cfg.stem_pool_padding,
               embedding_dim=cfg.embed_dim, num_layers=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
               num_classes=cfg.num_classes, positional_embedding={"learn": "learnable"}.get(cfg.pos_embed, cfg.pos_embed),
               dropout_rate=cfg.proj_drop_rate, attention_dropout=cfg.attn_drop_rate,
               stochastic_depth_rate=cfg.drop_path_rate)


def ref_timm_swin(cfg) -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    return TimmSwin(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                    global_pool=cfg.global_pool, embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads,
                    head_dim=cfg.head_dim, window_size=cfg.window_size, always_partition=cfg.always_partition,
                    mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop_rate=cfg.drop_rate,
                    proj_drop_rate=cfg.proj_drop_rate, attn_drop_rate=cfg.attn_drop_rate,
                    drop_path_rate=cfg.drop_path_rate)


def ref_vit_pytorch_t2t(kw: dict, cfg) -> nn.Module:
    from vit_pytorch.t2t import T2TViT as RefT2TViT

    return RefT2TViT(**kw)


# ------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    family: str
    cfg: Callable[[], ArchConfig]  # our architecture; ours = vit_model.build_model(cfg)
    ref: Callable[[ArchConfig], nn.Module]  # the reference with the same architecture
    reference: str  # what the reference is, in words
    batch: dict  # device type -> batch size


def _vit(**kw) -> Callable[[], ArchConfig]:
    return lambda: ViTConfig(**kw)


def _named(name: str, **overrides) -> Callable[[], ArchConfig]:
    return lambda: config_from_name(name, **overrides)


# vit-pytorch T2TViT arguments; our config is config_from_vit_pytorch(**same arguments).
# 28×28 grey: the parity test's splits (7,2),(3,2),(3,1): 28 -> 12 -> 6 -> 4; 224 RGB: vit-pytorch's
# default splits (7,4),(3,2),(3,2): 224 -> 56 -> 28 -> 14. Backbone: T2T-ViT-7's (256 wide, 7 deep).
T2T_VP_28 = dict(image_size=28, channels=1, num_classes=10, dim=256, depth=7, heads=4, dim_head=64, mlp_dim=512,
                 t2t_layers=((7, 2), (3, 2), (3, 1)))
T2T_VP_224 = dict(image_size=224, channels=3, num_classes=1000, dim=256, depth=7, heads=4, dim_head=64, mlp_dim=512)

CASES: dict[str, Case] = {
    # 28×28, 1 channel, 10 classes
    "fmnist_28_p4_d192_l6": Case(
        "vit", _vit(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=6, num_heads=3),
        ref_timm_vit, "timm VisionTransformer", {"cpu": 64, "cuda": 1024}),
    "vit_tiny_convstem_28": Case(
        "hybrid", _named("vit_tiny_convstem_28"), ref_timm_convstem, "timm VisionTransformer + HybridEmbed(ConvStem)",
        {"cpu": 64, "cuda": 1024}),
    "cct_7_3x1_28": Case(
        "hybrid", _named("cct_7_3x1_28"), ref_vit_pytorch_cct, "vit_pytorch.cct.CCT", {"cpu": 32, "cuda": 512}),
    "t2t_vp_d256_l7_28": Case(
        "t2t", lambda: config_from_vit_pytorch(**T2T_VP_28), partial(ref_vit_pytorch_t2t, T2T_VP_28),
        "vit_pytorch.t2t.T2TViT", {"cpu": 64, "cuda": 1024}),
    "swin_micro_patch2_window7_28": Case(
        "swin", _named("swin_micro_patch2_window7_28", in_chans=1, num_classes=10), ref_timm_swin, "timm SwinTransformer", {"cpu": 64, "cuda": 1024}),
    # 224×224 RGB
    "vit_s16_224": Case(
        "vit", _vit(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=384, depth=12, num_heads=6),
        ref_timm_vit, "timm VisionTransformer", {"cpu": 4, "cuda": 128}),
    "vit_tiny_convstem": Case(
        "hybrid", _named("vit_tiny_convstem"), ref_timm_convstem, "timm VisionTransformer + HybridEmbed(ConvStem)",
        {"cpu": 8, "cuda": 256}),
    "cct_7_7x2_224": Case(
        "hybrid", _named("cct_7_7x2_224"), ref_vit_pytorch_cct, "vit_pytorch.cct.CCT", {"cpu": 8, "cuda": 128}),
    "t2t_vp_d256_l7_224": Case(
        "t2t", lambda: config_from_vit_pytorch(**T2T_VP_224), partial(ref_vit_pytorch_t2t, T2T_VP_224),
        "vit_pytorch.t2t.T2TViT", {"cpu": 2, "cuda": 64}),
    "swin_tiny_patch4_window7_224": Case(
        "swin", _named("swin_tiny_patch4_window7_224"), ref_timm_swin, "timm SwinTransformer", {"cpu": 4, "cuda": 128}),
}


def build(impl: str, case: str, device: str) -> nn.Module:
    c = CASES[case]
    cfg = c.cfg()
    torch.manual_seed(0)
    model = build_model(cfg) if impl == "ours" else c.ref(cfg)
    return model.to(device)


def input_shape(case: str, batch: int) -> tuple[int, ...]:
    cfg = CASES[case].cfg()
    return (batch, cfg.in_chans, *cfg.img_hw)


def reference_attention(model: nn.Module) -> str:
    """Which attention path a reference model runs: timm modules say it in ``fused_attn``;
    vit-pytorch's attention is eager (einsum / matmul + softmax) always."""
    flags = {bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")}
    if not flags:
        return "eager (vit-pytorch)"
    return {frozenset({True}): "sdpa", frozenset({False}): "eager"}.get(frozenset(flags), "mixed")


# ------------------------------------------------------------------------------ measurements


def time_once(model: nn.Module, x: torch.Tensor, mode: str, iters: int) -> float:
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
    model = build(impl, case, device).train(mode == "fwd_bwd")
    x = torch.randn(*input_shape(case, batch), device=device)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES), metavar="CASE",
                        help=f"cases to run (default all): {', '.join(CASES)}")
    parser.add_argument("--batch", type=int, default=None, help="override every case's batch size")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/model.json")
    args = parser.parse_args()
    dev = torch.device(args.device)
    results = []
    print(f"{'case':30s} {'family':6s} {'mode':8s} {'batch':>5s}  {'ours img/s':>10s}  {'ref img/s':>10s}  {'ratio':>6s}"
          f"{'' if args.no_memory else '  peak MiB ours / ref'}", flush=True)
    for case in args.cases:
        c = CASES[case]
        batch = args.batch or c.batch[dev.type]
        x = torch.randn(*input_shape(case, batch), device=dev)
        models = {impl: build(impl, case, args.device) for impl in ("ours", "ref")}
        ours = models["ours"]
        info = {
            "case": case, "family": c.family, "reference": c.reference,
            "reference_attention": reference_attention(models["ref"]),
            "ours_attention": "sdpa" if getattr(ours.cfg, "fused_attn", True) else "eager",
            "input": list(x.shape[1:]), "batch": batch,
            "params": ours.num_params, "ref_params": sum(p.numel() for p in models["ref"].parameters()),
            "gflops_per_image": flops_per_image(ours) / 1e9,
        }
        for mode in ("fwd", "fwd_bwd"):
            load_before = os.getloadavg()[0]  # other work on the machine shows here (ours + ref ~ threads)
            speeds = {"ours": [], "ref": []}
            for _ in range(args.repeats):
                for impl in ("ours", "ref"):
                    speeds[impl].append(time_once(models[impl], x, mode, args.iters))
            row = dict(info, mode=mode, ours_img_s=statistics.median(speeds["ours"]),
                       ref_img_s=statistics.median(speeds["ref"]), ours_img_s_all=speeds["ours"], ref_img_s_all=speeds["ref"])
            row["ratio"] = row["ours_img_s"] / row["ref_img_s"]
            row["loadavg_1min"] = [load_before, os.getloadavg()[0]]  # before / after the timing
            if not args.no_memory:
                row["ours_peak_mib"] = peak_memory_child("ours", case, mode, args.device, batch)
                row["ref_peak_mib"] = peak_memory_child("ref", case, mode, args.device, batch)
            results.append(row)
            mem = f"  {row['ours_peak_mib']:8.0f} / {row['ref_peak_mib']:.0f}" if not args.no_memory else ""
            print(f"{case:30s} {c.family:6s} {mode:8s} {batch:5d}  {row['ours_img_s']:10.1f}  {row['ref_img_s']:10.1f}"
                  f"  {row['ratio']:6.3f}{mem}", flush=True)
        del models, ours
    import timm
    import vit_pytorch

    try:
        from importlib.metadata import version

        vp_version = version("vit-pytorch")
    except Exception:  # pragma: no cover - metadata missing
        vp_version = getattr(vit_pytorch, "__version__", "unknown")
    doc = {
        "benchmark": "vit_model families vs their references (timm, vit-pytorch)",
        "goal": "ratio = ours_img_s / ref_img_s >= 0.95 for every family",
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "timm": timm.__version__, "vit_pytorch": vp_version,
        "python": platform.python_version(), "dtype": "float32",
        "repeats": args.repeats, "iters": args.iters, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
