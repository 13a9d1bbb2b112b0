"""Training augmentation cost: the batched path (pipelines.data.augment) vs per-image torchvision.

Measured in one run, one thread, on 512-image batches of decoded 28x28 Fashion-MNIST-sized
images, for crop (pad 2) + flip and crop + flip + random erasing (p 0.25):

1. **batched**: :func:`pipelines.data.stream.preprocess_batch` as training runs it (per-row seeds
   from ``(seed, epoch, row id)``, crop/flip/erasing vectorised over the batch, normalise).
2. **per image** (the baseline, the path this project used before): per row ``torch.manual_seed``
   of the row's seed, ``v2.Compose([RandomCrop(padding=2), RandomHorizontalFlip])``, normalise,
   then per row re-seeded ``v2.RandomErasing``.
3. The **training step** (forward + backward + AdamW, one thread, batch 64, channels-last) of the
   quick recipe's model and of the best recipe's, to express each path's cost as a share of the
   time a worker spends per image.

Prints microseconds per image and ratios, writes JSON.

    python benchmarks/bench_augment.py [--repeats 3] [--out benchmarks/results/augment.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.config import AugmentConfig  # noqa: E402
from pipelines.data.stream import StreamSpec, preprocess_batch, sample_seeds  # noqa: E402

BATCH = 512
MEAN, STD = 0.2860, 0.3530
MODELS = {
    "quick (convstem 16/32/64 d64)": dict(stem_channels=[16, 32, 64], embed_dim=64, num_heads=2),
    "best (convstem 24/48/96 d96)": dict(stem_channels=[24, 48, 96], embed_dim=96, num_heads=3),
}


def per_image(pixels: np.ndarray, seeds: np.ndarray, aug: AugmentConfig) -> np.ndarray:
    """The per-image torchvision baseline (what preprocess_batch did before the batched path)."""
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomCrop((28, 28), padding=aug.random_crop_padding), v2.RandomHorizontalFlip(aug.hflip)])
    out = torch.empty(pixels.shape, dtype=torch.uint8)
    with torch.random.fork_rng(devices=[]):
        for i, t in enumerate(torch.from_numpy(pixels)):
            torch.manual_seed(int(seeds[i]))
            out[i] = tf(t)
        x = out.to(torch.float32).div_(255.0).sub_(MEAN).div_(STD)
        if aug.random_erasing > 0:
            erase = v2.RandomErasing(p=aug.random_erasing, value=0)
            for i in range(len(x)):
                torch.manual_seed(int(seeds[i]) ^ 1)
                x[i] = erase(x[i])
    return x.numpy()


def us_per_image(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / BATCH * 1e6


def step_us_per_image(args: dict, repeats: int, steps: int = 20, bs: int = 64) -> float:
    from vit_model import create_model, to_preferred_memory_format

    model = to_preferred_memory_format(create_model(
        "vit_tiny_convstem_28", num_classes=10, in_chans=1, img_size=28, stem_strides=[1, 2, 2], depth=4,
        mlp_ratio=2.0, class_token=False, global_pool="avg", **args))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(bs, 1, 28, 28), torch.randint(0, 10, (bs,))

    def run():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    run()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best / (steps * bs) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/augment.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (BATCH, 1, 28, 28), dtype=np.uint8)
    row_ids = np.arange(BATCH, dtype=np.int64)
    batch = {"pixels": pixels, "label": np.zeros(BATCH, np.int64), "row_id": row_ids}
    seeds = sample_seeds(0, 1, row_ids)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                     "torch": torch.__version__, "threads": 1, "batch": BATCH, "augment": {}, "train_step_us": {}}
    for name, aug in [("crop+flip", AugmentConfig(random_crop_padding=2, hflip=0.5)),
                      ("crop+flip+erasing", AugmentConfig(random_crop_padding=2, hflip=0.5, random_erasing=0.25))]:
        spec = StreamSpec((28, 28), 1, True, aug, seed=0, deterministic=True)
        batched = us_per_image(lambda spec=spec: preprocess_batch(batch, spec, epoch=1), args.repeats)
        baseline = us_per_image(lambda aug=aug: per_image(pixels, seeds, aug), args.repeats)
        results["augment"][name] = {"batched_us": batched, "per_image_us": baseline, "speedup": baseline / batched}
        print(f"{name:18s} batched {batched:7.1f} us/image   per-image torchvision {baseline:7.1f} us/image   "
              f"{baseline / batched:5.1f}x", flush=True)
    for name, margs in MODELS.items():
        step = step_us_per_image(margs, args.repeats)
        results["train_step_us"][name] = step
        for r in results["augment"].values():
            r.setdefault("share_of_step", {})[name] = {"batched": r["batched_us"] / step,
                                                       "per_image": r["per_image_us"] / step}
        erase = results["augment"]["crop+flip+erasing"]
        print(f"train step {name}: {step:7.1f} us/image; crop+flip+erasing adds "
              f"{erase['per_image_us'] / step:5.1%} per image (per-image path) vs {erase['batched_us'] / step:5.1%} (batched)",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
