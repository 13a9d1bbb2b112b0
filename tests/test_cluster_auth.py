"""cluster/: who may run code on the pipeline's Ray clusters.

Manifest checks (fast, parsing only): every Ray container of every cluster file runs with Ray token
authentication (``RAY_AUTH_MODE=token``) and takes the token from a Kubernetes Secret or a file
outside the repository, never a literal; the KubeRay head Service is ClusterIP; the NetworkPolicy
admits to the head only this pipeline's Ray pods, labelled submitters, the operator and metrics
scrapers (evaluated on the policy itself for concrete peers, ports included); the ``ray up`` YAML
is valid for the installed Ray's own cluster schema.

The integration test starts the dev stack's real Ray head (``ray start --head`` with token auth)
and submits a job the way an outsider would: ``ray job submit`` with no token anywhere in its
environment or home directory is refused (exit 1, "Authentication required"), raw HTTP without or
with a wrong ``Authorization: Bearer`` header gets 401/403 and creates no job, and the same
submission with the stack's token runs to SUCCEEDED.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
sys.path.insert(0, str(CLUSTER))

from dev_stack import DevStack, _alive, _pids_using  # noqa: E402

TOKEN_SECRET = "vit-pipeline-ray-token"  # the Secret every KubeRay manifest reads the token from
TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName requires
HEAD_PORTS = {6379, 8265, 10001, 8080}  # GCS, dashboard/jobs API, Ray Client, metrics
SUBMITTER_LABEL = {"vit-pipeline/ray-submitter": "true"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _ray_containers(doc: dict) -> list[tuple[str, dict]]:
    """(where, container) for every container KubeRay runs Ray or `ray` CLI in."""
    spec = _cluster_spec(doc)
    out = []
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        name = group.get("groupName", "head")
        pod = group["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            out.append((f"{name}/{container['name']}", container))
    if spec.get("enableInTreeAutoscaling"):
        out.append(("autoscaler", spec.get("autoscalerOptions") or {}))
    if doc["kind"] == "RayJob":
        submitter = doc["spec"].get("submitterPodTemplate")
        assert submitter, "a RayJob needs a submitterPodTemplate carrying the token and the submitter label"
        for container in submitter["spec"]["containers"]:
            out.append((f"submitter/{container['name']}", container))
    return out


def _env(container: dict) -> dict[str, dict]:
    env = {}
    for var in container.get("env", []):
        assert var["name"] not in env, f"{var['name']} set twice"
        env[var["name"]] = var
    return env


# --------------------------------------------------------------------------------------------
# KubeRay: token auth in every Ray container, ClusterIP head
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_every_kuberay_ray_container_uses_token_auth_from_the_secret(name):
    (doc,) = _docs(KUBERAY / name)
    spec = _cluster_spec(doc)
    # authOptions: the operator sends the token on its own jobs-API calls (RayJob status) and
    # injects it into submitters; secretName makes it use our Secret instead of generating one.
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    containers = _ray_containers(doc)
    assert {where.split("/")[0] for where, _ in containers} >= {"head", "autoscaler"}
    for where, container in containers:
        env = _env(container)
        assert env.get("RAY_AUTH_MODE") == {"name": "RAY_AUTH_MODE", "value": "token"}, where
        token = env.get("RAY_AUTH_TOKEN")
        assert token is not None and "value" not in token, f"{where}: RAY_AUTH_TOKEN must come from the Secret"
        # not optional: without the Secret the pod must not start (fail closed)
        assert token["valueFrom"] == {"secretKeyRef": {"name": TOKEN_SECRET, "key": TOKEN_KEY}}, where
        assert "RAY_AUTH_TOKEN_PATH" not in env, where  # one source only: the Secret
    if doc["kind"] == "RayJob":
        submitter = doc["spec"]["submitterPodTemplate"]
        assert SUBMITTER_LABEL.items() <= submitter["metadata"]["labels"].items()
        assert submitter["spec"]["restartPolicy"] == "Never"
        head_image = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        assert {c["image"] for c in submitter["spec"]["containers"]} == {head_image}  # the same Ray client
        # the submitter needs no Kubernetes API access and no S3 role
        assert submitter["spec"].get("automountServiceAccountToken") is False
        assert "serviceAccountName" not in submitter["spec"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_head_service_is_cluster_ip(name):
    (doc,) = _docs(KUBERAY / name)
    head = _cluster_spec(doc)["headGroupSpec"]
    assert head.get("serviceType") == "ClusterIP"
    assert not head.get("enableIngress", False)
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    # The dashboard binds the pod's interfaces only; the pod is reached through the ClusterIP
    # service under networkpolicy.yaml (it never shares the node's network).
    assert head["rayStartParams"]["dashboard-host"] in {"0.0.0.0", "127.0.0.1"}
    assert not head["template"]["spec"].get("hostNetwork", False)


def test_no_cluster_file_exposes_a_service_outside_the_cluster():
    for path in sorted(CLUSTER.rglob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path
            if doc.get("kind") in {"RayCluster", "RayJob", "RayService"}:
                spec = _cluster_spec(doc) if doc["kind"] != "RayService" else doc["spec"]["rayClusterConfig"]
                assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path
            assert doc.get("kind") != "Ingress", path


# --------------------------------------------------------------------------------------------
# NetworkPolicy, evaluated for concrete peers
# --------------------------------------------------------------------------------------------


def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels + matchExpressions); {} selects all."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_admits(peer: dict, pod: dict[str, str], ns: dict[str, str], same_ns: bool) -> bool:
    if "ipBlock" in peer:
        return True  # an address range admits pods regardless of labels: treated as open
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], ns):
            return False
    elif not same_ns:
        return False  # a podSelector alone means the policy's own namespace
    return _selects(peer.get("podSelector", {}), pod)


def admitted(policies: list[dict], target: dict[str, str], pod: dict[str, str], port: int,
             ns: dict[str, str] | None = None) -> bool:
    """Whether a TCP connection from a pod (labels ``pod``, in a namespace labelled ``ns``, the
    policies' own namespace when ``ns`` is None) to ``port`` of a pod labelled ``target`` is
    allowed by the ingress policies selecting the target (none selecting it: allowed)."""
    same_ns = ns is None
    ns = ns or {"kubernetes.io/metadata.name": "vit"}
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], target)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            if peers is None or peers == []:
                peer_ok = True  # no `from`: every source
            else:
                peer_ok = any(_peer_admits(peer, pod, ns, same_ns) for peer in peers)
            ports = rule.get("ports")
            port_ok = not ports or any(p.get("protocol", "TCP") == "TCP" and p.get("port") in (port, None)
                                       for p in ports)
            if peer_ok and port_ok:
                return True
    return False


def _pod_labels(doc: dict, group: dict, node_type: str) -> dict[str, str]:
    """The labels KubeRay gives a Ray pod of ``group``: the template's plus its own."""
    labels = dict(group["template"].get("metadata", {}).get("labels", {}))
    labels.update({"ray.io/node-type": node_type, "ray.io/is-ray-node": "yes",
                   "ray.io/cluster": doc["metadata"]["name"], "app.kubernetes.io/created-by": "kuberay-operator"})
    labels.setdefault("app.kubernetes.io/name", "kuberay")
    return labels


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_network_policy_limits_ingress_to_the_head(name):
    policies = _docs(KUBERAY / "networkpolicy.yaml")
    assert policies and all(p["apiVersion"] == "networking.k8s.io/v1" and p["kind"] == "NetworkPolicy"
                            for p in policies)
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            assert rule.get("from"), f"{policy['metadata']['name']}: an ingress rule without `from` admits everyone"
            for peer in rule["from"]:
                assert "ipBlock" not in peer, policy["metadata"]["name"]
                assert peer.get("namespaceSelector") != {} or peer.get("podSelector"), "every namespace"
    (doc,) = _docs(KUBERAY / name)
    spec = _cluster_spec(doc)
    head = _pod_labels(doc, spec["headGroupSpec"], "head")
    workers = [_pod_labels(doc, g, "worker") for g in spec["workerGroupSpecs"]]
    assert any(_selects(p["spec"]["podSelector"], head) for p in policies), "no NetworkPolicy selects the head"
    for worker in workers:
        assert any(_selects(p["spec"]["podSelector"], worker) for p in policies), "no NetworkPolicy selects workers"

    stranger = {"app": "anything"}  # any other pod in the namespace
    stranger_ns = {"kubernetes.io/metadata.name": "default"}
    for port in sorted(HEAD_PORTS):
        assert not admitted(policies, head, stranger, port), port
        assert not admitted(policies, head, stranger, port, ns=stranger_ns), port
        # a pod that copies the submitter label in another namespace is not a submitter
        assert not admitted(policies, head, SUBMITTER_LABEL, port, ns=stranger_ns), port
        for worker in workers:
            assert admitted(policies, head, worker, port), ("worker -> head", port)
            assert admitted(policies, worker, head, port), ("head -> worker", port)
            assert not admitted(policies, worker, stranger, port), ("stranger -> worker", port)
            assert not admitted(policies, worker, SUBMITTER_LABEL, port), ("submitter -> worker", port)
    # the labelled submitter: jobs API (and Ray Client) only, never the GCS
    assert admitted(policies, head, SUBMITTER_LABEL, 8265)
    assert not admitted(policies, head, SUBMITTER_LABEL, 6379)
    if doc["kind"] == "RayJob":
        submitter = doc["spec"]["submitterPodTemplate"]["metadata"]["labels"]
        assert admitted(policies, head, submitter, 8265)
    # the operator (its own namespace) may call the jobs API; a same-named pod elsewhere may not
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    operator_ns = {"kubernetes.io/metadata.name": "kuberay-system"}
    assert admitted(policies, head, operator, 8265, ns=operator_ns)
    assert not admitted(policies, head, operator, 6379, ns=operator_ns)
    assert not admitted(policies, head, operator, 8265, ns=stranger_ns)
    assert not admitted(policies, head, operator, 8265)


# --------------------------------------------------------------------------------------------
# `ray up`
# --------------------------------------------------------------------------------------------


def test_ray_up_yaml_enables_token_auth_on_every_node():
    import jsonschema
    import ray.autoscaler

    doc = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)  # the installed Ray's own schema for `ray up` configs

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in doc[key] if re.search(r"\bray start\b", c)]
        assert starts, key
        for command in starts:
            # the assignment prefixes the `ray start` it belongs to, in the same shell command
            prefix = command[:command.index("ray start")]
            assert re.search(r"(^|[\s;])RAY_AUTH_MODE=token\s", prefix), command
            assert "RAY_AUTH_TOKEN=" not in command, command  # never the token itself
    assert "--env RAY_AUTH_MODE=token" in doc["docker"]["run_options"]  # every process in the container
    # The token reaches every node as a file at Ray's default token path, copied from a file on
    # the launching machine outside the repository (the autoscaler syncs file_mounts to workers).
    mounts = doc["file_mounts"]
    assert set(mounts) == {"~/.ray/auth_token"}
    local = mounts["~/.ray/auth_token"]
    assert local.startswith("~/") and not (ROOT / local).exists()
    assert "--dashboard-host=127.0.0.1" in " ".join(doc["head_start_ray_commands"])


