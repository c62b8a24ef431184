"""GNMT-style decoder: the bottom LSTM layer's output queries the attention; the context feeds every layer
above it and the output layer; residuals from layer 3 up; MoE (or dense FFN) layers between LSTM layers.

Speed in training comes from keeping per-step work small. Only the bottom layer and the attention are
recurrent in the attention context (and only with input feeding, where the bottom layer reads the previous
step's context); everything above them - MoE layers, upper LSTM layers, the output projection - runs as
whole-sequence calls. Without input feeding even the bottom layer is one fused `nn.LSTM` call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from nmt_moe.models.attention import Attention
from nmt_moe.models.encoder import EncoderOutput
from nmt_moe.models.ffn import apply_ffns_after
from nmt_moe.moe import MoEOutput


@dataclass
class DecoderState:
    """Recurrent state of a batch of hypotheses; every tensor has the batch in the dim noted."""

    hidden: Tensor  # [L, N, H]
    cell: Tensor  # [L, N, H]
    context: Tensor  # [N, H] attention context of the previous step (read by input feeding)

    def index_select(self, index: Tensor) -> DecoderState:
        return DecoderState(self.hidden[:, index], self.cell[:, index], self.context[index])


@dataclass
class StepOutput:
    logits: Tensor  # [N, V] float32 (also under bf16 autocast: bfloat16 is too coarse to rank beams)
    state: DecoderState
    attention: Tensor  # [N, S]
    expert_index: list[Tensor] = field(default_factory=list)  # per decoder MoE layer [N, k]; -1 at padding

    @property
    def log_probs(self) -> Tensor:
        """[N, V] log-probabilities of the next token (one fused log-softmax over the vocabulary)."""
        return torch.log_softmax(self.logits, dim=-1)


class Decoder(nn.Module):
    def __init__(
        self,
        embedding: nn.Embedding,
        hidden_size: int,
        num_layers: int,
        attention: str,
        input_feeding: bool,
        dropout: float,
        moe_after: list[int],
        ffns: list[nn.Module],
        tie_embeddings: bool,
        pad_id: int,
    ) -> None:
        super().__init__()
        E, H = embedding.embedding_dim, hidden_size
        self.embedding = embedding
        self.hidden_size = hidden_size
        self.pad_id = pad_id
        self.input_feeding = input_feeding
        self.dropout = nn.Dropout(dropout)
        # With input feeding the bottom layer steps (LSTMCell); without, one nn.LSTM runs the sequence.
        self.bottom = nn.LSTMCell(E + H, H) if input_feeding else nn.LSTM(E, H, batch_first=True)
        self.attention = Attention(attention, H)
        self.layers = nn.ModuleList(nn.LSTM(2 * H, H, batch_first=True) for _ in range(num_layers - 1))
        self.moe_after = list(moe_after)
        self.moe = nn.ModuleList(ffns)
        # tanh(W [h_top; context]) is the vector the softmax reads; sized E when tied so the output layer can
        # share the embedding matrix.
        out_dim = E if tie_embeddings else H
        self.combine = nn.Linear(2 * H, out_dim)
        self.output = nn.Linear(out_dim, embedding.num_embeddings)
        if tie_embeddings:
            self.output.weight = embedding.weight

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        """Zero state: the attention carries the source, so nothing depends on padding or sorting."""
        N = enc.memory.shape[0]
        zeros = enc.memory.new_zeros(len(self.layers) + 1, N, self.hidden_size)
        return DecoderState(zeros, zeros.clone(), enc.memory.new_zeros(N, self.hidden_size))

    def forward(self, tgt_in: Tensor, enc: EncoderOutput) -> tuple[Tensor, dict[str, MoEOutput]]:
        """Teacher forcing: tgt_in [B, T] -> logits [B, T, V], {"decoder.moe<i>": MoEOutput}."""
        T = tgt_in.shape[1]
        emb = self.dropout(self.embedding(tgt_in))  # [B, T, E]
        if self.input_feeding:
            state = self.init_state(enc)
            h, c, context = state.hidden[0], state.cell[0], state.context  # [B, H] each
            bottom_out, contexts = [], []
            for t in range(T):
                h, c = self.bottom(torch.cat([emb[:, t], context], dim=-1), (h, c))
                context = self.attention(h.unsqueeze(1), enc.keys, enc.memory, enc.mask)[0].squeeze(1)
                bottom_out.append(h)
                contexts.append(context)
            x, ctx = torch.stack(bottom_out, dim=1), torch.stack(contexts, dim=1)  # [B, T, H] each
        else:
            x, _ = self.bottom(emb)  # [B, T, H]
            ctx, _ = self.attention(x, enc.keys, enc.memory, enc.mask)  # [B, T, H]
        mask = tgt_in != self.pad_id  # [B, T]
        top, _, moe_outputs = self._upper(x, ctx, mask, hidden=None, cell=None)
        return self._logits(top, ctx), moe_outputs

    def step(self, prev_tokens: Tensor, state: DecoderState, enc: EncoderOutput) -> StepOutput:
        """One decoding step for N hypotheses: prev_tokens [N] -> log-probs of the next token [N, V]."""
        emb = self.embedding(prev_tokens)  # [N, E]
        if self.input_feeding:
            h, c = self.bottom(torch.cat([emb, state.context], dim=-1), (state.hidden[0], state.cell[0]))
        else:
            _, (h, c) = self.bottom(emb.unsqueeze(1), (state.hidden[:1], state.cell[:1]))
            h, c = h[0], c[0]
        context, weights = self.attention(h.unsqueeze(1), enc.keys, enc.memory, enc.mask)  # [N,1,H], [N,1,S]
        mask = (prev_tokens != self.pad_id).unsqueeze(1)  # [N, 1]
        top, (hidden, cell), moe_outputs = self._upper(
            h.unsqueeze(1), context, mask, hidden=state.hidden[1:], cell=state.cell[1:]
        )
        logits = self._logits(top, context).squeeze(1).float()  # [N, V]
        new_state = DecoderState(
            torch.cat([h.unsqueeze(0), hidden]), torch.cat([c.unsqueeze(0), cell]), context.squeeze(1)
        )
        expert_index = [out.expert_index_by_position for out in moe_outputs.values()]  # [N, k] each
        return StepOutput(logits, new_state, weights.squeeze(1), expert_index)

    def _upper(
        self, x: Tensor, ctx: Tensor, mask: Tensor, hidden: Tensor | None, cell: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor], dict[str, MoEOutput]]:
        """Layers above the bottom: x, ctx [B, T, H], mask [B, T]; hidden/cell [L-1, B, H] or None (zeros).
        Returns the top output [B, T, H], the final (hidden, cell) [L-1, B, H] and the MoE outputs."""
        moe_outputs: dict[str, MoEOutput] = {}
        x = self._ffns(1, x, mask, moe_outputs)
        hs, cs = [], []
        for i, lstm in enumerate(self.layers):
            layer_number = i + 2
            state = None if hidden is None else (hidden[i : i + 1], cell[i : i + 1])
            y, (h, c) = lstm(torch.cat([self.dropout(x), ctx], dim=-1), state)  # [B, T, H]
            hs.append(h)
            cs.append(c)
            x = y + x if layer_number >= 3 else y
            x = self._ffns(layer_number, x, mask, moe_outputs)
        empty = x.new_zeros(0, x.shape[0], self.hidden_size)
        return x, (torch.cat(hs) if hs else empty, torch.cat(cs) if cs else empty), moe_outputs

    def _ffns(self, layer_number: int, x: Tensor, mask: Tensor, outputs: dict[str, MoEOutput]) -> Tensor:
        return apply_ffns_after(
            layer_number, self.moe_after, self.moe, x, mask, self.dropout, outputs, "decoder"
        )

    def _logits(self, top: Tensor, ctx: Tensor) -> Tensor:
        """top, ctx [B, T, H] -> logits [B, T, V], all positions in one projection."""
        return self.output(self.dropout(torch.tanh(self.combine(torch.cat([top, ctx], dim=-1)))))
