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
    ("train.precision=fp8", "train.precision='fp8' is not supported; use 'fp32', 'bf16', 'fp16' or 'auto'"),
    ("train.epochs=0", "train.epochs=0 must be at least 1"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker=0.0 must be positive"),
    ("model.depth=3", "model.depth moved to model.args.depth (model.args takes any argument of the model's family); "
                      "rename the key"),
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


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.integration
def test_tracking_inputs_are_one_line_errors(tmp_path, capsys):
    def error_line(*argv: str) -> str:
        code, out, err = _cli(capsys, *argv)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
        return errors[0]

    sets = ["--set", f"storage.uri={tmp_path.as_uri()}/store", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    assert error_line("evaluate", "--run-id", "bogus", *sets).startswith("error: MLflow run 'bogus' does not exist")
    (tmp_path / "empty-model").mkdir()
    line = error_line("evaluate", "--model", str(tmp_path / "empty-model"), *sets)
    assert line.startswith(f"error: model {tmp_path / 'empty-model'} cannot be loaded (") and "has no config.json" in line
    line = error_line("evaluate", "--set", f"storage.uri={tmp_path.as_uri()}/store",
                      "--set", f"mlflow.tracking_uri=http://127.0.0.1:{_closed_port()}")
    assert "is unreachable; start it" in line


def test_unreachable_ray_address_is_one_line():
    from pipelines.errors import UserError
    from pipelines.ray_setup import _probe_ray

    port = _closed_port()
    with pytest.raises(UserError, match=rf"^Ray cluster at ray://127.0.0.1:{port} is unreachable; start it"):
        _probe_ray(f"ray://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=r"ray.address 'head-node' is not HOST:PORT"):
        _probe_ray("head-node")


def test_missing_pretrained_weights_are_refused_on_the_driver(tmp_path):
    import types

    from pipelines.errors import UserError
    from pipelines.trainer import make_spec

    version = types.SimpleNamespace(num_classes=10, channels=1, image_size=(28, 28), classes=list("abcdefghij"),
                                    count=lambda split: 10, version="v")
    cfg = load_config(None, [f"model.pretrained={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match=r"model.pretrained='.*nope' does not exist; give a vit_model directory"):
        make_spec(cfg, version, None)


@pytest.mark.parametrize("name", ["it's", "a/b", "m@champion", ""])
def test_registry_names_that_break_model_uris_are_refused(name):
    with pytest.raises(ConfigError, match=r"registry.model_name=.* must be a non-empty name without quotes"):
        load_config(None, [f"registry.model_name={name!r}" if name in ("", "it's") else f"registry.model_name={name}"])


@pytest.mark.integration
def test_class_names_mlflow_rejects_become_safe_metric_keys(tmp_path):
    from pipelines import tracking

    assert tracking.metric_key("T-shirt/top") == "T-shirt/top"
    assert tracking.metric_key("cat (wild): #1") == "cat _wild__ _1"
    cfg = load_config(None, [f"storage.uri={tmp_path.as_uri()}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"])
    client = tracking.client(cfg)
    run_id, _ = tracking.start_or_resume_run(cfg, "keys", "evaluate", mlflow_client=client)
    tracking.log_metrics(client, run_id, {"test_acc_cat (wild): #1": 0.5}, step=0)
    assert client.get_run(run_id).data.metrics == {"test_acc_cat _wild__ _1": 0.5}
