"""Convolutional tokenizers in front of a ViT: one family, two tokenizer styles.

``stem="conv"`` — "Early Convolutions Help Transformers See Better" (Xiao et al., 2021):
    k×k convolutions (no bias) each followed by BatchNorm and ReLU, then a 1×1 convolution (with
    bias) to the width, replace the P×P patchify convolution; a standard pre-norm ViT follows
    (class token, learned position embeddings). State-dict keys are timm's for
    ``VisionTransformer(embed_layer=HybridEmbed(backbone=ConvStem(...), proj=False))``, so weights
    move to and from timm with ``load_state_dict(strict=True)``.

``stem="cct"`` — Compact Convolutional Transformer (Hassani et al., 2021, "Escaping the Big
    Data Paradigm with Compact Transformers"): k×k convolutions (no bias) each followed by ReLU
    and an optional max-pool, the last one producing the width; no class token; learnable, sine
    or no position embeddings; CCT blocks (the residual stream is normalised before the MLP,
    ``Block(norm_layout="cct")``); sequence pooling: a Linear(D, 1) scores every token, softmax
    over tokens, weighted sum. :func:`convert_cct_state_dict` maps the reference implementations'
    keys (SHI-Labs/Compact-Transformers, vit-pytorch's ``cct``) to ours.

Both styles describe the stem the same way: ``stem_strides`` has one stride per k×k convolution
(kernel ``stem_kernel``). ``stem_channels`` lists their output widths; in the conv style every
k×k conv has a listed width and a 1×1 conv maps the last one to ``embed_dim``, in the CCT style
the last k×k conv outputs ``embed_dim`` itself, so ``stem_channels`` lists one width fewer::

    >>> cfg = config_from_name("cct_7_3x2_32")       # 3 -> 64 -> 256 channels, two 3x3 convs
    >>> cfg.stem_channels, cfg.stem_strides, cfg.grid_size
    ((64,), (1, 1), (8, 8))
    >>> config_from_name("vit_small_convstem").stem_channels      # four stride-2 3x3 convs, /16
    (48, 96, 192, 384)

Fields left as ``None`` take the style's value from :data:`STYLE_DEFAULTS` when the config is
built (the stored config is always explicit): the conv style is timm's ViT (class token, token
pooling, qkv bias, LayerNorm eps 1e-6, pre-norm blocks), the CCT style is the reference CCT
(no class token, sequence pooling, no qkv bias, eps 1e-5, CCT blocks, 3/2/1 max-pools).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .arch import ArchConfig, check, check_rates, pair
from .base import TokenModel
from .explain import token_readout
from .layers import Block, drop_path_rates, run_checkpointed
from .surgery import resample_pos_embed

__all__ = ["HybridConfig", "HybridViT", "available_models", "convert_cct_state_dict", "hybrid_flops", "match_name",
           "sine_pos_embed", "stem_plan"]

STEMS = ("conv", "cct")
POS_EMBED_TYPES = ("learn", "sine", "none")
GLOBAL_POOLS = ("token", "avg", "seq")
NORM_LAYOUTS = ("pre", "cct")

# What a field left as None becomes, per tokenizer style.
STYLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "conv": dict(stem_channels=(24, 48, 96, 192), stem_strides=(2, 2, 2, 2), stem_pool_kernel=0,
                 class_token=True, global_pool="token", qkv_bias=True, norm_layout="pre", norm_eps=1e-6),
    "cct": dict(stem_channels=(), stem_strides=(1,), stem_pool_kernel=3,
                class_token=False, global_pool="seq", qkv_bias=False, norm_layout="cct", norm_eps=1e-5),
}


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class HybridConfig(ArchConfig):
    """A conv-stem ViT or a CCT. Defaults (a bare ``"hybrid"``) are ViTC-1GF at 224×224.

    ``stem_padding=None`` pads each k×k conv the reference's way: ``((s - 1) + (k - 1)) // 2``
    for the conv style (timm's), ``max(1, k // 2)`` for CCT. ``stem_pool_kernel=0`` means no
    max-pool; otherwise every k×k conv is followed by ``MaxPool2d(stem_pool_kernel,
    stem_pool_stride, stem_pool_padding)``. ``img_size`` is the size the position embeddings are
    laid out for; any input size the stem admits works at forward time (learned embeddings are
    resampled, sine ones recomputed).
    """

    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    stem: str = "conv"  # conv (Xiao et al.) | cct (Hassani et al.)
    stem_channels: tuple[int, ...] | None = None  # widths of the k×k convs (CCT: all but the last)
    stem_strides: tuple[int, ...] | None = None  # one per k×k conv
    stem_kernel: int = 3
    stem_padding: int | None = None
    stem_pool_kernel: int | None = None  # max-pool after each k×k conv; 0 = none
    stem_pool_stride: int = 2
    stem_pool_padding: int = 1
    embed_dim: int = 192
    depth: int = 11
    num_heads: int = 3
    mlp_ratio: float = 3.0
    qkv_bias: bool | None = None
    class_token: bool | None = None
    pos_embed: str = "learn"  # learn | sine (CCT's 1-D sinusoid over token index) | none
    global_pool: str | None = None  # token | avg | seq (sequence pooling)
    norm_layout: str | None = None  # pre (ViT) | cct (norm the residual stream before the MLP)
    norm_eps: float | None = None
    drop_rate: float = 0.0  # dropout before the head
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0  # dropout after attention projection and MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear over depth
    fused_attn: bool = True  # F.scaled_dot_product_attention; False = the eager path

    family: ClassVar[str] = "hybrid"
    # The stem's geometry (padding and pooling too) sets the token grid the weights were trained on.
    STRUCTURAL: ClassVar[tuple[str, ...]] = (
        "stem", "stem_channels", "stem_strides", "stem_kernel", "stem_padding", "stem_pool_kernel", "stem_pool_stride",
        "stem_pool_padding", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token", "pos_embed",
        "global_pool", "norm_layout",
    )

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("img_size", self.img_size if isinstance(self.img_size, int) else pair(self.img_size))
        check([(self.stem in STEMS, f"stem must be one of {STEMS}, got {self.stem!r}")])
        for name, value in STYLE_DEFAULTS[self.stem].items():
            if getattr(self, name) is None:
                put(name, value)
        for name in ("stem_channels", "stem_strides"):
            value = getattr(self, name)
            check([(isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value),
                    f"{name} must be a tuple of ints, got {value!r}")])
            put(name, tuple(value))
        n_convs, n_widths = len(self.stem_strides), len(self.stem_channels)
        want_widths = n_convs if self.stem == "conv" else n_convs - 1
        h, w = self.img_hw
        check([
            (h >= 1 and w >= 1, f"img_size must be positive, got {self.img_size}"),
            (self.in_chans >= 1, f"in_chans must be >= 1, got {self.in_chans}"),
            (self.num_classes >= 0, f"num_classes must be >= 0 (0 = no head), got {self.num_classes}"),
            (n_convs >= 1, f"stem_strides must list at least one stride, got {self.stem_strides}"),
            (all(s >= 1 for s in self.stem_strides), f"stem_strides must all be >= 1, got {self.stem_strides}"),
            (n_widths == want_widths,
             f"stem_channels {self.stem_channels} must list {want_widths} width(s) for stem={self.stem!r} with "
             f"stem_strides {self.stem_strides} ({'one per k×k conv' if self.stem == 'conv' else 'one per k×k conv but the last, which outputs embed_dim'})"),
            (all(c >= 1 for c in self.stem_channels), f"stem_channels must all be >= 1, got {self.stem_channels}"),
            (self.stem_kernel >= 1, f"stem_kernel must be >= 1, got {self.stem_kernel}"),
            (self.stem_padding is None or self.stem_padding >= 0,
             f"stem_padding must be >= 0 or None (the style's default), got {self.stem_padding}"),
            (self.stem_pool_kernel >= 0, f"stem_pool_kernel must be >= 0 (0 = no max-pool), got {self.stem_pool_kernel}"),
            (self.stem_pool_kernel == 0 or self.stem_pool_stride >= 1,
             f"stem_pool_stride must be >= 1, got {self.stem_pool_stride}"),
            (self.stem_pool_kernel == 0 or 0 <= self.stem_pool_padding <= self.stem_pool_kernel // 2,
             f"stem_pool_padding must be in [0, stem_pool_kernel // 2 = {self.stem_pool_kernel // 2}], got {self.stem_pool_padding}"),
            (self.embed_dim >= 1, f"embed_dim must be >= 1, got {self.embed_dim}"),
            (self.depth >= 1, f"depth must be >= 1, got {self.depth}"),
            (self.num_heads >= 1 and self.embed_dim % self.num_heads == 0,
             f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"),
            (self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}"),
            (self.pos_embed in POS_EMBED_TYPES, f"pos_embed must be one of {POS_EMBED_TYPES}, got {self.pos_embed!r}"),
            (self.global_pool in GLOBAL_POOLS, f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}"),
            (self.class_token or self.global_pool != "token",
             "global_pool='token' needs class_token=True; use global_pool='seq' or 'avg' without a class token"),
            (self.norm_layout in NORM_LAYOUTS, f"norm_layout must be one of {NORM_LAYOUTS}, got {self.norm_layout!r}"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
        ])
        check_rates(self, ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"))
        gh, gw = stem_grid(self, (h, w))
        check([(gh >= 1 and gw >= 1,
                f"img_size {self.img_size} is too small for the stem: it leaves a {gh}x{gw} token grid; "
                f"use at least {min_input_size(self)} pixels per side or fewer/smaller strides")])

    @property
    def grid_size(self) -> tuple[int, int]:
        """The token grid at ``img_size``."""
        return stem_grid(self, self.img_hw)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)


# ------------------------------------------------------------------------------------ stem plan


@dataclass(frozen=True)
class ConvSpec:
    """One stem layer: conv -> [BatchNorm] -> [ReLU] -> [max-pool]."""

    in_chans: int
    out_chans: int
    kernel: int
    stride: int
    padding: int
    batchnorm: bool
    bias: bool
    relu: bool
    pool: tuple[int, int, int] | None  # (kernel, stride, padding)


def stem_plan(cfg: HybridConfig) -> list[ConvSpec]:
    """The stem's layers, in order: the one description the model, the grid and FLOPs use."""
    k = cfg.stem_kernel
    pool = (cfg.stem_pool_kernel, cfg.stem_pool_stride, cfg.stem_pool_padding) if cfg.stem_pool_kernel else None
    conv_style = cfg.stem == "conv"
    widths = cfg.stem_channels if conv_style else cfg.stem_channels + (cfg.embed_dim,)
    plan, c_in = [], cfg.in_chans
    for width, s in zip(widths, cfg.stem_strides):
        if cfg.stem_padding is not None:
            p = cfg.stem_padding
        else:
            p = ((s - 1) + (k - 1)) // 2 if conv_style else max(1, k // 2)
        plan.append(ConvSpec(c_in, width, k, s, p, batchnorm=conv_style, bias=False, relu=True, pool=pool))
        c_in = width
    if conv_style:  # 1×1 projection to the width (Xiao et al.; the last ConvStem layer in timm)
        plan.append(ConvSpec(c_in, cfg.embed_dim, 1, 1, 0, batchnorm=False, bias=True, relu=False, pool=None))
    return plan


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1  # nn.Conv2d / nn.MaxPool2d (floor mode)


def stem_grid(cfg: HybridConfig, img_hw: tuple[int, int]) -> tuple[int, int]:
    """Token grid (h, w) the stem leaves for an input of ``img_hw`` pixels (<= 0: too small)."""
    h, w = img_hw
    for spec in stem_plan(cfg):
        h, w = _out(h, spec.kernel, spec.stride, spec.padding), _out(w, spec.kernel, spec.stride, spec.padding)
        if spec.pool and h >= 1 and w >= 1:
            h, w = _out(h, *spec.pool), _out(w, *spec.pool)
        if h < 1 or w < 1:
            return max(h, 0), max(w, 0)  # empty: the input is too small
    return h, w


def min_input_size(cfg: HybridConfig) -> int:
    """Smallest square input side that leaves at least one token."""
    side = 1
    while min(stem_grid(cfg, (side, side))) < 1:
        side += 1
    return side


class StemLayer(nn.Module):
    """conv -> bn -> act -> pool with timm's ``ConvNormAct`` names (``conv``, ``bn``)."""

    def __init__(self, spec: ConvSpec):
        super().__init__()
        self.conv = nn.Conv2d(spec.in_chans, spec.out_chans, spec.kernel, spec.stride, spec.padding, bias=spec.bias)
        self.bn = nn.BatchNorm2d(spec.out_chans) if spec.batchnorm else nn.Identity()
        self.act = nn.ReLU() if spec.relu else nn.Identity()
        self.pool = nn.MaxPool2d(*spec.pool) if spec.pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))  # (B, Cin, H, W) -> (B, Cout, H', W')


