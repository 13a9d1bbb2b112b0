"""Vision Transformer (Dosovitskiy et al., 2021) in one readable file.

An image (B, C, H, W) is cut into P×P patches; a convolution with kernel = stride = P is exactly a
shared linear projection of each flattened patch. A class token (and optional register tokens)
is prepended, position embeddings are added, pre-norm transformer blocks follow, and a head
classifies the pooled token. State-dict keys are timm's ``VisionTransformer`` keys, so timm
weights load as the identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import TokenModel
from .config import ViTConfig
from .layers import Attention, Block, DropPath, LayerScale, Mlp, drop_path_rates, run_checkpointed
from .surgery import resample_pos_embed, sincos_pos_embed_2d

__all__ = ["Attention", "Block", "DropPath", "LayerScale", "Mlp", "PatchEmbed", "VisionTransformer", "vit_flops"]


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/P, W/P, D): one linear projection per non-overlapping P×P patch."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, {self.in_chans}, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        p = self.patch_size
        if c != self.in_chans:
            raise ValueError(
                f"expected {self.in_chans} input channels, got shape {tuple(x.shape)}; "
                f"convert the images or adapt the model with in_chans={c}"
            )
        if h < p or w < p:
            raise ValueError(f"input of shape {tuple(x.shape)} is smaller than one {p}x{p} patch")
        if h % p or w % p:
            raise ValueError(
                f"input of shape {tuple(x.shape)}: height {h} and width {w} must be divisible by patch size {p}; "
                f"resize or pad to a multiple of {p}"
            )
        x = self.proj(x)  # (B, C, H, W) -> (B, D, H/P, W/P)
        return x.permute(0, 2, 3, 1)  # (B, D, h, w) -> (B, h, w, D)


class VisionTransformer(TokenModel):
    """The ViT. ``VisionTransformer(ViTConfig(...))``; keys and behaviour match timm's."""

    first_conv = "patch_embed.proj.weight"  # adapted when in_chans changes
    head_keys = ("head.weight", "head.bias")  # dropped when num_classes changes

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        grid = cfg.grid_size
        embed_len = grid[0] * grid[1] + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
        if cfg.pos_embed == "none":
            self.pos_embed = None
        elif cfg.pos_embed == "sincos":
            n_prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(D, grid, n_prefix), requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, D))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)

        dpr = drop_path_rates(cfg.drop_path_rate, cfg.depth)  # stochastic depth grows with depth
        self.blocks = nn.Sequential(*[
            Block(D, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm,
                  init_values=cfg.init_values, proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
                  drop_path=dpr[i], norm_eps=cfg.norm_eps, fused_attn=cfg.fused_attn)
            for i in range(cfg.depth)
        ])
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.final_norm and not cfg.use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.final_norm and cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ---------------------------------------------------------------- init and contract helpers
    def init_weights(self) -> None:
        if self.pos_embed is not None and self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight  # patch projection initialised like a linear layer (MAE)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (new random weights) for ``num_classes`` classes."""
        cfg = self.cfg.replace(num_classes=num_classes, global_pool=global_pool if global_pool is not None else self.cfg.global_pool)
        self.cfg, self.num_classes, self.global_pool = cfg, num_classes, cfg.global_pool
        self.head = nn.Linear(cfg.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.head.to(self.patch_embed.proj.weight.device)

    # ---------------------------------------------------------------------------- forward path
    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        if self.pos_embed is None:
            return None
        cfg = self.cfg
        if grid == cfg.grid_size:
            return self.pos_embed
        n_prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        if cfg.pos_embed == "sincos":  # exact for any grid, no interpolation needed
            return sincos_pos_embed_2d(cfg.embed_dim, grid, n_prefix).to(self.pos_embed)
        return resample_pos_embed(self.pos_embed, grid, cfg.grid_size, num_prefix_tokens=n_prefix)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, h, w, D)
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)  # (B, h, w, D) -> (B, N, D)
        pos = self._pos_embed_for((h, w))
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(B, -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(B, -1, -1))
        if self.cfg.no_embed_class:  # position embeddings cover patches only: add, then prepend
            x = x + pos if pos is not None else x
            x = torch.cat(prefix + [x], dim=1) if prefix else x
        else:  # original ViT: prepend, then add (the class token has a position too)
            x = torch.cat(prefix + [x], dim=1) if prefix else x  # (B, N, D) -> (B, prefix + N, D)
            x = x + pos if pos is not None else x
        return self.pos_drop(x), (h, w)

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        return run_checkpointed(block, self.grad_checkpointing, x)

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
                x = self._run_block(block, x)
        x = self.norm(x)
        return (x, maps) if return_attention else x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, T, D) -> (B, D)
        if self.global_pool == "token":
            return x[:, 0]  # the class token
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    # ------------------------------------------------------------------------------- weights
    @staticmethod
    def adapt_img_size(state_dict: dict[str, torch.Tensor], src: ViTConfig, dst: ViTConfig) -> dict[str, torch.Tensor]:
        """Position embeddings of ``src``'s grid resampled to ``dst``'s (sin-cos ones recomputed)."""
        sd = dict(state_dict)
        if src.grid_size != dst.grid_size and "pos_embed" in sd:
            n_prefix = 0 if src.no_embed_class else src.num_prefix_tokens
            if dst.pos_embed == "sincos":
                sd.pop("pos_embed")  # recomputed exactly by the model for the new grid
            else:
                sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], dst.grid_size, src.grid_size, n_prefix)
        return sd

    @staticmethod
    def recomputed_keys(cfg: ViTConfig) -> set[str]:
        """Parameters the model computes itself, so a state dict may leave them out."""
        return {"pos_embed"} if cfg.pos_embed == "sincos" else set()


def vit_flops(cfg: ViTConfig, img_hw: tuple[int, int] | None = None) -> float:
    """Forward multiply-adds x2 per image (matmuls only; attention included), for MFU."""
    h, w = img_hw or cfg.img_hw
    n = (h // cfg.patch_size) * (w // cfg.patch_size)
    t = n + cfg.num_prefix_tokens
    D, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    patch = n * cfg.in_chans * cfg.patch_size**2 * D
    per_block = t * D * 3 * D + 2 * t * t * D + t * D * D + 2 * t * D * hidden
    head = D * cfg.num_classes
    return 2.0 * (patch + cfg.depth * per_block + head)
