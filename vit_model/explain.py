"""Where a model looks: attention rollout (Abnar & Zuidema, 2020) and a per-image heatmap for
every family.

:func:`attention_rollout` is the pure algorithm: per layer, fuse the heads (mean by default),
add the identity for the residual connection and normalise each row to sum 1, then multiply the
layers, last on the left: ``R = Â_L ... Â_2 Â_1``. Row ``i`` of ``R`` says how much of token
``i``'s final representation flows from each input token.

:func:`explain` / :func:`attention_heatmap` turn that into a (B, H, W) map over the image for any
model of :mod:`vit_model.registry`. Each family's model class provides
``attention_relevance(x, head_fusion, discard_ratio, add_residual) -> AttentionRelevance``: the logits, one relevance
value per cell of a token grid, and the pixel extent that grid covers. The families read the
rollout the way their head reads the tokens:

* **ViT, hybrid, T2T** roll out every backbone block over the whole sequence (class and register
  tokens included, so attention that flows through them is counted) and take the row(s) the head
  reads: the class token's row for ``global_pool='token'``; for pooling over the patch tokens
  (``'avg'``, or no class token) the mean of the patch tokens' rows — the pooled vector is their
  mean, so its relevance is the mean of theirs; for CCT's sequence pooling the rows weighted by the
  pooling's own softmax weights. The prefix columns (class, register tokens) are then dropped.
* **Conv stems (hybrid)**: the token grid is the stem's output grid; each token's receptive field
  overlaps its neighbours', so the grid is upsampled bilinearly to the image (an approximation).
* **T2T**: the rollout runs over the backbone's grid only. The soft-split stages before it are
  local (each token mixes an overlapping k×k neighbourhood of the previous grid, centred on the
  token's position) and are not rolled out: upsampling the backbone grid stands in for them.
* **Swin**: global pooling reads the last stage's tokens uniformly, so the map is the mean row of
  the rollout *within the last stage*: each block's window attention is scattered back into a
  dense (tokens × tokens) matrix on the stage's unshifted grid (shifted windows rolled back,
  padding dropped; :func:`vit_model.swin.window_attention_to_dense`) and those blocks are rolled
  out. Earlier stages (and their patch merging) are not rolled out; the last-stage grid is
  upsampled over the pixels it covers (padding included) and cropped to the image.

The heatmap is min-max normalised per image to [0, 1] (a constant map is all zeros). Nothing here
changes the model: maps come from the eager attention path for this call only, in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_FUSIONS = ("mean", "max", "min")


class AttentionRelevance(NamedTuple):
    """What a family's ``attention_relevance`` returns."""

    logits: torch.Tensor  # (B, num_classes): the model's ordinary output for these images
    grid: torch.Tensor  # (B, h, w): relevance of each token of the family's token grid (>= 0)
    extent: tuple[int, int]  # pixels (H', W') the grid covers; >= the image when the grid is padded