class ConvTokenizer(nn.Module):
    """(B, C, H, W) -> (B, h, w, D): the stem's layers in ``backbone`` (timm's HybridEmbed name)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.Sequential(*[StemLayer(spec) for spec in stem_plan(cfg)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, {cfg.in_chans}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_chans:
            raise ValueError(f"expected {cfg.in_chans} input channels, got shape {tuple(x.shape)}; "
                             f"convert the images or adapt the model with in_chans={x.shape[1]}")
        if min(stem_grid(cfg, tuple(x.shape[-2:]))) < 1:
            raise ValueError(f"input of shape {tuple(x.shape)} is too small for the {cfg.stem} stem; "
                             f"use at least {min_input_size(cfg)}x{min_input_size(cfg)} pixels")
        x = self.backbone(x)  # (B, C, H, W) -> (B, D, h, w)
        return x.permute(0, 2, 3, 1)  # (B, D, h, w) -> (B, h, w, D)


# ------------------------------------------------------------------------------------ position embeddings


def sine_pos_embed(num_tokens: int, dim: int) -> torch.Tensor:
    """CCT's fixed embedding (1, T, D): position p, channel i -> sin / cos (even / odd i) of
    p / 10000^(2*(i//2)/D). Angles are rounded to float32 before sin/cos, as the reference does,
    so the table equals the reference's bit for bit."""
    p = torch.arange(num_tokens, dtype=torch.float64)[:, None]  # (T, 1)
    i = torch.arange(dim, dtype=torch.float64)
    angle = (p / 10000.0 ** (2 * torch.div(i, 2, rounding_mode="floor") / dim)).float()  # (T, D)
    pe = angle.clone()
    pe[:, 0::2] = angle[:, 0::2].sin()
    pe[:, 1::2] = angle[:, 1::2].cos()
    return pe.unsqueeze(0)


# ------------------------------------------------------------------------------------ model


class HybridViT(TokenModel):
    """A conv-stem ViT or a CCT: ``HybridViT(HybridConfig(...))`` (see the module docstring)."""

    first_conv = "patch_embed.backbone.0.conv.weight"  # adapted when in_chans changes
    head_keys = ("head.weight", "head.bias")  # dropped when num_classes changes

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.grad_checkpointing = False

        self.patch_embed = ConvTokenizer(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        embed_len = cfg.grid_size[0] * cfg.grid_size[1] + cfg.num_prefix_tokens
        if cfg.pos_embed == "none":
            self.pos_embed = None
        elif cfg.pos_embed == "sine":
            self.pos_embed = nn.Parameter(sine_pos_embed(embed_len, D), requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, D))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)

        dpr = drop_path_rates(cfg.drop_path_rate, cfg.depth)  # stochastic depth grows with depth
        self.blocks = nn.Sequential(*[
            Block(D, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop=cfg.proj_drop_rate,
                  attn_drop=cfg.attn_drop_rate, drop_path=dpr[i], norm_eps=cfg.norm_eps, fused_attn=cfg.fused_attn,
                  norm_layout=cfg.norm_layout)
            for i in range(cfg.depth)
        ])
        self._make_pooling(cfg, nn.LayerNorm(D, eps=cfg.norm_eps))
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    def _make_pooling(self, cfg: HybridConfig, final_norm: nn.LayerNorm) -> None:
        """timm's placement of the final norm: after pooling (``fc_norm``) for 'avg', before it
        (``norm``) otherwise; sequence pooling scores tokens with ``seq_pool`` (Linear(D, 1))."""
        self.norm = nn.Identity() if cfg.global_pool == "avg" else final_norm
        self.fc_norm = final_norm if cfg.global_pool == "avg" else nn.Identity()
        self.seq_pool = nn.Linear(cfg.embed_dim, 1) if cfg.global_pool == "seq" else None

    # ---------------------------------------------------------------- init and contract helpers
    def init_weights(self) -> None:
        """timm's ViT init for the conv style, the reference CCT's for the CCT style."""
        cct = self.cfg.stem == "cct"
        if self.pos_embed is not None and self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.2 if cct else 0.02)
        if self.cls_token is not None and not cct:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and cct:
                nn.init.kaiming_normal_(m.weight)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New random head for ``num_classes``; a new ``global_pool`` moves the final norm as
        timm places it and creates a fresh ``seq_pool`` when switching to sequence pooling."""
        pool = global_pool if global_pool is not None else self.cfg.global_pool
        cfg = self.cfg.replace(num_classes=num_classes, global_pool=pool)
        device = self.blocks[0].norm1.weight.device
        if pool != self.cfg.global_pool:
            final_norm = self.fc_norm if self.cfg.global_pool == "avg" else self.norm
            self._make_pooling(cfg, final_norm)
            if self.seq_pool is not None:
                nn.init.trunc_normal_(self.seq_pool.weight, std=0.02)
                nn.init.zeros_(self.seq_pool.bias)
                self.seq_pool.to(device)
        self.cfg, self.num_classes, self.global_pool = cfg, num_classes, pool
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.head.to(device)

    # ---------------------------------------------------------------------------- forward path
    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        cfg = self.cfg
        if self.pos_embed is None or grid == cfg.grid_size:
            return self.pos_embed
        if cfg.pos_embed == "sine":  # exact for any length: recompute
            return sine_pos_embed(grid[0] * grid[1] + cfg.num_prefix_tokens, cfg.embed_dim).to(self.pos_embed)
        return resample_pos_embed(self.pos_embed, grid, cfg.grid_size, num_prefix_tokens=cfg.num_prefix_tokens)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, h, w, D)
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)  # (B, h, w, D) -> (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # -> (B, 1 + N, D)
        pos = self._pos_embed_for((h, w))
        if pos is not None:
            x = x + pos
        return self.pos_drop(x), (h, w)

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        """Images -> normalised tokens (B, prefix + N, D); with ``return_attention`` also the
        per-layer attention maps [(B, heads, T, T)] computed on the eager path for this call."""
        x, _ = self._embed(x)
        maps = []
        for block in self.blocks:
            if return_attention:
                x, attn = block(x, return_attention=True)
                maps.append(attn)
            else:
                x = run_checkpointed(block, self.grad_checkpointing, x)
        x = self.norm(x)
        return (x, maps) if return_attention else x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D). 'avg' and 'seq' pool the patch tokens (the class token, if any, is left out)."""
        if self.global_pool == "token":
            return x[:, 0]
        tokens = x[:, self.num_prefix_tokens:]
        if self.global_pool == "avg":
            return tokens.mean(dim=1)
        weights = self.seq_pool(tokens).softmax(dim=1)  # (B, N, D) -> (B, N, 1), softmax over tokens
        return (weights.transpose(1, 2) @ tokens).squeeze(1)  # (B, 1, N) @ (B, N, D) -> (B, D)

    def _readout(self, feats: torch.Tensor) -> torch.Tensor:
        """Sequence pooling reads the patch tokens with its own softmax weights; those weight the
        rollout's rows (TokenModel._readout for 'token' / 'avg')."""
        if self.global_pool != "seq":
            return super()._readout(feats)
        B, T, _ = feats.shape
        weights = self.seq_pool(feats[:, self.num_prefix_tokens:]).softmax(dim=1)  # (B, N, 1), as in pool()
        return token_readout("seq", T, self.num_prefix_tokens, B, feats.device, pool_weights=weights)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    # ------------------------------------------------------------------------------- weights
    @staticmethod
    def adapt_img_size(state_dict: dict[str, torch.Tensor], src: HybridConfig, dst: HybridConfig) -> dict[str, torch.Tensor]:
        """Learned position embeddings of ``src``'s token grid resampled to ``dst``'s; sine ones
        dropped (the model recomputes them)."""
        sd = dict(state_dict)
        if src.grid_size != dst.grid_size and "pos_embed" in sd:
            if dst.pos_embed == "sine":
                sd.pop("pos_embed")
            else:
                sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], dst.grid_size, src.grid_size, src.num_prefix_tokens)
        return sd

    @staticmethod
    def recomputed_keys(cfg: HybridConfig) -> set[str]:
        """Parameters the model computes itself, so a state dict may leave them out."""
        return {"pos_embed"} if cfg.pos_embed == "sine" else set()


