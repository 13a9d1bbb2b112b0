"""Typed config loading, overrides and the CLI's error contract (one line, exit code 2)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import REPO, run_module

from pipelines.config import PipelineConfig, flatten, load_config, to_dict, to_yaml
from pipelines.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: 3\n  lr: 0.002\ndata:\n  augment:\n    mean: [0.5]\n")
    cfg = load_config(path, ["train.epochs=7", "storage.uri=s3://bucket/x", "model.args.drop_path_rate=0.1",
                             "train.clip_grad_norm=null"])
    assert isinstance(cfg, PipelineConfig)
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.002
    assert cfg.storage.uri == "s3://bucket/x"
    assert cfg.model.args == {"drop_path_rate": 0.1}
    assert cfg.train.clip_grad_norm is None
    assert cfg.data.augment.mean == (0.5,)
    assert cfg.train.batch_size == PipelineConfig().train.batch_size


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["tune.space={lr: [0.001, 0.01]}", "data.augment.crop_scale=[0.5, 1.0]"])
    again = load_config(_write(tmp_path, to_yaml(cfg)))
    assert again == cfg
    assert flatten(to_dict(cfg))["tune.space.lr"] == [0.001, 0.01]


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("train:\n  epocs: 3\n", [], r"unknown config key 'train.epocs'; valid keys here: .*epochs"),
        ("trian: {}\n", [], r"unknown config key 'trian'"),
        ("", ["train.epochs=three"], r"config key 'train.epochs' must be an integer, got 'three'"),
        ("", ["train.lr=true"], r"config key 'train.lr' must be a number, got True"),
        ("", ["data.strict=1"], r"config key 'data.strict' must be true or false, got 1"),
        ("", ["data.augment.crop_scale=[1]"], r"config key 'data.augment.crop_scale' must have 2 items"),
        ("", ["train.epochs"], r"override 'train.epochs' is not of the form key=value"),
        ("", ["train.epochs.x=1"], r"config key 'train.epochs' must be an integer, got \{'x': 1\}"),
        ("train: [1, 2]\n", [], r"train must be a mapping"),
        ("- a\n", [], r"must hold a mapping of sections, got list"),
        ("train: {epochs: 1\n", [], r"is not valid YAML"),
    ],
)
def test_bad_config_errors_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    path = _write(tmp_path, "train:\n  epocs: 3\n")
    proc = run_module("train", "--config", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown config key 'train.epocs'")
    assert "Traceback" not in proc.stderr


# Each task's own options besides -h/--config/--set that `python -m pipelines TASK --help` must list.
TASK_OPTIONS = {
    "prepare": {"--verify"},
    "train": set(),
    "tune": {"--resume"},
    "evaluate": {"--model", "--run-id", "--split"},
    "register": {"--model-dir", "--model", "--run-id"},
    "infer": {"--input", "--model", "--job"},
    "run": {"--from"},
}


@pytest.fixture(scope="module")
def task_listing() -> dict[str, str]:
    """``python -m pipelines --help``'s subcommand lines, ``    <task>   <help text>``, as {task: help text}."""
    proc = run_module("--help")
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("usage: python -m pipelines [-h] [--verbose] TASK ...\n")
    return {m[1]: m[2] for m in re.finditer(r"^ {4}(\S+) +(\S.*)$", proc.stdout, re.MULTILINE)}


def test_cli_help_lists_tasks(task_listing):
    from pipelines.cli import TASKS

    assert list(task_listing) == list(TASKS)  # every task, in order, nothing else
    assert all(len(text) > 10 for text in task_listing.values())  # each with its help text
    assert set(TASKS) == set(TASK_OPTIONS)  # a new task needs its options listed above


@pytest.mark.parametrize("task", list(TASK_OPTIONS))
def test_cli_task_help_shows_config_set_and_own_options(task, task_listing):
    proc = run_module(task, "--help")
    assert (proc.returncode, proc.stderr) == (0, "")
    out = proc.stdout
    assert out.startswith(f"usage: python -m pipelines {task} [-h] [--config CONFIG] [--set KEY=VALUE] [--verbose]")
    assert f"\n\n{task_listing[task]}\n\n" in out  # its description is the help text the task list shows
    options = out.split("\noptions:\n", 1)[1]
    flags = {flag.split()[0] for m in re.finditer(r"^  (-\S.*?)(?: {2,}|$)", options, re.MULTILINE)
             for flag in m[1].split(", ")}
    assert {"-h", "--help", "--config", "-c", "--set", "--verbose", "-v", *TASK_OPTIONS[task]} <= flags, flags
    assert re.search(r"^  --set KEY=VALUE +override a config value", options, re.MULTILINE)


def heavy_imports(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``python -X importtime -m pipelines ARGS``; the torch and ray modules the process imported."""
    proc = run_module(*args, python_flags=("-X", "importtime"))
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    if "pipelines.cli" not in modules:  # not an AssertionError: a broken measurement is a real failure
        pytest.fail(f"no import trace from the CLI: {proc.stderr[-2000:]}")
    return proc, sorted(m for m in modules if m.split(".")[0] in ("torch", "ray"))


def test_cli_help_imports_neither_torch_nor_ray():
    proc, heavy = heavy_imports("--help")
    if proc.returncode != 0:
        pytest.fail(f"--help exited {proc.returncode}")
    assert heavy == []


def test_cli_config_error_imports_neither_torch_nor_ray():
    proc, heavy = heavy_imports("train", "--set", "train.epocs=3")
    if proc.returncode != 2 or not proc.stderr.rstrip("\n").splitlines()[-1].startswith("error: unknown config key 'train.epocs'"):
        pytest.fail(f"not the config error: exit {proc.returncode}, {proc.stderr[-500:]}")
    assert heavy == []


def test_config_files_in_repo_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "space" not in data and "tune_space" not in data:
            load_config(path)


def test_pinned_paths_makes_local_paths_absolute(tmp_path, monkeypatch):
    """Trials and workflow steps run in other working directories: the driver hands them absolute paths."""
    from pipelines.ray_setup import pinned_paths

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = pinned_paths(load_config(None, ["storage.uri=file://./artifacts"]))
    assert cfg.storage.uri == (tmp_path / "artifacts").as_uri()
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'artifacts' / 'mlflow.db'}"
    s3 = pinned_paths(load_config(None, ["storage.uri=s3://bucket/x", "mlflow.tracking_uri=http://127.0.0.1:5000"]))
    assert s3.storage.uri == "s3://bucket/x" and s3.mlflow.tracking_uri == "http://127.0.0.1:5000"
    (tmp_path / "idx").mkdir()
    other = pinned_paths(load_config(None, ["storage.uri=store", "mlflow.tracking_uri=sqlite:///runs.db",
                                            "data.source_dir=idx", "infer.input=file://new-images",
                                            "model.pretrained=hf-hub:timm/vit_tiny_patch16_224"]))
    assert other.storage.uri == (tmp_path / "store").as_uri()
    assert other.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'runs.db'}"
    assert other.data.source_dir == str(tmp_path / "idx") and other.data.source == "fashion-mnist"
    assert other.infer.input == (tmp_path / "new-images").as_uri()
    assert other.model.pretrained == "hf-hub:timm/vit_tiny_patch16_224"
