"""The ViT as an MLflow pyfunc model, built from data files only (safetensors + JSON), never pickle.

:class:`ViTClassifier` loads the four artifact files of :data:`ARTIFACT_FILES` (architecture,
weights, class names, :class:`PreprocessSpec`) and scores encoded images (``predict``: a DataFrame
with an ``image`` column -> label, label_name, probabilities, error per row) or decoded pixels
(``predict_proba``). Images are decoded by :mod:`pipelines.imaging`, exactly as prepare stores them.
This file and ``imaging.py`` import nothing from ``pipelines``: both ship inside every registered
model (``code/``), where this file is loaded by path. Package layout and guarantees: docs/registry.md.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image

from vit_model import arch_from_dict, build_model, load_state_dict, to_preferred_memory_format


def _sibling_module(name: str):
    """``name.py`` beside this file, loaded by path under a name unique to this folder (inside a
    packaged model this file is itself loaded by path, with no package around it)."""
    import hashlib
    import importlib.util
    import sys

    path = Path(__file__).resolve().with_name(f"{name}.py")
    unique = f"vit_{name}_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if unique not in sys.modules:
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[unique]


try:
    from . import imaging  # the source tree: pipelines.imaging
except ImportError:  # inside a packaged model: code/serving.py and code/imaging.py, no package
    imaging = _sibling_module("imaging")

InvalidInput = imaging.InvalidImage  # one input cannot be scored; str(exc) is its error column
convert_pixels = imaging.convert_pixels
resize_center_crop = imaging.resize_center_crop

ARTIFACT_FILES = {
    "config": "config.json",
    "weights": "model.safetensors",
    "class_names": "class_names.json",
    "preprocessing": "preprocessing.json",
}
INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("label", "label_name", "probabilities", "error")
RESIZE_MODE = "shorter-side-bicubic-center-crop"

# --------------------------------------------------------------------------------------------
# Preprocessing spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessSpec:
    """How raw pixels become the model's input. Stored as ``preprocessing.json`` with the weights."""

    channels: int  # 1 (gray, "L") or 3 ("RGB")
    image_size: tuple[int, int]  # (H, W) the model expects
    mean: tuple[float, ...]  # per channel, on pixels scaled to [0, 1]
    std: tuple[float, ...]
    alpha_background: int = 255  # gray level transparent pixels are composited onto
    max_pixels: int = 50_000_000  # decompression-bomb guard, checked from the header
    resize: str = RESIZE_MODE

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"preprocessing {name} {list(values)} must have 1 or {self.channels} values")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"preprocessing std {list(self.std)} must be positive")
        if self.resize != RESIZE_MODE:
            raise ValueError(f"preprocessing resize {self.resize!r} is not supported (only {RESIZE_MODE!r})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels, "image_size": list(self.image_size), "mean": list(self.mean),
            "std": list(self.std), "alpha_background": self.alpha_background, "max_pixels": self.max_pixels,
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        size = d["image_size"]
        hw = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        return cls(
            channels=int(d["channels"]), image_size=hw,
            mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
            alpha_background=int(d.get("alpha_background", 255)), max_pixels=int(d.get("max_pixels", 50_000_000)),
            resize=str(d.get("resize", RESIZE_MODE)),
        )


# --------------------------------------------------------------------------------------------
# Decoding: pipelines.imaging, the same module prepare uses (shipped beside this file)
# --------------------------------------------------------------------------------------------


def decode_image_bytes(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Encoded image -> uint8 pixels (H, W) or (H, W, 3) at the model's size; :class:`InvalidInput`."""
    return imaging.decode(data, channels=spec.channels, max_pixels=spec.max_pixels,
                          alpha_background=spec.alpha_background, size=spec.image_size).pixels


def pixels_to_tensor(pixels: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W), (H, W, C), or a batch (N, H, W) / (N, H, W, C) -> uint8 tensor (N, C, H, W)."""
    arr = np.stack(list(pixels)) if not isinstance(pixels, np.ndarray) else pixels
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3:  # (N, H, W): gray
        arr = arr[:, None, :, :]  # (N, H, W) -> (N, 1, H, W)
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    else:
        raise ValueError(f"expected pixels shaped (N, H, W) or (N, H, W, C), got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # the REST scoring server and JSON examples carry binary as base64
        try:
            return base64.b64decode("".join(value.split()), validate=True)  # MIME base64 wraps lines
        except (binascii.Error, ValueError):
            raise InvalidInput("a text value in the image column is not base64-encoded image bytes") from None
    raise InvalidInput(f"the image column holds {type(value).__name__}; expected encoded image bytes")


# --------------------------------------------------------------------------------------------
# The pyfunc model
# --------------------------------------------------------------------------------------------


class ViTClassifier(mlflow.pyfunc.PythonModel):
    """Image classifier over a vit_model ViT; state comes only from the artifact files.

    Load it through MLflow (``mlflow.pyfunc.load_model("models:/NAME@champion")``) or directly
    from files with :meth:`from_artifacts`. The device is ``model_config["device"]`` when given
    (``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})``), else CUDA if available.
    """

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.spec: PreprocessSpec | None = None
        self.class_names: list[str] = []
        self.device = torch.device("cpu")
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None

    # ---------------------------------------------------------------- loading

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        device = (context.model_config or {}).get("device")
        self.load_artifacts(context.artifacts, device=device)

    def load_artifacts(self, paths: Mapping[str, str], device: str | None = None) -> ViTClassifier:
        """Build the model from the artifact files named in :data:`ARTIFACT_FILES`."""
        missing = sorted(set(ARTIFACT_FILES) - set(paths))
        if missing:
            raise ValueError(f"the packaged model lacks artifact(s) {missing}; re-register it")
        doc = json.loads(Path(paths["config"]).read_text())
        cfg = arch_from_dict(doc)  # any vit_model family; config.json names it
        model = build_model(cfg)
        model.load_state_dict(load_state_dict(paths["weights"]), strict=True)  # safetensors: no pickle
        self.spec = PreprocessSpec.from_dict(json.loads(Path(paths["preprocessing"]).read_text()))
        self.class_names = [str(c) for c in json.loads(Path(paths["class_names"]).read_text())]
        if len(self.class_names) != cfg.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for a model with {cfg.num_classes} classes")
        if self.spec.channels != cfg.in_chans:
            raise ValueError(f"preprocessing gives {self.spec.channels} channels; the model takes {cfg.in_chans}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = to_preferred_memory_format(model.eval().to(self.device))
        c = self.spec.channels
        self._mean = torch.tensor(self.spec.mean, dtype=torch.float32).expand(c).reshape(1, c, 1, 1).to(self.device)
        self._std = torch.tensor(self.spec.std, dtype=torch.float32).expand(c).reshape(1, c, 1, 1).to(self.device)
        return self

    @classmethod
    def from_artifacts(cls, directory: str | Path, device: str | None = None) -> ViTClassifier:
        """A classifier from a folder holding the four artifact files (e.g. a downloaded model's
        ``artifacts/`` folder)."""
        folder = Path(directory)
        return cls().load_artifacts({k: str(folder / v) for k, v in ARTIFACT_FILES.items()}, device=device)

    # ---------------------------------------------------------------- inference

    @torch.inference_mode()
    def predict_proba(self, images: torch.Tensor | np.ndarray, batch_size: int = 256, *, normalized: bool = False) -> torch.Tensor:
        """Class probabilities (N, num_classes), float32 on the CPU.

        ``images`` is (N, C, H, W) at the model's size: uint8 pixels, or float pixels already
        scaled to [0, 1]; both are normalised with the packaged mean/std unless ``normalized``.
        A numpy array of uint8 (N, H, W) or (N, H, W, C) pixels is accepted too.
        """
        model, spec = self._ready()
        if isinstance(images, np.ndarray):
            images = pixels_to_tensor(images)
        if images.ndim != 4 or images.shape[1] != spec.channels or tuple(images.shape[2:]) != spec.image_size:
            raise ValueError(
                f"expected images shaped (N, {spec.channels}, {spec.image_size[0]}, {spec.image_size[1]}), "
                f"got {tuple(images.shape)}; decode with decode_image_bytes() or resize first"
            )
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(self.device, non_blocking=True)
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            if not normalized:
                x = (x - self._mean) / self._std
            out.append(model(x).float().softmax(dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.class_names))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """pyfunc entry: DataFrame with an ``image`` column of encoded bytes -> one row per image."""
        _, spec = self._ready()
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            cols = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise ValueError(f"expected a DataFrame with an {INPUT_COLUMN!r} column of encoded image bytes, got {cols}")
        batch_size = int((params or {}).get("batch_size", 256))
        pixels, ok_rows, errors = [], [], [""] * len(model_input)
        for i, value in enumerate(model_input[INPUT_COLUMN].tolist()):
            try:
                pixels.append(decode_image_bytes(_as_bytes(value), spec))
                ok_rows.append(i)
            except InvalidInput as exc:
                errors[i] = str(exc)
        labels = [-1] * len(model_input)
        names = [""] * len(model_input)
        probs: list[list[float]] = [[] for _ in range(len(model_input))]
        if pixels:
            p = self.predict_proba(pixels_to_tensor(pixels), batch_size=batch_size)
            top = p.argmax(dim=1).tolist()
            for row, label, row_probs in zip(ok_rows, top, p.double().tolist()):
                labels[row], names[row], probs[row] = label, self.class_names[label], row_probs
        return pd.DataFrame({"label": labels, "label_name": names, "probabilities": probs, "error": errors},
                            index=model_input.index)

    def _ready(self) -> tuple[torch.nn.Module, PreprocessSpec]:
        if self.model is None or self.spec is None:
            raise RuntimeError("ViTClassifier has no weights yet: load it with mlflow.pyfunc.load_model or from_artifacts")
        return self.model, self.spec


# --------------------------------------------------------------------------------------------
# Contract: signature and input example
# --------------------------------------------------------------------------------------------


def model_signature() -> Any:
    """The pyfunc signature: ``image`` (binary) in; label, label_name, probabilities, error out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("binary", INPUT_COLUMN)])
    outputs = Schema([
        ColSpec("long", "label"), ColSpec("string", "label_name"),
        ColSpec(Array("double"), "probabilities"), ColSpec("string", "error"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(spec: PreprocessSpec) -> pd.DataFrame:
    """One mid-gray PNG at the model's size (stored as JSON with base64 by MLflow)."""
    h, w = spec.image_size
    shape = (h, w) if spec.channels == 1 else (h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 128, dtype=np.uint8)).save(buf, format="PNG")
    return pd.DataFrame({INPUT_COLUMN: [buf.getvalue()]})