# ------------------------------------------------------------------------------------ FLOPs


def hybrid_flops(cfg: HybridConfig, img_hw: tuple[int, int] | None = None) -> float:
    """Forward FLOPs per image: 2 x multiply-adds of the stem convolutions and of every matmul
    (attention scores and values, sequence pooling and head included)."""
    h, w = img_hw or cfg.img_hw
    macs = 0
    for spec in stem_plan(cfg):
        h, w = _out(h, spec.kernel, spec.stride, spec.padding), _out(w, spec.kernel, spec.stride, spec.padding)
        macs += h * w * spec.out_chans * spec.in_chans * spec.kernel**2
        if spec.pool:
            h, w = _out(h, *spec.pool), _out(w, *spec.pool)
    n = h * w
    t = n + cfg.num_prefix_tokens
    D, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_block = t * D * 3 * D + 2 * t * t * D + t * D * D + 2 * t * D * hidden
    pool = 2 * n * D if cfg.global_pool == "seq" else 0  # token scores + weighted sum
    head = D * cfg.num_classes
    return 2.0 * (macs + cfg.depth * per_block + pool + head)


# ------------------------------------------------------------------------------------ names

# CCT-L: layers -> (width, heads, MLP ratio); the paper's table, = SHI-Labs' cct_2 ... cct_14.
CCT_SIZES = {2: (128, 2, 1.0), 4: (128, 2, 1.0), 6: (256, 4, 2.0), 7: (256, 4, 2.0), 14: (384, 6, 3.0)}


