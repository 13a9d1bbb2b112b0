"""A trained model as an MLflow pyfunc package: plain data files and source code, never pickle.

:func:`stage_model_dir` reads only ``config.json`` + ``model.safetensors`` from a vit_model
directory (a planted ``evil.pkl`` is never opened) and writes the four artifact files of
:data:`pipelines.serving.ARTIFACT_FILES`; :func:`stage_code` copies the code the package runs
(``vit_model/``, ``serving.py``, ``imaging.py``); :func:`find_pickles` refuses anything in the
staged tree that is, or contains, a pickle. The entry point is ``serving_model.py`` (MLflow
*models from code*), so MLflow writes no ``python_model.pkl`` either.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import pickletools
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vit_model import arch_from_dict

from . import storage as st
from .config import PipelineConfig
from .errors import RegisterError, redact_uri
from .serving import ARTIFACT_FILES, PreprocessSpec

log = logging.getLogger(__name__)

_PKG = Path(__file__).resolve().parent
SERVING_FILE = _PKG / "serving.py"
IMAGING_FILE = _PKG / "imaging.py"
ENTRY_FILE = _PKG / "serving_model.py"
VIT_MODEL_DIR = _PKG.parent / "vit_model"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".ckpt")


@dataclass(frozen=True)
class StagedModel:
    """The four artifact files in a local folder, plus what they say."""

    folder: Path
    config_doc: dict[str, Any]
    class_names: list[str]
    spec: PreprocessSpec

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.config_doc.get("meta") or {})

    def artifact_paths(self) -> dict[str, str]:
        return {k: str(self.folder / v) for k, v in ARTIFACT_FILES.items()}


def stage_model_dir(model_dir_uri: str, cfg: PipelineConfig, dest: Path) -> StagedModel:
    """Read ``config.json`` + ``model.safetensors`` from ``model_dir_uri`` (nothing else) and write
    the four artifact files into ``dest``."""
    def read(name: str) -> bytes:
        try:
            return st.read_bytes(st.join_uri(model_dir_uri, name), cfg.storage)
        except st.ObjectNotFound:
            raise RegisterError(
                f"model directory {redact_uri(model_dir_uri)} has no {name}; pass a folder written by "
                "vit_model's save_pretrained (config.json + model.safetensors), e.g. a train run's model/ folder"
            ) from None

    try:
        doc = json.loads(read("config.json"))
    except ValueError:
        raise RegisterError(f"{redact_uri(model_dir_uri)}/config.json is not valid JSON; re-export the model") from None
    if not isinstance(doc, dict) or doc.get("format") != "vit_model" or not isinstance(doc.get("config"), dict):
        raise RegisterError(
            f"{redact_uri(model_dir_uri)}/config.json is not a vit_model config (format 'vit_model'); "
            "convert the weights with vit_model.from_pretrained(...).save_pretrained(dir) first"
        )
    try:
        arch = arch_from_dict(doc)
    except (TypeError, ValueError) as exc:
        raise RegisterError(f"{redact_uri(model_dir_uri)}/config.json has an invalid architecture ({exc})") from None
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
        raise RegisterError(f"model {redact_uri(model_dir_uri)}: {exc}") from None

    dest.mkdir(parents=True, exist_ok=True)
    (dest / ARTIFACT_FILES["config"]).write_text(json.dumps(doc, indent=2, sort_keys=True))
    (dest / ARTIFACT_FILES["weights"]).write_bytes(weights)
    (dest / ARTIFACT_FILES["class_names"]).write_text(json.dumps([str(c) for c in class_names]))
    (dest / ARTIFACT_FILES["preprocessing"]).write_text(json.dumps(spec.to_dict(), indent=2))
    return StagedModel(dest, doc, [str(c) for c in class_names], spec)


def stage_code(dest: Path) -> list[str]:
    """Copy the code a packaged model runs (``vit_model/``, ``serving.py``, ``imaging.py``; sources only)."""
    shutil.copytree(VIT_MODEL_DIR, dest / "vit_model", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo"))
    shutil.copy2(SERVING_FILE, dest / "serving.py")
    shutil.copy2(IMAGING_FILE, dest / "imaging.py")
    return [str(dest / "vit_model"), str(dest / "serving.py"), str(dest / "imaging.py")]


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


def pip_requirements() -> list[str]:
    """Pinned runtime requirements of a packaged model (what serving.py and vit_model import)."""
    reqs = []
    for dist in ("mlflow", "torch", "safetensors", "numpy", "pandas", "pillow"):
        try:
            version = importlib.metadata.version(dist).split("+")[0]
            reqs.append(f"{dist}=={version}")
        except importlib.metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs
