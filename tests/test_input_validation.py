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


@pytest.mark.parametrize("override,message", [
    ("train.num_workers=-1", "train.num_workers=-1 must be at least 1"),
    ("train.lr=-1", "train.lr=-1.0 must be positive"),
    ("train.precision=fp8", "train.precision='fp8' is not supported; use 'fp32', 'bf16' or 'fp16'"),
    ("train.epochs=0", "train.epochs=0 must be at least 1"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker=0.0 must be positive"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate=1.0 must be in [0, 1)"),
    ("data.channels=2", "data.channels=2 is not supported; use 1 or 3"),
    ("data.augment.crop_scale=[0.9,0.1]", "data.augment.crop_scale=[0.9, 0.1] must be [low, high] with 0 < low <= high <= 1"),
    ("tune.mode=best", "tune.mode='best' is not supported; use 'max' or 'min'"),
    ("registry.metric=f1", "registry.metric='f1' is not supported; use 'test_acc' or 'test_loss'"),
    ("infer.top_k=0", "infer.top_k=0 must be at least 1"),
    ("workflow.steps=[prepare,deploy]", "workflow.steps=['prepare', 'deploy'] must list steps from prepare, search, "
                                        "evaluate, register, infer"),
    ("data.val_fraction=0.95", "data.val_fraction=0.95 + data.test_fraction=0.1 must leave some training data"),
])
def test_values_no_run_could_use_are_refused_before_ray_starts(capsys, override, message):
    import sys

    ray_loaded = "ray" in sys.modules
    code, out, err = _cli(capsys, "train", "--set", override)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {message}"), err
    assert ray_loaded or "ray" not in sys.modules  # refused by the config, before anything imports Ray


def test_exponent_notation_numbers_are_numbers():
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float setting accepts it as the number it is."""
    assert load_config(None, ["train.lr=1e-3", "train.min_lr=5E-6"]).train.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"config key 'train.lr' must be a number, got '1e-3x'"):
        load_config(None, ["train.lr=1e-3x"])
