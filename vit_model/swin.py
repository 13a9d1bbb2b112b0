"""Swin Transformer (Liu et al., 2021): a hierarchical ViT with shifted-window attention.

An image (B, C, H, W) is cut into P×P patches (a conv with kernel = stride = P, then LayerNorm);
the tokens stay on their (h, w) grid, channels last. Four (or any number of) stages follow; every
stage after the first starts by merging each 2×2 neighbourhood into one token (width doubles,
resolution halves). Inside a stage, pre-norm blocks attend within non-overlapping M×M windows,
every second block on windows shifted by M/2 (a cyclic roll plus a mask that keeps tokens that
were not neighbours before the roll apart). Each window adds a learned bias per head and relative
offset. A final LayerNorm, global average pooling and a linear head classify.

State-dict keys are timm's ``SwinTransformer`` keys (timm >= 0.9 layout: ``layers.{i}.downsample``
at the start of stages i > 0, ``head.fc``), so timm weights load as the identity. The behaviour is
timm's, including its small-resolution rules:

* a stage whose resolution is <= the window (per dimension) uses one window of that resolution and
  is never shifted (timm's ``_calc_window_shift``; ``always_partition=True`` turns this off);
* a resolution that is not a multiple of the window is zero-padded at the bottom/right after the
  cyclic shift (as timm does), an odd resolution is padded before patch merging;
* window sizes and shifts are fixed by ``img_size``; other input sizes (multiples of the patch
  size) work at forward time with those windows and an attention mask built for the actual
  resolution, which is what timm does with ``strict_img_size=False`` (its default,
  ``strict_img_size=True``, refuses other sizes; at ``img_size`` both are the same).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import ArchConfig, check, check_rates, pair
from .base import FamilyModel
from .explain import AttentionRelevance, attention_rollout, fuse_heads, read_rollout, token_readout
from .layers import DropPath, Mlp, attention, drop_path_rates, init_linear_trunc_normal, run_checkpointed, take_indices
from .model import PatchEmbed

__all__ = ["SIZES", "SwinConfig", "SwinTransformer", "available_models", "match_name", "resample_rel_pos_table",
           "swin_flops"]

# Stage layout per size: width of stage 0 (doubling per stage), blocks per stage, heads per stage.
# tiny/small/base/large are the paper's Swin-T/S/B/L. nano/micro are ours, for 28×28 inputs with
# patch 2 (Fashion-MNIST): the 14×14 token grid gives stages at 14×14, 7×7 and 4×4. With window 7,
# stage 0 has 2×2 windows and real shifted-window attention; stages 1 and 2 are one window each
# (global attention over 49 and 16 tokens, no shift). Heads keep a width of 16 per head. micro puts
# its extra depth at 7×7, the finest resolution with global attention (cheap: 49 tokens) — the
# 4×4 stage holds most of the parameters but sees little spatial detail.
SIZES: dict[str, dict[str, Any]] = {
    "nano": dict(embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8)),
    "micro": dict(embed_dim=48, depths=(2, 4, 2), num_heads=(3, 6, 12)),
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}
NAMED_MODELS = (
    "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
    "swin_base_patch4_window12_384", "swin_large_patch4_window7_224", "swin_large_patch4_window12_384",
    "swin_nano_patch2_window7_28", "swin_micro_patch2_window7_28",
)
GLOBAL_POOLS = ("avg", "")
MASK_VALUE = -100.0  # timm's (and the original's) value for masked pairs in shifted windows


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class SwinConfig(ArchConfig):
    """Everything that defines a Swin Transformer (timm's argument names and defaults).

    ``window_size`` is the target M (int or (h, w)); a stage smaller than it uses a smaller window
    (see the module docstring). ``head_dim=None`` means width // heads. ``img_size`` fixes each
    stage's window and shift, so it decides the relative-position table shapes of small stages.
    """

    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    head_dim: int | None = None
    window_size: int | tuple[int, int] = 7
    always_partition: bool = False  # True: keep the full window and shift even on small stages
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5  # nn.LayerNorm's default, which timm's Swin uses
    global_pool: str = "avg"  # avg | "" (no pooling: logits per position, (B, h, w, classes))
    drop_rate: float = 0.0  # dropout before the head
    proj_drop_rate: float = 0.0  # dropout after attention projection and MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1  # stochastic depth, linear over all blocks (timm's default 0.1)
    fused_attn: bool = True  # F.scaled_dot_product_attention; False = the eager path

    family: ClassVar[str] = "swin"
    STRUCTURAL: ClassVar[tuple[str, ...]] = (
        "patch_size", "embed_dim", "depths", "num_heads", "head_dim", "window_size", "always_partition",
        "mlp_ratio", "qkv_bias",
    )

    def __post_init__(self) -> None:
        for name in ("img_size", "window_size"):
            v = getattr(self, name)
            if not isinstance(v, int):
                check([(isinstance(v, (tuple, list)) and len(v) == 2,
                        f"{name} must be an int or (height, width), got {v!r}")])
                object.__setattr__(self, name, pair(v))
        for name in ("depths", "num_heads"):
            v = getattr(self, name)
            check([(isinstance(v, (tuple, list)) and len(v) >= 1 and all(isinstance(d, int) for d in v),
                    f"{name} must be a non-empty sequence of ints (one per stage), got {v!r}")])
            object.__setattr__(self, name, tuple(v))
        h, w = self.img_hw
        p = self.patch_size
        check([
            (p >= 1, f"patch_size must be >= 1, got {p}"),
            (h >= p and w >= p and h % p == 0 and w % p == 0,
             f"img_size {self.img_size} must be a multiple of patch_size {p} (and at least one patch); "
             f"pick sizes that are multiples"),
            (self.in_chans >= 1, f"in_chans must be >= 1, got {self.in_chans}"),
            (self.num_classes >= 0, f"num_classes must be >= 0 (0 = no head), got {self.num_classes}"),
            (self.embed_dim >= 1, f"embed_dim must be >= 1, got {self.embed_dim}"),
            (all(d >= 1 for d in self.depths), f"depths must all be >= 1, got {self.depths}"),
            (len(self.num_heads) == len(self.depths),
             f"num_heads {self.num_heads} needs one entry per stage like depths {self.depths}"),
            (all(n >= 1 for n in self.num_heads), f"num_heads must all be >= 1, got {self.num_heads}"),
            (self.head_dim is None or self.head_dim >= 1, f"head_dim must be None or >= 1, got {self.head_dim}"),
            (self.head_dim is not None or all(d % n == 0 for d, n in zip(self.stage_dims, self.num_heads)),
             f"num_heads {self.num_heads} must divide the stage widths {self.stage_dims} (embed_dim {self.embed_dim} "
             f"doubling per stage); change num_heads or embed_dim, or set head_dim"),
            (min(pair(self.window_size)) >= 1, f"window_size must be >= 1, got {self.window_size}"),
            (self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
            (self.global_pool in GLOBAL_POOLS, f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}"),
        ])
        check_rates(self, ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"))

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.img_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    @property
    def num_features(self) -> int:
        return self.stage_dims[-1]

    def stage_resolutions(self, grid: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Token grid of each stage for a patch grid (default: img_size's); merging rounds up."""
        h, w = grid or self.grid_size
        out = [(h, w)]
        for _ in self.depths[1:]:
            h, w = (h + 1) // 2, (w + 1) // 2
            out.append((h, w))
        return out

    def stage_windows(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """(window, shift of the shifted blocks) per stage, fixed by img_size (timm's rule): a
        dimension no larger than the window gets one window of its size and no shift."""
        target = pair(self.window_size)
        out = []
        for res in self.stage_resolutions():
            if self.always_partition:
                window = target
                shift = (target[0] // 2, target[1] // 2)
            else:
                window = tuple(min(r, t) for r, t in zip(res, target))
                shift = tuple(0 if r <= m else t // 2 for r, m, t in zip(res, window, target))
            out.append((window, shift))
        return out


_NAME_RE = re.compile(r"^swin_(?P<size>[a-z]+)_patch(?P<patch>\d+)_window(?P<window>\d+)_(?P<img>\d+)$")


def match_name(name: str) -> dict[str, Any] | None:
    """``swin_tiny_patch4_window7_224`` -> SwinConfig fields (any size × patch × window × image
    size); None if the name is not a Swin name."""
    m = _NAME_RE.match(name)
    if not m or m["size"] not in SIZES:
        return None
    return dict(SIZES[m["size"]], patch_size=int(m["patch"]), window_size=int(m["window"]), img_size=int(m["img"]))


def available_models() -> list[str]:
    return list(NAMED_MODELS)


NAME_HELP = f"swin_<{'|'.join(SIZES)}>_patch<P>_window<W>_<img> (e.g. swin_tiny_patch4_window7_224)"


# ---------------------------------------------------------------------------- window helpers


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, wh * ww, C), windows in row-major order within each image."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C)  # (B, H, W, C) -> (B, nH, wh, nW, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)  # -> (B * nH * nW, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """(B * nW, wh * ww, C) -> (B, H, W, C); inverse of :func:`window_partition`."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)  # -> (B, nH, nW, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)  # -> (B, H, W, C)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """(N, N) row of the bias table for each pair of tokens in a window (N = wh * ww).

    Offsets dy in [-(wh-1), wh-1] and dx in [-(ww-1), ww-1] are shifted to start at 0 and
    flattened row-major over a (2wh-1, 2ww-1) table.
    """
    wh, ww = window
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (N,) coordinates of each token in the window
    dy = ys[:, None] - ys[None, :] + (wh - 1)  # (N, N), in [0, 2wh-2]
    dx = xs[:, None] - xs[None, :] + (ww - 1)  # (N, N), in [0, 2ww-2]
    return dy * (2 * ww - 1) + dx


def shifted_window_mask(hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """(nW, N, N) additive mask for attention in shifted windows over a padded (H, W) grid.

    After the cyclic roll by -shift, the last ``shift`` rows (columns) came from the top (left)
    edge. Each dimension is cut into regions — before the last window, the last window up to the
    wrapped part, the wrapped part — and a token may only attend to tokens of the same 2-D region
    (others get -100). A dimension that is not shifted is one region. This reproduces timm's mask
    exactly, including its placement on the padded grid.
    """

    def regions(n: int, m: int, s: int) -> torch.Tensor:
        labels = torch.zeros(n, dtype=torch.long, device=device)
        if s:
            labels[n - m:] = 1
            labels[n - s:] = 2
        return labels

    H, W = hw
    ids = regions(H, window[0], shift[0])[:, None] * 3 + regions(W, window[1], shift[1])[None, :]  # (H, W)
    ids = window_partition(ids.view(1, H, W, 1), window).squeeze(-1)  # (H, W) -> (nW, N)
    differ = ids[:, :, None] != ids[:, None, :]  # (nW, N, N)
    return torch.zeros(differ.shape, device=device, dtype=dtype).masked_fill(differ, MASK_VALUE)


def window_token_index(hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """(nW, N): for each window position of a block (windows as :func:`window_partition` orders
    them, after the cyclic shift and the bottom/right padding), the index of the token on the
    stage's unshifted, unpadded (H, W) grid (row-major), or -1 for padding."""
    H, W = hw
    Hp, Wp = (math.ceil(n / m) * m for n, m in zip(hw, window))
    ys = torch.arange(Hp)[:, None].expand(Hp, Wp)
    xs = torch.arange(Wp)[None, :].expand(Hp, Wp)
    # torch.roll by -shift puts original row (y + shift) % H at row y; rows >= H are padding
    idx = ((ys + shift[0]) % H) * W + (xs + shift[1]) % W
    idx = torch.where((ys < H) & (xs < W), idx, torch.full_like(idx, -1))  # (Hp, Wp)
    return window_partition(idx.reshape(1, Hp, Wp, 1), window).squeeze(-1)  # -> (nW, N)


def window_attention_to_dense(attn: torch.Tensor, hw: tuple[int, int], window: tuple[int, int],
                              shift: tuple[int, int]) -> torch.Tensor:
    """A block's window attention (B * nW, heads, N, N) -> (B, heads, T, T) over the stage's
    T = H * W tokens in their unshifted grid order: entry (q, k) is q's attention to k when both
    share a window, 0 otherwise. Attention to padding tokens is dropped (rows then sum to <= 1)."""
    H, W = hw
    idx = window_token_index(hw, window, shift).to(attn.device)
    nW, N = idx.shape
    B, heads, T = attn.shape[0] // nW, attn.shape[1], H * W
    slot = torch.where(idx < 0, torch.full_like(idx, T), idx)  # padding -> an extra slot T, dropped below
    rows = slot[:, :, None].expand(nW, N, N)
    cols = slot[:, None, :].expand(nW, N, N)
    dense = attn.new_zeros(B, heads, T + 1, T + 1)
    dense[:, :, rows, cols] = attn.reshape(B, nW, heads, N, N).transpose(1, 2)  # (B, heads, nW, N, N)
    return dense[:, :, :T, :T]


def resample_rel_pos_table(table: torch.Tensor, src_window: tuple[int, int], dst_window: tuple[int, int]) -> torch.Tensor:
    """A ((2h-1)(2w-1), heads) relative-position bias table resampled to another window size.

    Bicubic interpolation over the table's 2-D grid of offsets, as the Swin paper does when the
    window changes; ``align_corners`` keeps the zero offset and the largest offsets exactly. Same
    window: returned unchanged.
    """
    src_window, dst_window = pair(src_window), pair(dst_window)
    if src_window == dst_window:
        return table
    sh, sw = 2 * src_window[0] - 1, 2 * src_window[1] - 1
    dh, dw = 2 * dst_window[0] - 1, 2 * dst_window[1] - 1
    if table.shape[0] != sh * sw:
        raise ValueError(f"relative position table of shape {tuple(table.shape)} does not fit window {src_window}")
    heads, dtype = table.shape[1], table.dtype
    grid = table.float().T.reshape(1, heads, sh, sw)  # ((2h-1)(2w-1), heads) -> (1, heads, 2h-1, 2w-1)
    grid = F.interpolate(grid, size=(dh, dw), mode="bicubic", align_corners=True)
    return grid.reshape(heads, dh * dw).T.contiguous().to(dtype)  # -> ((2h'-1)(2w'-1), heads)


# ------------------------------------------------------------------------------------ layers


class SwinPatchEmbed(PatchEmbed):
    """(B, C, H, W) -> (B, H/P, W/P, D): the ViT patch projection followed by LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_eps: float):
        super().__init__(patch_size, in_chans, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows of N = wh * ww tokens, with a learned bias per
    head and relative offset (``relative_position_bias_table``, indexed by the non-persistent
    ``relative_position_index`` buffer) and an optional (nW, N, N) mask for shifted windows."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], head_dim: int | None = None,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window = window
        self.fused = fused
        attn_dim = self.head_dim * num_heads
        wh, ww = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def rel_pos_bias(self) -> torch.Tensor:
        N = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        return bias.view(N, N, -1).permute(2, 0, 1)  # (N*N, heads) -> (heads, N, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_attention: bool = False):
        B_, N, _ = x.shape  # B_ = B * nW
        H = self.num_heads
        qkv = self.qkv(x).reshape(B_, N, 3, H, self.head_dim)  # (B_, N, C) -> (B_, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # -> 3 x (B_, H, N, Dh)
        bias = self.rel_pos_bias().unsqueeze(0)  # (1, H, N, N)
        if mask is not None:  # (nW, N, N): the same mask for every image of the batch
            bias = bias + mask.unsqueeze(1)  # -> (nW, H, N, N)
        nW = bias.shape[0]
        attn = None
        # On the CPU a mask that needs a gradient (the learned bias, in training) sends SDPA to its
        # math fallback, slower than the eager path below (bench_model: 0.92x timm): use eager then.
        bias_grad = bias.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"
        if self.fused and not return_attention and not bias_grad:
            # window b*nW + w of the batch gets bias[w]; one bias (no mask) broadcasts as it is
            attn_mask = bias if nW == 1 else bias.expand(B_ // nW, -1, -1, -1, -1).reshape(B_, H, N, N)
            x = attention(q, k, v, attn_mask=attn_mask.to(q.dtype),
                          dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B_, H, N, Dh) @ (B_, H, Dh, N) -> (B_, H, N, N)
            attn = (attn.view(-1, nW, H, N, N) + bias).view(B_, H, N, N).softmax(dim=-1)
            x = self.attn_drop(attn) @ v  # (B_, H, N, N) @ (B_, H, N, Dh) -> (B_, H, N, Dh)
        x = x.transpose(1, 2).reshape(B_, N, -1)  # (B_, H, N, Dh) -> (B_, N, H*Dh)
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attention else x


class SwinBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)) in (shifted) windows, then x + mlp(norm2(x)).

    Works on (B, H, W, C). ``resolution`` is the stage resolution at img_size, for which the
    shifted-window mask is kept in the non-persistent ``attn_mask`` buffer; other resolutions
    get their mask computed on the fly.
    """

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], shift: tuple[int, int],
                 resolution: tuple[int, int], head_dim: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-5, fused_attn: bool = True):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(dim, num_heads, window, head_dim=head_dim, qkv_bias=qkv_bias,
                                    attn_drop=attn_drop, proj_drop=proj_drop, fused=fused_attn)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mask_hw = self._padded(resolution)
        mask = shifted_window_mask(self.mask_hw, window, shift) if any(shift) else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def _padded(self, hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(math.ceil(n / m) * m for n, m in zip(hw, self.window))

    def _mask_for(self, hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
        if not any(self.shift):
            return None
        if hw == self.mask_hw:
            return self.attn_mask
        return shifted_window_mask(hw, self.window, self.shift, device=like.device, dtype=like.dtype)

    def _window_attention(self, x: torch.Tensor, return_attention: bool):
        B, H, W, C = x.shape
        if any(self.shift):  # cyclic shift: windows now straddle the previous windows' borders
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        Hp, Wp = self._padded((H, W))
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))  # (B, H, W, C) -> (B, Hp, Wp, C), zeros bottom/right
        windows = window_partition(x, self.window)  # -> (B * nW, N, C)
        out = self.attn(windows, mask=self._mask_for((Hp, Wp), x), return_attention=return_attention)
        windows, attn = out if return_attention else (out, None)
        x = window_reverse(windows, self.window, Hp, Wp)[:, :H, :W]  # -> (B, H, W, C)
        if any(self.shift):
            x = torch.roll(x, shifts=self.shift, dims=(1, 2))
        return x, attn

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        y, attn = self._window_attention(self.norm1(x), return_attention)
        x = x + self.drop_path1(y)
        del y  # not alive while the MLP runs (bench_model: an extra live buffer costs page faults)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))  # the MLP acts per token: (B, H, W, C) as is
        return (x, attn) if return_attention else x


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim): each 2×2 neighbourhood concatenated
    (4C), normalised and projected. Odd sizes are zero-padded at the bottom/right first."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=norm_eps)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))  # -> even (H', W')
        # the original's channel order, which pretrained reductions expect:
        # (top-left, bottom-left, top-right, bottom-right)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)  # (B, H'/2, W'/2, 4C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Patch merging (stages i > 0) then ``depth`` blocks alternating plain and shifted windows."""

    def __init__(self, dim: int, out_dim: int, depth: int, num_heads: int, window: tuple[int, int],
                 shift: tuple[int, int], resolution: tuple[int, int], downsample: bool, drop_path: list[float],
                 cfg: SwinConfig):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, cfg.norm_eps) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            SwinBlock(out_dim, num_heads, window, shift if i % 2 else (0, 0), resolution, head_dim=cfg.head_dim,
                      mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_drop=cfg.proj_drop_rate,
                      attn_drop=cfg.attn_drop_rate, drop_path=drop_path[i], norm_eps=cfg.norm_eps,
                      fused_attn=cfg.fused_attn)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor, maps: list | None = None, grad_checkpointing: bool = False) -> torch.Tensor:
        """(B, H, W, C_in) -> (B, H', W', C); with ``maps`` a list, each block's attention
        probabilities are appended to it (eager path, no checkpointing)."""
        x = self.downsample(x)  # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C) for stages i > 0
        for block in self.blocks:
            if maps is not None:
                x, attn = block(x, return_attention=True)
                maps.append(attn)
            else:
                x = run_checkpointed(block, grad_checkpointing, x)
        return x


