"""The workflow DAG on a real local Ray cluster: caching, resume after a failed step, --from."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_WORKFLOW as TINY

from pipelines import storage as st
from pipelines.config import load_config
from pipelines.run import StepFailed, load_record, run

pytestmark = pytest.mark.integration


def test_cached_rerun_and_resume_after_failed_register(ray_cluster, fmnist_idx, tmp_path):
    base = [f"storage.uri=file://{tmp_path}/store", f"data.source_dir={fmnist_idx.folder}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "workflow.name=wf", *TINY]

    # 1. register fails on a bad setting: prepare/search/evaluate succeed and are recorded
    with pytest.raises(StepFailed, match=r"step 'register' failed: registry.metric 'bogus' .*rerun the same command"):
        run(load_config(None, base + ["registry.metric=bogus"]))
    record = load_record(load_config(None, base))
    assert {k: v.status for k, v in record.items()} == {
        "prepare": "succeeded", "search": "succeeded", "evaluate": "succeeded", "register": "failed"}
    assert "registry.metric" in record["register"].error

    # 2. fixed and rerun: the finished steps are skipped, register and infer run
    cfg = load_config(None, base)
    second = run(cfg)
    assert second.skipped == ["prepare", "search", "evaluate"]
    assert second.executed == ["register", "infer"]
    for step in ("prepare", "search", "evaluate"):
        assert second.outputs[step] == record[step].outputs  # outputs equal, nothing recomputed
    infer_out = second.outputs["infer"]
    assert infer_out["input_count"] == infer_out["output_count"] == second.outputs["prepare"]["counts"]["test"]
    assert infer_out["accuracy"] == pytest.approx(second.outputs["evaluate"]["metrics"]["test_acc"])
    assert st.exists(infer_out["manifest_uri"])
    assert second.outputs["register"]["decision"] == "first"

    # 3. the same config again: every step skipped, the same outputs
    third = run(cfg)
    assert third.executed == [] and third.skipped == ["prepare", "search", "evaluate", "register", "infer"]
    assert third.outputs == second.outputs

    # 4. --from infer re-runs only infer
    fourth = run(cfg, from_step="infer")
    assert fourth.executed == ["infer"] and fourth.skipped == ["prepare", "search", "evaluate", "register"]
    assert fourth.outputs["infer"]["output_count"] == infer_out["output_count"]


def test_sweep_workflow_with_relative_storage(ray_cluster, fmnist_idx, tmp_path, monkeypatch):
    """The README's main job shape: search=tune, `file://./…` storage, the default sqlite store.

    The Ray workers and Tune trials run in other working directories; every output must still
    land under the driver's ./store."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "main.yaml").write_text(yaml.safe_dump({
        "storage": {"uri": "file://./store"},
        "data": {"source_dir": str(fmnist_idx.folder)},
        "train": {"warmup_epochs": 0.2},
        "tune": {"name": "sweep", "num_samples": 1, "grace_period": 1, "max_concurrent_trials": 1,
                 "space": {"train.lr": {"grid": [0.003, 0.001]}}},
    }))
    overrides = [kv for kv in TINY if not kv.startswith("workflow.search")] + ["workflow.search=tune"]
    result = run(load_config("main.yaml", overrides))
    assert result.executed == ["prepare", "search", "evaluate", "register", "infer"]

    store = tmp_path / "store"
    out = result.outputs
    assert (store / "tune" / "sweep").is_dir() and out["search"]["tune_parent_run_id"]
    for uri in (out["search"]["model_uri"], out["search"]["checkpoint_uri"], out["infer"]["manifest_uri"]):
        assert uri.startswith(store.as_uri() + "/"), uri
        assert st.exists(uri), uri
    assert (store / "mlflow.db").is_file() and (store / "runs" / "local" / "record.json").is_file()
    assert not (repo / "store").exists()
    assert out["infer"]["output_count"] == out["prepare"]["counts"]["test"]