def test_project_image_defaults_to_token_auth():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    env = re.search(r"^ENV (.*?)(?<!\\)$", dockerfile, re.M | re.S).group(1)
    assert re.search(r"\bRAY_AUTH_MODE=token\b", env), env
    code = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert "RAY_AUTH_TOKEN" not in code  # no token (or token path) baked into the image


# --------------------------------------------------------------------------------------------
# No token anywhere in cluster/
# --------------------------------------------------------------------------------------------


def test_no_literal_ray_token_in_cluster_files():
    files = [p for p in sorted(CLUSTER.rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.name == "networkpolicy.yaml" for p in files)
    hex_token = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}(?![0-9a-fA-F])")  # token_hex(16+) shape
    for path in files:
        text = path.read_text()
        assert not hex_token.search(text), f"{path}: looks like a literal token"
        # shell / Dockerfile / runtime env: RAY_AUTH_TOKEN=<literal> (a $VAR or <placeholder> is fine)
        for match in re.finditer(r"RAY_AUTH_TOKEN\s*[=:]\s*(\S+)", text):
            assert match.group(1)[0] in "$<'\"`", f"{path}: {match.group(0)}"
        if path.suffix != ".yaml":
            continue
        for doc in _docs(path):
            if doc.get("kind") == "Secret":
                pytest.fail(f"{path}: a Secret manifest in the repository")
            for where, container in _ray_containers(doc) if doc.get("kind") in {"RayCluster", "RayJob"} else []:
                assert "value" not in _env(container).get("RAY_AUTH_TOKEN", {}), where
    for path in (CLUSTER / "runtime_env.yaml", ):
        env_vars = yaml.safe_load(path.read_text()).get("env_vars", {})
        assert not any(k.startswith("RAY_AUTH") for k in env_vars), "job runtime envs are shown by the dashboard"
    (job,) = _docs(KUBERAY / "rayjob.yaml")
    assert "RAY_AUTH" not in job["spec"]["runtimeEnvYAML"] and "RAY_AUTH" not in job["spec"]["entrypoint"]


