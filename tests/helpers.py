"""Plain helpers shared by several test modules (fixtures live in conftest.py, image sources in data_zoo.py).

``run_module``
    ``python -m pipelines ...`` in a child process from the repository root, as a user runs it.
``tiny_vit``
    The small 28x28 one-channel ViT of the training-loop and checkpoint tests.
``TINY_WORKFLOW``
    Overrides that make ``pipelines run`` small enough for a test (workflow and ``ray job submit`` tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from vit_model import VisionTransformer, ViTConfig

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str, python_flags: Sequence[str] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """``python [flags] -m pipelines ARGS`` in the repository root; help is printed wide enough
    (``COLUMNS``) that each option or task stays on one line."""
    return subprocess.run([sys.executable, *python_flags, "-m", "pipelines", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "250"})


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def tiny_vit(dropout: float = 0.0, reg_tokens: int = 0) -> VisionTransformer:
    """28x28, one channel, patch 7, 10 classes, width 32, depth 2."""
    return VisionTransformer(ViTConfig(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                                       depth=2, num_heads=2, reg_tokens=reg_tokens, drop_rate=dropout,
                                       proj_drop_rate=dropout))


# --------------------------------------------------------------------------------------------
# Workflow
# --------------------------------------------------------------------------------------------

TINY_WORKFLOW = [
    "model.args.embed_dim=32", "model.args.depth=1", "model.args.num_heads=2", "model.args.patch_size=7", "train.batch_size=32",
    "train.cpus_per_worker=0.5", "train.num_workers=2", "train.epochs=1", "data.shard_rows=100",
    "workflow.search=train", "workflow.retries=0", "infer.batch_size=64", "registry.model_name=vit-run-test",
]