def _cct(layers: int, kernel: int, convs: int, img: int, **extra: Any) -> dict[str, Any]:
    """CCT-L/KxN: N convs of kernel K (stride max(1, K//2 - 1), padding max(1, K//2), 64 hidden
    channels, each followed by a 3/2/1 max-pool), L CCT blocks, sequence pooling."""
    width, heads, ratio = CCT_SIZES[layers]
    fields = dict(stem="cct", img_size=img, stem_kernel=kernel, stem_strides=(max(1, kernel // 2 - 1),) * convs,
                  stem_channels=(64,) * (convs - 1), embed_dim=width, depth=layers, num_heads=heads, mlp_ratio=ratio)
    return {**fields, **extra}


# ViTC-1GF / 4GF / 18GF (Xiao et al. 2021, table 1 and section 3): stem channels and strides to
# /16, then a 1×1 conv; one transformer block fewer than the ViTP model of the same budget.
_VITC = {
    "tiny": dict(embed_dim=192, depth=11, num_heads=3, mlp_ratio=3.0, stem_channels=(24, 48, 96, 192), stem_strides=(2, 2, 2, 2)),
    "small": dict(embed_dim=384, depth=11, num_heads=6, mlp_ratio=3.0, stem_channels=(48, 96, 192, 384), stem_strides=(2, 2, 2, 2)),
    "base": dict(embed_dim=768, depth=11, num_heads=12, mlp_ratio=4.0, stem_channels=(64, 128, 128, 256, 256, 512),
                 stem_strides=(2, 2, 1, 2, 1, 2)),
}

MODELS: dict[str, dict[str, Any]] = {
    # CCT paper sizes; class counts as the reference registers them (CIFAR-10, Flowers-102, ImageNet)
    "cct_2_3x2_32": _cct(2, 3, 2, 32, num_classes=10),
    "cct_4_3x2_32": _cct(4, 3, 2, 32, num_classes=10),
    "cct_6_3x1_32": _cct(6, 3, 1, 32, num_classes=10),
    "cct_6_3x2_32": _cct(6, 3, 2, 32, num_classes=10),
    "cct_7_3x1_32": _cct(7, 3, 1, 32, num_classes=10),
    "cct_7_3x2_32": _cct(7, 3, 2, 32, num_classes=10),
    "cct_7_7x2_224": _cct(7, 7, 2, 224, num_classes=102),
    "cct_14_7x2_224": _cct(14, 7, 2, 224, num_classes=1000),
    # 28x28 grey (Fashion-MNIST): one 3x3 stride-1 conv + 3/2/1 max-pool -> a 14x14 grid (196 tokens,
    # CIFAR's 16x16 grid scaled to 28 pixels), CCT-7's transformer
    "cct_7_3x1_28": _cct(7, 3, 1, 28, in_chans=1, num_classes=10),
    **{f"vit_{size}_convstem": dict(fields, stem="conv", img_size=224) for size, fields in _VITC.items()},
    # 28x28 grey: two stride-2 3x3 convs (96, 192 channels: ViTC-1GF's last two) -> 7x7 grid, the
    # same 49 tokens as vit_tiny_patch4 on 28x28, then ViTC-1GF's transformer
    "vit_tiny_convstem_28": dict(_VITC["tiny"], stem="conv", img_size=28, in_chans=1, num_classes=10,
                                 stem_channels=(96, 192), stem_strides=(2, 2)),
}
SINE_SUFFIX = "_sine"  # cct_7_3x1_32_sine: the reference's fixed sine position embeddings

NAME_HELP = ("cct_<layers>_<k>x<convs>_<img>[_sine] for the sizes available_models('hybrid') lists (e.g. cct_7_3x1_32, "
             "cct_7_3x1_28), vit_<tiny|small|base>_convstem or vit_tiny_convstem_28")


def match_name(name: str) -> dict[str, Any] | None:
    """A named size -> HybridConfig fields; None if the name is not this family's."""
    if name in MODELS:
        return dict(MODELS[name])
    base = name.removesuffix(SINE_SUFFIX)
    if base != name and base in MODELS and MODELS[base]["stem"] == "cct":
        return dict(MODELS[base], pos_embed="sine")
    return None


def available_models() -> list[str]:
    return list(MODELS) + [n + SINE_SUFFIX for n, f in MODELS.items() if f["stem"] == "cct"]


# ------------------------------------------------------------------------------------ CCT weights

_CCT_RENAMES = (  # reference (SHI-Labs / vit-pytorch) -> ours, applied as prefix/suffix rewrites
    ("classifier.positional_emb", "pos_embed"),
    ("classifier.class_emb", "cls_token"),
    ("classifier.attention_pool.", "seq_pool."),
    ("classifier.norm.", "norm."),
    ("classifier.fc.", "head."),
)
_CCT_BLOCK_RENAMES = {
    "pre_norm": "norm1", "self_attn.qkv": "attn.qkv", "self_attn.proj": "attn.proj",
    "linear1": "mlp.fc1", "linear2": "mlp.fc2", "norm1": "norm2",
}


def convert_cct_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference CCT's state dict (SHI-Labs/Compact-Transformers or vit-pytorch ``cct``) with
    our keys; an unknown key is a ValueError naming it."""
    out = {}
    for key, value in state_dict.items():
        new = None
        if key.startswith("tokenizer.conv_layers.") and key.endswith(".0.weight"):
            i = key.split(".")[2]  # tokenizer.conv_layers.{i}.0.weight: the i-th conv of the stem
            new = f"patch_embed.backbone.{i}.conv.weight"
        elif key.startswith("classifier.blocks."):
            _, _, i, rest = key.split(".", 3)
            name, _, param = rest.rpartition(".")
            if name in _CCT_BLOCK_RENAMES:
                new = f"blocks.{i}.{_CCT_BLOCK_RENAMES[name]}.{param}"
        else:
            for old, ours in _CCT_RENAMES:
                if key.startswith(old):
                    new = ours + key[len(old):]
                    break
        if new is None:
            raise ValueError(f"unexpected key {key!r} in a CCT state dict; expected the reference's tokenizer.* / classifier.* keys")
        out[new] = value
    return out
