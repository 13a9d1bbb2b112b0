"""Storage URIs, atomic writes, retries, and S3 through a real local endpoint over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipelines import storage as st
from pipelines.config import StorageConfig
from pipelines.errors import StorageError

FAST = StorageConfig(retries=3, retry_backoff_s=0.01)


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------


def test_parse_local_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert st.parse_uri("file://./artifacts") == st.URI("file", "", str(tmp_path / "artifacts"))
    assert st.parse_uri("artifacts/x") == st.URI("file", "", str(tmp_path / "artifacts/x"))
    assert st.parse_uri("file:///abs/dir/") == st.URI("file", "", "/abs/dir")
    assert str(st.parse_uri("file:///abs/dir")) == "file:///abs/dir"


def test_parse_s3_forms():
    u = st.parse_uri("s3://bucket//a/b/")
    assert (u.scheme, u.bucket, u.path, u.fs_path) == ("s3", "bucket", "a/b", "bucket/a/b")
    assert str(u.join("c", "d.json")) == "s3://bucket/a/b/c/d.json"
    assert str(st.parse_uri("s3://bucket")) == "s3://bucket"
    assert st.join_uri("s3://bucket", "x") == "s3://bucket/x"


@pytest.mark.parametrize("uri, fragment", [
    ("gs://bucket/x", "unsupported scheme 'gs'"),
    ("s3:///nobucket", "has no bucket"),
    ("", "is empty"),
])
def test_bad_uris_are_one_line_errors(uri, fragment):
    with pytest.raises(StorageError, match=fragment) as err:
        st.parse_uri(uri)
    assert "\n" not in str(err.value)


def test_credentials_in_uris_are_refused_without_echoing_them():
    for uri in ("s3://AKIASECRETKEY:hunter2secret@bucket/x", "s3://bucket/x?aws_secret_access_key=hunter2secret"):
        with pytest.raises(StorageError) as err:
            st.parse_uri(uri)
        assert "hunter2secret" not in str(err.value)
        assert "AKIASECRETKEY" not in str(err.value)
        assert "environment" in str(err.value) or "AWS_" in str(err.value)


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------


def test_local_round_trip_and_listing(tmp_path):
    base = f"file://{tmp_path}/root"
    st.write_bytes(st.join_uri(base, "a/one.bin"), b"1")
    st.write_json(st.join_uri(base, "a/b/two.json"), {"x": [1, 2]})
    assert st.read_bytes(st.join_uri(base, "a/one.bin")) == b"1"
    assert st.read_json(st.join_uri(base, "a/b/two.json")) == {"x": [1, 2]}
    assert [e.relpath for e in st.list_files(base)] == ["a/b/two.json", "a/one.bin"]
    assert st.list_dirs(st.join_uri(base, "a")) == ["b"]
    assert st.list_files(st.join_uri(base, "missing")) == []
    assert st.exists(base) and not st.exists(st.join_uri(base, "nope"))
    st.delete_tree(st.join_uri(base, "a"))
    assert not st.exists(st.join_uri(base, "a"))


def test_local_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    st.write_bytes(str(target), b"old")

    real_replace = os.replace

    def crash(src, dst):
        raise KeyboardInterrupt  # killed between writing the temp file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        st.write_bytes(str(target), b"new content")
    monkeypatch.setattr(os, "replace", real_replace)
    assert target.read_bytes() == b"old"  # readers never saw a partial file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # temp file removed


def test_missing_local_file_names_the_uri(tmp_path):
    with pytest.raises(st.ObjectNotFound, match=f"file://{tmp_path}/nothing.json does not exist"):
        st.read_json(f"{tmp_path}/nothing.json")


# --------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------


def test_transient_errors_are_retried_then_succeed():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate.")
        return "ok"

    assert st.with_retries(flaky, "s3://b/k", "write", FAST) == "ok"
    assert len(calls) == 3


def test_transient_errors_give_up_after_the_configured_attempts():
    calls = []

    def always_503():
        calls.append(1)
        raise OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation")

    with pytest.raises(StorageError, match=r"could not read s3://b/k after 3 attempts"):
        st.with_retries(always_503, "s3://b/k", "read", FAST)
    assert len(calls) == 3


def test_permanent_errors_are_not_retried():
    calls = []

    def denied():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body.")

    with pytest.raises(StorageError, match="denied access to s3://b/k"):
        st.with_retries(denied, "s3://b/k", "read", FAST)
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# S3 over HTTP (moto server)
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_round_trip_listing_and_delete(s3_endpoint):
    base = s3_endpoint.uri("storage")
    st.check_bucket(base)
    st.write_bytes(st.join_uri(base, "x/part-00000.parquet"), b"\x00" * 10)
    st.write_json(st.join_uri(base, "x/manifest.json"), {"ok": True})
    assert st.read_json(st.join_uri(base, "x/manifest.json")) == {"ok": True}
    manifest_size = len(st.read_bytes(st.join_uri(base, "x/manifest.json")))
    assert [(e.relpath, e.size) for e in st.list_files(base)] == [("x/manifest.json", manifest_size), ("x/part-00000.parquet", 10)]
    assert st.list_dirs(base) == ["x"]
    fs, path = st.resolve(st.join_uri(base, "x/part-00000.parquet"))
    assert isinstance(fs, pafs.S3FileSystem) and path.startswith(f"{s3_endpoint.bucket}/")
    with fs.open_input_stream(path) as f:  # the pair works directly (what Ray Data receives)
        assert f.read() == b"\x00" * 10
    st.delete_tree(st.join_uri(base, "x"))
    assert st.list_files(base) == []


@pytest.mark.integration
def test_s3_endpoint_from_config_overrides_environment(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    cfg = StorageConfig(s3_endpoint_url=s3_endpoint.url)
    uri = st.join_uri(s3_endpoint.uri("cfg"), "a.txt")
    st.write_bytes(uri, b"via config", cfg)
    assert st.read_bytes(uri, cfg) == b"via config"


@pytest.mark.integration
def test_missing_s3_object_and_missing_bucket(s3_endpoint):
    with pytest.raises(st.ObjectNotFound, match=f"s3://{s3_endpoint.bucket}/nope/x.json does not exist"):
        st.read_bytes(f"s3://{s3_endpoint.bucket}/nope/x.json")
    with pytest.raises(StorageError) as err:
        st.read_bytes("s3://no-such-bucket/x.json")
    assert str(err.value) == (
        f"bucket 'no-such-bucket' does not exist at the endpoint {s3_endpoint.url} (URI s3://no-such-bucket/x.json); "
        "create it (aws s3 mb s3://no-such-bucket, or python cluster/s3_server.py start --bucket no-such-bucket) or fix the URI"
    )


# --------------------------------------------------------------------------------------------
# The local endpoint itself
# --------------------------------------------------------------------------------------------

SCRIPT = str(Path(__file__).resolve().parents[1] / "cluster" / "s3_server.py")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split(")")[1].split()[0] != "Z"


@pytest.mark.integration
def test_s3_server_script_start_env_stop(tmp_path):
    state = tmp_path / "state"
    started = subprocess.run([sys.executable, SCRIPT, "start", "--bucket", "script-bucket", "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=60, check=True)
    exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
    pid = json.loads((state / "s3_server.json").read_text())["pid"]
    try:
        assert exports["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
        assert exports["AWS_ACCESS_KEY_ID"] == "testing"
        env = subprocess.run([sys.executable, SCRIPT, "env", "--state-dir", str(state)],
                             capture_output=True, text=True, timeout=30, check=True)
        assert env.stdout == started.stdout
        cfg = StorageConfig(s3_endpoint_url=exports["AWS_ENDPOINT_URL_S3"])
        st.check_bucket("s3://script-bucket/x", cfg)  # the bucket was created
    finally:
        subprocess.run([sys.executable, SCRIPT, "stop", "--state-dir", str(state)], timeout=30, check=True)
    assert not _alive(pid)
    assert not (state / "s3_server.json").exists()


@pytest.mark.integration
def test_server_started_for_tests_dies_with_its_parent(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(Path(SCRIPT).parent)!r}); from s3_server import LocalS3Server; "
            "s = LocalS3Server(die_with_parent=True).start(); print(s.proc.pid, flush=True); import time; time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    assert _alive(server_pid)
    parent.kill()  # a test run killed without teardown
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid)
