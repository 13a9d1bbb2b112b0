"""Errors a user can act on: one line naming the value and the fix, exit code 2, no secrets."""

from __future__ import annotations

import pytest
from data_zoo import make_split_tree, png_bytes
from helpers import run_module
from PIL import Image
from s3_server import LocalS3Server, free_port

from pipelines import cli
from pipelines.config import load_config
from pipelines.data.shards import find_version, load_version
from pipelines.errors import DataError, StorageError
from pipelines.prepare import prepare

SECRET = "Sup3rSecretValue-do-not-print"


def run_cli(capsys, *args):
    code = cli.main(["prepare", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, out, err, expected):
    """Exit code 2 and the error as one line (progress lines may precede it on stderr)."""
    assert code == 2
    assert err.endswith("\n") and err.splitlines()[-1] == f"error: {expected}"
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {expected}"]
    assert "Traceback" not in out + err


@pytest.mark.integration
def test_missing_bucket(s3_endpoint, capsys):
    code, out, err = run_cli(capsys, "--set", "storage.uri=s3://missing-bucket/art")
    assert_one_line_error(code, out, err, (
        f"bucket 'missing-bucket' does not exist at the endpoint {s3_endpoint.url} (URI s3://missing-bucket/art); "
        "create it (aws s3 mb s3://missing-bucket, or python cluster/s3_server.py start --bucket missing-bucket) or fix the URI"
    ))


@pytest.mark.integration
def test_bad_credentials_are_denied_without_printing_them(s3_endpoint, monkeypatch, capsys):
    with LocalS3Server(bucket=None, enforce_auth=True, die_with_parent=True) as strict_server:  # checks keys like real S3
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        code, out, err = run_cli(capsys, "--set", "storage.uri=s3://some-bucket/art",
                                 "--set", f"storage.s3_endpoint_url={strict_server.url}", "--set", "storage.retries=1")
    assert_one_line_error(code, out, err, (
        f"the endpoint {strict_server.url} denied access to s3://some-bucket/art (AWS ACCESS_DENIED); check the credentials "
        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their permissions on the bucket"
    ))
    assert SECRET not in out + err and "AKIANOTAREALKEY00000" not in out + err


@pytest.mark.integration
def test_unreachable_endpoint(s3_endpoint, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = run_cli(capsys, "--set", "storage.uri=s3://test-bucket/art", "--set", f"storage.s3_endpoint_url={dead}",
                             "--set", "storage.retries=2", "--set", "storage.retry_backoff_s=0.01")
    assert_one_line_error(code, out, err, (
        f"cannot reach the endpoint {dead} for s3://test-bucket/art after 2 attempt(s) (AWS NETWORK_CONNECTION); "
        "start the endpoint or fix storage.s3_endpoint_url / AWS_ENDPOINT_URL_S3"
    ))


def test_empty_source_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "--set", f"storage.uri=file://{tmp_path}/art", "--set", f"data.source={tmp_path}/empty")
    assert_one_line_error(code, out, err, (
        f"ImageFolder root file://{tmp_path}/empty holds no images in class folders; expected root/<class>/<image> "
        "or root/train/<class>/<image>"
    ))


def test_missing_source_folder(tmp_path):
    with pytest.raises(DataError, match=f"ImageFolder root file://{tmp_path}/nowhere is not a folder"):
        prepare(load_config(None, [f"storage.uri=file://{tmp_path}/art", f"data.source={tmp_path}/nowhere"]))


@pytest.mark.integration
def test_empty_s3_source(s3_endpoint):
    with pytest.raises(DataError, match=r"ImageFolder root s3://test-bucket/nothing-here holds no images"):
        prepare(load_config(None, [f"storage.uri={s3_endpoint.uri('art')}", "data.source=s3://test-bucket/nothing-here"]))


def test_source_where_every_file_is_bad(tmp_path):
    (tmp_path / "src/cat").mkdir(parents=True)
    (tmp_path / "src/cat/a.png").write_bytes(b"")
    (tmp_path / "src/cat/b.jpg").write_text("nope")
    with pytest.raises(DataError) as err:
        prepare(load_config(None, [f"storage.uri=file://{tmp_path}/art", f"data.source={tmp_path}/src"]))
    assert str(err.value) == (
        f"no valid images in file://{tmp_path}/src: all 2 input(s) were rejected (cat/a.png (empty file (0 bytes)); "
        "cat/b.jpg (not an image: the content is not a recognised image format)); point data.source at real images"
    )


def test_val_class_missing_from_train(tmp_path):
    make_split_tree(tmp_path / "src", classes=("ants", "bees"))
    (tmp_path / "src/val/moths").mkdir()
    (tmp_path / "src/val/moths/0.png").write_bytes(png_bytes(Image.new("L", (4, 4))))
    with pytest.raises(DataError) as err:
        prepare(load_config(None, [f"storage.uri=file://{tmp_path}/art", f"data.source={tmp_path}/src"]))
    assert str(err.value) == (
        f"class folder(s) 'moths' in file://{tmp_path}/src/val/ are not in train/; every class needs training images: "
        "add them to train/ or remove them"
    )


def test_split_folders_mixed_with_class_folders(tmp_path):
    make_split_tree(tmp_path / "src", classes=("ants",), per_class=(2,), splits=("train",))
    (tmp_path / "src/bees").mkdir()
    (tmp_path / "src/bees/0.png").write_bytes(png_bytes(Image.new("L", (4, 4))))
    with pytest.raises(DataError, match=r"mixes split folders with 'bees'/"):
        prepare(load_config(None, [f"storage.uri=file://{tmp_path}/art", f"data.source={tmp_path}/src"]))


def test_fashion_mnist_folder_without_idx_files(tmp_path):
    with pytest.raises(DataError) as err:
        prepare(load_config(None, [f"storage.uri=file://{tmp_path}/art", f"data.source_dir={tmp_path}"]))
    assert str(err.value).startswith(f"data.source_dir={str(tmp_path)!r} does not hold the Fashion-MNIST idx files")


def test_truncated_idx_file(tmp_path, fmnist_idx):
    for f in fmnist_idx.folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes((tmp_path / "t10k-labels-idx1-ubyte").read_bytes()[:-5])
    full = 8 + len(fmnist_idx.test_labels)  # idx header (magic + one dimension) + one byte per label
    with pytest.raises(DataError, match=rf"t10k-labels-idx1-ubyte holds {full - 5} bytes but its header promises {full}; the file is truncated"):
        prepare(load_config(None, [f"storage.uri=file://{tmp_path}/art", f"data.source_dir={tmp_path}"]))


def test_reading_a_version_that_does_not_exist(tmp_path):
    with pytest.raises(DataError, match=f"no complete dataset version at file://{tmp_path}/v1 \\(no manifest.json\\)"):
        load_version(f"file://{tmp_path}/v1")
    with pytest.raises(DataError, match="no complete version of dataset 'fashion-mnist' under"):
        find_version(f"file://{tmp_path}", "fashion-mnist")


def test_bad_storage_uri(capsys):
    code, out, err = run_cli(capsys, "--set", "storage.uri=ftp://host/x")
    assert_one_line_error(code, out, err, (
        "storage URI 'ftp://host/x' has the unsupported scheme 'ftp'; use file://PATH, a local path or s3://bucket/prefix"
    ))


# The tests above call cli.main in-process. These run the real entry point, ``python -m pipelines``:
# a StorageError raised by prepare must end the process with exit code 2 and its message as the
# only line on stderr (no traceback, no log noise from pyarrow or the AWS SDK), nothing on stdout.


def test_storage_error_ends_the_process_with_one_line_and_exit_2():
    with pytest.raises(StorageError) as err:  # raised by the real code path, not constructed here
        prepare(load_config(None, ["storage.uri=ftp://host/x"]))
    proc = run_module("prepare", "--set", "storage.uri=ftp://host/x")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {err.value}\n")


@pytest.mark.integration
def test_missing_bucket_ends_the_process_with_one_line_and_exit_2(s3_endpoint):
    """The child process inherits the session's endpoint settings: the bucket check really asks S3."""
    with pytest.raises(StorageError) as err:
        prepare(load_config(None, ["storage.uri=s3://missing-bucket/art"]))
    assert f"bucket 'missing-bucket' does not exist at the endpoint {s3_endpoint.url}" in str(err.value)
    proc = run_module("prepare", "--set", "storage.uri=s3://missing-bucket/art")
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {err.value}\n")
