"""Weights I/O: ``config.json`` + ``model.safetensors``; loading foreign checkpoints safely.

Weights are data that carry what is needed to use them: the architecture (``config``) and, in
``meta``, anything the caller wants to keep with them (preprocessing, class names, provenance).

Nothing here unpickles code. ``.safetensors`` files are plain tensors; legacy ``.pth/.bin`` files
are read only with ``torch.load(weights_only=True)``, and a file whose pickle references anything
but tensors is refused with :class:`UnsafeCheckpointError` before any of it runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .arch import ArchConfig
from .convert import detect_format, hf_config_to_vit, hf_to_timm, infer_config, to_timm
from .files import CONFIG_NAME, FORMAT, WEIGHTS_NAME, UnsafeCheckpointError, load_state_dict, save_pretrained
from .registry import arch_from_dict, build_model, family_of
from .surgery import adapt_input_conv

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "UnsafeCheckpointError", "load_state_dict", "save_pretrained",
           "adapt_state_dict", "from_pretrained"]

HUB_PREFIX = "hf-hub:"


# ------------------------------------------------------------------------------ adapting


def adapt_state_dict(state_dict: Mapping[str, torch.Tensor], src: ArchConfig, dst: ArchConfig) -> dict[str, torch.Tensor]:
    """Weights of architecture ``src`` made to fit ``dst`` (same family) which differs only in
    image size, input channels, class count or non-structural settings (dropout, pooling): the
    family resamples what depends on the image size, the first convolution is adapted to the
    channel count, the head is dropped (to be initialised fresh) when the class count changes."""
    differ = src.structural_differences(dst)
    if differ:
        name = differ[0]
        raise ValueError(f"cannot adapt weights: {name} differs ({getattr(src, name, src.family)} vs {getattr(dst, name, dst.family)})")
    model_cls = family_of(src).model_cls
    sd = dict(state_dict)
    if src.img_hw != dst.img_hw:
        sd = model_cls.adapt_img_size(sd, src, dst)
    if src.in_chans != dst.in_chans:
        if hasattr(model_cls, "adapt_in_chans"):  # an input layer that is not one convolution (T2T-ViT)
            sd = model_cls.adapt_in_chans(sd, src, dst)
        elif model_cls.first_conv in sd:
            sd[model_cls.first_conv] = adapt_input_conv(sd[model_cls.first_conv], dst.in_chans)
    if src.num_classes != dst.num_classes:
        for key in model_cls.head_keys:
            sd.pop(key, None)
    return sd


def build_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], src: ArchConfig, dst: ArchConfig | None = None
) -> nn.Module:
    """A model of architecture ``dst`` (default ``src``) holding ``state_dict`` (our keys)."""
    dst = dst or src
    sd = adapt_state_dict(state_dict, src, dst)
    model = build_model(dst)
    model_cls = type(model)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"weights do not match the architecture: {str(exc).strip().splitlines()[-1].strip()}") from None
    allowed_missing = set(model_cls.recomputed_keys(dst))
    if src.num_classes != dst.num_classes:
        allowed_missing |= set(model_cls.head_keys)
    bad_missing = sorted(set(missing) - allowed_missing)
    if bad_missing or unexpected:
        raise ValueError(f"weights do not match the architecture: missing {bad_missing[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model


# ------------------------------------------------------------------------------ from_pretrained


def _resolve_hub(ref: str) -> Path:
    repo_id = ref[len(HUB_PREFIX):]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - optional dependency
        raise ImportError(f"loading {ref!r} needs huggingface_hub: pip install 'vit-pipeline[hub]'") from None
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))


def read_pretrained(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ArchConfig | None, dict[str, Any]]:
    """(timm-keyed state dict, its config if known, meta) from any supported source."""
    ref = str(path)
    p = _resolve_hub(ref) if ref.startswith(HUB_PREFIX) else Path(ref)
    if p.is_dir():
        cfg_file = p / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{str(p)!r} has no {CONFIG_NAME}; pass a weights file or a saved model directory")
        doc = json.loads(cfg_file.read_text())
        if doc.get("format") == FORMAT:
            return load_state_dict(p / WEIGHTS_NAME), arch_from_dict(doc), doc.get("meta", {})
        if doc.get("model_type") == "vit":  # a Hugging Face save_pretrained directory
            weights = next((p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"Hugging Face directory {str(p)!r} has no model.safetensors or pytorch_model.bin")
            sd = hf_to_timm(load_state_dict(weights))
            cfg = hf_config_to_vit(doc)
            if "head.weight" not in sd:
                cfg = cfg.replace(num_classes=0)
            labels = doc.get("id2label") or {}
            meta = {"class_names": [labels[k] for k in sorted(labels, key=int)]} if labels and "head.weight" in sd else {}
            return sd, cfg, meta
        raise ValueError(f"{str(cfg_file)!r} is neither a vit_model nor a Hugging Face ViT config")
    sd = load_state_dict(p)
    fmt = detect_format(sd)
    sd = to_timm(sd)
    return sd, None, {"source_format": fmt}


def from_pretrained(
    path: str | os.PathLike,
    *,
    config: ArchConfig | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    return_meta: bool = False,
    **config_overrides: Any,
):
    """Load a model from a saved directory (any family), a Hugging Face ViT directory, a ViT
    weights file (timm, torchvision or HF keys) or ``hf-hub:org/name``, adapted to
    ``num_classes``/``img_size``/``in_chans`` when given.

    For bare ViT weights files the architecture is inferred from tensor shapes; pass ``config``
    (any family's) or ``num_heads=`` when the width is not in the size table. Other keyword
    arguments override non-structural config fields (e.g. ``drop_path_rate=0.1``).
    """
    if config is not None and config.family != "vit" and Path(str(path)).is_file():
        sd, src_cfg, meta = load_state_dict(path), config, {}  # our keys: no foreign-format conversion
    else:
        sd, src_cfg, meta = read_pretrained(path)
    if config is not None:
        src_cfg = config
    if src_cfg is None:
        src_cfg = infer_config(sd, num_heads=config_overrides.pop("num_heads", None))
    changes = {k: v for k, v in dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans).items() if v is not None}
    dst_cfg = src_cfg.replace(**changes, **config_overrides)
    model = build_from_state_dict(sd, src_cfg, dst_cfg)
    return (model, meta) if return_meta else model
