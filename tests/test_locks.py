"""One writer at a time: exclusive creates and locks on local disk and on the S3 endpoint, and
the second prepare / workflow run that meets a held lock fails cleanly, naming the holder."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from pipelines import storage as st
from pipelines.config import load_config
from pipelines.prepare import prepare
from pipelines.run import run


def _locations(tmp_path, request):
    if request.param == "local":
        return tmp_path.as_uri()
    return request.getfixturevalue("s3_endpoint").uri("locks")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def root(tmp_path, request):
    return _locations(tmp_path, request)


def test_create_exclusive_lets_exactly_one_writer_win(root):
    uri = st.join_uri(root, "x", "lock")
    assert st.create_exclusive(uri, b"first", None) is True
    assert st.create_exclusive(uri, b"second", None) is False
    assert st.read_bytes(uri) == b"first"


def test_a_held_lock_refuses_a_second_holder_until_released(root):
    uri = st.join_uri(root, "job", "_lock")
    with st.exclusive(uri, "inference job 'j'"):
        held = st.read_json(uri)
        assert held["host"] == socket.gethostname()
        with pytest.raises(st.Locked, match=rf"^inference job 'j' is in use by another run \(host {held['host']}, "
                                            rf"pid {held['pid']}, since .*\); wait for it to finish, or delete "):
            with st.exclusive(uri, "inference job 'j'"):
                pass
    assert not st.exists(uri)  # released
    with st.exclusive(uri, "inference job 'j'"):
        pass


def test_stale_locks_are_taken_over(root):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_here = {"host": socket.gethostname(), "pid": gone.pid, "token": "a", "since": "then", "created": time.time()}
    expired = {"host": "other-host", "pid": 1, "token": "b", "since": "long ago", "created": time.time() - 2 * 86400}
    for held in (dead_here, expired):
        uri = st.join_uri(root, f"stale-{held['token']}", "_lock")
        st.write_bytes(uri, json.dumps(held).encode())
        with st.exclusive(uri, "workflow 'w'"):
            assert st.read_json(uri)["pid"] != held["pid"]
    live_elsewhere = {"host": "other-host", "pid": 1, "token": "c", "since": "now", "created": time.time()}
    uri = st.join_uri(root, "live", "_lock")
    st.write_bytes(uri, json.dumps(live_elsewhere).encode())
    with pytest.raises(st.Locked, match="host other-host, pid 1"):
        with st.exclusive(uri, "workflow 'w'"):
            pass


def test_a_second_workflow_run_fails_cleanly(tmp_path):
    cfg = load_config(None, [f"storage.uri={tmp_path.as_uri()}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
                             "workflow.name=wf"])
    with st.exclusive(st.join_uri(tmp_path.as_uri(), "runs", "wf", "_lock"), "workflow 'wf'"):
        with pytest.raises(st.Locked, match=r"^workflow 'wf' is in use by another run"):
            run(cfg)
    assert not (tmp_path / "runs" / "wf" / "record.json").exists()


def test_a_concurrent_prepare_of_the_same_version_fails_cleanly(tmp_path, fmnist_idx):
    cfg = load_config(None, [f"storage.uri={tmp_path.as_uri()}", f"data.source_dir={fmnist_idx.folder}"])
    version = prepare(cfg)
    manifest = st.join_uri(version.uri, "manifest.json")
    saved = st.read_bytes(manifest)
    st.parse_uri(manifest)
    (tmp_path / "datasets" / "fashion-mnist" / version.version / "manifest.json").unlink()  # as if never published
    with st.exclusive(f"{version.uri}.lock", "dataset version"):  # another prepare is writing it
        with pytest.raises(st.Locked, match=rf"^dataset version fashion-mnist/{version.version} is in use"):
            prepare(cfg)
        shards = sorted(p.name for p in (tmp_path / "datasets" / "fashion-mnist" / version.version).rglob("*.parquet"))
        assert shards  # the refused prepare deleted nothing of the holder's
    again = prepare(cfg)  # lock released: the version is completed and published
    assert again.version == version.version and st.read_bytes(manifest) != b"" and saved
