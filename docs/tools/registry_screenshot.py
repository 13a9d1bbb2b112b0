"""Screenshots of the MLflow registry pages that ``register`` describes, taken in a real browser.

    python docs/tools/registry_screenshot.py [--out docs] [--chromium chromium] [--keep DIR]

What it does, all on 127.0.0.1 and in a temporary folder (no Ray needed):

1. starts ``mlflow server`` (sqlite backend, local artifact folder served by the server) on a free port;
2. prepares a tiny image-folder dataset (three classes of random 28x28 images) with ``prepare``;
3. registers two tiny ViTs through ``register_from_workflow`` (the ``run`` workflow's register
   step): A, which always predicts the commonest test class, becomes champion; B, which always
   predicts a rarer one, is kept as a candidate. Each has an MLflow "training" run with a
   ``model.name`` param and the ``attention.png`` artifact that evaluate logs, drawn by the same
   code (the models are untrained, so the maps and predictions are those of random weights);
4. screenshots the registered-model page and B's version page with headless Chromium
   (``--virtual-time-budget`` lets the React UI fetch and render before the shot), writing
   ``<out>/registry-model-page.png`` and ``<out>/registry-version-page.png``;
5. stops the server (by its process group) and removes the folder (unless ``--keep``).

A documentation tool, not a test: it needs Chromium (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipelines import tracking  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.prepare import prepare  # noqa: E402
from pipelines.register import register_from_workflow  # noqa: E402
from vit_model import VisionTransformer, ViTConfig, from_pretrained  # noqa: E402

MODEL = "vit-fashion-demo"
# The browser reaches the server under this name (mapped to 127.0.0.1): the UI opens its assistant
# panel on localhost only, and a registry is normally browsed on a remote host anyway.
HOST = "mlflow.registry.test"
CLASSES = ["ankle-boot", "bag", "coat"]
ARCH = ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=3, embed_dim=32, depth=2, num_heads=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(work / "mlflow.log", "wb")
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
           "--artifacts-destination", (work / "artifacts").as_uri(), "--allowed-hosts", f"{HOST}:{port},127.0.0.1:{port}"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited with code {proc.returncode}; see {work / 'mlflow.log'}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"mlflow server did not answer on {url} within 90 s; see {work / 'mlflow.log'}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def image_folder(root: Path) -> Path:
    """train/test splits of random 28x28 grey images; the test split has 6/3/1 of the classes."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", (8, 8, 8)), ("test", (12, 6, 2))):
        for name, count in zip(CLASSES, counts):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def model_dir(path: Path, favourite: int, seed: int, dataset) -> Path:
    """An untrained ViT whose head bias makes it predict class ``favourite``."""
    torch.manual_seed(seed)
    model = VisionTransformer(ARCH)
    with torch.no_grad():
        model.head.weight.mul_(0.05)
        model.head.bias.zero_()
        model.head.bias[favourite] = 4.0
    meta = {"class_names": dataset.classes, "channels": 1, "image_size": [28, 28], "mean": [0.286], "std": [0.353],
            "dataset": {"name": dataset.name, "version": dataset.version, "uri": dataset.uri}}
    model.save_pretrained(path, meta=meta)
    return path


def training_run(client, cfg, name: str, model_name: str, model_path: Path, dataset) -> str:
    """An MLflow "training" run for ``model_path`` with the attention picture evaluate would log
    (drawn by the same code, on the dataset's fixed images; the models here are untrained)."""
    from pipelines.attention import attention_png, fixed_sample, sample_split
    from pipelines.evaluate import eval_config

    model, meta = from_pretrained(model_path, return_meta=True)
    sample = fixed_sample(dataset, sample_split(dataset, "test"), eval_config(cfg, meta))
    png = attention_png(model.eval(), sample, dataset.classes, title=f"{name}: attention on fixed images")
    run_id, _ = tracking.start_or_resume_run(cfg, name, "train", mlflow_client=client)
    client.log_param(run_id, "model.name", model_name)
    if png is not None:
        (model_path / "attention.png").write_bytes(png)
        client.log_artifact(run_id, str(model_path / "attention.png"))
    tracking.end_run(client, run_id)
    return run_id


def screenshot(chromium: str, url: str, out: Path, height: int) -> None:
    cmd = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
           f"--window-size=1400,{height}", "--virtual-time-budget=20000", f"--screenshot={out}", url]
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    print(f"wrote {out} ({url})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    parser.add_argument("--keep", help="keep the server's folder here instead of a temporary one")
    args = parser.parse_args(argv)

    work = Path(args.keep or tempfile.mkdtemp(prefix="registry-shot-"))
    work.mkdir(parents=True, exist_ok=True)
    proc, url = start_mlflow(work)
    try:
        overrides = [f"storage.uri={(work / 'store').as_uri()}", f"mlflow.tracking_uri={url}",
                     "mlflow.experiment_name=registry-demo", f"registry.model_name={MODEL}",
                     f"data.source={image_folder(work / 'images')}", "data.name=fashion-demo"]
        cfg = load_config(None, overrides)
        dataset = prepare(cfg)
        client = tracking.client(cfg)
        for label, favourite, seed in (("A", 0, 1), ("B", 1, 2)):
            path = model_dir(work / label, favourite, seed, dataset)
            run_id = training_run(client, cfg, f"train-{label}", "vit_tiny_patch7", path, dataset)
            result = register_from_workflow(cfg, model_uri=str(path),
                                            dataset_uri=dataset.uri, run_id=run_id)
            print(f"v{result['version']}: {result['decision']} ({result['reason']})")
        out, page = Path(args.out), url.replace("127.0.0.1", HOST)
        screenshot(args.chromium, f"{page}/#/models/{MODEL}", out / "registry-model-page.png", 1500)
        screenshot(args.chromium, f"{page}/#/models/{MODEL}/versions/2", out / "registry-version-page.png", 2000)
    finally:
        stop(proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
