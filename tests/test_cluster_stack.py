"""cluster/: the dev stack's real MLflow server over HTTP, and the cluster manifests' versions.

The integration test starts the stack's S3 endpoint and ``mlflow server`` (real processes on
127.0.0.1, free ports), registers one model over HTTP, reads it back through MLflow's REST API
with urllib, checks the artifacts landed in the S3 bucket, and stops both by pid. The Ray head
test (marked slow) starts the stack's ``ray start --head`` and submits the whole workflow,
``python -m pipelines run`` with a tiny config, through ``ray job submit`` with the project's
runtime env and the stack's Ray auth token; the job must end SUCCEEDED with every step's outputs
on storage. (tests/test_cluster_auth.py checks that the same head refuses a job without the token.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
sys.path.insert(0, str(CLUSTER))

from dev_stack import DevStack, _alive  # noqa: E402


def ray_version() -> str:
    import ray

    return ray.__version__


def py_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


# --------------------------------------------------------------------------------------------
# Manifests (fast)
# --------------------------------------------------------------------------------------------


def _images(node, out: list[str]) -> list[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                out.append(value)
            else:
                _images(value, out)
    elif isinstance(node, list):
        for item in node:
            _images(item, out)
    return out


def test_ray_up_yaml_matches_installed_ray():
    doc = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert doc["docker"]["image"] == f"rayproject/ray:{ray_version()}-{py_tag()}-gpu"
    gpu = doc["available_node_types"]["ray.worker.gpu"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family
    assert doc["head_node_type"] in doc["available_node_types"]
    assert "--dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"])


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_match_installed_ray(name):
    doc = yaml.safe_load((CLUSTER / "kuberay" / name).read_text())
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert doc["apiVersion"] == "ray.io/v1"
    assert spec["rayVersion"] == ray_version()
    images = _images(spec, [])
    assert images and all(f"ray{ray_version()}-{py_tag()}" in image for image in images), images
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "vit-pipeline"  # S3 through IRSA
        for container in pod["containers"]:
            for var in container.get("env", []):  # credentials only ever from a Secret
                if var["name"].startswith(("AWS_ACCESS", "AWS_SECRET", "MLFLOW_TRACKING_PASS")):
                    assert "value" not in var and var["valueFrom"]["secretKeyRef"]["optional"] is True


def test_dockerfile_and_runtime_env():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_version()}-{py_tag()}-gpu" in dockerfile
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert {".venv", ".git", "artifacts"} <= set(env["excludes"])
    assert not any(k.startswith(("AWS_", "MLFLOW_TRACKING_")) for k in env.get("env_vars", {}))


def test_jobs_md_has_a_recipe_per_task():
    from pipelines.cli import TASKS

    text = (CLUSTER / "jobs.md").read_text()
    for task in TASKS:
        assert f"python -m pipelines {task}" in text, task
    assert "--entrypoint-num-cpus" in text and "--entrypoint-num-gpus" in text


# --------------------------------------------------------------------------------------------
# The dev stack's MLflow server, over HTTP
# --------------------------------------------------------------------------------------------


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.load(resp)


@pytest.mark.integration
def test_register_against_the_stack_mlflow_server(tmp_path, monkeypatch):
    import boto3
    import mlflow
    from test_register import make_model_dir, png, synthetic_test_set

    from pipelines import tracking
    from pipelines.config import load_config
    from pipelines.register import register

    stack = DevStack(tmp_path / "state", bucket="stack-test")
    try:
        stack.start(["s3", "mlflow"])
        env = stack.env()
        url = env["MLFLOW_TRACKING_URI"]
        assert url.startswith("http://127.0.0.1:")
        env_file = (tmp_path / "state" / "env.sh").read_text()
        assert f"export MLFLOW_TRACKING_URI={url}" in env_file

        cfg = load_config(None, [f"storage.uri=file://{tmp_path / 'store'}", f"mlflow.tracking_uri={url}",
                                 "mlflow.experiment_name=stack-test", "registry.model_name=vit-http"])
        data = synthetic_test_set()
        result = register(cfg, str(make_model_dir(tmp_path / "model", 0, seed=1)), run_id="run-http",
                          test_data=data)
        assert (result.version, result.decision) == ("1", "first")

        # The registry through MLflow's REST API, as any non-Python client sees it.
        name = urllib.parse.quote("vit-http")
        model = _get(f"{url}/api/2.0/mlflow/registered-models/get?name={name}")["registered_model"]
        assert model["name"] == "vit-http"
        assert {(a["alias"], a["version"]) for a in model["aliases"]} == {("champion", "1"), ("candidate", "1")}
        log = json.loads({t["key"]: t["value"] for t in model["tags"]}["promotion.log"])
        assert [e["decision"] for e in log] == ["first"]
        by_alias = _get(f"{url}/api/2.0/mlflow/registered-models/alias?name={name}&alias=champion")["model_version"]
        assert by_alias["version"] == "1" and set(by_alias["aliases"]) == {"champion", "candidate"}
        tags = {t["key"]: t["value"] for t in by_alias["tags"]}
        assert tags["training_run_id"] == "run-http" and float(tags["gate.test_acc"]) == pytest.approx(0.6)

        # The server stored the artifacts in the stack's S3 bucket, weights as safetensors.
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="stack-test", Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith("/artifacts/model.safetensors") for k in keys), keys
        assert not any(k.endswith((".pkl", ".pickle")) for k in keys), keys

        # And the alias loads over HTTP (artifacts proxied by the server: no S3 settings needed).
        for key in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(key, raising=False)
        import pandas as pd

        with tracking.fluent_tracking(url, url):
            model = mlflow.pyfunc.load_model("models:/vit-http@champion")
        out = model.predict(pd.DataFrame({"image": [png(data[0][0])]}))
        assert out["label_name"].tolist() == ["ankle"]
    finally:
        pids = [info["pid"] for info in stack.state.get("services", {}).values()]
        stack.stop()
    assert pids and not any(_alive(pid) for pid in pids)
    assert stack.running() == {}


# --------------------------------------------------------------------------------------------
# The dev stack's Ray head and a job submitted with the project's runtime env
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_ray_job_submit_runs_the_pipeline(tmp_path, fmnist_idx):
    """`ray job submit` of `pipelines run` (tiny config) on the stack's `ray start --head`."""
    from helpers import TINY_WORKFLOW as TINY

    from pipelines import storage as st
    from pipelines.config import load_config
    from pipelines.run import load_record

    store = tmp_path / "store"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"storage": {"uri": f"file://{store}"},
                                      "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
                                      "data": {"source_dir": str(fmnist_idx.folder)},
                                      "workflow": {"name": "submitted"}}))
    stack = DevStack(tmp_path / "state")
    try:
        stack.start(["ray"])
        # the stack's token (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH); RAY_AUTH_TOKEN would win over it
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}, **stack.env()}
        assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]).is_file()
        info = stack.state["services"]["ray"]
        assert info["address"].startswith("127.0.0.1:") and info["dashboard"].startswith("http://127.0.0.1:")
        ray_cli = str(Path(sys.executable).parent / "ray")
        sets = [arg for kv in TINY for arg in ("--set", kv)]
        proc = subprocess.run(
            [ray_cli, "job", "submit", "--submission-id", "pipeline-tiny", "--working-dir", str(ROOT),
             "--runtime-env", str(CLUSTER / "runtime_env.yaml"), "--entrypoint-num-cpus", "0.1", "--",
             "python", "-m", "pipelines", "run", "--config", str(config), *sets],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        status = subprocess.run([ray_cli, "job", "status", "pipeline-tiny"], env=env, capture_output=True,
                                text=True, timeout=60)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
        assert "Job 'pipeline-tiny' succeeded" in plain, plain  # the CLI's words for JobStatus.SUCCEEDED

        # The job's outputs are on storage: every step recorded as succeeded, predictions complete.
        record = load_record(load_config(str(config), TINY))
        assert {k: v.status for k, v in record.items()} == {
            s: "succeeded" for s in ("prepare", "search", "evaluate", "register", "infer")}
        infer_out = record["infer"].outputs
        assert infer_out["input_count"] == infer_out["output_count"] == len(fmnist_idx.test_labels)
        assert infer_out["manifest_uri"].startswith(f"file://{store}/predictions/")
        assert st.exists(infer_out["manifest_uri"])
        # The driver's progress reached the submitter's terminal, ending with the summary.
        assert "[infer] done" in proc.stdout and "test accuracy:" in proc.stdout, proc.stdout[-3000:]
    finally:
        temp_dir = stack.state.get("services", {}).get("ray", {}).get("temp_dir")
        pid = stack.state.get("services", {}).get("ray", {}).get("pid")
        stack.stop()
    from dev_stack import _pids_using

    assert pid is not None and not _alive(pid)
    assert temp_dir and _pids_using(temp_dir) == []
    shutil.rmtree(temp_dir, ignore_errors=True)  # the stack keeps Ray's logs after stop; a test need not