class Explanation(NamedTuple):
    logits: torch.Tensor  # (B, num_classes)
    heatmap: torch.Tensor  # (B, H, W) in [0, 1]


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """(B, heads, T, T) -> (B, T, T) by the mean, max or min over heads."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention maps must be (B, heads, T, T), got shape {tuple(attn.shape)}")
    if head_fusion == "mean":
        return attn.mean(dim=1)
    return attn.amax(dim=1) if head_fusion == "max" else attn.amin(dim=1)


def attention_rollout(maps: Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0,
                      add_residual: bool = True) -> torch.Tensor:
    """Attention rollout over layers ``maps`` [(B, heads, T, T)], first layer first -> (B, T, T).

    Per layer: fuse heads (``head_fusion``); with ``discard_ratio`` > 0, zero the smallest
    ``floor(discard_ratio * T)`` entries of each row, never the diagonal (Gildenblat's
    noise-reduction variant; 0 = the paper's rollout); with ``add_residual`` add the identity (the
    skip connection); normalise rows to sum 1. Then ``R = Â_L @ ... @ Â_1``. Every row of the
    result sums to 1.
    """
    if not maps:
        raise ValueError("attention_rollout needs at least one layer of attention maps")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    rollout = None
    for attn in maps:
        a = fuse_heads(attn.float(), head_fusion)  # (B, heads, T, T) -> (B, T, T)
        B, T, _ = a.shape
        eye = torch.eye(T, dtype=a.dtype, device=a.device)
        n_drop = int(discard_ratio * T)
        if n_drop:
            scores = a.masked_fill(eye.bool(), float("inf"))  # the diagonal is never discarded
            drop = scores.topk(n_drop, dim=-1, largest=False).indices  # (B, T, n_drop)
            a = a.scatter(-1, drop, 0.0)
        if add_residual:
            a = a + eye
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # rows sum to 1
        if rollout is not None and rollout.shape[-1] != T:
            raise ValueError(f"attention maps of different sizes ({rollout.shape[-1]} and {T} tokens) cannot be rolled out")
        rollout = a if rollout is None else a @ rollout  # (B, T, T) @ (B, T, T): later layers on the left
    return rollout


def read_rollout(rollout: torch.Tensor, readout: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Relevance of each non-prefix token, (B, N): the rollout's rows weighted by ``readout``
    (B, T) — how the head reads the tokens (one-hot on the class token, uniform over the patch
    tokens, pooling weights) — with the prefix columns dropped."""
    rel = (readout.unsqueeze(1).to(rollout.dtype) @ rollout).squeeze(1)  # (B, 1, T) @ (B, T, T) -> (B, T)
    return rel[:, num_prefix_tokens:]


def token_readout(global_pool: str, num_tokens: int, num_prefix_tokens: int, batch: int,
                  device: torch.device | None = None, pool_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) weights of the tokens the head reads: ``'token'`` -> the class token (index 0);
    ``'seq'`` -> ``pool_weights`` (B, N) over the patch tokens; anything else (``'avg'``, no
    pooling) -> uniform over the patch tokens."""
    w = torch.zeros(batch, num_tokens, device=device)
    if global_pool == "token":
        w[:, 0] = 1.0
    elif pool_weights is not None:
        w[:, num_prefix_tokens:] = pool_weights.reshape(batch, -1).to(w.dtype)
    else:
        w[:, num_prefix_tokens:] = 1.0 / (num_tokens - num_prefix_tokens)
    return w


def to_image(grid: torch.Tensor, extent: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) relevance -> (B, H, W) in [0, 1]: bilinear upsampling over the ``extent`` the grid
    covers, cropped to the image (top-left aligned, as the models pad bottom/right), min-max
    normalised per image (a constant map becomes zeros)."""
    up = F.interpolate(grid.unsqueeze(1).float(), size=tuple(extent), mode="bilinear", align_corners=False)
    up = up[:, 0, : image_hw[0], : image_hw[1]]  # (B, 1, H', W') -> (B, H, W)
    lo = up.amin(dim=(1, 2), keepdim=True)
    span = up.amax(dim=(1, 2), keepdim=True) - lo
    return torch.where(span > 1e-12, (up - lo) / span.clamp_min(1e-12), torch.zeros_like(up)).clamp_(0.0, 1.0)


@torch.no_grad()
def explain(model: nn.Module, images: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
            add_residual: bool = True) -> Explanation:
    """Logits and a (B, H, W) attention heatmap in [0, 1] for normalised ``images`` (B, C, H, W),
    any family (see the module docstring). The model runs in eval mode for this call."""
    relevance = getattr(model, "attention_relevance", None)
    if relevance is None:
        raise TypeError(f"{type(model).__name__} has no attention_relevance(); build the model with vit_model "
                        "(create_model / from_pretrained) to get attention heatmaps")
    was_training = model.training
    model.eval()
    try:
        out = relevance(images, head_fusion=head_fusion, discard_ratio=discard_ratio, add_residual=add_residual)
    finally:
        model.train(was_training)
    return Explanation(out.logits, to_image(out.grid, out.extent, tuple(images.shape[-2:])))


def attention_heatmap(model: nn.Module, images: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      add_residual: bool = True) -> torch.Tensor:
    """(B, H, W) heatmap in [0, 1] of where ``model`` looks in ``images``; :func:`explain` without
    the logits."""
    return explain(model, images, head_fusion, discard_ratio, add_residual).heatmap
