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

from .config import ViTConfig
from .convert import detect_format, hf_config_to_vit, hf_to_timm, infer_config, to_timm
from .files import CONFIG_NAME, FORMAT, WEIGHTS_NAME, UnsafeCheckpointError, load_state_dict, save_pretrained
from .model import VisionTransformer
from .surgery import adapt_input_conv, resample_pos_embed

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "UnsafeCheckpointError", "load_state_dict", "save_pretrained",
           "adapt_state_dict", "from_pretrained"]

HUB_PREFIX = "hf-hub:"


# ------------------------------------------------------------------------------ adapting


def adapt_state_dict(state_dict: Mapping[str, torch.Tensor], src: ViTConfig, dst: ViTConfig) -> dict[str, torch.Tensor]:
    """Weights of architecture ``src`` made to fit ``dst`` which differs only in image size,
    input channels or number of classes: position embeddings resampled, the patch kernel adapted,
    the head dropped (to be initialised fresh) when the class count changes."""
    structural = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "class_token", "reg_tokens", "no_embed_class", "pos_embed")
    for name in structural:
        if getattr(src, name) != getattr(dst, name):
            raise ValueError(f"cannot adapt weights: {name} differs ({getattr(src, name)} vs {getattr(dst, name)})")
    sd = dict(state_dict)
    if src.grid_size != dst.grid_size and "pos_embed" in sd:
        n_prefix = 0 if src.no_embed_class else src.num_prefix_tokens
        if dst.pos_embed == "sincos":
            sd.pop("pos_embed")  # recomputed exactly by the model for the new grid
        else:
            sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], dst.grid_size, src.grid_size, n_prefix)
    if src.in_chans != dst.in_chans:
        sd["patch_embed.proj.weight"] = adapt_input_conv(sd["patch_embed.proj.weight"], dst.in_chans)
    if src.num_classes != dst.num_classes:
        sd.pop("head.weight", None)
        sd.pop("head.bias", None)
    return sd


def build_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], src: ViTConfig, dst: ViTConfig | None = None
) -> VisionTransformer:
    """A model of architecture ``dst`` (default ``src``) holding ``state_dict`` (timm keys)."""
    dst = dst or src
    sd = adapt_state_dict(state_dict, src, dst)
    model = VisionTransformer(dst)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = set()
    if src.num_classes != dst.num_classes:
        allowed_missing |= {"head.weight", "head.bias"}
    if dst.pos_embed == "sincos":
        allowed_missing.add("pos_embed")
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


def read_pretrained(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ViTConfig | None, dict[str, Any]]:
    """(timm-keyed state dict, its config if known, meta) from any supported source."""
    ref = str(path)
    p = _resolve_hub(ref) if ref.startswith(HUB_PREFIX) else Path(ref)
    if p.is_dir():
        cfg_file = p / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{str(p)!r} has no {CONFIG_NAME}; pass a weights file or a saved model directory")
        doc = json.loads(cfg_file.read_text())
        if doc.get("format") == FORMAT:
            return load_state_dict(p / WEIGHTS_NAME), ViTConfig.from_dict(doc["config"]), doc.get("meta", {})
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
    config: ViTConfig | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    return_meta: bool = False,
    **config_overrides: Any,
):
    """Load a ViT from a saved directory, a Hugging Face directory, a weights file (timm,
    torchvision or HF keys) or ``hf-hub:org/name``, adapted to ``num_classes``/``img_size``/
    ``in_chans`` when given.

    For bare weights files the architecture is inferred from tensor shapes; pass ``config`` or
    ``num_heads=`` when the width is not in the size table. Other keyword arguments override
    non-structural config fields (e.g. ``drop_path_rate=0.1``).
    """
    sd, src_cfg, meta = read_pretrained(path)
    if config is not None:
        src_cfg = config
    if src_cfg is None:
        src_cfg = infer_config(sd, num_heads=config_overrides.pop("num_heads", None))
    changes = {k: v for k, v in dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans).items() if v is not None}
    dst_cfg = src_cfg.replace(**changes, **config_overrides)
    model = build_from_state_dict(sd, src_cfg, dst_cfg)
    return (model, meta) if return_meta else model
