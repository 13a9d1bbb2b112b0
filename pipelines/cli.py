"""Command line: ``python -m pipelines TASK --config FILE [--set key=value ...] [--verbose]``.

The parser is built from the table below without importing any task module, so ``--help`` and
config errors answer in well under a second (no torch, Ray or MLflow). Each task module
(``pipelines/<task>.py``) exposes ``run_cli(cfg, args) -> int`` and is imported only to run.
A :class:`~pipelines.errors.UserError` anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from . import console
from .config import WORKFLOW_STEPS, load_config
from .errors import UserError

Option = tuple[tuple[str, ...], dict[str, Any]]

TASKS: dict[str, tuple[str, list[Option]]] = {
    "prepare": ("validate images from a source and write a sharded Parquet dataset version", [
        (("--verify",), dict(action="store_true",
                             help="re-read every shard afterwards and check its sha256 and row count")),
    ]),
    "train": ("train the ViT with Ray Train (DDP workers) and track it in MLflow", [
        (("--continue",), dict(dest="extend", action="store_true",
                               help="resume train.run_name under changed hyperparameters (train.epochs, lr, ...); "
                                    "the learning-rate schedule is recomputed")),
    ]),
    "tune": ("search hyperparameters with Ray Tune (ASHA), one nested MLflow run per trial", [
        (("--resume",), dict(action="store_true", help="continue the interrupted sweep named tune.name")),
    ]),
    "evaluate": ("score a checkpoint or run on the test split", [
        (("--model",), dict(dest="model_uri", help="vit_model directory URI (default: the model of "
                                                    "train.run_name's run, else of the newest finished training)")),
        (("--run-id",), dict(help="MLflow training run whose model to evaluate")),
        (("--split",), dict(default="test", help="dataset split to score (default: test)")),
    ]),
    "register": ("package a trained model for MLflow and gate the @champion alias", [
        (("--model-dir", "--model"), dict(dest="model_dir", default=None, metavar="URI",
                                          help="vit_model directory to register (config.json + model.safetensors): "
                                               "path, file:// or s3:// (default: the model of --run-id, else of "
                                               "train.run_name's run, else of the newest finished training)")),
        (("--run-id",), dict(default=None, help="MLflow run that trained the model (default: from the model's meta)")),
    ]),
    "infer": ("batch inference over images with a registered model", [
        (("--input",), dict(dest="input_uri", default=None, metavar="URI",
                            help="dataset version folder or a prefix of raw images, local or s3:// "
                                 "(default: infer.input)")),
        (("--model",), dict(dest="model_uri", default=None, metavar="URI",
                            help="models:/NAME@ALIAS or models:/NAME/VERSION (default: infer.model_uri, else "
                                 "models:/<registry.model_name>@champion)")),
        (("--job",), dict(dest="job_name", default=None, metavar="NAME",
                          help="job name: output under <storage.uri>/predictions/NAME/ (default: infer.job_name, "
                               "else <model>-v<version>-<input digest>)")),
    ]),
    "run": ("the whole workflow as a cached, resumable DAG", [
        (("--from",), dict(dest="from_step", choices=WORKFLOW_STEPS,
                           help="re-run this step and everything after it")),
    ]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.splitlines()[0])
    verbose_help = "show Ray's own output (worker logs, Tune tables, warnings); default: the pipeline's lines only"
    parser.add_argument("--verbose", "-v", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, (help_text, options) in TASKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", default=None, help="YAML config file (default: built-in defaults)")
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override a config value, e.g. --set train.epochs=3 (repeatable)",
        )
        p.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
        for flags, kwargs in options:
            p.add_argument(*flags, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Ray reads this when it is imported; with the 127.0.0.1 node address of a local cluster it
    # keeps every Ray port on loopback. Set before any task module imports ray.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        console.configure(args.verbose, local_ray=not (cfg.ray.address or os.environ.get("RAY_ADDRESS")))
        module = importlib.import_module(f"pipelines.{args.task}")
        return int(module.run_cli(cfg, args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