# --------------------------------------------------------------------------------------------
# The dev stack's Ray head refuses jobs without its token
# --------------------------------------------------------------------------------------------


def _http(url: str, method: str = "GET", headers: dict | None = None, body: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.integration
def test_dev_stack_ray_refuses_a_job_without_the_token(tmp_path):
    stack = DevStack(tmp_path / "state")
    try:
        stack.start(["ray"])
        env = stack.env()
        info = stack.state["services"]["ray"]
        token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
        assert env["RAY_AUTH_MODE"] == "token" and token_file.parent == tmp_path / "state"
        assert token_file.stat().st_mode & 0o077 == 0  # this user's only
        token = token_file.read_text().strip()
        assert len(token) == 64
        env_sh = (tmp_path / "state" / "env.sh").read_text()
        assert token not in env_sh and f"export RAY_AUTH_TOKEN_PATH={token_file}" in env_sh
        assert "unset RAY_AUTH_TOKEN" in env_sh.splitlines()
        api = info["dashboard"]

        # A client with no token anywhere: no RAY_AUTH_* variables and a home without ~/.ray.
        home = tmp_path / "home"
        home.mkdir()
        outsider = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        outsider.update(HOME=str(home), RAY_API_SERVER_ADDRESS=api, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        ray_cli = str(Path(sys.executable).parent / "ray")
        submit = [ray_cli, "job", "submit", "--entrypoint-num-cpus", "0.1"]
        marker = "ran-with-token"
        refused = subprocess.run([*submit, "--submission-id", "no-token", "--", "python", "-c", "print('x')"],
                                 env=outsider, capture_output=True, text=True, timeout=120)
        out = _plain(refused.stdout + refused.stderr)
        assert refused.returncode == 1, out[-3000:]
        assert "AuthenticationError: Authentication required: Unauthorized: Missing authentication token" in out, out[-3000:]

        # The HTTP API itself, as any non-Ray client sees it: no header 401, a wrong token 403.
        job = {"entrypoint": "python -c 'print(1)'", "submission_id": "raw-http"}
        status, body = _http(f"{api}/api/jobs/", "POST", body=job)
        assert (status, body) == (401, "Unauthorized: Missing authentication token")
        status, body = _http(f"{api}/api/jobs/", "POST", {"Authorization": "Bearer " + "0" * 64}, job)
        assert (status, body) == (403, "Forbidden: Invalid authentication token")
        status, body = _http(f"{api}/api/jobs/", "POST", {"X-Ray-Authorization": "Bearer wrong"}, job)
        assert status == 403, body

        # The same submission with the stack's token (RAY_AUTH_MODE=token + RAY_AUTH_TOKEN_PATH,
        # as env.sh sets them) runs to the end; blocking submit exits 0 only when it SUCCEEDED.
        insider = {**outsider, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
        accepted = subprocess.run([*submit, "--submission-id", "with-token", "--", "python", "-c",
                                   f"print('{marker}')"], env=insider, capture_output=True, text=True, timeout=300)
        out = _plain(accepted.stdout + accepted.stderr)
        assert accepted.returncode == 0, out[-3000:]
        assert marker in accepted.stdout and "Job 'with-token' succeeded" in out, out[-3000:]

        # Only the authenticated submission exists (read with the token as a bearer header).
        status, body = _http(f"{api}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        assert status == 200, body
        jobs = {j["submission_id"]: j["status"] for j in json.loads(body)}
        assert jobs == {"with-token": "SUCCEEDED"}
    finally:
        ray_info = stack.state.get("services", {}).get("ray", {})
        stack.stop()
    assert ray_info and not _alive(ray_info["pid"])
    assert _pids_using(ray_info["temp_dir"]) == []
