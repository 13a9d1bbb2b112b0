"""A readable, timm-compatible PyTorch Vision Transformer (nothing about Ray or MLflow here).

    from vit_model import ViTConfig, VisionTransformer, create_model, from_pretrained

    model = create_model("vit_small_patch16", num_classes=10)
    model = VisionTransformer(ViTConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10,
                                        embed_dim=192, depth=6, num_heads=3))
    model.save_pretrained("out/")            # config.json + model.safetensors
    model = from_pretrained("out/")          # also HF dirs, timm/torchvision weights files
"""

from .config import SIZES, ViTConfig, available_models, config_from_name, parse_name
from .model import VisionTransformer, flops_per_image
from .surgery import adapt_input_conv, resample_pos_embed, sincos_pos_embed_2d
from .weights import UnsafeCheckpointError, adapt_state_dict, from_pretrained, load_state_dict, save_pretrained


def create_model(name: str, pretrained: str | None = None, **overrides) -> VisionTransformer:
    """A model by name (``vit_small_patch16``, ``S/16``) with ViTConfig fields overridden,
    optionally initialised from ``pretrained`` weights (adapted to the overrides)."""
    cfg = config_from_name(name, **overrides)
    if pretrained is None:
        return VisionTransformer(cfg)
    return from_pretrained(pretrained, num_classes=cfg.num_classes, img_size=cfg.img_size, in_chans=cfg.in_chans)


__all__ = [
    "SIZES", "ViTConfig", "VisionTransformer", "UnsafeCheckpointError", "adapt_input_conv", "adapt_state_dict",
    "available_models", "config_from_name", "create_model", "flops_per_image", "from_pretrained",
    "load_state_dict", "parse_name", "resample_pos_embed", "save_pretrained", "sincos_pos_embed_2d",
]
