"""Command line: ``python -m pipelines TASK --config FILE [--set key=value ...]``.

Each task lives in its own module (``pipelines/<task>.py``) and exposes
``run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int``. Task modules are imported
lazily so ``--help`` and config errors are instant. A :class:`~pipelines.errors.UserError`
anywhere becomes one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .config import load_config
from .errors import UserError

TASKS = {
    "prepare": "validate images from a source and write a sharded Parquet dataset version",
    "train": "train the ViT with Ray Train (DDP workers) and track it in MLflow",
    "tune": "search hyperparameters with Ray Tune (ASHA), one nested MLflow run per trial",
    "evaluate": "score a checkpoint or run on the test split",
    "register": "package a trained model for MLflow and gate the @champion alias",
    "infer": "batch inference over images with a registered model",
    "run": "the whole workflow as a cached, resumable DAG",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, help_text in TASKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML config file (default: built-in defaults)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. --set train.epochs=3 (repeatable)",
        )
        module = _task_module(name, required=False)
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(p)
    return parser


def _task_module(name: str, required: bool = True):
    try:
        return importlib.import_module(f"pipelines.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"pipelines.{name}" and not required:
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    # Ray reads this when it is imported; with the 127.0.0.1 node address of a local cluster it
    # keeps every Ray port on loopback. Set before any task module imports ray.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        module = _task_module(args.task, required=False)
        if module is None:
            raise UserError(f"task {args.task!r} is not implemented yet in this version of the pipeline")
        return int(module.run_cli(cfg, args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
