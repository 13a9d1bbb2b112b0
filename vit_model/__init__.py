"""Readable, reference-exact PyTorch vision transformers (nothing about Ray or MLflow here).

Families: the original ViT (``vit``), conv-stem / CCT hybrids (``hybrid``), Tokens-to-Token
ViT (``t2t``) and Swin (``swin``); see :mod:`vit_model.registry`.

    from vit_model import ViTConfig, VisionTransformer, create_model, from_pretrained

    model = create_model("vit_small_patch16", num_classes=10)
    model = create_model("swin_tiny_patch4_window7_224", num_classes=10, in_chans=1)
    model = VisionTransformer(ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10,
                                        embed_dim=192, depth=6, num_heads=3))
    heat = attention_heatmap(model, images)  # (B, H, W) in [0, 1]: attention rollout, any family
    model.save_pretrained("out/")            # config.json (with the family) + model.safetensors
    model = from_pretrained("out/")          # also HF dirs, timm/torchvision ViT weights files
"""

from .arch import ArchConfig
from .config import SIZES, ViTConfig, parse_name
from .explain import attention_heatmap, attention_rollout, explain
from .hybrid import HybridConfig, HybridViT
from .layers import to_preferred_memory_format
from .model import VisionTransformer
from .registry import (
    FAMILIES,
    arch_from_dict,
    arch_to_dict,
    available_models,
    build_model,
    config_from_name,
    flops_per_image,
    get_family,
    parse_model_name,
)
from .surgery import adapt_input_conv, resample_pos_embed, sincos_pos_embed_2d
from .swin import SwinConfig, SwinTransformer
from .t2t import T2TConfig, T2TViT
from .weights import UnsafeCheckpointError, adapt_state_dict, from_pretrained, load_state_dict, save_pretrained


def create_model(name: str, pretrained: str | None = None, **overrides):
    """A model by name (``vit_small_patch16``, ``S/16``, ``swin_tiny_patch4_window7_224``,
    ``t2t_vit_14``, a bare family name, ...) with any of its family's arguments overridden,
    optionally initialised from ``pretrained`` weights (adapted to the overrides)."""
    cfg = config_from_name(name, **overrides)
    if pretrained is None:
        return build_model(cfg)
    return from_pretrained(pretrained, num_classes=cfg.num_classes, img_size=cfg.img_size, in_chans=cfg.in_chans)


__all__ = [
    "FAMILIES", "SIZES", "ArchConfig", "HybridConfig", "HybridViT", "SwinConfig", "SwinTransformer", "T2TConfig",
    "T2TViT", "ViTConfig", "VisionTransformer", "UnsafeCheckpointError", "adapt_input_conv",
    "adapt_state_dict", "arch_from_dict", "arch_to_dict", "attention_heatmap", "attention_rollout", "available_models",
    "build_model", "config_from_name", "create_model", "explain", "flops_per_image", "from_pretrained", "get_family",
    "load_state_dict", "parse_model_name", "parse_name", "resample_pos_embed", "save_pretrained", "sincos_pos_embed_2d",
    "to_preferred_memory_format",
]
