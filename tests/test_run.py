"""The workflow DAG on a real local Ray cluster: caching, resume after a failed step, --from."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import TINY_WORKFLOW as TINY

from pipelines import storage as st
from pipelines import tracking
from pipelines.config import load_config
from pipelines.run import StepFailed, load_record, run

pytestmark = pytest.mark.integration


def test_cached_rerun_and_resume_after_failed_register(ray_cluster, fmnist_idx, tmp_path):
    base = [f"storage.uri=file://{tmp_path}/store", f"data.source_dir={fmnist_idx.folder}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "workflow.name=wf", *TINY]

    # 1. register fails (a broken @champion it cannot load): prepare/search/evaluate succeed and are recorded
    cfg = load_config(None, base)
    client = tracking.client(cfg)
    client.create_registered_model("vit-run-test")
    broken = client.create_model_version("vit-run-test", source=str(tmp_path / "nowhere"))
    client.set_registered_model_alias("vit-run-test", "champion", broken.version)
    with pytest.raises(StepFailed, match=r"step 'register' failed: cannot load the champion vit-run-test v1 .*"
                                         r"rerun the same command"):
        run(cfg)
    record = load_record(cfg)
    assert {k: v.status for k, v in record.items()} == {
        "prepare": "succeeded", "search": "succeeded", "evaluate": "succeeded", "register": "failed"}
    assert "cannot load the champion" in record["register"].error

    # 2. fixed (the broken alias removed) and rerun: the finished steps are skipped (prepare,
    # content-addressed, finds its version again), register and infer run
    client.delete_registered_model_alias("vit-run-test", "champion")
    second = run(cfg)
    assert second.skipped == ["search", "evaluate"]
    assert second.executed == ["prepare", "register", "infer"]
    for step in ("prepare", "search", "evaluate"):
        assert second.outputs[step] == record[step].outputs  # outputs equal, nothing recomputed
    infer_out = second.outputs["infer"]
    assert infer_out["input_count"] == infer_out["output_count"] == second.outputs["prepare"]["counts"]["test"]
    assert infer_out["accuracy"] == pytest.approx(second.outputs["evaluate"]["metrics"]["test_acc"])
    assert st.exists(infer_out["manifest_uri"])
    assert second.outputs["register"]["decision"] == "first"

    # 3. the same config again: every step skipped, the same outputs
    third = run(cfg)
    assert third.executed == ["prepare"] and third.skipped == ["search", "evaluate", "register", "infer"]
    assert third.outputs == second.outputs

    # 4. --from infer re-runs only infer
    fourth = run(cfg, from_step="infer")
    assert fourth.executed == ["prepare", "infer"] and fourth.skipped == ["search", "evaluate", "register"]
    assert fourth.outputs["infer"]["output_count"] == infer_out["output_count"]

    # 5. a changed training input trains anew (never the previous model): a new run for the new key
    longer = run(load_config(None, base + ["train.epochs=2"]))
    assert longer.executed == ["prepare", "search", "evaluate", "register", "infer"]
    old_search, new_search = second.outputs["search"], longer.outputs["search"]
    assert new_search["train_run"] != old_search["train_run"] and new_search["model_uri"] != old_search["model_uri"]
    assert len(client.get_metric_history(new_search["train_run_id"], "val_acc")) == 2  # two epochs, not a reused run
    assert longer.outputs["register"]["version"] != second.outputs["register"]["version"]

    # 6. the first config again: its recorded outputs are reused ... unless forced with --from search
    again = run(cfg, from_step="search")
    assert again.executed == ["prepare", "search", "evaluate", "register", "infer"]
    assert again.outputs["search"]["train_run"] not in (old_search["train_run"], new_search["train_run"])


def test_sweep_workflow_with_relative_storage(ray_cluster, fmnist_idx, tmp_path, monkeypatch):
    """The README's main job shape: search=tune, `file://./…` storage, the default sqlite store.

    The Ray workers and Tune trials run in other working directories; every output must still
    land under the driver's ./store. One of the two trials diverges (an absurd learning rate): it
    must end alone, marked, and the sweep go on with the other."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "main.yaml").write_text(yaml.safe_dump({
        "storage": {"uri": "file://./store"},
        "data": {"source_dir": str(fmnist_idx.folder)},
        "train": {"warmup_epochs": 0.2},
        "tune": {"name": "sweep", "num_samples": 1, "grace_period": 1, "max_concurrent_trials": 1,
                 "space": {"train.lr": {"grid": [0.003, 1.0e30]}}},
    }))
    overrides = [kv for kv in TINY if not kv.startswith("workflow.search")] + ["workflow.search=tune"]
    result = run(load_config("main.yaml", overrides))
    assert result.executed == ["prepare", "search", "evaluate", "register", "infer"]

    store = tmp_path / "store"
    out = result.outputs
    assert out["search"]["sweep"].startswith("sweep-") and (store / "tune" / out["search"]["sweep"]).is_dir()
    assert out["search"]["tune_parent_run_id"] and out["search"]["best_config"] == {"train.lr": 0.003}
    trials = {t["config"]["train.lr"]: t for t in st.read_json(
        (store / "tune" / out["search"]["sweep"] / "best.json").as_uri())["trials"]}
    assert trials[0.003]["error"] is None and "non-finite loss" in trials[1.0e30]["error"], trials
    diverged = tracking.client(load_config("main.yaml", overrides)).get_run(trials[1.0e30]["run_id"])
    assert diverged.info.status == "FAILED" and "non-finite" in diverged.data.tags["pipeline.stopped"]
    for uri in (out["search"]["model_uri"], out["search"]["checkpoint_uri"], out["infer"]["manifest_uri"]):
        assert uri.startswith(store.as_uri() + "/"), uri
        assert st.exists(uri), uri
    assert (store / "mlflow.db").is_file() and (store / "runs" / "local" / "record.json").is_file()
    assert not (repo / "store").exists()
    assert out["infer"]["output_count"] == out["prepare"]["counts"]["test"]
