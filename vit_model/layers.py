"""Transformer building blocks shared by every family (timm's state-dict names).

Each layer takes plain arguments (width, heads, rates), not a family config, so the plain ViT,
the hybrid / CCT backbone, T2T-ViT's token and backbone blocks and Swin's stages all use the
same Attention / Mlp / Block / DropPath code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

NORM_LAYOUTS = ("pre", "cct")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, run in float32 for bfloat16 inputs on the CPU.

    PyTorch's CPU flash-attention kernel is slow in bfloat16: its backward took 7x the float32
    time for (64 images, 2 heads, 49 tokens, 32 per head) on an AVX512-BF16 EPYC (docs/training.md),
    more than bf16 autocast saves in all the matmuls around it. Autocast is switched off inside,
    so the kernel really runs in float32; the result comes back in the inputs' dtype."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, D) tokens.

    ``fused`` uses ``F.scaled_dot_product_attention``; ``return_attention=True`` takes the eager
    path and also returns the (B, heads, N, N) attention probabilities.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_eps: float = 1e-6,
                 fused: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3*D) -> (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # -> 3 x (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = None
        if self.fused and not return_attention:
            x = attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, Dh) @ (B, H, Dh, N) -> (B, H, N, N)
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v  # (B, H, N, N) @ (B, H, N, Dh) -> (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, H, N, Dh) -> (B, N, D)
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attention else x


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout; ``out_features`` defaults to ``in_features``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)  # (B, N, D) -> (B, N, D*r)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)  # (B, N, D*r) -> (B, N, D)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """A transformer block.

    ``norm_layout="pre"`` (ViT): x + attn(norm1(x)), then x + mlp(norm2(x)).
    ``norm_layout="cct"`` (Compact Transformers): x + attn(norm1(x)), then x = norm2(x) and
    x + mlp(x): the residual stream itself is normalised before the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_norm: bool = False, init_values: float | None = None, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 fused_attn: bool = True, norm_layout: str = "pre"):
        super().__init__()
        if norm_layout not in NORM_LAYOUTS:
            raise ValueError(f"norm_layout must be one of {NORM_LAYOUTS}, got {norm_layout!r}")
        self.norm_layout = norm_layout
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
                              proj_drop=proj_drop, norm_eps=norm_eps, fused=fused_attn)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        attn = None
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True)
            x = x + self.drop_path1(self.ls1(y))
            del y
        else:  # no name keeps the attention output alive while the MLP runs: one buffer fewer
            # per block changes the allocator's layout enough to cost ~8 % on the CPU (bench_model)
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        if self.norm_layout == "cct":
            x = self.norm2(x)
            x = x + self.drop_path2(self.ls2(self.mlp(x)))
        else:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attention else x


def run_checkpointed(module: nn.Module, enabled: bool, *args):
    """``module(*args)``, through activation checkpointing when ``enabled`` and gradients are on."""
    if enabled and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth growing linearly from 0 to ``rate`` over ``depth`` blocks."""
    return torch.linspace(0, rate, depth, device="cpu").tolist() if depth else []  # cpu: works under meta-device init


def take_indices(indices, depth: int) -> list[int]:
    """timm's ``indices`` argument of forward_intermediates -> sorted block/stage indices."""
    if indices is None:
        take = list(range(depth))
    elif isinstance(indices, int):
        take = list(range(depth - indices, depth))
    else:
        take = [i if i >= 0 else depth + i for i in indices]
    if any(i < 0 or i >= depth for i in take):
        raise ValueError(f"indices {indices} out of range for depth {depth}")
    return take


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """timm's default: Linear weights truncated normal (std 0.02), biases zero; LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def has_overlapping_convs(model: nn.Module) -> bool:
    """Whether ``model`` has a 2-D convolution whose kernel is larger than its stride (a conv stem
    or CCT tokenizer, as opposed to a patchify projection where kernel == stride)."""
    return any(isinstance(m, nn.Conv2d) and any(k > s for k, s in zip(m.kernel_size, m.stride, strict=True))
               for m in model.modules())


def to_preferred_memory_format(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D weights in channels-last layout when it has overlapping convolutions.

    oneDNN (CPU) and cuDNN run such convolutions, their batch norms and poolings faster in NHWC;
    measured here on one CPU thread, a training step of the conv-stem hybrid is ~12 % faster and
    the CCT's ~30 % faster (outputs equal to float rounding). Inputs may stay NCHW: PyTorch picks
    the layout from the weights. Patchify-only models are returned unchanged. Works in place, like
    ``Module.to``; state dicts saved from it are made contiguous by the savers as usual.
    """
    if has_overlapping_convs(model):
        model.to(memory_format=torch.channels_last)
    return model
