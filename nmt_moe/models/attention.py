"""Attention of decoder queries over encoder states: Luong "general"/"dot" and Bahdanau "additive".

The key side depends only on the source, so `keys(memory)` runs once per batch (training) or once per
sentence (decoding) and every decoder step only projects its query and scores it against those keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ATTENTION_TYPES = ("general", "dot", "additive")


class Attention(nn.Module):
    """Scores queries [B, T, H] against precomputed keys [B, S, H]; returns context and weights."""

    def __init__(self, kind: str, hidden_size: int) -> None:
        super().__init__()
        if kind not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {kind!r}")
        self.kind = kind
        # general: score = q . (W m), so W m is the key. additive: score = v . tanh(W_k m + W_q q).
        self.key_proj = nn.Linear(hidden_size, hidden_size, bias=False) if kind != "dot" else None
        self.query_proj = nn.Linear(hidden_size, hidden_size) if kind == "additive" else None
        self.v = nn.Linear(hidden_size, 1, bias=False) if kind == "additive" else None

    def keys(self, memory: Tensor) -> Tensor:
        """The source-side half of the score, computed once: [B, S, H] -> [B, S, H]."""
        return memory if self.key_proj is None else self.key_proj(memory)

    def forward(self, query: Tensor, keys: Tensor, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """query [B, T, H], keys/memory [B, S, H], mask [B, S] (True = real) -> context [B, T, H], weights
        [B, T, S]."""
        if self.v is not None:
            q = self.query_proj(query)  # [B, T, H]
            scores = self.v(torch.tanh(keys.unsqueeze(1) + q.unsqueeze(2))).squeeze(-1)  # [B, T, S]
        else:
            scores = torch.bmm(query, keys.transpose(1, 2))  # [B, T, S]
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        weights = torch.softmax(scores, dim=-1)  # [B, T, S]
        context = torch.bmm(weights, memory)  # [B, T, H]
        return context, weights
