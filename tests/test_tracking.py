"""MLflow client state: the fluent API is pointed at our stores only inside the block."""

from __future__ import annotations

import os

import mlflow
import pytest

from pipelines import tracking


def test_fluent_tracking_restores_the_exact_previous_state(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    default = mlflow.get_tracking_uri()
    ours = f"sqlite:///{tmp_path}/m.db"
    with tracking.fluent_tracking(ours, ours):
        assert mlflow.get_tracking_uri() == ours and mlflow.get_registry_uri() == ours
    # nothing pinned afterwards: no environment variable left behind for later code in this
    # process (a Ray worker runs many steps) to pick up as "the" tracking URI
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_tracking_uri() == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with tracking.fluent_tracking(ours, ours):
        assert os.environ["MLFLOW_TRACKING_URI"] == ours
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before


def test_a_late_failure_does_not_overwrite_a_run_the_sweep_closed(tmp_path):
    # a trial that ASHA stopped: the sweep driver closes its run KILLED; the trial's own exception
    # handler can run afterwards and must leave it KILLED, while a run still open becomes FAILED
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("e")
    stopped, broken = (client.create_run(exp).info.run_id for _ in range(2))
    client.set_terminated(stopped, status="KILLED")
    for run_id in (stopped, broken):
        tracking.fail_run(client, run_id)
    assert client.get_run(stopped).info.status == "KILLED"
    assert client.get_run(broken).info.status == "FAILED"


def test_evaluate_and_register_default_to_the_run_the_config_names(tmp_path):
    # two finished training runs, 'best' then 'quick': a config that names 'best' must get best's
    # model although 'quick' finished later; a config that names no run gets the newest
    from pipelines.config import load_config
    from pipelines.errors import UserError

    def cfg(*extra):
        return load_config(None, [f"storage.uri={tmp_path.as_uri()}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
                                  *extra])

    client = tracking.client(cfg())
    ids = {}
    for name in ("best", "quick", "open"):
        ids[name], _ = tracking.start_or_resume_run(cfg(), name, "train")
        client.set_tag(ids[name], "pipeline.model_uri", f"file:///models/{name}")
        if name != "open":
            client.set_terminated(ids[name], status="FINISHED")

    assert tracking.latest_model_uri(cfg("train.run_name=best")) == ("file:///models/best", ids["best"])
    assert tracking.latest_model_uri(cfg()) == ("file:///models/quick", ids["quick"])
    assert tracking.latest_model_uri(cfg("train.run_name=best"), ids["quick"]) == ("file:///models/quick", ids["quick"])
    with pytest.raises(UserError, match=r"^training run 'other' \(train.run_name\) does not exist in MLflow experiment "
                                        r"'vit'; train it .* or pass --run-id / --model URI$"):
        tracking.latest_model_uri(cfg("train.run_name=other"))
    with pytest.raises(UserError, match=r"^training run 'open' \(train.run_name\) has not finished \(status RUNNING\)"):
        tracking.latest_model_uri(cfg("train.run_name=open"))
