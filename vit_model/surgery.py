"""Checkpoint surgery as pure functions: position embeddings and input channels.

Each function takes tensors and returns new tensors; none touches a module. They match timm's
``resample_abs_pos_embed`` / ``adapt_input_conv`` numerically, so weights adapted here behave
like weights adapted by timm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample (1, prefix + Ho*Wo, D) position embeddings to a (Hn, Wn) patch grid.

    Prefix tokens (class, registers) keep their embeddings. Resampling to the same grid returns
    the input unchanged.
    """
    n_prefix = num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(pos_embed.shape[1] - n_prefix)
        old_grid = (side, side)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] + n_prefix != pos_embed.shape[1]:
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not fit a {old_grid} grid "
            f"with {n_prefix} prefix tokens"
        )
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :n_prefix], pos_embed[:, n_prefix:]
    dim, dtype = grid.shape[-1], grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, Ho, Wo)
    grid = F.interpolate(grid, size=new_grid, mode=interpolation, antialias=antialias)  # (1, D, Hn, Wn)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)  # (1, Hn*Wn, D)
    return torch.cat([prefix, grid], dim=1)


def sincos_pos_embed_2d(
    dim: int, grid: tuple[int, int], num_prefix_tokens: int = 0, temperature: float = 10000.0
) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings (MAE / big_vision layout), shape (1, prefix + H*W, dim).

    Half the channels encode the row, half the column; prefix tokens get zeros.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embeddings need embed_dim divisible by 4, got {dim}")
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    omega = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0)
    omega = 1.0 / temperature**omega  # (D/4,)
    out_y = ys.reshape(-1, 1) * omega  # (H*W, D/4)
    out_x = xs.reshape(-1, 1) * omega
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1).float()  # (H*W, D)
    prefix = torch.zeros(num_prefix_tokens, dim)
    return torch.cat([prefix, emb], dim=0).unsqueeze(0)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a (D, C, P, P) patch-embedding kernel to ``in_chans`` input channels.

    RGB -> 1 channel sums the colour kernels (a grey image then gives the response of the grey
    RGB image). Otherwise channels are tiled and scaled by C / in_chans so activations keep their
    magnitude.
    """
    out_c, old_c, kh, kw = weight.shape
    if old_c == in_chans:
        return weight
    dtype = weight.dtype
    w = weight.float()
    if in_chans == 1:
        if old_c > 3:
            w = w.reshape(out_c, old_c // 3, 3, kh, kw).sum(dim=2)
        else:
            w = w.sum(dim=1, keepdim=True)
    elif old_c != 3:
        raise ValueError(f"cannot adapt a {old_c}-channel patch embedding to {in_chans} channels; only RGB sources adapt")
    else:
        repeat = math.ceil(in_chans / 3)
        w = w.repeat(1, repeat, 1, 1)[:, :in_chans] * (3.0 / in_chans)
    return w.to(dtype)
