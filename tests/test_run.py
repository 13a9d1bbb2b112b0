"""The workflow DAG on a real local Ray cluster: caching, resume after a failed step, --from."""

from __future__ import annotations

import pytest

from pipelines import storage as st
from pipelines.config import load_config
from pipelines.run import StepFailed, load_record, run

pytestmark = pytest.mark.integration

TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=7", "train.batch_size=32",
        "train.cpus_per_worker=0.5", "train.num_workers=2", "train.epochs=1", "data.shard_rows=100",
        "workflow.search=train", "workflow.retries=0", "infer.batch_size=64", "registry.model_name=vit-run-test"]


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
