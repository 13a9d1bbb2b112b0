"""register: package a trained ViT for MLflow, register a version, and gate the ``@champion`` alias.

    python -m pipelines register --config FILE [--model-dir URI] [--run-id RUN] [--set key=value ...]

``--model-dir`` defaults, like evaluate's ``--model``, to the model exported by ``--run-id`` or by
the newest finished training run. From Python: :func:`register` (any test data) and
:func:`register_from_workflow` (the test split of a dataset version, for ``run``).

Packaging
    The input is a vit_model directory (``save_pretrained``: ``config.json`` + ``model.safetensors``,
    local path, ``file://`` or ``s3://``). Only those two files are read, whatever else the folder
    holds: a planted ``evil.pkl`` or ``pytorch_model.bin`` is never opened. The pyfunc model is
    logged as *models from code* (``pipelines/serving_model.py``), so MLflow writes no
    ``python_model.pkl``; its artifacts are the weights, ``config.json``, ``class_names.json`` and
    ``preprocessing.json`` (see :mod:`pipelines.serving`), its code ``vit_model/`` and
    ``serving.py``, with a signature and an input example. Before logging, the staged tree is
    scanned and refused if anything in it looks like a pickle (:func:`find_pickles`).

The model's ``meta`` (written by train) supplies ``class_names``, ``mean``, ``std`` and
``channels``/``image_size`` (checked against the architecture); ``mean``/``std`` fall back to
``data.augment`` and class names to ``"0" .. "N-1"``, each with a warning.

Promotion gate
    The candidate and the current ``@champion`` are scored on the same test images (the dataset
    version's test split from the CLI: ``data.version``, else the version named in the model's
    meta; any iterable of ``(uint8 images, labels)`` from Python), each with its own packaged
    preprocessing, after checking that both predict the split's class names. ``registry.metric``
    (``test_acc`` or ``test_loss``) is compared with ``registry.mode`` (max/min): ``champion``
    moves only when the candidate is better by more than ``registry.margin``, or when there is no
    champion yet. ``candidate`` always moves to the new version. Stages are not used
    (deprecated): aliases only.

Promotion log (MLflow keeps no alias history), three places, all in the registry
    * model-version tag ``promotion.decision`` on every registered version: that decision as
      JSON. The complete log is these tags in time order (:func:`read_promotion_log`).
    * registered-model tag ``promotion.log``: the most recent decisions as a JSON list, newest
      last, cut to ``registry.log_tag_entries`` and to :data:`LOG_TAG_MAX_CHARS` characters
      (inside the 5,000 bytes every MLflow backend guarantees for a tag value).
    * artifact ``promotion_log.json`` of the registration run: the complete log at that time.
    Two registrations of the same model at the same moment may interleave the model tag (the
    version tags stay exact); run one registration per model at a time.

Tracking goes to ``mlflow.tracking_uri`` (see :func:`pipelines.tracking.resolve_tracking_uri`).
Each registration is one MLflow run (task ``register``) in ``mlflow.experiment_name``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import importlib.metadata
import json
import logging
import math
import pickletools
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import tracking
from .config import PipelineConfig
from .errors import ConfigError, UserError

log = logging.getLogger(__name__)

TASK = "register"
CHAMPION = "champion"
CANDIDATE = "candidate"
DECISION_TAG = "promotion.decision"
LOG_TAG = "promotion.log"
LOG_ARTIFACT = "promotion_log.json"
LOG_TAG_MAX_CHARS = 4500
GATE_METRICS = ("test_acc", "test_loss")
MODES = ("max", "min")
MODEL_ARTIFACT_NAME = "model"

_PKG = Path(__file__).resolve().parent
SERVING_FILE = _PKG / "serving.py"
ENTRY_FILE = _PKG / "serving_model.py"
VIT_MODEL_DIR = _PKG.parent / "vit_model"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".ckpt")


class RegisterError(UserError):
    """The model cannot be registered (bad model directory, no test data for the gate, ...)."""


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterResult:
    """What one registration did. ``decision`` is ``promoted`` (champion moved to this version),
    ``first`` (no champion existed) or ``kept`` (champion unchanged)."""

    model_name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    champion_before: str | None
    champion_after: str
    decision: str
    reason: str
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None
    run_id: str | None = None  # the registration's MLflow run

    @property
    def promoted(self) -> bool:
        return self.champion_after == self.version

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Model directory -> staged artifacts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagedModel:
    """The four artifact files in a local folder, plus what they say."""

    folder: Path
    config_doc: dict[str, Any]
    class_names: list[str]
    spec: Any  # serving.PreprocessSpec

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.config_doc.get("meta") or {})

    def artifact_paths(self) -> dict[str, str]:
        from .serving import ARTIFACT_FILES

        return {k: str(self.folder / v) for k, v in ARTIFACT_FILES.items()}


def stage_model_dir(model_dir_uri: str, cfg: PipelineConfig, dest: Path) -> StagedModel:
    """Read ``config.json`` + ``model.safetensors`` from ``model_dir_uri`` (nothing else) and write
    the four artifact files into ``dest``."""
    from vit_model import ViTConfig

    from . import storage as st
    from .serving import ARTIFACT_FILES, PreprocessSpec

    def read(name: str) -> bytes:
        try:
            return st.read_bytes(st.join_uri(model_dir_uri, name), cfg.storage)
        except st.ObjectNotFound:
            raise RegisterError(
                f"model directory {_shown(model_dir_uri)} has no {name}; pass a folder written by "
                "vit_model's save_pretrained (config.json + model.safetensors), e.g. a train run's model/ folder"
            ) from None

    try:
        doc = json.loads(read("config.json"))
    except ValueError:
        raise RegisterError(f"{_shown(model_dir_uri)}/config.json is not valid JSON; re-export the model") from None
    if not isinstance(doc, dict) or doc.get("format") != "vit_model" or not isinstance(doc.get("config"), dict):
        raise RegisterError(
            f"{_shown(model_dir_uri)}/config.json is not a vit_model config (format 'vit_model'); "
            "convert the weights with vit_model.from_pretrained(...).save_pretrained(dir) first"
        )
    try:
        arch = ViTConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as exc:
        raise RegisterError(f"{_shown(model_dir_uri)}/config.json has an invalid architecture ({exc})") from None
    weights = read("model.safetensors")
    meta = dict(doc.get("meta") or {})

    class_names = meta.get("class_names")
    if class_names is None:
        class_names = [str(i) for i in range(arch.num_classes)]
        log.warning("model meta has no class_names; using %s", class_names[:3] + ["..."])
    if not isinstance(class_names, list) or len(class_names) != arch.num_classes:
        raise RegisterError(
            f"model meta lists {len(class_names) if isinstance(class_names, list) else class_names!r} class names "
            f"for a model with {arch.num_classes} classes; fix meta['class_names'] in config.json"
        )
    channels = int(meta.get("channels", arch.in_chans))
    if channels != arch.in_chans:
        raise RegisterError(f"model meta says {channels} channels but the model takes {arch.in_chans}; fix meta['channels']")
    size = meta.get("image_size", list(arch.img_hw))
    image_hw = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
    if image_hw != tuple(arch.img_hw):
        raise RegisterError(f"model meta image_size {list(image_hw)} differs from the architecture's {list(arch.img_hw)}")
    mean, std = meta.get("mean"), meta.get("std")
    if mean is None or std is None:
        mean, std = cfg.data.augment.mean, cfg.data.augment.std
        log.warning("model meta has no mean/std; using data.augment.mean=%s std=%s", list(mean), list(std))
    try:
        spec = PreprocessSpec(channels=channels, image_size=image_hw, mean=tuple(float(v) for v in mean),
                              std=tuple(float(v) for v in std), max_pixels=cfg.data.max_image_pixels,
                              alpha_background=cfg.data.alpha_background)
    except ValueError as exc:
        raise RegisterError(f"model {_shown(model_dir_uri)}: {exc}") from None

    dest.mkdir(parents=True, exist_ok=True)
    (dest / ARTIFACT_FILES["config"]).write_text(json.dumps(doc, indent=2, sort_keys=True))
    (dest / ARTIFACT_FILES["weights"]).write_bytes(weights)
    (dest / ARTIFACT_FILES["class_names"]).write_text(json.dumps([str(c) for c in class_names]))
    (dest / ARTIFACT_FILES["preprocessing"]).write_text(json.dumps(spec.to_dict(), indent=2))
    return StagedModel(dest, doc, [str(c) for c in class_names], spec)


def stage_code(dest: Path) -> list[str]:
    """Copy the code a packaged model needs (``vit_model/`` and ``serving.py``, sources only)."""
    shutil.copytree(VIT_MODEL_DIR, dest / "vit_model", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    shutil.copy2(SERVING_FILE, dest / "serving.py")
    return [str(dest / "vit_model"), str(dest / "serving.py")]


def find_pickles(root: str | Path) -> list[Path]:
    """Files under ``root`` that are, or contain, a pickle: pickle-ish suffixes, data that parses
    as a pickle stream (protocol 2+ starts with ``0x80``), and zip archives (torch's format) with
    ``.pkl`` members."""
    found = []
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file():
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES or _parses_as_pickle(path) or _zip_with_pickle(path):
            found.append(path)
    return found


def _parses_as_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
        if len(head) < 2 or head[0] != 0x80 or head[1] not in range(2, 6):
            return False
        f.seek(0)
        try:
            for _ in pickletools.genops(f):
                pass
        except Exception:
            return False
    return True


def _zip_with_pickle(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith((".pkl", ".pickle")) for n in z.namelist())


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

TestData = tuple[np.ndarray, np.ndarray] | Iterable[tuple[Any, Any]]


def _batches(test_data: TestData) -> Iterator[tuple[Any, np.ndarray]]:
    """``(images, labels)`` (one batch: labels a 1-D array), or an iterable of such batches."""
    if isinstance(test_data, tuple) and len(test_data) == 2 and isinstance(test_data[1], np.ndarray) \
            and test_data[1].ndim == 1:
        yield test_data[0], test_data[1]
        return
    for images, labels in test_data:
        yield images, np.asarray(labels)


def _fit_pixels(images: Any, spec: Any) -> np.ndarray:
    """uint8 images (a (N, H, W[, C]) array, or a list of per-image arrays of any size and
    channel count) -> a batch at the size and channel count ``spec`` expects."""
    from .serving import resize_center_crop

    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4):
        arr = images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images
        channels = 1 if arr.ndim == 3 else arr.shape[3]
        if tuple(arr.shape[1:3]) == spec.image_size and channels == spec.channels:
            return arr
    want_shape = spec.image_size + ((3,) if spec.channels == 3 else ())
    out = []
    for img in images:
        img = np.asarray(img)
        if img.dtype != np.uint8:
            raise RegisterError(f"test images must be uint8 pixels, got {img.dtype}")
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        if spec.channels == 3 and img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif spec.channels == 1 and img.ndim == 3:
            from PIL import Image

            img = np.asarray(Image.fromarray(img, "RGB").convert("L"))
        out.append(resize_center_crop(img, spec.image_size))
    return np.stack(out) if out else np.zeros((0,) + want_shape, np.uint8)


def score_models(models: Mapping[str, Any], test_data: TestData, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """``{key: {"test_acc", "test_loss", "test_count"}}`` for each ``ViTClassifier``, in one pass
    over ``test_data`` (so an iterator of batches is read once)."""
    sums = {k: {"correct": 0, "nll": 0.0, "n": 0} for k in models}
    for images, labels in _batches(test_data):
        labels = labels.astype(np.int64)
        for key, clf in models.items():
            probs = clf.predict_proba(_fit_pixels(images, clf.spec), batch_size=batch_size).double().numpy()
            if probs.shape[0] != len(labels):
                raise RegisterError(f"test batch has {probs.shape[0]} images but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
                raise RegisterError(f"test labels outside 0..{probs.shape[1] - 1}; the test split does not fit this model")
            picked = probs[np.arange(len(labels)), labels]
            sums[key]["correct"] += int((probs.argmax(axis=1) == labels).sum())
            sums[key]["nll"] += float(-np.log(np.clip(picked, 1e-12, None)).sum())
            sums[key]["n"] += len(labels)
    out = {}
    for key, s in sums.items():
        if s["n"] == 0:
            raise RegisterError("the test data for the promotion gate is empty; point data.version at a version with a test split")
        out[key] = {"test_acc": s["correct"] / s["n"], "test_loss": s["nll"] / s["n"], "test_count": float(s["n"])}
    return out


# --------------------------------------------------------------------------------------------
# Gate
# --------------------------------------------------------------------------------------------


def gate(metric: str, mode: str, margin: float, candidate: Mapping[str, float],
         champion: Mapping[str, float] | None, champion_version: str | None) -> tuple[bool, str]:
    """(promote?, reason). Better means ``mode`` (max/min) by strictly more than ``margin``."""
    if champion is None:
        return True, "no champion yet: the first registered version becomes champion"
    c, b = float(candidate[metric]), float(champion[metric])
    gain = (c - b) if mode == "max" else (b - c)
    verdict = (f"candidate {metric} {c:.6f} vs champion v{champion_version} {b:.6f} "
               f"({'+' if gain >= 0 else ''}{gain:.6f} in the {'higher' if mode == 'max' else 'lower'}-is-better "
               f"direction, margin {margin:g})")
    if math.isfinite(gain) and gain > margin:
        return True, f"promoted: {verdict}"
    return False, f"kept champion: {verdict}"


# --------------------------------------------------------------------------------------------
# Registry helpers
# --------------------------------------------------------------------------------------------


def _shown(uri: str) -> str:
    """A URI safe to print: any user:password@ part removed."""
    parts = urllib.parse.urlsplit(str(uri))
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    return str(uri)


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """For http(s) tracking URIs: one quick ``/health`` probe, so an unreachable server is one
    clear line instead of minutes of client retries."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise RegisterError(
                f"MLflow server {_shown(uri)} refused the request (HTTP {exc.code}); set MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, or start it with --allowed-hosts for this host"
            ) from None
        return  # it answers HTTP: up
    except OSError:
        raise RegisterError(
            f"MLflow tracking server {_shown(uri)} is unreachable; start it (python cluster/dev_stack.py start) "
            "or fix mlflow.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None


def _check_classes(who: str, names: Sequence[str], test_classes: Sequence[str] | None,
                   fix: str = "gate on the dataset the model was trained on (data.version)") -> None:
    if test_classes is not None and list(names) != list(test_classes):
        raise RegisterError(f"{who} predicts classes {list(names)} but the test split has {list(test_classes)}; {fix}")


def resolve_uris(cfg: PipelineConfig) -> tuple[str, str]:
    """(tracking URI, registry URI): the registry defaults to the tracking store. (Leaving it
    None would make MLflow fall back to ``sqlite:///mlflow.db`` in the working directory.)"""
    tracking_uri = tracking.resolve_tracking_uri(cfg)
    return tracking_uri, cfg.mlflow.registry_uri or tracking_uri


def registry_client(cfg: PipelineConfig) -> Any:
    """An ``MlflowClient`` on the configured tracking store and model registry."""
    return tracking.client(cfg)


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def load_registered_classifier(client: Any, name: str, version: str, cfg: PipelineConfig, work: Path) -> Any:
    """A ``ViTClassifier`` from a registered version's artifact files (its shipped code is not run)."""
    import mlflow
    from mlflow.models import Model

    from .serving import ViTClassifier

    dest = work / f"v{version}"
    try:
        with _fluent_tracking(*resolve_uris(cfg)):  # models:/ URIs resolve through the global registry URI
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
        artifacts = Model.load(local).flavors["python_function"]["artifacts"]
        return ViTClassifier().load_artifacts({k: str(Path(local, v["path"])) for k, v in artifacts.items()}, device="cpu")
    except Exception as exc:
        raise RegisterError(
            f"cannot load the champion {name} v{version} for the promotion gate ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); fix or delete that version's alias "
            f"(MlflowClient().delete_registered_model_alias({name!r}, {CHAMPION!r}))"
        ) from None


def read_promotion_log(client: Any, name: str) -> list[dict[str, Any]]:
    """The complete promotion log of ``name``: every version's decision, oldest first."""
    entries = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        text = (mv.tags or {}).get(DECISION_TAG)
        if text:
            try:
                entries.append(json.loads(text))
            except ValueError:
                log.warning("version %s has an unreadable %s tag", mv.version, DECISION_TAG)
    return sorted(entries, key=lambda e: (e.get("time", ""), int(e.get("candidate_version", 0))))


def _recent_log_tag(client: Any, name: str, entry: dict[str, Any], max_entries: int) -> str:
    """The registered-model log tag with ``entry`` appended, cut to fit."""
    model = client.get_registered_model(name)
    try:
        entries = json.loads((model.tags or {}).get(LOG_TAG, "[]"))
        if not isinstance(entries, list):
            entries = []
    except ValueError:
        entries = []
    entries = (entries + [entry])[-max(1, max_entries):]
    text = json.dumps(entries, separators=(",", ":"), sort_keys=True)
    while len(text) > LOG_TAG_MAX_CHARS and len(entries) > 1:
        entries = entries[1:]
        text = json.dumps(entries, separators=(",", ":"), sort_keys=True)
    return text


def _pip_requirements() -> list[str]:
    """Pinned runtime requirements of a packaged model (what serving.py and vit_model import)."""
    reqs = []
    for dist in ("mlflow", "torch", "safetensors", "numpy", "pandas", "pillow"):
        try:
            version = importlib.metadata.version(dist).split("+")[0]
            reqs.append(f"{dist}=={version}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


@contextlib.contextmanager
def _fluent_tracking(tracking_uri: str, registry_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (needed by ``log_model``) at our URIs, restoring them after."""
    import mlflow

    old_tracking, old_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_tracking)
        mlflow.set_registry_uri(old_registry)


def _flat_tags(prefix: str, metrics: Mapping[str, Any]) -> dict[str, str]:
    """Numeric ``metrics`` as tags ``<prefix><name>`` (characters MLflow rejects in keys -> ``_``)."""
    return {prefix + re.sub(r"[^\w.\-/ ]", "_", str(k)): f"{float(v):.6g}" for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


def register(cfg: PipelineConfig, model_dir_uri: str, *, run_id: str | None = None, dataset_digest: str | None = None,
             metrics: Mapping[str, Any] | None = None, test_data: TestData | None = None,
             test_classes: Sequence[str] | None = None) -> RegisterResult:
    """Package ``model_dir_uri`` as a pyfunc model, register a new version of
    ``registry.model_name``, run the promotion gate on ``test_data`` and move the aliases.

    ``run_id``/``dataset_digest`` default to the model meta's ``mlflow_run_id`` and
    ``dataset.version``; ``metrics`` (e.g. the training run's best validation metrics) are
    recorded as version tags ``metric.<name>``. ``test_data`` is ``(images, labels)`` (uint8
    ``(N, H, W[, C])`` and ints) or an iterable of such batches; it may be omitted only while
    the model has no champion. ``test_classes`` (the test split's class names) guards against
    scoring a model on another label set: candidate and champion must list the same names.
    """
    import mlflow

    from .serving import ViTClassifier, input_example, model_signature

    reg = cfg.registry
    if reg.metric not in GATE_METRICS:
        raise ConfigError(f"registry.metric {reg.metric!r} is not scored by the gate; use one of {', '.join(GATE_METRICS)}")
    if reg.mode not in MODES:
        raise ConfigError(f"registry.mode {reg.mode!r} is invalid; use max (e.g. test_acc) or min (e.g. test_loss)")
    if not reg.model_name:
        raise ConfigError("registry.model_name is empty; set it, e.g. --set registry.model_name=vit-fashion-mnist")
    tracking_uri, registry_uri = resolve_uris(cfg)
    check_tracking_server(tracking_uri)
    client = registry_client(cfg)
    name = reg.model_name

    with tempfile.TemporaryDirectory(prefix="vit-register-") as tmp:
        work = Path(tmp)
        staged = stage_model_dir(model_dir_uri, cfg, work / "artifacts")
        code_paths = stage_code(work / "code")
        bad = find_pickles(work)
        if bad:  # only reachable if someone edits the staging code; never ship a pickle
            raise RegisterError(f"refusing to package pickle file(s) {[str(p.relative_to(work)) for p in bad]}")
        meta = staged.meta
        run_id = run_id or meta.get("mlflow_run_id")
        dataset_digest = dataset_digest or (meta.get("dataset") or {}).get("version")
        candidate = ViTClassifier().load_artifacts(staged.artifact_paths(), device="cpu")
        _check_classes("the candidate", candidate.class_names, test_classes)

        champion_before = _alias_version(client, name, CHAMPION)
        models = {"candidate": candidate}
        if champion_before is not None:
            if test_data is None:
                raise RegisterError(
                    f"{name} has a champion (v{champion_before}) but no test data was given for the promotion gate; "
                    "pass the test split (data.version with a test split, or test_data=...)"
                )
            models["champion"] = load_registered_classifier(client, name, champion_before, cfg, work / "champion")
            _check_classes(f"the champion v{champion_before}", models["champion"].class_names, test_classes,
                           fix=f"remove the alias deliberately (MlflowClient().delete_registered_model_alias({name!r}, "
                               f"{CHAMPION!r})) if the label set changed on purpose")
        scores = score_models(models, test_data) if test_data is not None else {"candidate": {}}
        cand_scores, champ_scores = scores["candidate"], scores.get("champion")
        if cand_scores or champ_scores:
            log.info("gate scores: %s", scores)
        promote, reason = gate(reg.metric, reg.mode, reg.margin, cand_scores, champ_scores, champion_before)

        exp_id = tracking.experiment_id(cfg, client)
        run = client.create_run(exp_id, run_name=f"register-{name}",
                                tags={tracking.TASK_TAG: TASK, "registry.model_name": name,
                                      **({"training_run_id": run_id} if run_id else {}),
                                      **({"dataset_digest": dataset_digest} if dataset_digest else {})})
        reg_run_id = run.info.run_id
        try:
            tracking.log_config(client, reg_run_id, cfg)
            with _fluent_tracking(tracking_uri, registry_uri), mlflow.start_run(run_id=reg_run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT_NAME, python_model=str(ENTRY_FILE), artifacts=staged.artifact_paths(),
                    code_paths=code_paths, signature=model_signature(), input_example=input_example(staged.spec),
                    pip_requirements=_pip_requirements(),
                )
                version_tags = {
                    **({"training_run_id": run_id} if run_id else {}),
                    **({"dataset_digest": dataset_digest} if dataset_digest else {}),
                    "registration_run_id": reg_run_id,
                    **_flat_tags("metric.", metrics or {}),
                    **_flat_tags("gate.", cand_scores),
                }
                mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
            version = str(mv.version)

            client.set_registered_model_alias(name, CANDIDATE, version)
            if promote:
                client.set_registered_model_alias(name, CHAMPION, version)
            champion_after = version if promote else str(champion_before)
            decision = "first" if champion_before is None else ("promoted" if promote else "kept")
            entry = {
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
                "model": name, "candidate_version": version, "champion_before": champion_before,
                "champion_after": champion_after, "decision": decision, "reason": reason,
                "metric": reg.metric, "mode": reg.mode, "margin": reg.margin,
                "candidate_metrics": cand_scores, "champion_metrics": champ_scores,
                "registration_run_id": reg_run_id, "training_run_id": run_id, "dataset_digest": dataset_digest,
            }
            client.set_model_version_tag(name, version, DECISION_TAG, json.dumps(entry, sort_keys=True))
            client.set_registered_model_tag(name, LOG_TAG, _recent_log_tag(client, name, entry, reg.log_tag_entries))
            tracking.log_json(client, reg_run_id, read_promotion_log(client, name), LOG_ARTIFACT)
            tracking.log_metrics(client, reg_run_id, {**{f"candidate_{k}": v for k, v in cand_scores.items()},
                                                      **{f"champion_{k}": v for k, v in (champ_scores or {}).items()}}, step=0)
            client.set_tag(reg_run_id, "promotion.decision", decision)
        except BaseException:
            tracking.end_run(client, reg_run_id, "FAILED")
            raise
        tracking.end_run(client, reg_run_id, "FINISHED")

    return RegisterResult(
        model_name=name, version=version, model_uri=f"models:/{name}/{version}", champion_before=champion_before,
        champion_after=champion_after, decision=decision, reason=reason, candidate_metrics=dict(cand_scores),
        champion_metrics=dict(champ_scores) if champ_scores else None, run_id=reg_run_id,
    )


# --------------------------------------------------------------------------------------------
# Test split from a dataset version
# --------------------------------------------------------------------------------------------


def gate_dataset(cfg: PipelineConfig, model_meta: Mapping[str, Any] | None = None) -> Any:
    """The dataset version whose test split the gate uses: ``data.version`` if set, else the
    version the model was trained on (its meta), else the newest version of ``data.name``."""
    from .data.shards import dataset_from_config, load_version

    trained_on = (model_meta or {}).get("dataset")
    dataset_uri = trained_on.get("uri") if isinstance(trained_on, dict) else None
    if dataset_uri and not cfg.data.version:
        return load_version(dataset_uri, cfg.storage)
    return dataset_from_config(cfg)


def split_batches(version: Any, cfg: PipelineConfig, split: str = "test") -> Iterator[tuple[list, np.ndarray]]:
    """``(uint8 images, labels)`` per shard of ``split`` of a dataset version, streamed."""
    from .data.shards import iter_shard_batches
    from .data.validate import decode_png

    if split not in version.splits:
        raise RegisterError(f"dataset {version.uri} has no {split} split; prepare it with data.test_fraction > 0")
    for table in iter_shard_batches(version, split, cfg.storage, columns=["image", "label"]):
        yield [decode_png(b) for b in table.column("image").to_pylist()], table.column("label").to_numpy()


def register_from_workflow(cfg: PipelineConfig, *, model_uri: str, dataset_uri: str, run_id: str | None = None,
                           metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The workflow runner's register step: gate on the test split of ``dataset_uri``.

    Returns :meth:`RegisterResult.to_dict` plus ``champion_version`` (JSON-safe, for the run record).
    """
    from .data.shards import load_version

    version = load_version(dataset_uri, cfg.storage)
    if "test" not in version.splits:
        raise RegisterError(f"dataset {version.uri} has no test split; prepare it with data.test_fraction > 0")
    result = register(cfg, model_uri, run_id=run_id, dataset_digest=version.version, metrics=metrics,
                      test_data=split_batches(version, cfg), test_classes=version.classes)
    return {**result.to_dict(), "champion_version": result.champion_after}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", "--model", dest="model_dir", default=None, metavar="URI",
                        help="vit_model directory to register (config.json + model.safetensors): path, file:// or "
                             "s3:// (default: the model of --run-id, else of the newest finished training)")
    parser.add_argument("--run-id", default=None, help="MLflow run that trained the model (default: from the model's meta)")


def run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from . import storage as st

    model_dir, run_id = args.model_dir, args.run_id
    if not model_dir:  # the same default as evaluate: the run's exported model, else the newest one
        from .evaluate import latest_model_uri

        model_dir, found_run = latest_model_uri(cfg, run_id)
        run_id = run_id or found_run

    doc: Any = {}
    try:  # the model's meta names the dataset version it was trained on
        doc = json.loads(st.read_bytes(st.join_uri(model_dir, "config.json"), cfg.storage))
    except (st.ObjectNotFound, ValueError):
        pass  # register() reports a missing or broken config.json with the fix
    version = gate_dataset(cfg, doc.get("meta") if isinstance(doc, dict) else None)
    if "test" not in version.splits:
        raise RegisterError(f"dataset {version.uri} has no test split; prepare it with data.test_fraction > 0")
    started = time.monotonic()
    result = register(cfg, model_dir, run_id=run_id, dataset_digest=version.version,
                      test_data=split_batches(version, cfg), test_classes=version.classes)
    m = result.candidate_metrics.get(cfg.registry.metric)
    shown = f" {cfg.registry.metric} {m:.4f}" if m is not None else ""
    before = f"v{result.champion_before}" if result.champion_before else "none"
    print(f"registered {result.model_name} v{result.version}{shown}; @candidate -> v{result.version}, "
          f"@champion {before} -> v{result.champion_after} ({result.decision}) in {time.monotonic() - started:.0f} s")
    print(f"reason: {result.reason}")
    print(f"model uri: models:/{result.model_name}@{CHAMPION}")
    return 0
