"""A 3-trial ASHA sweep on a real local Ray cluster: nested MLflow runs, early stopping, and an
interrupted sweep that resumes without re-running its finished trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import tracking
from pipelines.config import load_config
from pipelines.prepare import prepare
from pipelines.tune import tune

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def sweep_config(tmp_path: Path, fmnist_idx) -> Path:
    doc = {
        "storage": {"uri": f"file://{tmp_path}/store"},
        "data": {"source_dir": str(fmnist_idx.folder), "shard_rows": 100},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "model": {"args": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 7}},
        "train": {"epochs": 3, "batch_size": 32, "num_workers": 2, "cpus_per_worker": 0.5, "warmup_epochs": 0.2},
        "tune": {
            "name": "sweep", "num_samples": 1, "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 1,
            # trials run in this order: two that learn, then one that cannot (lr ~ 0): ASHA must
            # stop the last one at the first rung, below the others' results there
            "space": {"train.lr": {"grid": [0.003, 0.01, 1.0e-9]}},
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def terminated_trials(experiment_dir: Path) -> list[str]:
    """Ids of the trials that Tune's newest experiment state file on storage records as TERMINATED."""
    states = sorted(experiment_dir.glob("experiment_state-*.json"))
    try:
        doc = json.loads(states[-1].read_text()) if states else {}
    except ValueError:  # caught while Tune copies it to storage: read it again on the next poll
        return []
    return [trial["trial_id"] for trial in (json.loads(state) for state, _metadata in doc.get("trial_data", []))
            if trial["status"] == "TERMINATED"]


def child_runs(cfg, parent_id):
    client = tracking.client(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_asha_sweep_nested_runs_early_stop_and_resume(ray_cluster, fmnist_idx, tmp_path):
    path = sweep_config(tmp_path, fmnist_idx)
    cfg = load_config(path)
    prepare(cfg)
    client_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}

    # interrupt the sweep (its own driver and local cluster) once the first trial has finished:
    # once Tune's experiment state on storage records it TERMINATED (what --resume reads). The
    # trial function returns only after train() exported the model and closed its MLflow run,
    # so that run is FINISHED by then. Watch storage, not MLflow: polling the sqlite store would
    # contend with the trials' writes.
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "tune", "--config", str(path)], cwd=REPO,
                            env=client_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not (finished := terminated_trials(tmp_path / "store" / "tune" / "sweep")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no trial recorded as finished (sweep exit code {proc.poll()}): "
                            f"{(tmp_path / 'sweep.log').read_text()[-3000:]}")
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    parent = tracking.find_run(cfg, "sweep", "tune")
    assert parent is not None, (tmp_path / "sweep.log").read_text()[-3000:]
    done = [r for r in child_runs(cfg, parent.info.run_id) if r.info.status == "FINISHED"]
    assert len(done) == 1, (tmp_path / "sweep.log").read_text()[-3000:]
    first = done[0]
    assert [first.data.tags[tracking.RUN_NAME_TAG]] == [f"sweep-{trial_id}" for trial_id in finished]
    first_history = tracking.client(cfg).get_metric_history(first.info.run_id, "val_acc")
    assert len(first_history) == 3

    # resume: the finished trial is not repeated; the other two run and are stopped by ASHA
    result = tune(cfg, resume=True)
    assert result.parent_run_id == parent.info.run_id
    assert len(result.trials) == 3
    stopped = [t for t in result.trials if t["early_stopped"]]
    assert len(stopped) >= 1 and all(t["iterations"] < 3 for t in stopped)
    assert result.trial_epochs == sum(t["iterations"] for t in result.trials) < result.trial_epochs_full == 9
    assert result.compute_ratio == result.trial_epochs / 9
    assert any(t["config"] == {"train.lr": 1.0e-9} for t in stopped)
    finished = [t for t in result.trials if not t["early_stopped"]]
    assert result.best_metrics["val_acc"] == max(t["metric"] for t in finished)
    assert result.best_config in ({"train.lr": 0.003}, {"train.lr": 0.01})
    children = child_runs(cfg, result.parent_run_id)
    assert len(children) == 3  # one nested run per trial, none duplicated by the resume
    assert len(tracking.client(cfg).get_metric_history(first.info.run_id, "val_acc")) == 3
    statuses = sorted(r.info.status for r in children)
    assert statuses.count("FINISHED") == 3 - len(stopped) and statuses.count("KILLED") == len(stopped)
    assert Path(result.model_uri.removeprefix("file://"), "model.safetensors").is_file()
    parent_run = tracking.client(cfg).get_run(result.parent_run_id)
    assert parent_run.data.tags["pipeline.best_model_uri"] == result.model_uri
    assert parent_run.info.status == "FINISHED"
