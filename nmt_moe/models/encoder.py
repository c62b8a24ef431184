"""GNMT encoder: a bidirectional bottom LSTM, unidirectional LSTMs above it, residuals from layer 3 up, and
MoE (or dense FFN) layers between LSTM layers. `bidirectional="all"` makes every layer bidirectional
(hidden_size / 2 per direction), as OpenNMT-py's `brnn` encoder: the like-for-like comparison needs it.

Each LSTM layer is one fused `nn.LSTM` call over the whole sequence. Only bidirectional layers are packed:
their backward direction would otherwise read padding first. Unidirectional layers read right-padded input,
so their outputs at real positions never see padding and need no packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt_moe.models.ffn import apply_ffns_after
from nmt_moe.moe import MoEOutput


@dataclass
class EncoderOutput:
    """What the decoder reads of a source batch; `keys` are the attention keys, computed once."""

    memory: Tensor  # [B, S, H]
    keys: Tensor  # [B, S, H]
    mask: Tensor  # [B, S] bool, True = real token

    def index_select(self, index: Tensor) -> EncoderOutput:
        """Rows `index` [N] of the batch (reordering for beams, dropping finished sentences)."""
        return EncoderOutput(self.memory[index], self.keys[index], self.mask[index])


ENCODER_BIDIRECTIONAL = ("bottom", "all")


def _run_packed(lstm: nn.LSTM, x: Tensor, lengths: Tensor) -> Tensor:
    """A bidirectional LSTM over the real positions only: x [B, S, D], lengths [B] (CPU) -> [B, S, H]."""
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.shape[1])[0]


class Encoder(nn.Module):
    def __init__(
        self,
        embedding: nn.Embedding,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        moe_after: list[int],
        ffns: list[nn.Module],
        bidirectional: str = "bottom",
    ) -> None:
        """`ffns[i]` goes after LSTM layer `moe_after[i]` (1-based: [2] = between layers 2 and 3);
        bidirectional: "bottom" (GNMT) or "all" layers."""
        super().__init__()
        if bidirectional not in ENCODER_BIDIRECTIONAL:
            raise ValueError(f"bidirectional must be one of {ENCODER_BIDIRECTIONAL}, got {bidirectional!r}")
        self.embedding = embedding
        self.dropout = nn.Dropout(dropout)
        self.bottom = nn.LSTM(embedding.embedding_dim, hidden_size // 2, batch_first=True, bidirectional=True)
        self.all_bidirectional = bidirectional == "all"
        upper = hidden_size // 2 if self.all_bidirectional else hidden_size
        self.layers = nn.ModuleList(
            nn.LSTM(hidden_size, upper, batch_first=True, bidirectional=self.all_bidirectional)
            for _ in range(num_layers - 1)
        )
        self.moe_after = list(moe_after)
        self.moe = nn.ModuleList(ffns)

    def forward(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor, dict[str, MoEOutput]]:
        """src [B, S], src_lengths [B] -> memory [B, S, H], mask [B, S], {"encoder.moe<i>": MoEOutput}."""
        B, S = src.shape
        mask = torch.arange(S, device=src.device).unsqueeze(0) < src_lengths.unsqueeze(1)  # [B, S]
        x = self.dropout(self.embedding(src))  # [B, S, E]
        lengths = src_lengths.cpu()
        x = _run_packed(self.bottom, x, lengths)  # [B, S, H]
        moe_outputs: dict[str, MoEOutput] = {}
        x = self._ffns(1, x, mask, moe_outputs)
        for layer_number, lstm in enumerate(self.layers, start=2):
            if self.all_bidirectional:
                y = _run_packed(lstm, self.dropout(x), lengths)  # [B, S, H]
            else:
                y, _ = lstm(self.dropout(x))  # [B, S, H]
            x = y + x if layer_number >= 3 else y
            x = self._ffns(layer_number, x, mask, moe_outputs)
        return x, mask, moe_outputs

    def _ffns(self, layer_number: int, x: Tensor, mask: Tensor, outputs: dict[str, MoEOutput]) -> Tensor:
        return apply_ffns_after(
            layer_number, self.moe_after, self.moe, x, mask, self.dropout, outputs, "encoder"
        )
