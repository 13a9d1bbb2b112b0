"""Batch inference: steady-state throughput per core and start-up, Ray Data job vs a plain loop.

Every run scores a test split of ``--sizes`` images (the Fashion-MNIST test images, repeated to
reach the size, prepared from the Debian package into a temporary local storage) with the same
registered model version (the model of ``--config``, default the main job's) and batch size:

* **plain**: one process with 1 and with ``--threads`` torch threads. Reads the split's Parquet
  shards, decodes each PNG and preprocesses it exactly as inference does (``decode_chw``,
  normalise with the packaged mean/std), runs the forward pass and takes the top-k. Model loading
  is not timed. Runs before and after the Ray runs; the mean is the baseline.
* **ray pipeline**, on a running local Ray cluster, for each ``--pools`` entry ``AxT`` (A model
  actors of T CPUs / T torch threads; each actor reads and decodes its own batches): the job's own Ray Data
  pipeline (:func:`pipelines.inference.actors.build_dataset`) iterated by the driver. **start-up**
  = submit -> first prediction rows (actor process start, imports, model build, planning, the
  first read); **steady** = rows after the first batch / time after it. Per core = steady / (A x T).
* **ray job**: the whole :func:`pipelines.infer.infer` (model resolution, the pipeline writing
  Parquet, verification, manifest): wall seconds.

Ratios: steady images/s per core vs the plain loop's per core (1 thread; goal >= 0.9): against
the plain runs right before and after that pipeline (this host's speed drifts by 10-15 % over
minutes) and against the mean of all plain runs; and against the ``--threads`` plain loop per thread.

    python benchmarks/bench_infer.py [--config configs/local.yaml] [--sizes 10000 100000] [--pools 1x1 2x1] \
                                     [--batch-size N] [--threads 2] [--out benchmarks/results/infer.json]
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

from pipelines.architecture import build_model, model_arch
from pipelines.config import load_config
from pipelines.data.shards import iter_shard_batches
from pipelines.data.stream import decode_chw
from pipelines.infer import infer
from pipelines.inference.model import fetch_model_files, resolve_model
from pipelines.prepare import prepare
from pipelines.ray_setup import ensure_ray
from pipelines.register import register
from pipelines.serving import ViTClassifier

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def subset_idx(folder: Path, n_train: int, n_test: int) -> None:
    """The first images of the Debian Fashion-MNIST files as a smaller idx set; a test size above
    10,000 repeats the test images."""

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
        arr = read(name)
        reps = -(-n // len(arr))
        write(name, np.concatenate([arr] * reps)[:n] if reps > 1 else arr[:n])


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


STEADY_FROM = 0.2  # the steady window starts when this share of the rows has reached the driver
STEADY_MIN_BATCHES = 20  # fewer batch arrivals in the window: no steady rate (10k images = 10 batches of 1024)


def pipeline_timing(cfg, version, model_uri: str) -> dict:
    """The job's Ray Data pipeline iterated by the driver: start-up and steady-state rate.

    Steady = rows arriving after the first :data:`STEADY_FROM` of them / the time they took: both
    ends of that window are arrivals in the steady state, so the lag between an actor finishing a
    batch and the driver receiving it cancels (measuring from the first batch would not: the
    actors keep scoring while the first rows travel, which inflated short runs' rates). Rows
    reach the driver in bursts, so a window of fewer than :data:`STEADY_MIN_BATCHES` arrivals
    gives no steady rate (None): a 10k-image run reports its start-up and whole-run rate only."""
    import ray

    from pipelines import tracking
    from pipelines.inference.actors import build_dataset
    from pipelines.inference.inputs import resolve_input
    from pipelines.inference.model import load_model_package

    submitted = time.perf_counter()
    model = resolve_model(cfg, model_uri, tracking.client(cfg))
    inputs = resolve_input(cfg, version.uri)
    ds = build_dataset(cfg, inputs, model, ray.put(load_model_package(model)))
    first = None
    arrivals = []  # (time, cumulative rows)
    rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        now = time.perf_counter()
        first = first or now
        rows += batch.num_rows
        arrivals.append((now, rows))
    end = arrivals[-1][0]
    k = next(i for i, (_, r) in enumerate(arrivals) if r >= STEADY_FROM * rows)
    start_t, start_rows = arrivals[k]
    steady_s = end - start_t
    enough = len(arrivals) - 1 - k >= STEADY_MIN_BATCHES and steady_s > 0
    return {"rows": rows, "startup_s": round(first - submitted, 3), "steady_s": round(steady_s, 3),
            "steady_rows": rows - start_rows, "arrivals": len(arrivals),
            "steady_images_per_s": round((rows - start_rows) / steady_s, 1) if enough else None,
            "after_startup_images_per_s": round(rows / (end - first), 1) if end > first else None,
            "total_s": round(end - submitted, 3)}


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/local.yaml", help="the benchmarked model (random weights)")
    p.add_argument("--sizes", nargs="+", type=int, default=[10000, 100000], help="test images per run")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's infer.batch_size")
    p.add_argument("--pools", nargs="+", default=["1x1", "2x1"],
                   help="actor pools to measure, ACTORSxTHREADS (threads = CPUs reserved per actor)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the second plain loop (default: 2 = the cores)")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster (> actors x threads)")
    p.add_argument("--out", default="benchmarks/results/infer.json")
    args = p.parse_args()
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        sys.exit(f"error: {FMNIST} has no Fashion-MNIST files; apt-get install dataset-fashion-mnist")

    if args.batch_size is None:
        args.batch_size = load_config(args.config, []).infer.batch_size
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    base = [f"storage.uri=file://{work}/store", "data.source=fashion-mnist", "data.val_fraction=0.1",
            f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", "mlflow.experiment_name=bench-infer",
            "registry.model_name=vit-bench", f"infer.batch_size={args.batch_size}", f"ray.num_cpus={args.ray_cpus}"]
    versions = {}
    for n in args.sizes:
        subset_idx(work / f"idx-{n}", 1000, n)
        t0 = time.time()
        versions[n] = prepare(load_config(args.config, base + [f"data.source_dir={work}/idx-{n}", f"data.name=fmnist-{n}"]))
        print(f"prepared {versions[n].count('test')} test images in {time.time() - t0:.1f} s", flush=True)
    cfg = load_config(args.config, base + [f"data.source_dir={work}/idx-{args.sizes[0]}"])

    version = versions[args.sizes[0]]
    torch.manual_seed(0)
    net = build_model(model_arch(cfg, version.num_classes, version.channels, version.image_size))
    meta = {"class_names": version.classes, "channels": 1, "image_size": [28, 28], "mean": [0.2860], "std": [0.3530]}
    net.save_pretrained(work / "model", meta=meta)
    reg = register(cfg, str(work / "model"))
    model_uri = f"models:/{reg.model_name}@champion"
    n_params = sum(t.numel() for t in net.parameters())
    print(f"registered {reg.model_uri} ({cfg.model.name}, {n_params / 1e6:.3f} M params)", flush=True)

    # the same registered version's files, loaded in this process for the plain loop
    resolved = resolve_model(cfg, model_uri)
    clf = ViTClassifier().load_artifacts(fetch_model_files(resolved.download_uri, resolved.tracking_uri,
                                                           work / "plain-model"), device="cpu")
    small = versions[min(args.sizes)]
    plain: dict[int, list[dict]] = {1: [], args.threads: []}

    def plain_runs(when: str) -> None:
        for threads in plain:
            torch.set_num_threads(threads)
            plain_loop(small, cfg, clf, args.batch_size, cfg.infer.top_k)  # warm-up (allocator, kernels)
            r = plain_loop(small, cfg, clf, args.batch_size, cfg.infer.top_k)
            plain[threads].append({**r, "when": when})
            print(f"plain loop ({threads} thread(s), {when}): {r['images_per_s']:.0f} img/s", flush=True)

    plain_runs("before")
    ensure_ray(cfg)  # the running cluster every Ray run below uses
    rows = []
    for n in args.sizes:
        for pool in args.pools:
            actors, threads = (int(v) for v in pool.lower().split("x"))
            run_cfg = load_config(args.config, base + [f"data.source_dir={work}/idx-{n}", f"data.name=fmnist-{n}",
                                                       f"infer.num_actors={actors}", f"infer.cpus_per_actor={threads}"])
            # the job first, then its pipeline timed: start-up on a cluster that has run a job (the
            # very first job on a fresh cluster also pays for Ray's worker pool: in job_timings)
            job = infer(run_cfg, input_uri=versions[n].uri, model_uri=model_uri, job_name=f"bench-{n}-{actors}x{threads}")
            # this host's speed drifts by 10-15 % over minutes: the plain loop (1 thread) also runs
            # right before and after each timed pipeline, and the row's ratio is against their mean
            torch.set_num_threads(1)
            adjacent = [plain_loop(small, cfg, clf, args.batch_size, cfg.infer.top_k)["images_per_s"]]
            pipe = pipeline_timing(run_cfg, versions[n], model_uri)
            adjacent.append(plain_loop(small, cfg, clf, args.batch_size, cfg.infer.top_k)["images_per_s"])
            steady = pipe["steady_images_per_s"]
            row = {"images": n, "actors": actors, "threads_per_actor": threads, "cores": actors * threads, **pipe,
                   "adjacent_plain_images_per_s": adjacent,
                   "steady_per_core_vs_adjacent_plain": (round(steady / (actors * threads) / (sum(adjacent) / 2), 3)
                                                         if steady else None),
                   "job_s": job.seconds, "job_images_per_s": job.images_per_s, "job_timings": job.timings,
                   "correct": job.correct}
            rows.append(row)
            rate = (f"steady {steady:.0f} img/s ({steady / row['cores']:.0f} per core, "
                    f"{row['steady_per_core_vs_adjacent_plain']:.2f}x the plain loop run right before and after: "
                    f"{adjacent[0]:.0f} / {adjacent[1]:.0f} img/s)" if steady else
                    f"too few batches for a steady rate ({pipe['after_startup_images_per_s']:.0f} img/s after start-up)")
            print(f"ray {n} images, {actors} actor(s) x {threads}: start-up {pipe['startup_s']:.1f} s, {rate}; "
                  f"whole job {job.seconds:.1f} s", flush=True)
    import ray

    ray.shutdown()
    plain_runs("after")
    per_core = sum(r["images_per_s"] for r in plain[1]) / len(plain[1])
    per_thread = sum(r["images_per_s"] for r in plain[args.threads]) / len(plain[args.threads]) / args.threads
    for row in rows:
        if not row["steady_images_per_s"]:
            print(f"{row['images']} images, {row['actors']}x{row['threads_per_actor']}: start-up {row['startup_s']:.1f} s",
                  flush=True)
            continue
        ray_per_core = row["steady_images_per_s"] / row["cores"]
        row["steady_per_core_vs_plain_1thread"] = round(ray_per_core / per_core, 3)
        row[f"steady_per_core_vs_plain_{args.threads}threads_per_thread"] = round(ray_per_core / per_thread, 3)
        print(f"{row['images']} images, {row['actors']}x{row['threads_per_actor']}: steady per core "
              f"{row['steady_per_core_vs_plain_1thread']:.2f}x the plain loop's (1 thread, before and after all Ray runs), "
              f"{row['steady_per_core_vs_adjacent_plain']:.2f}x the plain runs right before and after it, "
              f"{row[f'steady_per_core_vs_plain_{args.threads}threads_per_thread']:.2f}x per thread of the "
              f"{args.threads}-thread loop; start-up {row['startup_s']:.1f} s", flush=True)

    import mlflow

    doc = {
        "benchmark": "batch inference: steady-state images/s per core and start-up, Ray Data job vs plain loop",
        "date": time.strftime("%Y-%m-%d"), "config": args.config, "model": cfg.model.name, "params": n_params,
        "batch_size": args.batch_size, "plain_threads": args.threads, "ray_num_cpus": args.ray_cpus,
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
                     "mlflow": mlflow.__version__},
        "plain": {str(k): v for k, v in plain.items()}, "plain_images_per_s_per_core": round(per_core, 1),
        "ray_runs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
