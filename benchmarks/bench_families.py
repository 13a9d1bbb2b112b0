"""Accuracy of each model family at an equal wall-clock training budget (Fashion-MNIST, 28x28).

For every family (plain ViT, conv-stem hybrid, CCT, T2T-ViT, Swin) this trains the pipeline's own
worker loop (:func:`pipelines.train_worker.train_worker`, the function Ray Train runs on each
worker) in one process with ``--threads`` torch threads, reading the prepared Parquet shards with
the same decode and augmentation (:func:`pipelines.data.stream.iter_local_batches`). The budget is
turned into a number of epochs before training, so the learning-rate schedule is the one a user
would get: after 10 untimed warm-up steps, a calibration pass times ``--calib-steps`` training
steps (100; the 5-minute results in the README were planned from 40, without warm-up) and one
validation pass, then ``epochs = floor(budget / epoch_seconds)`` (at least 1). The run is then scored on the
official 10k test images (EMA weights when the recipe keeps an EMA, both with and without
horizontal-flip TTA). Reported per family: params, FLOPs per image, epochs, the measured training
seconds (close to, not exactly, the budget), val and test accuracy.

    python benchmarks/bench_families.py --budget 300 [--families vit hybrid t2t swin] [--threads 2]
                                        [--augment] [--store DIR] [--out benchmarks/results/families_300s.json]

Ray Train with 2 workers x 1 CPU runs the same loop at 0.9-1.2x this speed here (bench_train.py),
so a budget measured in-process is close to the same budget through ``python -m pipelines train``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.checkpoint import load_model_weights
from pipelines.config import load_config
from pipelines.data.stream import iter_local_batches
from pipelines.engine import evaluate, with_tta
from pipelines.prepare import prepare
from pipelines.train_worker import EpochData, LocalSession, build_model, train_worker
from pipelines.trainer import make_spec
from vit_model import flops_per_image

# One recipe per family: sizes of ~0.2-0.6 M parameters and ~10-40 MFLOPs per 28x28 image, the
# regime a 2-core CPU trains in minutes; optimizer settings from the exploration in the README.
COMMON = ["train.label_smoothing=0.0", "train.weight_decay=0.05", "train.warmup_epochs=0.5", "train.batch_size=128"]
# --augment (for long budgets: short ones underfit, and augmentation costs them accuracy)
AUGMENT = ["data.augment.random_crop_padding=2", "data.augment.hflip=0.5", "train.label_smoothing=0.1"]
FAMILIES: dict[str, list[str]] = {
    "vit": ["model.name=vit_tiny_patch4", "model.args.patch_size=4", "model.args.embed_dim=64", "model.args.depth=4",
            "model.args.num_heads=4", "model.args.global_pool=avg", "train.lr=0.002"],
    "hybrid": ["model.name=vit_tiny_convstem_28", "model.args.stem_channels=[16,32,64]", "model.args.stem_strides=[1,2,2]",
               "model.args.embed_dim=64", "model.args.depth=4", "model.args.num_heads=2", "model.args.mlp_ratio=2.0",
               "model.args.class_token=false", "model.args.global_pool=avg", "train.lr=0.003"],
    "cct": ["model.name=cct_7_3x1_28", "model.args.embed_dim=64", "model.args.depth=4", "model.args.num_heads=2",
            "model.args.mlp_ratio=2.0", "model.args.stem_channels=[32]", "model.args.stem_strides=[1,1]", "train.lr=0.002"],
    "t2t": ["model.name=t2t_vit_7_28", "model.args.embed_dim=64", "model.args.depth=4", "model.args.num_heads=2",
            "model.args.mlp_ratio=2.0", "model.args.token_dim=32", "train.lr=0.002"],
    "swin": ["model.name=swin_nano_patch2_window7_28", "train.lr=0.002"],
}


def timed_train(spec, version, cfg, threads: int, root: Path):
    """train_worker over lazily decoded batches; returns (summary, seconds, checkpoint root)."""
    spec.threads = threads
    data = EpochData(train=lambda e: iter_local_batches(version, "train", cfg, batch_size=cfg.train.batch_size, epoch=e),
                     val=lambda: iter_local_batches(version, "val", cfg, batch_size=512))
    t0 = time.perf_counter()
    summary = train_worker(spec, data, LocalSession(checkpoint_root=str(root)))
    return summary, time.perf_counter() - t0


def run_family(family: str, base: list[str], version, budget: float, threads: int, calib_steps: int, work: Path,
               augment: bool) -> dict:
    overrides = base + COMMON + (AUGMENT if augment else []) + FAMILIES[family]
    # calibration: the time to read the split and make the first batch (paid once per epoch), then
    # calib_steps training steps + a full validation pass
    calib = load_config(None, overrides + ["train.epochs=1", f"train.limit_train_batches={calib_steps}"])
    # a few steps first, untimed: the process's first steps of a model (allocator, oneDNN kernel
    # selection) are slower; counted in a 40-step calibration they cost a plain ViT a quarter of its
    # 30-minute budget (21 epochs planned from 82 s each ran in 1,357 s)
    warm = load_config(None, overrides + ["train.epochs=1", "train.limit_train_batches=10", "train.limit_val_batches=1"])
    timed_train(make_spec(warm, version, None), version, warm, threads, work / f"{family}-warm")
    t_calib = time.perf_counter()
    next(iter(iter_local_batches(version, "train", calib, batch_size=calib.train.batch_size)))
    read_s = time.perf_counter() - t_calib
    summary, _ = timed_train(make_spec(calib, version, None), version, calib, threads, work / f"{family}-calib")
    row = summary["history"][-1]
    calib_seconds = time.perf_counter() - t_calib
    train_s = row["train_images"] / row["images_per_s"]
    step_s = max(train_s - read_s, 0.0) / calib_steps
    steps_per_epoch = math.ceil(version.count("train") / calib.train.batch_size)
    epoch_s = read_s + step_s * steps_per_epoch + (row["epoch_seconds"] - train_s)
    epochs = max(1, int(budget // epoch_s))
    print(f"{family:7s}: calibration {calib_seconds:.0f} s: {step_s * 1000:.0f} ms/step, ~{epoch_s:.0f} s/epoch "
          f"-> {epochs} epochs for {budget:.0f} s", flush=True)

    cfg = load_config(None, overrides + [f"train.epochs={epochs}"])
    spec = make_spec(cfg, version, None)
    summary, seconds = timed_train(spec, version, cfg, threads, work / family)
    last = summary["history"][-1]
    model = build_model(spec)
    load_model_weights(work / family / f"epoch-{epochs - 1:03d}", model, ema=cfg.train.ema_decay > 0)
    model.eval()
    test = {}
    for tta in ("none", "hflip"):
        batches = iter_local_batches(version, "test", cfg, batch_size=512)
        with torch.no_grad():
            test[tta] = evaluate(with_tta(model, tta), batches, device=torch.device("cpu"), num_classes=version.num_classes)["acc1"]
    result = {
        "family": family, "model": cfg.model.name, "args": cfg.model.args, "overrides": FAMILIES[family],
        "params": sum(p.numel() for p in model.parameters()), "flops_per_image": flops_per_image(model),
        "budget_s": budget, "epochs": epochs, "train_seconds": seconds, "calibration_seconds": calib_seconds,
        "val_acc": last["val_acc"], "test_acc": test["none"], "test_acc_hflip_tta": test["hflip"],
        "val_acc_by_epoch": [h["val_acc"] for h in summary["history"]],
    }
    print(f"{family:7s}: {result['params'] / 1e6:.3f} M params, {result['flops_per_image'] / 1e6:.1f} MFLOPs, "
          f"{epochs} epochs in {seconds:.0f} s ({seconds / budget:.2f}x budget): val {last['val_acc']:.4f}, "
          f"test {test['none']:.4f}, with flip TTA {test['hflip']:.4f}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per family")
    p.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-steps", type=int, default=100)
    p.add_argument("--augment", action="store_true", help="random crop (pad 2) + h-flip + smoothing 0.1 for every family")
    p.add_argument("--store", default=None, help="storage folder to prepare into / reuse (default: a temp folder)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-families-"))
    store = Path(args.store) if args.store else work / "store"
    base = [f"storage.uri=file://{store}", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db"]
    version = prepare(load_config(None, base))
    torch.set_num_threads(args.threads)
    rows = [run_family(f, base, version, args.budget, args.threads, args.calib_steps, work, args.augment)
            for f in args.families]
    doc = {"benchmark": "test accuracy per model family at an equal training budget", "dataset": version.uri,
           "budget_s": args.budget, "threads": args.threads,
           "common_overrides": COMMON + (AUGMENT if args.augment else []),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "results": rows}
    out = Path(args.out or f"benchmarks/results/families_{int(args.budget)}s.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
