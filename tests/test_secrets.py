"""No credential reaches a log, an artifact or the console: URIs that embed one are refused
(naming the setting, never the value), and whatever is logged is redacted."""

from __future__ import annotations

import dataclasses

import pytest

from pipelines import storage as st
from pipelines import tracking
from pipelines.cli import main
from pipelines.config import load_config, to_dict
from pipelines.errors import ConfigError, StorageError, has_credentials, redact_uri, redact_values

SECRET = "s3cr3t/with+slash"


@pytest.mark.parametrize("uri", [
    f"s3://AKIAEXAMPLEKEY:{SECRET}@bucket/x",  # the secret's '/' leaves 'key:secret' where the bucket goes
    f"s3://AKIAEXAMPLEKEY:{SECRET.replace('/', '')}@bucket/x",
    "s3://tok3n@bucket/x",
])
def test_s3_uri_with_credentials_is_refused_without_echo(uri):
    with pytest.raises(StorageError, match="must not embed credentials") as info:
        st.parse_uri(uri)
    text = str(info.value)
    assert "AKIAEXAMPLEKEY" not in text and "s3cr3t" not in text and "tok3n" not in text


def test_s3_keys_with_at_signs_are_still_fine():
    assert st.parse_uri("s3://bucket/people/a@b.com/x.png").fs_path == "bucket/people/a@b.com/x.png"


@pytest.mark.parametrize("key,value", [
    ("mlflow.tracking_uri", f"http://user:{SECRET}@127.0.0.1:5000"),
    ("mlflow.registry_uri", "https://token@mlflow.example"),
    ("storage.s3_endpoint_url", "http://127.0.0.1:9000?X-Amz-Signature=abcdef"),
    ("infer.input", "https://u:pw@images.example/batch"),
    ("ray.address", "ray://admin:pw@head:10001"),
])
def test_config_uri_with_credentials_is_one_line_without_the_value(capsys, key, value):
    code = main(["train", "--set", f"{key}={value}"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {key} embeds credentials")
    for secret in ("s3cr3t", "token@", "abcdef", "pw@"):
        assert secret not in err


def test_tracking_uri_from_the_environment_with_credentials_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{SECRET}@127.0.0.1:5000")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI embeds credentials") as info:
        tracking.resolve_tracking_uri(load_config())
    assert "s3cr3t" not in str(info.value)
    code = main(["evaluate", "--set", "storage.uri=file:///nonexistent-store"])
    out, err = capsys.readouterr()
    assert code == 2 and "s3cr3t" not in out + err and "MLFLOW_TRACKING_URI embeds credentials" in err


def test_redaction():
    assert has_credentials("http://u:p@h:1/x") and has_credentials("https://h/x?access_token=1")
    assert not has_credentials("http://127.0.0.1:5000") and not has_credentials("sqlite:////tmp/m.db")
    assert not has_credentials("file:///data/a@b") and not has_credentials("/plain/path")
    assert redact_uri(f"http://user:{SECRET}@host:5000/api?token=1") == "http://host:5000/api"
    assert redact_uri("http://host:5000/api?page=2") == "http://host:5000/api?page=2"
    assert redact_values({"a": ["http://t@h/x", 3], "b": {"c": "s3://bucket/k"}}) == \
        {"a": ["http://h/x", 3], "b": {"c": "s3://bucket/k"}}


@pytest.mark.integration
def test_logged_config_is_redacted(tmp_path):
    """Defence in depth: even a config that skipped validation is logged without its secrets."""
    cfg = load_config(None, [f"storage.uri={tmp_path.as_uri()}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"])
    leaky = dataclasses.replace(cfg, mlflow=dataclasses.replace(cfg.mlflow, registry_uri=f"http://u:{SECRET}@h:5000"))
    assert "s3cr3t" in str(to_dict(leaky))
    client = tracking.client(cfg)
    run_id, _ = tracking.start_or_resume_run(cfg, "redaction", "train", mlflow_client=client)
    tracking.log_config(client, run_id, leaky)
    params = client.get_run(run_id).data.params
    assert params["mlflow.registry_uri"] == "http://h:5000"
    logged = (tmp_path / "dl").mkdir() or client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    text = open(logged).read()
    assert "registry_uri: http://h:5000" in text and "s3cr3t" not in text and "s3cr3t" not in str(params)