class ClassifierHead(nn.Module):
    """Global average pool over (h, w) (or none), dropout, linear ``fc`` (timm's ``head.fc``)."""

    def __init__(self, dim: int, num_classes: int, global_pool: str, drop_rate: float):
        super().__init__()
        self.global_pool = global_pool
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))  # (B, h, w, C) -> (B, C)
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


# ------------------------------------------------------------------------------------ model


class SwinTransformer(FamilyModel):
    """The Swin Transformer. ``SwinTransformer(SwinConfig(...))``; keys and behaviour match timm's."""

    first_conv = "patch_embed.proj.weight"  # adapted when in_chans changes
    head_keys = ("head.fc.weight", "head.fc.bias")  # dropped when num_classes changes

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.grad_checkpointing = False
        dims = cfg.stage_dims
        self.patch_embed = SwinPatchEmbed(cfg.patch_size, cfg.in_chans, dims[0], cfg.norm_eps)
        dpr = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))  # linear over all blocks
        stages, start = [], 0
        for i, ((window, shift), resolution) in enumerate(zip(cfg.stage_windows(), cfg.stage_resolutions())):
            depth = cfg.depths[i]
            stages.append(SwinStage(dims[max(i - 1, 0)], dims[i], depth, cfg.num_heads[i], window, shift, resolution,
                                    downsample=i > 0, drop_path=dpr[start:start + depth], cfg=cfg))
            start += depth
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(cfg.num_features, eps=cfg.norm_eps)
        self.head = ClassifierHead(cfg.num_features, cfg.num_classes, cfg.global_pool, cfg.drop_rate)
        self.init_weights()

    # ---------------------------------------------------------------- init and contract helpers
    def init_weights(self) -> None:
        """timm's: linear weights truncated normal (std 0.02), biases 0, bias tables std 0.02;
        the patch conv keeps PyTorch's default init."""
        init_linear_trunc_normal(self)
        for name, p in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head (new random weights) for ``num_classes`` classes."""
        cfg = self.cfg.replace(num_classes=num_classes, global_pool=self.cfg.global_pool if global_pool is None else global_pool)
        self.cfg, self.num_classes, self.global_pool = cfg, num_classes, cfg.global_pool
        self.head = ClassifierHead(cfg.num_features, num_classes, cfg.global_pool, cfg.drop_rate)
        init_linear_trunc_normal(self.head)
        self.head.to(self.patch_embed.proj.weight.device)

    # ---------------------------------------------------------------------------- forward path
    def forward_features(self, x: torch.Tensor, return_attention: bool = False):
        """Images -> normalised last-stage features (B, h, w, C) (channels last, like timm); with
        ``return_attention`` also each block's window attention [(B * nW, heads, N, N)] computed
        on the eager path for this call (windows of image b are rows b*nW ... b*nW + nW - 1)."""
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, H/P, W/P, D)
        maps = [] if return_attention else None
        for stage in self.layers:
            x = stage(x, maps, self.grad_checkpointing)
        x = self.norm(x)
        return (x, maps) if return_attention else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, h, w, C) -> (B, classes); with global_pool='' -> (B, h, w, classes)."""
        return self.head(x, pre_logits=pre_logits)

    def attention_relevance(self, x: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                            add_residual: bool = True) -> AttentionRelevance:
        """Logits and the rollout relevance of each last-stage token: the last stage's window
        attention made dense on its grid (:func:`window_attention_to_dense`), rolled out over that
        stage's blocks, read uniformly (global average pooling). See :mod:`vit_model.explain`."""
        B = x.shape[0]
        x = self.patch_embed(x)  # (B, C, H, W) -> (B, H/P, W/P, D)
        for stage in self.layers[:-1]:
            x = stage(x)
        last, maps = self.layers[-1], []
        x = last(x, maps)  # (B, h, w, C), maps [(B * nW, heads, N, N)]
        h, w = x.shape[1], x.shape[2]
        # heads fused per window first (the same as after: entries outside a window are 0 in every head),
        # so the dense matrices are (B, 1, T, T), not (B, heads, T, T)
        dense = [window_attention_to_dense(fuse_heads(a, head_fusion).unsqueeze(1), (h, w), blk.window, blk.shift)
                 for a, blk in zip(maps, last.blocks)]
        logits = self.forward_head(self.norm(x))
        rollout = attention_rollout(dense, "mean", discard_ratio, add_residual)  # (B, h*w, h*w)
        relevance = read_rollout(rollout, token_readout("avg", h * w, 0, B, x.device), 0)
        cell = self.cfg.patch_size * 2 ** (len(self.layers) - 1)  # pixels per last-stage token (merging rounds up)
        return AttentionRelevance(logits, relevance.reshape(B, h, w), (h * cell, w * cell))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Outputs of selected stages (timm's contract): (B, C_i, H_i, W_i) for ``NCHW`` or
        (B, H_i, W_i, C_i) for ``NHWC`` (timm offers NCHW only).

        ``indices``: an int n takes the last n stages, a sequence takes those stage indices
        (negative allowed); None takes all. ``norm`` applies the final norm to the last stage's
        output only (it is sized for that stage). Returns the list alone with
        ``intermediates_only``, else (final features (B, h, w, C), list); the final features are
        normalised only when the last stage ran (``stop_early`` may stop before it).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        num_stages = len(self.layers)
        take = take_indices(indices, num_stages)
        last = max(take) if stop_early else num_stages - 1
        x = self.patch_embed(x)
        intermediates = []
        for i, stage in enumerate(self.layers[: last + 1]):
            x = stage(x, grad_checkpointing=self.grad_checkpointing)
            if i in take:
                y = self.norm(x) if norm and i == num_stages - 1 else x
                intermediates.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)  # -> (B, C, H, W)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if last == num_stages - 1 else x), intermediates

    # ------------------------------------------------------------------------------- weights
    @staticmethod
    def adapt_img_size(state_dict: dict[str, torch.Tensor], src: SwinConfig, dst: SwinConfig) -> dict[str, torch.Tensor]:
        """Weights of an ``src.img_size`` model for ``dst.img_size``.

        Every parameter carries over unchanged except the relative-position tables of stages
        whose window changes with the image size (a stage no larger than window_size uses a
        window of its own size): those are resampled with :func:`resample_rel_pos_table`. The
        attention masks and position-index buffers are not in the state dict; the model
        recomputes them for ``dst``.
        """
        sd = dict(state_dict)
        src_windows, dst_windows = src.stage_windows(), dst.stage_windows()
        for i, depth in enumerate(src.depths):
            (w_src, _), (w_dst, _) = src_windows[i], dst_windows[i]
            for j in range(depth):
                key = f"layers.{i}.blocks.{j}.attn.relative_position_bias_table"
                if key in sd and w_src != w_dst:
                    sd[key] = resample_rel_pos_table(sd[key], w_src, w_dst)
        return sd

    @staticmethod
    def recomputed_keys(cfg: SwinConfig) -> set[str]:
        """Nothing: the index and mask buffers are non-persistent (never in a state dict)."""
        return set()


