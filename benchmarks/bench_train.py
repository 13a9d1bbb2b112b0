"""Ray Train overhead: epoch time of Ray Train (1 and 2 workers) vs the same loop in one process.

Baseline: :func:`pipelines.train_worker.train_worker` in this process (``LocalSession``) over batches
already decoded and normalised in memory — no Ray, no data pipeline. Measured: the full
``python -m pipelines train`` path (TorchTrainer, Ray Data streaming from the Parquet shards,
DDP over gloo) with 1 and 2 workers, same model, same global batch. Epoch time is the time of
the last epoch (the first pays for worker start-up and warm-up); ratio = Ray / plain (goal
<= 1.05). Same threads in total: the plain loop uses ``--threads`` (default 2) torch threads,
Ray workers split them. ``--runs`` picks the Ray runs; by default the 2-worker run is repeated
with ``data.cache_decoded=false`` (PNG decode every epoch instead of once per run).

    python benchmarks/bench_train.py [--train-images 12000] [--epochs 2] [--runs 1:cache 2:cache 2:nocache]
                                     [--out benchmarks/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import load_config
from pipelines.data.stream import iter_local_batches
from pipelines.prepare import prepare
from pipelines.train import train
from pipelines.train_worker import EpochData, LocalSession, train_worker
from pipelines.trainer import make_spec


def subset_idx(folder: Path, n_train: int, n_test: int) -> None:
    """The first images of Debian's Fashion-MNIST as a smaller idx set."""
    import gzip

    import numpy as np

    src = Path("/usr/share/datasets/fashion-mnist")

    def read(name):
        b = gzip.decompress((src / f"{name}.gz").read_bytes())
        nd = b[3]
        dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
        return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)

    def write(name, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + arr.tobytes()))

    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train-images-idx3-ubyte", n_train), ("train-labels-idx1-ubyte", n_train),
                    ("t10k-images-idx3-ubyte", n_test), ("t10k-labels-idx1-ubyte", n_test)):
        write(name, read(name)[:n])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train-images", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", nargs="*", default=["model.args.embed_dim=64", "model.args.depth=6", "model.args.num_heads=4",
                                                  "model.args.patch_size=4"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--runs", nargs="*", default=["1:cache", "2:cache", "2:nocache"],
                   help="Ray Train runs as WORKERS:cache|nocache (data.cache_decoded on/off)")
    p.add_argument("--out", default="benchmarks/results/train.json")
    args = p.parse_args()
    runs = []
    for r in args.runs:
        w, _, mode = r.partition(":")
        if not w.isdigit() or int(w) < 1 or mode not in ("cache", "nocache"):
            p.error(f"--runs {r!r}: use WORKERS:cache or WORKERS:nocache, e.g. 2:cache")
        runs.append((int(w), mode == "cache"))

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    n_val = args.train_images // 9
    subset_idx(work / "idx", args.train_images + n_val, 1000)
    base = [f"storage.uri=file://{work}/store", f"data.source_dir={work}/idx", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "data.val_fraction=0.1", *args.model]
    cfg = load_config(None, base)
    version = prepare(cfg)
    n_train = version.count("train")

    # plain single process over in-memory batches
    torch.set_num_threads(args.threads)
    val_batches = list(iter_local_batches(version, "val", cfg, batch_size=args.batch_size))
    epoch_batches = {e: list(iter_local_batches(version, "train", cfg, batch_size=args.batch_size, epoch=e))
                     for e in range(args.epochs)}
    spec = make_spec(cfg, version, None)
    spec.threads = args.threads
    summary = train_worker(spec, EpochData(train=lambda e: epoch_batches[e], val=lambda: val_batches), LocalSession())
    plain = summary["history"][-1]
    rows = [{"mode": "plain", "workers": 1, "epoch_seconds": plain["epoch_seconds"],
             "train_images_per_s": plain["images_per_s"]}]
    print(f"plain loop      : last epoch {plain['epoch_seconds']:.1f} s, {plain['images_per_s']:.0f} img/s in the loop", flush=True)

    for workers, cache in runs:
        per_worker = max(1, args.threads // workers)
        cfg_w = load_config(None, base + [f"train.num_workers={workers}", f"train.cpus_per_worker={per_worker}",
                                          f"train.run_name=bench-{workers}w-{cache}", "ray.num_cpus=4",
                                          f"data.cache_decoded={str(cache).lower()}"])
        t0 = time.time()
        result = train(cfg_w, version=version)
        last = result.history[-1]
        rows.append({"mode": "ray_train", "workers": workers, "cache_decoded": cache, "epoch_seconds": last["epoch_seconds"],
                     "train_images_per_s": last["images_per_s"], "wall_seconds": time.time() - t0,
                     "ratio_vs_plain": last["epoch_seconds"] / plain["epoch_seconds"]})
        print(f"ray train {workers} wkr, cache_decoded={cache}: last epoch {last['epoch_seconds']:.1f} s, "
              f"{last['images_per_s']:.0f} img/s in the loop, ratio vs plain {rows[-1]['ratio_vs_plain']:.3f} "
              f"(wall {rows[-1]['wall_seconds']:.0f} s incl. start-up)", flush=True)

    import ray

    doc = {"benchmark": "Ray Train epoch time vs plain loop", "train_images": n_train, "epochs": args.epochs,
           "global_batch": args.batch_size, "model": args.model, "threads": args.threads,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "ray": ray.__version__, "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
