"""Bad input is one line naming the value and the fix, exit code 2, before anything runs."""

from __future__ import annotations

import pytest

from pipelines.cli import main
from pipelines.config import NAME_SETTINGS, load_config
from pipelines.errors import ConfigError


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("key", NAME_SETTINGS)
@pytest.mark.parametrize("value", ["../../x", "a/b", ".hidden", "", "x" * 129])
def test_names_cannot_escape_the_storage_root(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not a valid name"):
        load_config(None, [f"{key}={value!r}" if value == "" else f"{key}={value}"])


def test_a_name_that_escapes_is_refused_before_anything_is_written(tmp_path, capsys):
    store = tmp_path / "store"
    code, out, err = _cli(capsys, "prepare", "--set", f"storage.uri={store.as_uri()}", "--set", "data.name=../../escaped")
    assert code == 2 and out == ""
    assert err == ("error: data.name='../../escaped' is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
                   "starting with a letter or digit (it names a folder under storage.uri)\n")
    assert not store.exists() and not (tmp_path / "escaped").exists()


def test_valid_names_and_version_uris_pass():
    cfg = load_config(None, ["data.name=fashion-mnist_v2.1", "train.run_name=Run-7", "workflow.name=wf",
                             "data.version=s3://bucket/datasets/fmnist/abc123"])
    assert cfg.data.version == "s3://bucket/datasets/fmnist/abc123" and cfg.train.run_name == "Run-7"
