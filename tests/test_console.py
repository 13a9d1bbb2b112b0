"""The console: the --verbose flag, line formats and quiet defaults (no Ray cluster needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import console
from pipelines.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, verbose", [
    (["run"], False), (["-v", "run"], True), (["run", "-v"], True),
    (["--verbose", "tune", "--resume"], True), (["train", "--config", "c.yaml", "--verbose"], True),
])
def test_verbose_flag_before_or_after_the_task(argv, verbose):
    assert build_parser().parse_args(argv).verbose is verbose


def test_epoch_line_and_durations():
    row = {"epoch": 1, "train_loss": 0.47824, "val_acc": 0.85183, "images_per_s": 3128.6}
    assert console.epoch_line("sweep-00000", row, 4, 95.2) == (
        "  sweep-00000 epoch 2/4: train loss 0.4782, val acc 0.8518, 3,129 images/s, ETA 1m35s")
    assert console.epoch_line("r", {"epoch": 3, "val_acc": 0.9}, 4, None) == "  r epoch 4/4: val acc 0.9000"
    assert [console.duration(s) for s in (0, 59.4, 61, 3600 + 120)] == ["0s", "59s", "1m01s", "1h02m"]


def test_say_prints_one_line_without_ray(capsys):
    console.say("[step] done")
    assert capsys.readouterr().out == "[step] done\n"


def test_quiet_configure_sets_env_before_ray_and_keeps_our_warnings(tmp_path):
    """In a fresh process: quiet env defaults, token auth chosen explicitly for a local cluster,
    third-party warnings held off the console, this package's warnings shown."""
    code = (
        "import os, sys, warnings\n"
        "from pipelines import console, engine\n"
        "console.configure(False, local_ray=True)\n"
        "print(os.environ['MLFLOW_LOGGING_LEVEL'], os.environ['MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'],"
        " os.environ['RAY_AUTH_MODE'], 'ray' in sys.modules)\n"
        "warnings.warn('third-party style warning', FutureWarning)\n"
        "import torch\n"
        "engine.autocast_context('bf16', torch.device('meta'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "RAY_AUTH_MODE",
                                                              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["WARNING", "false", "token", "False"]
    # ours on the console at once; the other one held, then released to stderr at exit (no Ray started)
    assert "bf16 autocast is not supported" in proc.stderr
    assert proc.stderr.index("bf16 autocast") < proc.stderr.index("third-party style warning")
    assert "/pipelines/engine.py:" in proc.stderr and "\n\n" not in proc.stderr
