"""Real images at real sizes: 224x224 RGB JPEGs through prepare -> train ViT-Ti/16 -> infer.

The fixture: an ImageFolder (``<class>/<n>.jpg``) of the first ``--images`` Fashion-MNIST test
images (Debian's idx files), upscaled 28 -> 224 (bicubic), grey -> RGB, JPEG quality 90. Then, in
one run on this machine:

1. **prepare** it (``data.source`` = the folder's URI, ``data.channels=3``): wall time, bytes,
   shards. Note: prepare validates and re-encodes every image as lossless PNG in the shards.
2. **Ingest per core**, one process with one torch thread (what one Ray Data task does):
   read the train shards (Parquet), decode the PNGs, ``RandomResizedCrop(224)`` + horizontal flip
   + normalise (the pipeline's own ``preprocess_batch``); each stage timed on its own. Baseline
   in the same run: the same work straight from the JPEG files (read + PIL decode, and read +
   ``torchvision.io.decode_jpeg``) — what a pipeline storing the source JPEGs would pay.
3. **Training consumption**: a plain torch loop (forward + backward + AdamW) of ViT-Ti/16 at
   224 with ``--threads`` threads, batch ``--batch-size``: images/s that one such trainer eats.
4. **Ray Data ingest + footprint** on a local Ray cluster whose object store
   (``--object-store-mib``) is smaller than the decoded train split: (a) ``data.cache_max_bytes``
   below the decoded size, so the pipeline streams (decodes every epoch); (b) the decoded cache
   forced on (``cache_max_bytes`` above it), so ``materialize()`` must spill to disk. For each:
   images/s per epoch (2 epochs), peak object-store use, spilled/restored bytes (Ray's store
   stats), and the summed RSS / PSS of every Ray process (psutil, sampled every second).
5. **prepare -> train -> infer** through the pipeline: ``train`` (Ray Train, 1 worker x
   ``--threads`` CPUs, ``--train-steps`` steps of ``--batch-size``, fp32 on the CPU), ``register``
   (MLflow sqlite store), ``infer`` over the test split; the training loop's images/s and the
   Ray processes' footprint while it runs.

The machine is 2 shared cores: everything is sized to finish in a few minutes, and ratios are
taken within this run. The sizes cut (and why) are written to the JSON's ``cuts``.

    python benchmarks/bench_jpeg224.py [--images 2000] [--train-steps 20] [--batch-size 8]
                                       [--out benchmarks/results/jpeg224.json]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.config import load_config  # noqa: E402
from pipelines.data.shards import iter_shard_batches  # noqa: E402
from pipelines.data.stream import (  # noqa: E402
    build_dataset,
    build_transform,
    cache_decoded,
    decode_chw,
    preprocess_batch,
    stream_spec,
)
from pipelines.prepare import prepare  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
STAGES = ("per_core", "train_step", "ray_ingest", "pipeline")
MiB = 2**20


# --------------------------------------------------------------------------------------------
# Fixture
# --------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    b = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    nd = b[3]
    dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)


def write_jpeg_folder(root: Path, n: int, size: int = 224, quality: int = 90) -> dict:
    """The first ``n`` Fashion-MNIST test images as ``root/<label>/<i>.jpg`` (RGB, size x size)."""
    images = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:n]
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")[:n]
    t0 = time.perf_counter()
    total = 0
    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = Image.fromarray(img, "L").resize((size, size), Image.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())
        total += buf.tell()
    return {"images": int(len(images)), "size": [size, size], "mode": "RGB", "jpeg_quality": quality,
            "bytes": total, "bytes_per_image": round(total / max(1, len(images))), "seconds": round(time.perf_counter() - t0, 2)}


# --------------------------------------------------------------------------------------------
# Per-core ingest (one process, one thread)
# --------------------------------------------------------------------------------------------


def best_rate(fn, n_images: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(n_images / (time.perf_counter() - t0))
    return {"images_per_s": round(max(runs), 1), "all_images_per_s": [round(r, 1) for r in runs]}


def per_core_ingest(version, cfg, jpeg_files: list[Path], repeats: int) -> dict:
    torch.set_num_threads(1)
    spec = stream_spec(version, cfg, train=True)
    n = version.count("train")
    tables: list = []

    def read():
        tables.clear()
        tables.extend(iter_shard_batches(version, "train", cfg.storage, columns=["image", "label", "row_id"]))

    out = {"read_parquet": best_rate(read, n, repeats)}
    batches = [{"image": t.column("image").to_numpy(zero_copy_only=False), "label": t.column("label").to_numpy(),
                "row_id": t.column("row_id").to_numpy()} for t in tables]
    chunks = [{k: v[s:s + 512] for k, v in b.items()} for b in batches for s in range(0, len(b["label"]), 512)]

    def decode_only():
        for b in chunks:
            for data in b["image"]:
                decode_chw(data)

    def pipeline():  # decode + RandomResizedCrop + flip + normalise, as a Ray Data task runs it
        for b in chunks:
            preprocess_batch(b, spec)

    out["png_decode"] = best_rate(decode_only, n, repeats)
    out["png_decode_rrc_flip_normalise"] = best_rate(pipeline, n, repeats)
    # read + decode + augment per image: the harmonic sum of the stages
    out["shards_total"] = {"images_per_s": round(1 / (1 / out["read_parquet"]["images_per_s"]
                                                      + 1 / out["png_decode_rrc_flip_normalise"]["images_per_s"]), 1)}

    # Baselines: the same per-image work straight from the JPEG files
    transform = build_transform(spec, (224, 224))
    mean, std = spec.mean, spec.std
    files = jpeg_files[:n]

    def jpeg_pil():
        for f in files:
            with Image.open(io.BytesIO(f.read_bytes())) as img:
                t = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
            x = transform(t)
            (x.to(torch.float32) / 255.0 - mean) / std

    def jpeg_torchvision():
        from torchvision.io import decode_jpeg

        for f in files:
            data = torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8)
            x = transform(decode_jpeg(data))
            (x.to(torch.float32) / 255.0 - mean) / std

    out["jpeg_files_pil_rrc_flip_normalise"] = best_rate(jpeg_pil, len(files), repeats)
    out["jpeg_files_torchvision_rrc_flip_normalise"] = best_rate(jpeg_torchvision, len(files), repeats)
    out["threads"] = 1
    return out


# --------------------------------------------------------------------------------------------
# Training consumption (plain torch loop)
# --------------------------------------------------------------------------------------------


def train_step_rate(threads: int, batch_size: int, steps: int, repeats: int) -> dict:
    from vit_model import create_model, flops_per_image

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", num_classes=10).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(batch_size, 3, 224, 224)
    y = torch.randint(0, 10, (batch_size,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(2):
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    return {"model": "vit_tiny_patch16_224 (10 classes)", "params": sum(p.numel() for p in model.parameters()),
            "train_gflops_per_image": round(3 * flops_per_image(model.cfg) / 1e9, 2), "threads": threads,
            "batch_size": batch_size, "steps": steps, "precision": "fp32",
            "images_per_s": round(max(rates), 2), "all_images_per_s": [round(r, 2) for r in rates],
            "images_per_s_per_core": round(max(rates) / threads, 2)}


# --------------------------------------------------------------------------------------------
# Footprint sampling: Ray processes (psutil) and the object store (Ray's store stats)
# --------------------------------------------------------------------------------------------


def ray_processes() -> list[psutil.Process]:
    """This driver's descendants: with ray.init() starting the cluster, that is every Ray process
    of it (GCS, raylet, dashboard, workers, ...); other users' clusters are not ours."""
    return psutil.Process().children(recursive=True)


