"""benchmarks/bench_gpu.py stays runnable: its CPU smoke path, in-process, and the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_writes_every_field(bench_gpu, tmp_path):
    out = tmp_path / "gpu.json"
    doc = bench_gpu.main(["--device", "cpu", "--model", "vit_tiny_patch16_224", "--steps", "1", "--warmup", "0",
                          "--batch-size", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert doc["device"]["type"] == "cpu" and doc["peak_bf16_tflops"]["value"] is None
    assert doc["settings"]["model"] == "vit_tiny_patch16_224" and doc["settings"]["batch_size"] == 2
    # training FLOPs = 3 x the forward FLOPs of ViT-Ti/16 at 224 (2 x MACs: 2.507 GFLOPs)
    assert doc["flops"]["forward_per_image"] == pytest.approx(2.5074e9, rel=1e-3)
    assert doc["flops"]["train_per_image"] == 3 * doc["flops"]["forward_per_image"]

    rows = doc["results"]
    keys = [(r["impl"], r["compiled"], r["fused_adamw"]) for r in rows]
    assert keys[0] == ("ours", False, False)  # the baseline is measured first
    assert ("ours", False, True) in keys and not any(c for _, c, _ in keys)  # no compile rows on the CPU by default
    ours = [r for r in rows if r["impl"] == "ours"]
    assert all(r["status"] == "ok" for r in ours), ours
    for r in ours:
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["params"] == 5_717_416
        assert r["mfu"] is None and r["peak_memory_mib"] is None  # n/a on the CPU
        assert r["loss"] == r["loss"]  # finite, not NaN
    assert rows[0]["ratio_vs_baseline"] == 1.0
    timm_rows = [r for r in rows if r["impl"] == "timm"]
    if bench_gpu.timm_version() is None:
        assert all(r["status"] == "skipped" and "timm" in r["reason"] for r in timm_rows)
        assert any("timm" in n for n in doc["notes"])
    else:
        assert all(r["status"] == "ok" and r["params"] == 5_717_416 for r in timm_rows)


def test_peak_table_is_dense_bf16(bench_gpu):
    assert bench_gpu.lookup_peak("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert bench_gpu.lookup_peak("NVIDIA H100 PCIe")[0] == 756.0
    assert bench_gpu.lookup_peak("NVIDIA H200")[0] == 989.0
    assert bench_gpu.lookup_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert bench_gpu.lookup_peak("NVIDIA L4")[0] == 121.0
    assert bench_gpu.lookup_peak("NVIDIA A10G")[0] is None  # no vendor figure: the user passes --peak-tflops


def test_mfu_uses_the_override(bench_gpu, tmp_path):
    doc = bench_gpu.main(["--device", "cpu", "--model", "vit_tiny_patch16_224", "--steps", "1", "--warmup", "0",
                          "--batch-size", "1", "--no-timm", "--no-fused", "--peak-tflops", "1.0",
                          "--out", str(tmp_path / "g.json")])
    (row,) = doc["results"]
    assert doc["peak_bf16_tflops"] == {"value": 1.0, "source": "--peak-tflops", "dense": True}
    images_per_s = 1 * 1 / row["seconds"]  # 1 step of batch 1 (images_per_s itself is rounded to 0.01)
    assert row["mfu"] == pytest.approx(images_per_s * doc["flops"]["train_per_image"] / 1e12, rel=1e-2)
