"""Which model a batch-inference job uses: ``models:/NAME@ALIAS`` pinned to one version, once.

The driver resolves the alias at job start and from then on uses that version's artifact
location only, so moving ``@champion`` mid-job cannot mix two versions in one output. It
downloads the version's plain data files (never its code) and hands the actors the config and
safetensors bytes through the object store: actors never touch MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vit_model import arch_from_dict

from .. import tracking
from ..config import PipelineConfig
from ..errors import ConfigError, InferError, first_line, redact_uri

MODEL_FILES = ("config", "weights", "class_names", "preprocessing")  # python_function artifacts we read
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))/?$")


@dataclass(frozen=True)
class ResolvedModel:
    """One registered model version, pinned; small and picklable (shipped to the actors)."""

    name: str
    version: str
    requested_uri: str  # what the user asked for, e.g. models:/vit@champion
    download_uri: str  # the version's artifact location (file://, s3://, mlflow-artifacts:/...)
    tracking_uri: str
    class_names: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixels: int
    alpha_background: int

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    m = _MODEL_URI.match(uri.strip()) if isinstance(uri, str) else None
    if not m:
        raise ConfigError(
            f"model URI {uri!r} is not of the form models:/NAME@ALIAS or models:/NAME/VERSION "
            "(e.g. --model models:/vit-fashion-mnist@champion)"
        )
    return m.group("name"), m.group("version"), m.group("alias")


def resolve_model(cfg: PipelineConfig, model_uri: str, client: Any = None) -> ResolvedModel:
    """Pin ``model_uri`` to one registered version and read its preprocessing and class names."""
    from mlflow.exceptions import MlflowException  # here: importing MLflow costs seconds

    name, version, alias = parse_model_uri(model_uri)
    tracking_uri, registry_uri = tracking.resolve_uris(cfg)
    client = client or tracking.client(cfg)
    try:
        if alias is not None:
            version = str(client.get_model_version_by_alias(name, alias).version)
        else:
            client.get_model_version(name, version)
        download_uri = client.get_model_version_download_uri(name, version)
    except MlflowException as exc:
        what = f"alias @{alias}" if alias else f"version {version}"
        raise InferError(
            f"model {model_uri!r}: the registry at {redact_uri(registry_uri)} has no {what} of {name!r} "
            f"({first_line(exc)}); register one with `python -m pipelines register` or fix infer.model_uri / --model"
        ) from None
    with tempfile.TemporaryDirectory(prefix="vit-infer-model-") as tmp:
        try:
            paths = fetch_model_files(download_uri, tracking_uri, Path(tmp), ("class_names", "preprocessing", "config"))
            class_names = tuple(str(c) for c in json.loads(Path(paths["class_names"]).read_text()))
            prep = json.loads(Path(paths["preprocessing"]).read_text())
            arch = json.loads(Path(paths["config"]).read_text())["config"]
        except (OSError, ValueError, KeyError, MlflowException) as exc:
            raise InferError(
                f"model {name} v{version} at {redact_uri(download_uri)} is not a ViT pyfunc package "
                f"({type(exc).__name__}: {first_line(exc)}); register it with `python -m pipelines register`"
            ) from None
    size = prep["image_size"]
    hw = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
    if len(class_names) != int(arch.get("num_classes", len(class_names))):
        raise InferError(f"model {name} v{version} lists {len(class_names)} class names for "
                         f"{arch.get('num_classes')} outputs; re-register it")
    return ResolvedModel(
        name=name, version=str(version), requested_uri=model_uri, download_uri=download_uri,
        tracking_uri=tracking_uri, class_names=class_names, channels=int(prep["channels"]), image_size=hw,
        mean=tuple(float(v) for v in prep["mean"]), std=tuple(float(v) for v in prep["std"]),
        max_pixels=int(prep.get("max_pixels", cfg.data.max_image_pixels)),
        alpha_background=int(prep.get("alpha_background", cfg.data.alpha_background)),
    )


def fetch_model_files(download_uri: str, tracking_uri: str, dest: Path,
                      keys: Iterable[str] = MODEL_FILES) -> dict[str, str]:
    """Download ``MLmodel`` and the python_function artifacts named ``keys`` into ``dest``.

    Returns ``{key: local path}``. Only plain data files are fetched; the model's code is not."""
    import mlflow
    from mlflow.models import Model

    dest.mkdir(parents=True, exist_ok=True)
    base = download_uri.rstrip("/")
    with _no_progress_bars():
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=str(dest),
                                                      tracking_uri=tracking_uri)
        artifacts = (Model.load(mlmodel).flavors.get("python_function") or {}).get("artifacts") or {}
        out = {}
        for key in keys:
            if key not in artifacts:
                raise KeyError(f"the model's MLmodel names no {key!r} artifact")
            rel = str(artifacts[key]["path"]).strip("/")
            out[key] = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{rel}",
                                                           dst_path=str(dest / Path(rel).parent),
                                                           tracking_uri=tracking_uri)
    return out


def load_model_package(model: ResolvedModel) -> dict[str, bytes]:
    """``{"config": bytes, "weights": bytes}`` of the pinned version, for the actors.

    Both files are parsed here (the architecture, and the safetensors header: names and shapes,
    no tensor data), so a damaged package fails in one line before any actor starts; the
    actors' strict ``load_state_dict`` checks that the two fit each other."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory(prefix="vit-infer-model-") as tmp:
        try:
            paths = fetch_model_files(model.download_uri, model.tracking_uri, Path(tmp), ("config", "weights"))
            config = Path(paths["config"]).read_bytes()
            arch_from_dict(json.loads(config))
            with safe_open(paths["weights"], "pt") as f:
                if not list(f.keys()):
                    raise ValueError("the safetensors file holds no tensors")
            weights = Path(paths["weights"]).read_bytes()
        except Exception as exc:
            raise InferError(f"cannot read the model files of {model.uri} at {redact_uri(model.download_uri)} "
                             f"({type(exc).__name__}: {first_line(exc)}); re-register the model") from None
    return {"config": config, "weights": weights}


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence MLflow's per-file download progress bars for a few small files, then restore."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
