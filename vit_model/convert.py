"""State-dict conversion to our (timm) keys: one rename table per foreign format.

Each converter is a pure function ``foreign state dict -> timm-keyed state dict`` and proves
itself in the tests by comparing logits with the original implementation for the same weights.

    Hugging Face ``ViTModel`` / ``ViTForImageClassification`` (transformers)
    torchvision ``vit_b_16`` family (``torchvision.models.VisionTransformer``)
    timm ``VisionTransformer`` (identity)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .config import SIZES, ViTConfig

Tensor = torch.Tensor

# ------------------------------------------------------------------------------ detection


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """'timm', 'hf' or 'torchvision' from the keys; ValueError otherwise."""
    keys = set(state_dict)
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf"
    if "conv_proj.weight" in keys:
        return "torchvision"
    sample = ", ".join(sorted(keys)[:5])
    raise ValueError(f"unrecognised ViT state dict (first keys: {sample}); expected timm, Hugging Face or torchvision keys")


# ------------------------------------------------------------------------------ Hugging Face

# Saved checkpoints (the hub's format) use ``encoder.layer.{i}.attention.attention.query``;
# transformers >= 5 modules in memory use ``layers.{i}.attention.q_proj``. Both are accepted.
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_HF_QKV = {
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
}
_HF_LAYER_MAP = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def hf_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ViT keys -> timm keys; separate q/k/v projections are fused into ``qkv``.

    The ``pooler`` of ``ViTModel`` (dense + tanh, not part of the ViT classifier) is dropped.
    """
    sd = {k.removeprefix("vit."): v for k, v in state_dict.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key.startswith("pooler."):
            continue
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("classifier."):
            out["head." + key.rsplit(".", 1)[1]] = value
        elif m := _HF_LAYER.match(key):
            i, (name, param) = int(m[1]), m[2].rsplit(".", 1)
            if name in _HF_QKV:
                qkv.setdefault(i, {})[f"{_HF_QKV[name]}.{param}"] = value
                continue
            if name not in _HF_LAYER_MAP:
                raise ValueError(f"unexpected Hugging Face ViT key {key!r}")
            out[f"blocks.{i}.{_HF_LAYER_MAP[name]}.{param}"] = value
        elif key == "embeddings.mask_token":
            continue  # only used for masked image modelling
        else:
            raise ValueError(f"unexpected Hugging Face ViT key {key!r}")
    for i, parts in qkv.items():
        # q, k, v projections (D, D) each -> one fused qkv projection (3*D, D), in timm's order
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([parts["q.weight"], parts["k.weight"], parts["v.weight"]])
        if "q.bias" in parts:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([parts["q.bias"], parts["k.bias"], parts["v.bias"]])
    return out


def hf_config_to_vit(hf: Mapping[str, Any]) -> ViTConfig:
    """A transformers ``ViTConfig`` (as dict, i.e. its config.json) -> our ViTConfig."""
    if hf.get("model_type", "vit") != "vit":
        raise ValueError(f"Hugging Face model_type {hf.get('model_type')!r} is not a plain ViT")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"Hugging Face hidden_act {act!r} is not supported (only exact 'gelu')")
    id2label = hf.get("id2label") or {}
    num_labels = hf.get("num_labels", len(id2label) or 0)
    return ViTConfig(
        img_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16),
        in_chans=hf.get("num_channels", 3),
        num_classes=num_labels,
        embed_dim=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        mlp_ratio=hf["intermediate_size"] / hf["hidden_size"],
        qkv_bias=hf.get("qkv_bias", True),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
    )


# ------------------------------------------------------------------------------ torchvision

_TV_LAYER = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
_TV_LAYER_MAP = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.weight": "attn.proj.weight",
    "self_attention.out_proj.bias": "attn.proj.bias",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    "mlp.linear_1": "mlp.fc1",  # torchvision < 0.12 names
    "mlp.linear_2": "mlp.fc2",
}


def torchvision_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ``VisionTransformer`` keys -> timm keys (``in_proj`` is already q|k|v fused)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "class_token":
            out["cls_token"] = value
        elif key == "encoder.pos_embedding":
            out["pos_embed"] = value
        elif key.startswith("conv_proj."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("encoder.ln."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("heads.head."):
            out["head." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("heads.pre_logits"):
            raise ValueError("torchvision ViT with a representation layer (heads.pre_logits) is not supported")
        elif m := _TV_LAYER.match(key):
            i, rest = int(m[1]), m[2]
            for src, dst in _TV_LAYER_MAP.items():
                if rest == src or rest.startswith(src + "."):
                    out[f"blocks.{i}.{dst}{rest[len(src):]}"] = value
                    break
            else:
                raise ValueError(f"unexpected torchvision ViT key {key!r}")
        else:
            raise ValueError(f"unexpected torchvision ViT key {key!r}")
    return out


# ------------------------------------------------------------------------------ config inference


def infer_config(state_dict: Mapping[str, Tensor], **overrides: Any) -> ViTConfig:
    """Architecture from a timm-keyed state dict's shapes.

    Head count is not visible in shapes: it comes from ``overrides`` or the size table by width
    (Ti 3, S 6, M 8, B 12, L/H 16). ``img_size`` is inferred for square grids.
    """
    w = state_dict["patch_embed.proj.weight"]  # (D, C, P, P)
    D, C, P = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    fields: dict[str, Any] = dict(embed_dim=D, in_chans=C, patch_size=P, depth=depth)
    fields["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / D
    fields["qkv_bias"] = "blocks.0.attn.qkv.bias" in state_dict
    fields["qk_norm"] = "blocks.0.attn.q_norm.weight" in state_dict
    if "blocks.0.ls1.gamma" in state_dict:
        fields["init_values"] = 1.0  # actual values come from the weights
    fields["class_token"] = "cls_token" in state_dict
    fields["reg_tokens"] = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    head = state_dict.get("head.weight")
    fields["num_classes"] = head.shape[0] if head is not None else 0
    fields["fc_norm"] = "fc_norm.weight" in state_dict
    fields["global_pool"] = "avg" if fields["fc_norm"] or not fields["class_token"] else "token"
    n_prefix = int(fields["class_token"]) + fields["reg_tokens"]
    if "pos_embed" in state_dict:
        n_pos = state_dict["pos_embed"].shape[1]
        side = int(round((n_pos - n_prefix) ** 0.5))
        if side * side == n_pos - n_prefix:
            fields["img_size"] = side * P
        else:  # position embeddings only for patches
            side = int(round(n_pos**0.5))
            fields["img_size"], fields["no_embed_class"] = side * P, True
    else:
        fields["pos_embed"] = "none"
    heads = {s["embed_dim"]: s["num_heads"] for s in SIZES.values()}
    fields["num_heads"] = heads.get(D, max(1, D // 64))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ViTConfig.from_dict(fields)


def to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any supported format -> timm keys."""
    fmt = detect_format(state_dict)
    if fmt == "hf":
        return hf_to_timm(state_dict)
    if fmt == "torchvision":
        return torchvision_to_timm(state_dict)
    return dict(state_dict)
