"""The files of a saved model: ``config.json`` + ``model.safetensors``, written atomically.

Weights are data that carry what is needed to use them: the architecture (``config``) and, in
``meta``, anything the caller wants to keep with them (preprocessing, class names, provenance).
Nothing here unpickles code: ``.safetensors`` files are plain tensors; legacy ``.pth/.bin`` files
are read only with ``torch.load(weights_only=True)`` and refused if they need more.
This module knows no model class (the model imports it to save itself).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "vit_model"
FORMAT_VERSION = 2  # 2 adds "family"; a version-1 file (no family) is a plain ViT


class UnsafeCheckpointError(ValueError):
    """A checkpoint needs arbitrary unpickling to load; it was not executed."""


# ------------------------------------------------------------------------------ saving


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: torch.nn.Module, directory: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` then ``config.json`` (each atomically; config last, so a
    directory with a config.json always has matching weights)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "family": model.cfg.family,
           "config": model.cfg.to_dict(), "meta": dict(meta or {})}
    text = json.dumps(doc, indent=2, sort_keys=True)
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(text))
    return out


# ------------------------------------------------------------------------------ loading files


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file, or from a pickle-based ``.pth/.pt/.bin`` file read
    with ``weights_only=True``. Wrapper dicts (``{"model": ...}``, ``{"state_dict": ...}``) and
    DDP ``module.`` prefixes are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        sd: Any = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "disallowed content"
            raise UnsafeCheckpointError(
                f"refusing to load {str(path)!r}: it needs unpickling beyond plain tensors ({first}); "
                f"it was not executed. Convert it to .safetensors in a trusted environment."
            ) from None
    for wrapper in ("model", "state_dict", "model_state", "module"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{str(path)!r} does not hold a flat state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


