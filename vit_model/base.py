"""What the families' model classes share, written once.

:class:`FamilyModel` — every family: ``forward`` = ``forward_features`` + ``forward_head``
(with attention maps on request), ``save_pretrained``, ``num_params``.
:class:`TokenModel` — families whose trunk is one sequence of blocks over one token grid (ViT,
hybrid, T2T): timm's ``forward_intermediates`` over those blocks. A subclass provides
``_embed(x) -> (tokens (B, prefix + h*w, D), (h, w))``, ``blocks``, ``norm``,
``num_prefix_tokens``, ``global_pool`` and ``grad_checkpointing``; :meth:`TokenModel._readout`
is the hook a family with its own pooling overrides (CCT's sequence pooling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .explain import AttentionRelevance, attention_rollout, read_rollout, token_readout
from .files import save_pretrained
from .layers import run_checkpointed, take_indices


class FamilyModel(nn.Module):
    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            feats, maps = self.forward_features(x, return_attention=True)
            return self.forward_head(feats), maps
        return self.forward_head(self.forward_features(x))

    def save_pretrained(self, directory, meta: dict | None = None) -> None:
        """Write ``config.json`` (with the family) + ``model.safetensors`` (see :mod:`vit_model.files`)."""
        save_pretrained(self, directory, meta=meta)

    @property
    def num_params(self) -> int:
        """All parameters (fixed tables kept as parameters, e.g. T2T's sinusoid, included)."""
        return sum(p.numel() for p in self.parameters())


class TokenModel(FamilyModel):
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """Outputs of selected blocks (timm's contract).

        ``indices``: an int n takes the last n blocks, a sequence takes those block indices
        (negative allowed); None takes all. Intermediates are (B, D, h, w) over the token grid for
        ``NCHW`` or (B, N, D) for ``NLC``; with ``return_prefix_tokens`` each is (spatial, prefix).
        Returns the list alone with ``intermediates_only``, else (final tokens, list).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        depth = len(self.blocks)
        take = take_indices(indices, depth)
        x, (h, w) = self._embed(x)
        B = x.shape[0]
        last = max(take) if stop_early else depth - 1
        n_prefix = self.num_prefix_tokens
        intermediates = []
        for i, block in enumerate(self.blocks[: last + 1]):
            x = run_checkpointed(block, self.grad_checkpointing, x)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, spatial = y[:, :n_prefix], y[:, n_prefix:]
                if output_fmt == "NCHW":
                    spatial = spatial.reshape(B, h, w, -1).permute(0, 3, 1, 2)  # (B, N, D) -> (B, D, h, w)
                intermediates.append((spatial, prefix) if return_prefix_tokens else spatial)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def attention_relevance(self, x: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                            add_residual: bool = True) -> AttentionRelevance:
        """Logits and the rollout relevance of each patch token on the (h, w) token grid, read
        the way the head reads the tokens (:meth:`_readout`); see :mod:`vit_model.explain`."""
        tokens, (h, w) = self._embed(x)
        maps = []
        for block in self.blocks:  # forward_features' loop, on the eager path, keeping the grid
            tokens, attn = block(tokens, return_attention=True)
            maps.append(attn)  # (B, heads, T, T)
        feats = self.norm(tokens)
        logits = self.forward_head(feats)
        rollout = attention_rollout(maps, head_fusion, discard_ratio, add_residual)  # (B, T, T)
        relevance = read_rollout(rollout, self._readout(feats), self.num_prefix_tokens)  # (B, h*w)
        return AttentionRelevance(logits, relevance.reshape(x.shape[0], h, w), (x.shape[-2], x.shape[-1]))

    def _readout(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T) weights with which the head reads the normalised tokens ``feats``: the class
        token for 'token' pooling, uniform over the patch tokens otherwise."""
        B, T, _ = feats.shape
        return token_readout(self.global_pool, T, self.num_prefix_tokens, B, feats.device)
