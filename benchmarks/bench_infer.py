"""Batch inference throughput: the Ray Data job (``pipelines.infer``) vs a plain single-process loop.

Both score the same images (the Fashion-MNIST test split, prepared from the Debian package into a
temporary local storage) with the same registered model version and the same batch size:

* **plain**: one process, ``--threads`` torch threads. Reads the split's Parquet shards, decodes
  each PNG and preprocesses it exactly as inference does (``decode_chw``, normalise with the
  packaged mean/std), runs the forward pass and takes the top-k. Model loading is not timed.
* **ray**: :func:`pipelines.infer.infer` on a local Ray cluster, for each ``--pools`` entry
  ``AxT``: A model actors of T CPUs / T torch threads each (decode fused into the actors),
  writing Parquet and verifying one row per input. Two figures: ``ray_s``, the Ray Data
  execution (actor start-up included), and ``job_s``, the job up to publishing (model
  resolution and download, Ray execution, verification).

The plain loop runs before and after the Ray runs; their spread shows how noisy the machine is.
Ratio = Ray images/s (execution) / plain images/s (mean of the two plain runs).

    python benchmarks/bench_infer.py [--test-images 10000] [--batch-size 256] [--pools 1x1 2x1 1x2] \
                                     [--threads 2] [--out benchmarks/results/infer.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config import load_config
from pipelines.data.shards import iter_shard_batches
from pipelines.data.stream import decode_chw
from pipelines.infer import infer
from pipelines.inference.model import fetch_model_files, resolve_model
from pipelines.prepare import prepare
from pipelines.register import register
from pipelines.serving import ViTClassifier
from vit_model import VisionTransformer, ViTConfig

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def subset_idx(folder: Path, n_train: int, n_test: int) -> None:
    """The first images of the Debian Fashion-MNIST files as a smaller idx set."""

    def read(name: str) -> np.ndarray:
        b = gzip.decompress((FMNIST / f"{name}.gz").read_bytes())
        nd = b[3]
        dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
        return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)

    def write(name: str, arr: np.ndarray) -> None:
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + arr.tobytes(), compresslevel=1))

    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train-images-idx3-ubyte", n_train), ("train-labels-idx1-ubyte", n_train),
                    ("t10k-images-idx3-ubyte", n_test), ("t10k-labels-idx1-ubyte", n_test)):
        write(name, read(name)[:n])


@torch.inference_mode()
def plain_loop(version, cfg, clf: ViTClassifier, batch_size: int, top_k: int) -> dict:
    """Read shards, decode, normalise, forward, top-k: one process, no Ray. Returns timings."""
    c = clf.spec.channels
    mean = torch.tensor(clf.spec.mean, dtype=torch.float32).expand(c).reshape(c, 1, 1)
    std = torch.tensor(clf.spec.std, dtype=torch.float32).expand(c).reshape(c, 1, 1)
    n = correct = 0
    started = time.perf_counter()
    for table in iter_shard_batches(version, "test", cfg.storage, columns=["image", "label"]):
        images, labels = table.column("image").to_pylist(), table.column("label").to_numpy()
        for s in range(0, len(images), batch_size):
            x = torch.stack([decode_chw(b) for b in images[s:s + batch_size]])  # (B, C, H, W) uint8
            x = x.to(torch.float32).div_(255.0).sub_(mean).div_(std)
            logits = clf.model(x)
            top = logits.topk(top_k, dim=-1).indices
            correct += int((top[:, 0].numpy() == labels[s:s + batch_size]).sum())
            n += x.shape[0]
    seconds = time.perf_counter() - started
    return {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 1), "correct": correct}


def main() -> None:
    try:
        run()
    finally:
        import ray

        ray.shutdown()  # the local cluster ensure_ray started, if any


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pools", nargs="+", default=["1x1", "2x1", "1x2"],
                   help="actor pools to measure, ACTORSxTHREADS (threads = CPUs reserved per actor)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop (default: 2 = the cores)")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster (> actors x threads)")
    p.add_argument("--arch", default="embed_dim=64,depth=6,num_heads=4,patch_size=4",
                   help="ViTConfig overrides of the benchmarked model (28x28, 1 channel, 10 classes)")
    p.add_argument("--out", default="benchmarks/results/infer.json")
    args = p.parse_args()
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        sys.exit(f"error: {FMNIST} has no Fashion-MNIST files; apt-get install dataset-fashion-mnist")

    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    subset_idx(work / "idx", 1000, args.test_images)
    base = [f"storage.uri=file://{work}/store", f"data.source_dir={work}/idx", "data.source=fashion-mnist",
            f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", "mlflow.experiment_name=bench-infer",
            "registry.model_name=vit-bench", f"infer.batch_size={args.batch_size}", f"ray.num_cpus={args.ray_cpus}"]
    cfg = load_config(None, base)
    t0 = time.time()
    version = prepare(cfg)
    print(f"prepared {version.count('test')} test images in {time.time() - t0:.1f} s", flush=True)

    arch = {k: int(v) for k, v in (kv.split("=") for kv in args.arch.split(","))}
    torch.manual_seed(0)
    net = VisionTransformer(ViTConfig(img_size=28, in_chans=1, num_classes=10, **arch))
    meta = {"class_names": version.classes, "channels": 1, "image_size": [28, 28], "mean": [0.2860], "std": [0.3530]}
    net.save_pretrained(work / "model", meta=meta)
    reg = register(cfg, str(work / "model"))
    model_uri = f"models:/{reg.model_name}@champion"
    print(f"registered {reg.model_uri} ({net.num_params / 1e6:.2f} M params)", flush=True)

    # the same registered version's files, loaded in this process for the plain loop
    resolved = resolve_model(cfg, model_uri)
    clf = ViTClassifier().load_artifacts(fetch_model_files(resolved.download_uri, resolved.tracking_uri,
                                                           work / "plain-model"), device="cpu")
    torch.set_num_threads(args.threads)
    plain_loop(version, cfg, clf, args.batch_size, cfg.infer.top_k)  # warm-up (allocator, kernels)
    plain = [plain_loop(version, cfg, clf, args.batch_size, cfg.infer.top_k)]
    print(f"plain loop ({args.threads} threads): {plain[0]['images_per_s']:.0f} img/s ({plain[0]['seconds']:.1f} s)",
          flush=True)

    rows = []
    for pool in args.pools:
        actors, threads = (int(v) for v in pool.lower().split("x"))
        run_cfg = load_config(None, base + [f"infer.num_actors={actors}", f"infer.cpus_per_actor={threads}"])
        r = infer(run_cfg, input_uri=version.uri, model_uri=model_uri, job_name=f"bench-{actors}x{threads}")
        ray_s = r.timings["ray_s"]
        rows.append({"actors": actors, "threads_per_actor": threads, "images": r.input_count, "ray_s": ray_s,
                     "ray_images_per_s": r.timings["ray_images_per_s"], "job_s": r.seconds,
                     "job_images_per_s": r.images_per_s, "correct": r.correct})
        print(f"ray, {actors} actor(s) x {threads} thread(s): {r.timings['ray_images_per_s']:.0f} img/s in the Ray job "
              f"({ray_s:.1f} s incl. actor start-up), {r.images_per_s:.0f} img/s for the whole job ({r.seconds:.1f} s)",
              flush=True)

    plain.append(plain_loop(version, cfg, clf, args.batch_size, cfg.infer.top_k))
    print(f"plain loop again: {plain[1]['images_per_s']:.0f} img/s", flush=True)
    plain_ips = sum(x["images_per_s"] for x in plain) / len(plain)
    for row in rows:
        row["ratio_vs_plain"] = round(row["ray_images_per_s"] / plain_ips, 3)
        row["job_ratio_vs_plain"] = round(row["job_images_per_s"] / plain_ips, 3)
        if row["correct"] != plain[0]["correct"]:  # same model, same pixels: only float noise could do this
            print(f"warning: {row['correct']} correct in the Ray job vs {plain[0]['correct']} in the plain loop")
        print(f"ratio ray/plain, {row['actors']}x{row['threads_per_actor']}: {row['ratio_vs_plain']:.2f} (Ray job), "
              f"{row['job_ratio_vs_plain']:.2f} (whole job)")

    import mlflow
    import ray

    doc = {
        "benchmark": "batch inference images/s: Ray Data job vs plain single-process torch loop",
        "images": version.count("test"), "batch_size": args.batch_size, "model": {"img_size": 28, "in_chans": 1, **arch},
        "params": net.num_params, "plain_threads": args.threads, "ray_num_cpus": args.ray_cpus,
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                     "mlflow": mlflow.__version__},
        "plain": plain, "plain_images_per_s": round(plain_ips, 1), "ray_runs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
