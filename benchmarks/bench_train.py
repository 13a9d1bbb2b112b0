"""Ray Train overhead: epoch time of Ray Train (1 and 2 workers) vs the same loop in one process.

Baseline: :func:`pipelines.train_worker.train_worker` in this process (``LocalSession``) over batches
already decoded and normalised in memory — no Ray, no data pipeline. Measured: the full
``python -m pipelines train`` path (TorchTrainer, the train split held by each worker
(``data.stream=memory``) or streamed by Ray Data every epoch (``ray``), DDP over gloo) with 1 and
2 workers, same model, same global batch. Epoch time is the mean over
the epochs after the first (which pays for worker start-up and warm-up); ratio = Ray / plain (goal
<= 1.05). Same threads in total: the plain loop uses ``--threads`` (default 2) torch threads,
Ray workers split them. ``--runs`` picks the Ray runs (``ray-nocache``: Ray Data streaming with
``data.cache_decoded=false``, PNG decode every epoch instead of once per run).

    python benchmarks/bench_train.py [--config configs/local.yaml] [--train-images 12000] [--epochs 2]
                                     [--runs 2:memory 2:ray 2:ray-nocache 1:memory] [--out benchmarks/results/train.json]

``--config`` takes the model and training recipe (EMA, optimizer, ...) from a config file (storage,
data source, epochs and batch size are the benchmark's); ``--model`` overrides go on top. The
plain loop runs before and after the Ray runs (the machine's speed drifts between runs of a few
minutes here); the ratio is against the mean of the two.
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


STREAMS = {"memory": ["data.stream=memory"], "ray": ["data.stream=ray", "data.cache_decoded=true"],
           "ray-nocache": ["data.stream=ray", "data.cache_decoded=false"]}


def steady(history: list[dict]) -> dict:
    """Mean epoch time and in-loop rate over the epochs after the first (which pays for start-up)."""
    rows = history[1:] or history
    return {"epoch_seconds": sum(r["epoch_seconds"] for r in rows) / len(rows),
            "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
            "data_wait_fraction": sum(r.get("data_wait_fraction", 0.0) for r in rows) / len(rows),
            "epochs_measured": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=None, help="take the model/recipe from this config file")
    p.add_argument("--train-images", type=int, default=12000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", nargs="*", default=None, help="config overrides (default without --config: "
                   "p4 d64 L6 h4)")
    default_model = ["model.args.embed_dim=64", "model.args.depth=6", "model.args.num_heads=4",
                     "model.args.patch_size=4"]
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--runs", nargs="*", default=["2:memory", "2:ray", "1:memory"],
                   help="Ray Train runs as WORKERS:MODE; MODE: memory (data.stream=memory), ray (data.stream=ray, "
                        "decoded cache), ray-nocache (data.stream=ray, PNG decode every epoch)")
    p.add_argument("--out", default="benchmarks/results/train.json")
    args = p.parse_args()
    runs = []
    for r in args.runs:
        w, _, mode = r.partition(":")
        if not w.isdigit() or int(w) < 1 or mode not in STREAMS:
            p.error(f"--runs {r!r}: use WORKERS:MODE with MODE one of {', '.join(STREAMS)}, e.g. 2:memory")
        runs.append((int(w), mode))

    model = args.model if args.model is not None else ([] if args.config else default_model)
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    n_val = args.train_images // 9
    subset_idx(work / "idx", args.train_images + n_val, 1000)
    base = [f"storage.uri=file://{work}/store", f"data.source_dir={work}/idx", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "data.val_fraction=0.1", *model]
    cfg = load_config(args.config, base)
    version = prepare(cfg)
    n_train = version.count("train")

    # plain single process over in-memory batches
    val_batches = list(iter_local_batches(version, "val", cfg, batch_size=args.batch_size))
    epoch_batches = {e: list(iter_local_batches(version, "train", cfg, batch_size=args.batch_size, epoch=e))
                     for e in range(args.epochs)}
    spec = make_spec(cfg, version, None)
    spec.threads = args.threads
    rows = []

    def plain_run(when: str) -> dict:
        torch.set_num_threads(args.threads)
        summary = train_worker(spec, EpochData(train=lambda e: epoch_batches[e], val=lambda: val_batches),
                               LocalSession())
        last = steady(summary["history"])
        rows.append({"mode": "plain", "when": when, "workers": 1, **last})
        print(f"plain loop ({when}): {last['epoch_seconds']:.1f} s per epoch, {last['images_per_s']:.0f} img/s in the "
              "loop", flush=True)
        return last

    plain_first = plain_run("before")
    ray_rows = []
    for workers, mode in runs:
        per_worker = max(1, args.threads // workers)
        cfg_w = load_config(args.config, base + [f"train.num_workers={workers}", f"train.cpus_per_worker={per_worker}",
                                                 f"train.run_name=bench-{workers}w-{mode}", "ray.num_cpus=4",
                                                 *STREAMS[mode]])
        t0 = time.time()
        result = train(cfg_w, version=version)
        last = steady(result.history)
        ray_rows.append({"mode": "ray_train", "workers": workers, "stream": mode, **last,
                         "wall_seconds": time.time() - t0})
        print(f"ray train {workers} wkr, {mode}: {last['epoch_seconds']:.1f} s per epoch, "
              f"{last['images_per_s']:.0f} img/s in the loop, waiting for data "
              f"{100 * (last.get('data_wait_fraction') or 0):.1f} % (wall {ray_rows[-1]['wall_seconds']:.0f} s incl. "
              "start-up)", flush=True)
    import ray

    ray.shutdown()  # the plain loop runs without a Ray cluster beside it, as before the Ray runs
    plain_last = plain_run("after")
    plain_seconds = (plain_first["epoch_seconds"] + plain_last["epoch_seconds"]) / 2
    for r in ray_rows:
        r["ratio_vs_plain"] = r["epoch_seconds"] / plain_seconds
        print(f"ratio vs plain (mean of before/after, {plain_seconds:.1f} s): {r['workers']} worker(s), "
              f"{r['stream']}: {r['ratio_vs_plain']:.3f}", flush=True)
    rows += ray_rows

    doc = {"benchmark": "Ray Train epoch time vs plain loop", "date": time.strftime("%Y-%m-%d"), "train_images": n_train, "epochs": args.epochs,
           "global_batch": args.batch_size, "config": args.config, "model": model, "threads": args.threads,
           "plain_epoch_seconds": plain_seconds,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "ray": ray.__version__, "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