# ------------------------------------------------------------------------------------ FLOPs


def swin_flops(cfg: SwinConfig, img_hw: tuple[int, int] | None = None) -> float:
    """Forward multiply-adds x2 per image (convolutions and matmuls; attention included), with
    the windows fixed by ``cfg.img_size`` and padding counted where the model pads."""
    h, w = img_hw or cfg.img_hw
    grid = (h // cfg.patch_size, w // cfg.patch_size)
    dims = cfg.stage_dims
    macs = grid[0] * grid[1] * cfg.in_chans * cfg.patch_size**2 * dims[0]  # patch embedding conv
    for i, ((window, _), (rh, rw)) in enumerate(zip(cfg.stage_windows(), cfg.stage_resolutions(grid))):
        D = dims[i]
        if i > 0:  # patch merging: 4 * C_in -> D on every merged token
            macs += rh * rw * 4 * dims[i - 1] * D
        attn_dim = (cfg.head_dim or D // cfg.num_heads[i]) * cfg.num_heads[i]
        N = window[0] * window[1]
        padded = math.ceil(rh / window[0]) * math.ceil(rw / window[1]) * N  # tokens incl. window padding
        hidden = int(D * cfg.mlp_ratio)
        per_block = (
            padded * D * 3 * attn_dim  # qkv on every (padded) window token
            + 2 * padded * N * attn_dim  # q @ k^T and attn @ v inside each window
            + padded * attn_dim * D  # output projection
            + rh * rw * 2 * D * hidden  # MLP on the unpadded tokens
        )
        macs += cfg.depths[i] * per_block
    (rh, rw) = cfg.stage_resolutions(grid)[-1]
    if cfg.num_classes:
        macs += (1 if cfg.global_pool == "avg" else rh * rw) * cfg.num_features * cfg.num_classes
    return 2.0 * macs
