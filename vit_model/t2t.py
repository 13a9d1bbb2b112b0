"""Tokens-to-Token ViT (Yuan et al., 2021, "Tokens-to-Token ViT: Training Vision Transformers from
Scratch on ImageNet") in one readable file.

Instead of cutting the image into disjoint patches, T2T-ViT builds its tokens progressively:

1. **soft split**: overlapping k×k neighbourhoods (``unfold`` with kernel / stride / padding) become
   tokens, each the concatenation of its neighbourhood: (B, C, H, W) -> (B, h*w, C*k*k);
2. a **token transformer** (one block) mixes them; it may reduce the width to ``token_dim``;
3. **re-structurization**: the tokens are laid back out as an image (B, d, h, w) and split again.

The last soft split is followed by a linear projection to the backbone width, then an ordinary
ViT backbone: class token, position embeddings, pre-norm blocks (:mod:`vit_model.layers`), final
norm and head. At 224×224 the paper's splits (7,4,2), (3,2,1), (3,2,1) give a 14×14 token grid.

The default configuration follows the paper and its code (yitu-opensource/T2T-ViT,
``models/t2t_vit.py`` with ``tokens_type='transformer'``, ``models/token_transformer.py``):

* the token transformer's attention projects ``C*k*k -> token_dim`` (64) with a qkv without bias,
  has an output projection, and takes its skip connection from the values ``v`` (the input has a
  different width); its softmax scale is ``(C*k*k // token_heads) ** -0.5`` (the *input* width, as
  the original computes it); its MLP has ratio 1; it has no dropout;
* the backbone has qkv_bias=False and a fixed 1-D sinusoid position table over the class token
  and the raster-ordered tokens (interleaved sin/cos), kept as a non-trainable parameter that
  counts in the parameter total as in the original (the paper's parameter counts include it);
* LayerNorm eps is 1e-5 (``nn.LayerNorm``'s default, used by the original).

``lucidrains/vit-pytorch``'s ``T2TViT`` is a simplified T2T: tokens keep their unfolded width
(``token_dim=None``), its token transformer (``token_layout="vit_pytorch"``) adds the attention
output to the block input without an output projection and ends with a LayerNorm, and its
position embeddings are learned (``pos_embed="learn"``). :func:`config_from_vit_pytorch` and
:func:`convert_vit_pytorch` reproduce it exactly (tested to 1e-5). Its backbone attention with
``dim_head * heads != dim`` and its ``pool='mean'`` (which averages the class token too) are not
reproduced; the converter refuses them.

State-dict keys: the T2T module uses the original repository's names
(``tokens_to_token.attention{1,2}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
``tokens_to_token.project``); the backbone uses timm's ViT names (``cls_token``, ``pos_embed``,
``blocks.{i}.attn.qkv``, ``norm``, ``head``). The original's pretrained checkpoints were trained
with a backbone softmax scale of ``embed_dim ** -0.5`` (their ``qk_scale``), which this module
does not offer; they are not loaded here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import ArchConfig, check, check_rates, pair
from .base import TokenModel
from .layers import Block, Mlp, attention, drop_path_rates, init_linear_trunc_normal, run_checkpointed
from .surgery import adapt_input_conv, resample_pos_embed

__all__ = ["T2TConfig", "T2TViT", "T2TModule", "TokenTransformer", "sinusoid_pos_embed_1d", "t2t_flops",
           "match_name", "available_models", "config_from_vit_pytorch", "convert_vit_pytorch"]

# (kernel, stride, padding) of each soft split.
T2T_LAYERS_224 = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # the paper's: 224 -> 56 -> 28 -> 14
# For 28×28 grey images: a 7×7 first split like the paper's, but at stride 2 (these images have
# 8x fewer pixels per side), then a halving split and a stride-1 split that still mixes each 3×3
# neighbourhood into its token: 28 -> 14 -> 7 -> 7, i.e. 49 tokens (as a patch-4 ViT). A 3×3
# first kernel would give grey tokens of only 9 values.
T2T_LAYERS_28 = ((7, 2, 3), (3, 2, 1), (3, 1, 1))

# Backbone of each named size (original repo's t2t_vit_<depth>).
SIZES: dict[int, dict[str, Any]] = {
    7: dict(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0),
    10: dict(embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.0),
    12: dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0),
    14: dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0),
    19: dict(embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.0),
    24: dict(embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.0),
}
TOKEN_LAYOUTS = ("paper", "vit_pytorch")
POS_EMBED_TYPES = ("sincos", "learn")
GLOBAL_POOLS = ("token", "avg")


def soft_split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of one unfold along one side."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class T2TConfig(ArchConfig):
    """Everything that defines a T2T-ViT. Defaults are the paper's T2T-ViT-14 (token transformer).

    ``token_dim=None`` keeps each token's unfolded width (vit-pytorch); ``token_layout`` picks the
    token transformer: ``"paper"`` (v skip connection, output projection) or ``"vit_pytorch"``
    (input skip connection, no output projection, LayerNorm after the block; needs
    ``token_dim=None`` and ``token_heads=1``).
    """

    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 14
    num_heads: int = 6
    mlp_ratio: float = 3.0
    qkv_bias: bool = False
    token_dim: int | None = 64
    t2t_layers: tuple[tuple[int, int, int], ...] = T2T_LAYERS_224
    token_mlp_ratio: float = 1.0
    token_heads: int = 1
    token_layout: str = "paper"
    pos_embed: str = "sincos"  # sincos (fixed 1-D table, the paper's) | learn
    global_pool: str = "token"  # token | avg (mean of the non-class tokens)
    drop_rate: float = 0.0  # dropout before the head
    pos_drop_rate: float = 0.0  # dropout after adding position embeddings
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0  # backbone attention projection and MLP
    drop_path_rate: float = 0.0  # stochastic depth, linear over the backbone depth
    fused_attn: bool = True  # F.scaled_dot_product_attention; False = the eager path
    norm_eps: float = 1e-5

    family: ClassVar[str] = "t2t"
    STRUCTURAL: ClassVar[tuple[str, ...]] = (
        "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "token_dim", "t2t_layers", "token_mlp_ratio",
        "token_heads", "token_layout", "pos_embed",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.img_size, int):
            object.__setattr__(self, "img_size", pair(self.img_size))
        layers = self.t2t_layers
        ok_layers = (isinstance(layers, (tuple, list)) and len(layers) >= 1
                     and all(isinstance(t, (tuple, list)) and len(t) == 3 and all(isinstance(v, int) for v in t) for t in layers))
        check([(ok_layers, f"t2t_layers must be a non-empty sequence of (kernel, stride, padding) integer triples, got {layers!r}")])
        layers = tuple(tuple(t) for t in layers)
        object.__setattr__(self, "t2t_layers", layers)
        check([
            (all(k >= 1 and s >= 1 and 0 <= p < k for k, s, p in layers),
             f"t2t_layers {layers}: each (kernel, stride, padding) needs kernel >= 1, stride >= 1 and 0 <= padding < kernel"),
            (self.in_chans >= 1, f"in_chans must be >= 1, got {self.in_chans}"),
            (self.num_classes >= 0, f"num_classes must be >= 0 (0 = no head), got {self.num_classes}"),
            (self.embed_dim >= 1, f"embed_dim must be >= 1, got {self.embed_dim}"),
            (self.depth >= 1, f"depth must be >= 1, got {self.depth}"),
            (self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}"),
            (self.embed_dim % self.num_heads == 0, f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"),
            (self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}"),
            (self.token_dim is None or (isinstance(self.token_dim, int) and self.token_dim >= 1),
             f"token_dim must be an integer >= 1 or None (keep the unfolded width), got {self.token_dim!r}"),
            (self.token_mlp_ratio > 0, f"token_mlp_ratio must be > 0, got {self.token_mlp_ratio}"),
            (self.token_heads >= 1, f"token_heads must be >= 1, got {self.token_heads}"),
            (self.token_layout in TOKEN_LAYOUTS, f"token_layout must be one of {TOKEN_LAYOUTS}, got {self.token_layout!r}"),
            (self.token_layout != "vit_pytorch" or (self.token_dim is None and self.token_heads == 1),
             f"token_layout='vit_pytorch' needs token_dim=None and token_heads=1, got token_dim={self.token_dim}, token_heads={self.token_heads}"),
            (self.pos_embed in POS_EMBED_TYPES, f"pos_embed must be one of {POS_EMBED_TYPES}, got {self.pos_embed!r}"),
            (self.global_pool in GLOBAL_POOLS, f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
        ])
        out_widths = [w if self.token_dim is None else self.token_dim for w in self.token_widths[:-1]]
        bad = [w for w in out_widths if w % self.token_heads]
        check([(not bad, f"token_heads {self.token_heads} does not divide the token transformer width {bad[:1]}; "
                         f"pick token_heads dividing token_dim ({self.token_dim})")])
        h, w = self.img_hw
        check([(min(h, w) >= 1, f"img_size must be >= 1, got {self.img_size}"),
               (self.fits((h, w)),
                f"img_size {self.img_size} is too small for t2t_layers {layers}; use a larger image or smaller kernels")])
        check_rates(self, ("drop_rate", "pos_drop_rate", "attn_drop_rate", "proj_drop_rate", "drop_path_rate"))

    def grids_for(self, hw: tuple[int, int]) -> list[tuple[int, int]]:
        """Token grid (h, w) after each soft split of an (H, W) image."""
        h, w = hw
        out = []
        for k, s, p in self.t2t_layers:
            h, w = soft_split_size(h, k, s, p), soft_split_size(w, k, s, p)
            out.append((h, w))
        return out

    def fits(self, hw: tuple[int, int]) -> bool:
        """Whether an (H, W) image leaves at least one token after every soft split."""
        return all(min(g) >= 1 for g in self.grids_for(hw))

    def grid_for(self, hw: tuple[int, int]) -> tuple[int, int]:
        return self.grids_for(hw)[-1]

    @property
    def grid_size(self) -> tuple[int, int]:
        """The backbone's token grid at ``img_size`` (what learned position embeddings cover)."""
        return self.grid_for(self.img_hw)

    @property
    def token_widths(self) -> list[int]:
        """Width of the tokens after each soft split; the last one is the projection's input."""
        widths, c = [], self.in_chans
        for k, _, _ in self.t2t_layers:
            widths.append(c * k * k)
            c = widths[-1] if self.token_dim is None else self.token_dim  # the token transformer's output width
        return widths


