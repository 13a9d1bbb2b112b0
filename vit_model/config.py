"""ViT configuration: one frozen dataclass with timm's field names, and one table of sizes.

Names follow timm (``vit_small_patch16``) and big_vision (``S/16``); any patch size works::

    >>> cfg = config_from_name("vit_small_patch16", num_classes=10)
    >>> cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size
    (384, 12, 6, 16)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from .arch import ArchConfig, check_rates, pair

# width, depth, heads, MLP width — ViT paper table 1, plus Ti/S from DeiT and M from timm.
SIZES: dict[str, dict[str, Any]] = {
    "Ti": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "S": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "M": dict(embed_dim=512, depth=12, num_heads=8, mlp_ratio=4.0),
    "B": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "H": dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
}
SIZE_NAMES = {"tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L", "huge": "H"}

GLOBAL_POOLS = ("token", "avg", "")
POS_EMBED_TYPES = ("learn", "sincos", "none")


@dataclass(frozen=True)
class ViTConfig(ArchConfig):
    """Everything that defines a ViT's architecture (timm's names where timm has one).

    ``img_size`` is the size the position embeddings are laid out for; other input sizes work at
    forward time (embeddings resampled). ``fc_norm=None`` means timm's default: normalise after
    pooling for ``avg`` pooling, before pooling (``norm``) otherwise.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # LayerScale init; None = no LayerScale
    class_token: bool = True
    reg_tokens: int = 0  # register tokens (Darcet et al., 2023)
    no_embed_class: bool = False  # True: position embeddings cover only patch tokens
    pos_embed: str = "learn"  # learn | sincos (fixed 2-D sin-cos) | none
    global_pool: str = "token"  # token | avg | "" (no pooling)
    fc_norm: bool | None = None
    final_norm: bool = True
    norm_eps: float = 1e-6  # timm/torchvision 1e-6, Hugging Face ViT 1e-12
    drop_rate: float = 0.0  # dropout before the head
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0  # dropout after attention projection and MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear over depth
    fused_attn: bool = True  # F.scaled_dot_product_attention; False = the eager path

    family: ClassVar[str] = "vit"
    STRUCTURAL: ClassVar[tuple[str, ...]] = (
        "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values",
        "class_token", "reg_tokens", "no_embed_class", "pos_embed",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", pair(self.img_size) if not isinstance(self.img_size, int) else self.img_size)
        h, w = self.img_hw
        checks = [
            (self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}"),
            (h % self.patch_size == 0 and w % self.patch_size == 0,
             f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}; pick sizes that are multiples"),
            (self.in_chans >= 1, f"in_chans must be >= 1, got {self.in_chans}"),
            (self.num_classes >= 0, f"num_classes must be >= 0 (0 = no head), got {self.num_classes}"),
            (self.depth >= 1 and self.num_heads >= 1, f"depth and num_heads must be >= 1, got {self.depth}, {self.num_heads}"),
            (self.embed_dim % self.num_heads == 0,
             f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"),
            (self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}"),
            (self.reg_tokens >= 0, f"reg_tokens must be >= 0, got {self.reg_tokens}"),
            (self.global_pool in GLOBAL_POOLS, f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}"),
            (self.pos_embed in POS_EMBED_TYPES, f"pos_embed must be one of {POS_EMBED_TYPES}, got {self.pos_embed!r}"),
            (self.class_token or self.global_pool != "token",
             "global_pool='token' needs class_token=True; use global_pool='avg' without a class token"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_rates(self, ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"))

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.img_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm



_NAME_RE = re.compile(r"^vit_(?P<size>tiny|small|medium|base|large|huge)_patch(?P<patch>\d+)(?:_(?P<img>\d+))?$")
_VARIANT_RE = re.compile(r"^(?P<size>Ti|S|M|B|L|H)/(?P<patch>\d+)$")


def match_name(name: str) -> dict[str, Any] | None:
    """``vit_small_patch16`` / ``vit_base_patch16_384`` / ``S/16`` -> ViTConfig fields; None if
    the name is not a ViT name."""
    m = _NAME_RE.match(name)
    if m:
        fields = dict(SIZES[SIZE_NAMES[m["size"]]], patch_size=int(m["patch"]))
        if m["img"]:
            fields["img_size"] = int(m["img"])
        return fields
    m = _VARIANT_RE.match(name)
    if m:
        return dict(SIZES[m["size"]], patch_size=int(m["patch"]))
    return None


def parse_name(name: str) -> dict[str, Any]:
    """Like :func:`match_name`, but an unknown name is a ValueError saying what names look like."""
    fields = match_name(name)
    if fields is not None:
        return fields
    raise ValueError(
        f"unknown model name {name!r}; use vit_<tiny|small|medium|base|large|huge>_patch<P>[_<img>] "
        f"(e.g. vit_small_patch16) or <Ti|S|M|B|L|H>/<P> (e.g. S/16)"
    )


def config_from_name(name: str, **overrides: Any) -> ViTConfig:
    """The named size with any ViTConfig field overridden."""
    fields = parse_name(name)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ViTConfig.from_dict(fields)


def available_models() -> list[str]:
    return [f"vit_{size}_patch{p}" for size in SIZE_NAMES for p in (4, 8, 14, 16, 32)]