def store_stats() -> dict:
    import ray
    from ray._private.internal_api import memory_summary

    # our cluster's GCS, by address: other users' clusters on this machine make auto-detection fail
    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    out: dict = {}
    m = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", text)
    if m:
        out["plasma_mib"], out["plasma_objects"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"Spilled (\d+) MiB, (\d+) objects", text)
    out["spilled_mib"] = int(m.group(1)) if m else 0
    m = re.search(r"Restored (\d+) MiB, (\d+) objects", text)
    out["restored_mib"] = int(m.group(1)) if m else 0
    return out


class Sampler:
    """Every ``period`` s: summed RSS / PSS / USS of the Ray processes and the driver, plus the
    object store's use; keeps the peaks."""

    def __init__(self, period: float = 1.0):
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.sample()  # the store's spilled/restored counters are cumulative: keep the starting values
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()  # a last one: spilled/restored totals at the end

    def sample(self) -> None:
        rss = pss = uss = 0
        n = 0
        for p in ray_processes():
            try:
                mi = p.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss, uss, n = rss + mi.rss, pss + getattr(mi, "pss", 0), uss + mi.uss, n + 1
        driver = psutil.Process().memory_info().rss
        row = {"t": time.time(), "processes": n, "ray_rss_mib": round(rss / MiB), "ray_pss_mib": round(pss / MiB),
               "ray_uss_mib": round(uss / MiB), "driver_rss_mib": round(driver / MiB)}
        try:
            row.update(store_stats())
        except Exception as exc:  # stats are best effort; the timing goes on
            row["store_error"] = f"{type(exc).__name__}: {exc}"
        self.samples.append(row)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def summary(self) -> dict:
        s = self.samples
        peak = {k: max((r.get(k, 0) for r in s), default=0)
                for k in ("ray_rss_mib", "ray_pss_mib", "ray_uss_mib", "driver_rss_mib", "plasma_mib", "processes")}
        delta = {k: (s[-1].get(k, 0) - s[0].get(k, 0)) if s else 0 for k in ("spilled_mib", "restored_mib")}
        errors = [r["store_error"] for r in s if "store_error" in r]
        return {**{f"peak_{k}": v for k, v in peak.items()}, **delta, "samples": len(s),
                "store_samples": len(s) - len(errors), "store_errors": len(errors), "first_store_error": errors[0] if errors else None}