# ---------------------------------------------------------------------------------- names

_NAME_RE = re.compile(r"^t2t_vit_(?P<t>t_)?(?P<depth>\d+)(?P<small>_28)?$")
SMALL_28 = dict(img_size=28, in_chans=1, t2t_layers=T2T_LAYERS_28)


def match_name(name: str) -> dict[str, Any] | None:
    """``t2t_vit_14`` (224 RGB), ``t2t_vit_14_28`` (28×28 grey, :data:`T2T_LAYERS_28`) and the
    original repository's ``t2t_vit_t_14/19/24`` (the same token-transformer models) -> fields."""
    m = _NAME_RE.match(name)
    if not m or int(m["depth"]) not in SIZES or (m["t"] and (m["small"] or int(m["depth"]) < 14)):
        return None
    fields = dict(SIZES[int(m["depth"])])
    if m["small"]:
        fields.update(SMALL_28)
    return fields


def available_models() -> list[str]:
    return ([f"t2t_vit_{d}" for d in SIZES] + [f"t2t_vit_t_{d}" for d in (14, 19, 24)]
            + [f"t2t_vit_{d}_28" for d in SIZES])


NAME_HELP = "t2t_vit_<7|10|12|14|19|24>[_28] or t2t_vit_t_<14|19|24>"


# ---------------------------------------------------------------------------------- layers


def sinusoid_pos_embed_1d(n_positions: int, dim: int) -> torch.Tensor:
    """The Transformer's fixed 1-D table (1, n, dim): channel 2i is sin(pos / 10000^(2i/dim)),
    channel 2i+1 the cosine of the same angle (the original T2T-ViT's ``get_sinusoid_encoding``)."""
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)  # (n, 1)
    j = torch.arange(dim)
    angle = pos / 10000.0 ** (2 * (j // 2) / dim)  # (n, dim)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float().unsqueeze(0)


class TokenAttention(nn.Module):
    """Attention that may change the width: (B, N, C_in) -> (B, N, d), plus the values v (B, N, d).

    ``proj=False`` leaves out the output projection (vit-pytorch with one head of full width).
    The scale is ``(C_in // heads) ** -0.5``, from the input width as in the original code.
    """

    def __init__(self, in_dim: int, dim: int, num_heads: int, proj: bool, fused: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = (in_dim // num_heads) ** -0.5
        self.fused = fused
        self.qkv = nn.Linear(in_dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim) if proj else None

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3*d) -> (B, N, 3, H, dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # -> 3 x (B, H, N, dh)
        attn = None
        if self.fused and not return_attention:
            y = attention(q, k, v, scale=self.scale)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
            y = attn @ v  # (B, H, N, N) @ (B, H, N, dh) -> (B, H, N, dh)
        y = y.transpose(1, 2).reshape(B, N, -1)  # (B, H, N, dh) -> (B, N, d)
        v = v.transpose(1, 2).reshape(B, N, -1)  # (B, H, N, dh) -> (B, N, d)
        if self.proj is not None:
            y = self.proj(y)
        return y, v, attn


class TokenTransformer(nn.Module):
    """One transformer block over soft-split tokens, (B, N, C_in) -> (B, N, d).

    ``layout="paper"``: x = v + proj(attn(norm1(x))); x = x + mlp(norm2(x)) (v carries the skip
    connection because the width changes). ``layout="vit_pytorch"`` (d = C_in): x = x +
    attn(norm1(x)) without projection; x = x + mlp(norm2(x)); x = norm(x).
    """

    def __init__(self, in_dim: int, dim: int, num_heads: int, mlp_ratio: float, layout: str,
                 norm_eps: float, fused_attn: bool):
        super().__init__()
        self.layout = layout
        self.norm1 = nn.LayerNorm(in_dim, eps=norm_eps)
        self.attn = TokenAttention(in_dim, dim, num_heads, proj=layout == "paper", fused=fused_attn)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if layout == "vit_pytorch" else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        y, v, attn = self.attn(self.norm1(x), return_attention=return_attention)
        x = (v if self.layout == "paper" else x) + y  # (B, N, d)
        x = x + self.mlp(self.norm2(x))
        x = self.norm(x)
        return (x, attn) if return_attention else x


class T2TModule(nn.Module):
    """Images -> backbone tokens: soft split, then (token transformer, re-structurization, soft
    split) per further layer, then a linear projection. (B, C, H, W) -> (B, h*w, D), (h, w)."""

    def __init__(self, cfg: T2TConfig):
        super().__init__()
        self.cfg = cfg
        widths = cfg.token_widths
        for i in range(len(cfg.t2t_layers) - 1):  # keys attention1, attention2, ... as in the original
            out = widths[i] if cfg.token_dim is None else cfg.token_dim
            self.add_module(f"attention{i + 1}", TokenTransformer(
                widths[i], out, cfg.token_heads, cfg.token_mlp_ratio, cfg.token_layout, cfg.norm_eps, cfg.fused_attn))
        self.project = nn.Linear(widths[-1], cfg.embed_dim)  # (B, N, C_last) -> (B, N, D)

    def token_transformers(self) -> list[TokenTransformer]:
        return [getattr(self, f"attention{i + 1}") for i in range(len(self.cfg.t2t_layers) - 1)]

    def forward(self, x: torch.Tensor, return_attention: bool = False, grad_checkpointing: bool = False):
        """Tokens (B, N, D) and their grid (h, w); with ``return_attention`` also the token
        transformers' attention maps [(B, token_heads, N_i, N_i)]."""
        B, _, h, w = x.shape
        blocks, maps = self.token_transformers(), []
        for i, (k, s, p) in enumerate(self.cfg.t2t_layers):
            if i > 0:  # re-structurization: (B, N, C) -> (B, C, h, w)
                x = x.transpose(1, 2).reshape(B, -1, h, w)
            h, w = soft_split_size(h, k, s, p), soft_split_size(w, k, s, p)
            x = F.unfold(x, kernel_size=k, stride=s, padding=p)  # soft split: (B, C, H, W) -> (B, C*k*k, h*w)
            x = x.transpose(1, 2)  # (B, C*k*k, N) -> (B, N, C*k*k)
            if i < len(blocks):
                if return_attention:
                    x, attn = blocks[i](x, return_attention=True)
                    maps.append(attn)
                else:
                    x = run_checkpointed(blocks[i], grad_checkpointing, x)  # (B, N, C*k*k) -> (B, N, d)
        x = self.project(x)
        return (x, (h, w), maps) if return_attention else (x, (h, w))


# ---------------------------------------------------------------------------------- model


class T2TViT(TokenModel):
    """T2T-ViT. ``T2TViT(T2TConfig(...))``; see the module docstring for layouts and keys."""

    # The first input-channel-dependent weight; together with its LayerNorm it is adapted by
    # adapt_in_chans (the input layer is LayerNorm + linear on unfolded patches, not a conv).
    first_conv = "tokens_to_token.attention1.attn.qkv.weight"
    head_keys = ("head.weight", "head.bias")

    def __init__(self, cfg: T2TConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        self.tokens_to_token = T2TModule(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        n = cfg.grid_size[0] * cfg.grid_size[1] + 1
        if cfg.pos_embed == "sincos":
            self.pos_embed = nn.Parameter(sinusoid_pos_embed_1d(n, D), requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, n, D))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        dpr = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.Sequential(*[
            Block(D, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop=cfg.proj_drop_rate,
                  attn_drop=cfg.attn_drop_rate, drop_path=dpr[i], norm_eps=cfg.norm_eps, fused_attn=cfg.fused_attn)
            for i in range(cfg.depth)
        ])
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ---------------------------------------------------------------- init and contract helpers
    def init_weights(self) -> None:
        """The original's: Linear weights truncated normal (0.02), biases 0, LayerNorm (1, 0)."""
        init_linear_trunc_normal(self)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the token transformers and the backbone blocks."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (new random weights) for ``num_classes`` classes."""
        cfg = self.cfg.replace(num_classes=num_classes, global_pool=global_pool or self.cfg.global_pool)
        self.cfg, self.num_classes, self.global_pool = cfg, num_classes, cfg.global_pool
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.head.to(self.cls_token.device)

    # ---------------------------------------------------------------------------- forward path
    def _check_input(self, x: torch.Tensor) -> None:
        c = self.cfg.in_chans
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, {c}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != c:
            raise ValueError(f"expected {c} input channels, got shape {tuple(x.shape)}; "
                             f"convert the images or adapt the model with in_chans={x.shape[1]}")
        if not self.cfg.fits(tuple(x.shape[2:])):
            raise ValueError(f"input of shape {tuple(x.shape)} is too small for t2t_layers {self.cfg.t2t_layers}")

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        cfg = self.cfg
        if grid == cfg.grid_size:
            return self.pos_embed
        if cfg.pos_embed == "sincos":  # the 1-D table is exact for any token count
            return sinusoid_pos_embed_1d(grid[0] * grid[1] + 1, cfg.embed_dim).to(self.pos_embed)
        return resample_pos_embed(self.pos_embed, grid, cfg.grid_size, num_prefix_tokens=1)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        self._check_input(x)
        x, grid = self.tokens_to_token(x, grad_checkpointing=self.grad_checkpointing)  # (B, C, H, W) -> (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N, D) -> (B, 1 + N, D)
        return self.pos_drop(x + self._pos_embed_for(grid)), grid

    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        """Images -> normalised tokens (B, 1 + N, D); with ``return_attention`` also the backbone
        blocks' attention maps [(B, heads, 1 + N, 1 + N)] (eager path for this call). The token
        transformers' maps are not in that list: see :meth:`token_attention_maps`."""
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

    def token_attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The token transformers' attention maps [(B, token_heads, N_i, N_i)] for images ``x``."""
        self._check_input(x)
        return self.tokens_to_token(x, return_attention=True)[2]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return x[:, 1:].mean(dim=1)  # (B, 1 + N, D) -> (B, D)
        return x[:, 0]  # the class token

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    # ------------------------------------------------------------------------------- weights
    @staticmethod
    def adapt_img_size(state_dict: dict[str, torch.Tensor], src: T2TConfig, dst: T2TConfig) -> dict[str, torch.Tensor]:
        """Learned position embeddings resampled to ``dst``'s token grid; the sinusoid table is
        dropped (the model recomputes it)."""
        sd = dict(state_dict)
        if src.grid_size != dst.grid_size and "pos_embed" in sd:
            if dst.pos_embed == "sincos":
                sd.pop("pos_embed")
            else:
                sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], dst.grid_size, src.grid_size, num_prefix_tokens=1)
        return sd

    @staticmethod
    def adapt_in_chans(state_dict: dict[str, torch.Tensor], src: T2TConfig, dst: T2TConfig) -> dict[str, torch.Tensor]:
        """Weights for ``dst.in_chans`` input channels.

        The first layer sees unfolded patches, channel-major (C, k, k). Its linear weight is
        adapted like a convolution kernel (:func:`adapt_input_conv`: RGB -> grey sums the colour
        kernels), its query rows rescaled so the scores keep their scale (the softmax scale follows
        the input width); its LayerNorm's gain and bias are averaged over the source channels and
        repeated. For RGB -> grey this is exact (a grey image then gives the response of the grey
        RGB image) when the LayerNorm parameters are equal across channels, approximate otherwise.
        """
        if src.token_dim is None:
            raise ValueError(f"cannot adapt weights from in_chans={src.in_chans} to {dst.in_chans}: with token_dim=None "
                             f"every token layer's width is a multiple of in_chans; train the model from scratch")
        sd = dict(state_dict)
        k, c_new = src.t2t_layers[0][0], dst.in_chans
        first = "tokens_to_token.attention1" if len(src.t2t_layers) > 1 else None
        weight_key = f"{first}.attn.qkv.weight" if first else "tokens_to_token.project.weight"
        if weight_key in sd:
            w = sd[weight_key]
            w = adapt_input_conv(w.reshape(w.shape[0], -1, k, k), c_new).reshape(w.shape[0], -1)  # via (out, C, k, k)
            if first:  # the softmax scale follows the input width: rescale q so the scores stay the same
                d, heads = w.shape[0] // 3, src.token_heads
                w[:d] *= (c_new * k * k // heads) ** 0.5 / (src.in_chans * k * k // heads) ** 0.5  # old / new scale
            sd[weight_key] = w
        for key in (f"{first}.norm1.weight", f"{first}.norm1.bias") if first else ():
            if key in sd:
                per_channel = sd[key].reshape(-1, k * k).mean(dim=0)  # (C*k*k,) -> (k*k,)
                sd[key] = per_channel.repeat(c_new)  # -> (C'*k*k,)
        return sd

    @staticmethod
    def recomputed_keys(cfg: T2TConfig) -> set[str]:
        return {"pos_embed"} if cfg.pos_embed == "sincos" else set()


# ---------------------------------------------------------------------------------- FLOPs


def t2t_flops(cfg: T2TConfig, img_hw: tuple[int, int] | None = None) -> float:
    """Forward multiply-adds x2 per image: token transformers, projection, backbone, head."""
    grids = cfg.grids_for(img_hw or cfg.img_hw)
    widths = cfg.token_widths
    macs = 0
    for i in range(len(cfg.t2t_layers) - 1):  # token transformer after soft split i
        n = grids[i][0] * grids[i][1]
        c_in = widths[i]
        d = c_in if cfg.token_dim is None else cfg.token_dim
        hidden = int(d * cfg.token_mlp_ratio)
        proj = n * d * d if cfg.token_layout == "paper" else 0
        macs += n * c_in * 3 * d + 2 * n * n * d + proj + 2 * n * d * hidden
    n = grids[-1][0] * grids[-1][1]
    D, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    macs += n * widths[-1] * D  # projection to the backbone width
    t = n + 1
    macs += cfg.depth * (t * D * 3 * D + 2 * t * t * D + t * D * D + 2 * t * D * hidden)
    macs += D * cfg.num_classes
    return 2.0 * macs


# ---------------------------------------------------------------------------------- vit-pytorch


def config_from_vit_pytorch(*, image_size: int, num_classes: int, dim: int, depth: int, heads: int, mlp_dim: int,
                            channels: int = 3, dim_head: int = 64, pool: str = "cls",
                            t2t_layers: Sequence[tuple[int, int]] = ((7, 4), (3, 2), (3, 2)), **overrides: Any) -> T2TConfig:
    """Our config for ``vit_pytorch.t2t.T2TViT(**same arguments)`` (eval-mode exact)."""
    if dim_head * heads != dim:
        raise ValueError(f"vit-pytorch dim_head * heads ({dim_head} * {heads}) must equal dim {dim}; "
                         f"our backbone attention keeps the width")
    if heads == 1:
        raise ValueError("vit-pytorch heads=1 (dim_head == dim) has no attention output projection; not reproduced, use heads >= 2")
    if pool != "cls":
        raise ValueError(f"vit-pytorch pool={pool!r} (a mean that includes the class token) is not reproduced; use pool='cls'")
    if int(dim * (mlp_dim / dim)) != mlp_dim:
        raise ValueError(f"vit-pytorch mlp_dim {mlp_dim} is not reproduced as int(dim * mlp_ratio) for dim {dim}")
    return T2TConfig(img_size=image_size, in_chans=channels, num_classes=num_classes, embed_dim=dim, depth=depth,
                     num_heads=heads, mlp_ratio=mlp_dim / dim, qkv_bias=False, token_dim=None,
                     t2t_layers=tuple((k, s, s // 2) for k, s in t2t_layers), token_layout="vit_pytorch",
                     pos_embed="learn", **overrides)


_VP_BLOCK = {  # vit-pytorch Transformer layer -> our block (attention part 0, feed-forward part 1)
    "0.norm": "norm1", "0.to_qkv": "attn.qkv", "0.to_out.0": "attn.proj",
    "1.net.0": "norm2", "1.net.1": "mlp.fc1", "1.net.4": "mlp.fc2",
}


def convert_vit_pytorch(state_dict: dict[str, torch.Tensor], cfg: T2TConfig) -> dict[str, torch.Tensor]:
    """A ``vit_pytorch.t2t.T2TViT`` state dict -> ours (for ``cfg`` = :func:`config_from_vit_pytorch`).

    Its ``to_patch_embedding`` holds per soft split i four modules, the token Transformer at
    index 4i+3, and the final Linear at index 4 * len(t2t_layers).
    """
    n_split = len(cfg.t2t_layers)
    out = {}
    for key, value in state_dict.items():
        m = re.match(r"^to_patch_embedding\.(\d+)\.(.*)$", key)
        if m:
            idx, rest = int(m[1]), m[2]
            if idx == 4 * n_split:
                out[f"tokens_to_token.project.{rest}"] = value
                continue
            prefix = f"tokens_to_token.attention{idx // 4 + 1}"
        elif key.startswith("transformer."):
            prefix, rest = "", key[len("transformer."):]
        else:
            out[{"pos_embedding": "pos_embed", "cls_token": "cls_token"}.get(key, key.replace("mlp_head.", "head."))] = value
            continue
        if rest.startswith("norm."):
            out[f"{prefix}.{rest}" if prefix else rest] = value
            continue
        m = re.match(r"^layers\.(\d+)\.(.*)\.(weight|bias)$", rest)
        if m is None or m[2] not in _VP_BLOCK:
            raise ValueError(f"unexpected vit-pytorch T2TViT key {key!r}")
        block = prefix if prefix else f"blocks.{m[1]}"
        out[f"{block}.{_VP_BLOCK[m[2]]}.{m[3]}"] = value
    return out