def timed_epochs(ds, epochs: int, batch_size: int) -> list[dict]:
    out = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = 0
        first = None
        for batch in ds.iter_torch_batches(batch_size=batch_size, prefetch_batches=2):
            n += len(batch["label"])
            first = first or time.perf_counter() - t0
        s = time.perf_counter() - t0
        out.append({"images": n, "seconds": round(s, 2), "first_batch_s": round(first or 0, 2),
                    "images_per_s": round(n / s, 1)})
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="Fashion-MNIST test images in the JPEG fixture")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the trainer (the machine's cores)")
    p.add_argument("--repeats", type=int, default=2, help="per-core stages: best of this many")
    p.add_argument("--object-store-mib", type=int, default=200, help="object store of the ingest cluster (stage 4)")
    p.add_argument("--ingest-epochs", type=int, default=2)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                   help="stages after fixture + prepare (default: all)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/jpeg224.json"))
    args = p.parse_args()
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        sys.exit(f"error: {FMNIST} has no Fashion-MNIST files; apt-get install dataset-fashion-mnist")

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)
    work = Path(tempfile.mkdtemp(prefix="bench-jpeg224-"))
    started = time.time()
    import ray
    import torchvision

    doc: dict = {
        "benchmark": "224x224 RGB JPEGs: prepare -> ingest per core vs train step -> Ray Data footprint -> train -> infer",
        "machine": {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                    "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "shared": "2 cores shared with other engineers' jobs while this ran: rates are lower bounds, "
                              "read the ratios within this run"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "ray": ray.__version__},
        "load_average_at_start": list(os.getloadavg()),
        "cuts": {
            "images": f"{args.images} (not ImageNet's 1.28 M): 2 shared cores; prepare and every epoch stay under a minute",
            "train_steps": f"{args.train_steps} x batch {args.batch_size} (not a few hundred): ViT-Ti/16 at 224 trained "
                           "at 1-4 img/s on these 2 cores under the load of the day (load average 10-44 from other "
                           "engineers' jobs), so a few hundred steps would take 10-60 minutes; a first run with 60 "
                           "steps was stopped at 7 minutes; accuracy is not the point here",
            "val": "train.limit_val_batches=10 for the same reason",
            "source_images": "Fashion-MNIST upscaled 28 -> 224: smooth images, so JPEGs are small (~10 KB) and decode "
                             "faster than photos; ImageNet's average JPEG is ~110 KB at ~400x350",
        },
    }
    base = [f"storage.uri=file://{work}/store", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
            "mlflow.experiment_name=bench-jpeg224", "registry.model_name=vit-jpeg224",
            f"data.source=file://{work}/jpeg", "data.name=jpeg224", "data.channels=3",
            "data.val_fraction=0.1", "data.test_fraction=0.1",
            "data.augment.random_resized_crop=true", "data.augment.crop_scale=[0.35, 1.0]", "data.augment.hflip=0.5",
            "data.augment.mean=[0.2860]", "data.augment.std=[0.3530]",
            "model.name=vit_tiny_patch16", f"train.batch_size={args.batch_size}", "train.epochs=1",
            "train.num_workers=1", f"train.cpus_per_worker={args.threads}", "train.warmup_epochs=0.1",
            "ray.num_cpus=4", "infer.batch_size=64", "infer.cpus_per_actor=2"]
    out = Path(args.out)

    def save() -> None:  # after every stage: a run stopped half-way keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, default=str) + "\n")

    try:
        # 0. fixture -----------------------------------------------------------------------
        doc["fixture"] = write_jpeg_folder(work / "jpeg", args.images)
        doc["fixture"]["load_average"] = list(os.getloadavg())
        print(f"fixture: {doc['fixture']['images']} JPEGs 224x224 RGB, {doc['fixture']['bytes_per_image']} B each, "
              f"{doc['fixture']['seconds']} s", flush=True)

        # 1. prepare -----------------------------------------------------------------------
        cfg = load_config(None, base)
        t0 = time.perf_counter()
        version = prepare(cfg)
        m = version.manifest
        shards = [sh for s in m["splits"].values() for sh in s["shards"]]
        n_train = version.count("train")
        doc["prepare"] = {"seconds": round(time.perf_counter() - t0, 2),
                          "images_per_s": round(sum(s["count"] for s in m["splits"].values()) / (time.perf_counter() - t0), 1),
                          "splits": {k: v["count"] for k, v in m["splits"].items()}, "shards": len(shards),
                          "shard_bytes": sum(sh["bytes"] for sh in shards),
                          "shard_bytes_per_image": round(sum(sh["bytes"] for sh in shards) / sum(sh["rows"] for sh in shards)),
                          "stored_encoding": m["images"]["encoding"], "source_formats": m["images"]["source_formats"],
                          "read_threads": cfg.data.read_threads}
        doc["prepare"]["load_average"] = list(os.getloadavg())
        doc["prepare"]["png_vs_jpeg_bytes"] = round(doc["prepare"]["shard_bytes_per_image"] / doc["fixture"]["bytes_per_image"], 2)
        print(f"prepare: {doc['prepare']['seconds']} s ({doc['prepare']['images_per_s']} img/s), {len(shards)} shards, "
              f"{doc['prepare']['shard_bytes'] / 1e6:.1f} MB ({doc['prepare']['png_vs_jpeg_bytes']}x the JPEG bytes: "
              f"shards store PNG)", flush=True)
        save()

        # 2. ingest per core ----------------------------------------------------------------
        jpegs = sorted((work / "jpeg").rglob("*.jpg"))
        if "per_core" in args.stages:
            doc["ingest_per_core"] = ipc = per_core_ingest(version, cfg, jpegs, args.repeats)
            ipc["load_average"] = list(os.getloadavg())
            print("ingest per core (1 thread): " + ", ".join(f"{k} {v['images_per_s']}" for k, v in ipc.items() if isinstance(v, dict))
              + " img/s", flush=True)
        save()

        # 3. training consumption -------------------------------------------------------------
        if "train_step" in args.stages:
            doc["train_step"] = train_step_rate(args.threads, args.batch_size, steps=6, repeats=args.repeats)
            ts = doc["train_step"]
            ts["load_average"] = list(os.getloadavg())
            print(f"train step (plain torch, {args.threads} threads, batch {args.batch_size}): {ts['images_per_s']} img/s "
                  f"({ts['images_per_s_per_core']} per core)", flush=True)
            save()

        # 4. Ray Data ingest + footprint, object store smaller than the decoded split ---------
        if "ray_ingest" in args.stages:
            decoded_bytes = n_train * 3 * 224 * 224
            doc["ray_ingest"] = {"object_store_mib": args.object_store_mib, "decoded_train_mib": round(decoded_bytes / MiB),
                                 "shard_train_mib": round(sum(s.bytes for s in version.shards("train")) / MiB),
                                 "ray_num_cpus": 2, "batch_size": args.batch_size, "runs": {}}
            ray.init(num_cpus=2, object_store_memory=args.object_store_mib * MiB, include_dashboard=False,
                     _node_ip_address="127.0.0.1", _temp_dir=f"/tmp/ray-jpeg224-{os.getpid()}", log_to_driver=False,
                     configure_logging=False)
            idle = Sampler()
            idle.sample()
            doc["ray_ingest"]["idle"] = idle.samples[-1]
            for name, cache_max in (("stream_cache_too_small", decoded_bytes // 2), ("cache_forced_spills", 4 * decoded_bytes)):
                cfg_i = load_config(None, base + [f"data.cache_max_bytes={cache_max}"])
                cached = cache_decoded(version, "train", cfg_i)
                with Sampler() as s:
                    t0 = time.perf_counter()
                    ds = build_dataset(version, "train", cfg_i)
                    ds.context.execution_options.preserve_order = True
                    build_s = time.perf_counter() - t0
                    epochs = timed_epochs(ds, args.ingest_epochs, args.batch_size)
                run = {"cache_decoded": cached, "cache_max_mib": round(cache_max / MiB), "build_s": round(build_s, 2),
                       "epochs": epochs, **s.summary()}
                run["load_average"] = list(os.getloadavg())
                run["images_per_s_per_core"] = round(epochs[-1]["images_per_s"] / 2, 1)  # the last epoch: past start-up
                doc["ray_ingest"]["runs"][name] = run
                print(f"ray data, {name} (cached={cached}): build {run['build_s']} s, epochs "
                      f"{[e['images_per_s'] for e in epochs]} img/s; peak object store {run['peak_plasma_mib']} MiB, "
                      f"spilled {run['spilled_mib']} MiB, restored {run['restored_mib']} MiB, Ray RSS {run['peak_ray_rss_mib']} "
                      f"MiB / PSS {run['peak_ray_pss_mib']} MiB", flush=True)
                save()
                del ds
            ray.shutdown()

        # 5. prepare -> train -> register -> infer through the pipeline -------------------------
        if "pipeline" in args.stages:
            from pipelines.infer import infer
            from pipelines.register import register
            from pipelines.train import train

            cfg_t = load_config(None, base + [f"train.limit_train_batches={args.train_steps}", "train.limit_val_batches=10",
                                              "train.run_name=jpeg224"])
            steps_in_epoch = min(args.train_steps, n_train // args.batch_size)
            with Sampler(period=2.0) as s:
                t0 = time.perf_counter()
                result = train(cfg_t, version=version)
                train_wall = time.perf_counter() - t0
            last = result.history[-1]
            doc["train"] = {"steps": steps_in_epoch, "batch_size": args.batch_size, "workers": 1,
                            "cpus_per_worker": args.threads, "precision": cfg_t.train.precision,
                            "cache_decoded": cache_decoded(version, "train", cfg_t),
                            "images_per_s_in_loop": round(last["images_per_s"], 2), "epoch_seconds": round(last["epoch_seconds"], 1),
                            "wall_seconds": round(train_wall, 1), "val_acc": round(result.metrics.get("val_acc", float("nan")), 4),
                            "footprint": s.summary(), "load_average": list(os.getloadavg())}
            print(f"train: {steps_in_epoch} steps, {doc['train']['images_per_s_in_loop']} img/s in the loop, "
                  f"val_acc {doc['train']['val_acc']}, wall {doc['train']['wall_seconds']} s; Ray RSS peak "
                  f"{doc['train']['footprint']['peak_ray_rss_mib']} MiB", flush=True)
            save()
            t0 = time.perf_counter()
            reg = register(cfg_t, result.model_uri)
            register_s = time.perf_counter() - t0
            r = infer(cfg_t, input_uri=version.uri, model_uri=f"models:/{reg.model_name}@champion", job_name="jpeg224")
            doc["infer"] = {"images": r.input_count, "seconds": r.seconds, "ray_images_per_s": r.timings["ray_images_per_s"],
                            "images_per_s": r.images_per_s, "accuracy": r.accuracy, "register_seconds": round(register_s, 1),
                            "actors": 1, "cpus_per_actor": 2, "load_average": list(os.getloadavg())}
            print(f"register {register_s:.1f} s; infer {r.input_count} test images in {r.seconds:.1f} s "
                  f"({r.timings['ray_images_per_s']} img/s in the Ray job), accuracy {r.accuracy}", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(f"/tmp/ray-jpeg224-{os.getpid()}", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # ratios, all within this run (those whose stages ran) -----------------------------------------
    ratios: dict = {}
    ipc, ts = doc.get("ingest_per_core"), doc.get("train_step")
    if ipc:
        per_core = ipc["shards_total"]["images_per_s"]
        ratios["jpeg_pil_vs_shards_png"] = round(ipc["jpeg_files_pil_rrc_flip_normalise"]["images_per_s"] / per_core, 2)
        ratios["jpeg_torchvision_vs_shards_png"] = round(
            ipc["jpeg_files_torchvision_rrc_flip_normalise"]["images_per_s"] / per_core, 2)
        if ts:
            ratios["ingest_per_core_vs_train_step_2_threads"] = round(per_core / ts["images_per_s"], 2)
            ratios["cores_of_ingest_per_trainer_here"] = round(ts["images_per_s"] / per_core, 3)
        if "train" in doc:
            ratios["ingest_per_core_vs_pipeline_train_loop"] = round(per_core / doc["train"]["images_per_s_in_loop"], 2)
        if "ray_ingest" in doc:
            ratios["ray_stream_per_core_vs_one_process"] = round(
                doc["ray_ingest"]["runs"]["stream_cache_too_small"]["images_per_s_per_core"] / per_core, 2)
    doc["ratios"] = ratios
    doc["load_average_at_end"] = list(os.getloadavg())
    doc["wall_seconds"] = round(time.time() - started, 1)
    print("ratios:")
    for k, v in doc["ratios"].items():
        print(f"  {k}: {v}")
    save()
    print(f"wrote {out} ({doc['wall_seconds']} s)")


if __name__ == "__main__":
    main()
