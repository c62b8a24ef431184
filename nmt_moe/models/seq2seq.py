"""The MoE encoder-decoder of Shazeer et al. (2017) on a GNMT-style LSTM stack, built from typed arguments.

`Seq2Seq(**model.config)` rebuilds a model from a checkpoint; `forward` is teacher forcing for training;
`encode` / `init_state` / `decode_step` are what greedy and beam search drive one token at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from nmt_moe.data.tokenizer import PAD_ID
from nmt_moe.models.attention import ATTENTION_TYPES
from nmt_moe.models.decoder import Decoder, DecoderState, StepOutput
from nmt_moe.models.encoder import ENCODER_BIDIRECTIONAL, Encoder, EncoderOutput
from nmt_moe.models.ffn import FFN_TYPES, build_ffn
from nmt_moe.models.precision import fp32_where_bf16_is_missing
from nmt_moe.moe import MoELayer, MoEOutput


@dataclass
class Seq2SeqConfig:
    """Every model knob, as primitives; `Seq2Seq(**dataclasses.asdict(config))` builds the model.

    vocab_size: joint source/target vocabulary (one SentencePiece model serves both sides).
    embed_dim, hidden_size: embedding and LSTM sizes; the bidirectional bottom encoder layer uses
        hidden_size / 2 per direction.
    encoder_layers, decoder_layers: LSTM layers; residual connections start at the third layer.
    encoder_bidirectional: "bottom" (GNMT: only the first encoder layer) or "all" (every layer, as
        OpenNMT-py's brnn encoder).
    attention: "general" | "dot" | "additive".
    input_feeding: feed the previous attention context to the bottom decoder layer (better quality; makes
        that layer step token by token in training).
    dropout: on embeddings, between layers, on MoE/FFN outputs and before the output layer.
    tie_embeddings: the output layer shares the target embedding matrix.
    share_embeddings: source and target share one embedding matrix.
    ffn: "moe" (MoELayer), "dense" (FeedForward of the same active size: equal compute per token), or
        "none" (plain LSTM stack; the positions below are then ignored).
    encoder_moe_after, decoder_moe_after: 1-based LSTM layers followed by an MoE layer ([2] = between
        layers 2 and 3); each must be below the top layer. The paper: encoder [2], decoder [1].
    num_experts, k, gate, d_hidden: MoELayer settings; moe_options: any further MoELayer keyword
        (capacity_factor, w_importance, activation, ...).
    """

    vocab_size: int = 8000
    embed_dim: int = 256
    hidden_size: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention: Literal["general", "dot", "additive"] = "general"
    input_feeding: bool = True
    dropout: float = 0.2
    tie_embeddings: bool = True
    share_embeddings: bool = True
    ffn: Literal["moe", "dense", "none"] = "moe"
    encoder_moe_after: list[int] = field(default_factory=lambda: [1])
    decoder_moe_after: list[int] = field(default_factory=lambda: [1])
    num_experts: int = 8
    k: int = 2
    gate: str = "noisy_topk"
    d_hidden: int = 512
    moe_options: dict[str, Any] = field(default_factory=dict)
    encoder_bidirectional: Literal["bottom", "all"] = "bottom"

    def __post_init__(self) -> None:
        """Rejects a bad configuration before anything is built, naming the argument at fault."""
        self.encoder_moe_after, self.decoder_moe_after = (
            list(self.encoder_moe_after),
            list(self.decoder_moe_after),
        )
        self.moe_options = dict(self.moe_options)
        sizes = ["vocab_size", "embed_dim", "hidden_size", "encoder_layers", "decoder_layers"]
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size must be even (the bidirectional encoder layer halves it), got "
                             f"{self.hidden_size}")  # fmt: skip
        if self.attention not in ATTENTION_TYPES:
            raise ValueError(f"attention must be one of {ATTENTION_TYPES}, got {self.attention!r}")
        if self.encoder_bidirectional not in ENCODER_BIDIRECTIONAL:
            raise ValueError(f"encoder_bidirectional must be one of {ENCODER_BIDIRECTIONAL}, got "
                             f"{self.encoder_bidirectional!r}")  # fmt: skip
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.ffn not in FFN_TYPES:
            raise ValueError(f"ffn must be one of {FFN_TYPES}, got {self.ffn!r}")
        if self.ffn == "none":
            return
        for name, layers in [
            ("encoder_moe_after", self.encoder_layers),
            ("decoder_moe_after", self.decoder_layers),
        ]:
            positions = getattr(self, name)
            for position in positions:
                if not 1 <= position < layers:
                    raise ValueError(
                        f"{name} position {position} is outside the LSTM stack: with {layers} layers an MoE "
                        f"layer can follow layers 1..{layers - 1}"
                    )
            if len(set(positions)) != len(positions):
                raise ValueError(f"{name} lists a position twice: {positions}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"k must be in 1..num_experts ({self.num_experts}), got {self.k}")
        if self.d_hidden < 1:
            raise ValueError(f"d_hidden must be >= 1, got {self.d_hidden}")


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # [B, T, V]
    moe: dict[str, MoEOutput] = field(default_factory=dict)  # "encoder.moe0", "decoder.moe0", ...

    @property
    def aux_loss(self) -> Tensor:
        """Sum of the (already weighted) auxiliary losses of all MoE layers; 0 without MoE layers."""
        return sum((out.aux_loss for out in self.moe.values()), self.logits.new_zeros(()))


class Seq2Seq(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 256,
        hidden_size: int = 256,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        attention: Literal["general", "dot", "additive"] = "general",
        input_feeding: bool = True,
        dropout: float = 0.2,
        tie_embeddings: bool = True,
        share_embeddings: bool = True,
        ffn: Literal["moe", "dense", "none"] = "moe",
        encoder_moe_after: Sequence[int] = (1,),
        decoder_moe_after: Sequence[int] = (1,),
        num_experts: int = 8,
        k: int = 2,
        gate: str = "noisy_topk",
        d_hidden: int = 512,
        moe_options: dict[str, Any] | None = None,
        encoder_bidirectional: Literal["bottom", "all"] = "bottom",
    ) -> None:
        """Arguments as in `Seq2SeqConfig` (which documents them and validates them)."""
        super().__init__()
        cfg = Seq2SeqConfig(
            vocab_size=vocab_size, embed_dim=embed_dim, hidden_size=hidden_size,
            encoder_layers=encoder_layers, decoder_layers=decoder_layers, attention=attention,
            input_feeding=input_feeding, dropout=dropout,
            tie_embeddings=tie_embeddings, share_embeddings=share_embeddings, ffn=ffn,
            encoder_moe_after=list(encoder_moe_after), decoder_moe_after=list(decoder_moe_after),
            num_experts=num_experts, k=k, gate=gate, d_hidden=d_hidden, moe_options=dict(moe_options or {}),
            encoder_bidirectional=encoder_bidirectional,
        )  # fmt: skip
        self._config = cfg
        encoder_moe_after, decoder_moe_after = (
            ([], []) if ffn == "none" else (cfg.encoder_moe_after, cfg.decoder_moe_after)
        )

        def ffns(count: int) -> list[nn.Module]:
            kwargs = dict(num_experts=num_experts, k=k, gate=gate, d_hidden=d_hidden, options=cfg.moe_options)
            return [build_ffn(ffn, hidden_size, **kwargs) for _ in range(count)]

        src_embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        tgt_embedding = src_embedding if share_embeddings else nn.Embedding(vocab_size, embed_dim, PAD_ID)
        enc_ffns, dec_ffns = ffns(len(encoder_moe_after)), ffns(len(decoder_moe_after))
        self.encoder = Encoder(
            src_embedding, hidden_size, encoder_layers, dropout, encoder_moe_after, enc_ffns,
            encoder_bidirectional,
        )  # fmt: skip
        self.decoder = Decoder(
            tgt_embedding, hidden_size, decoder_layers, attention, input_feeding, dropout,
            decoder_moe_after, dec_ffns, tie_embeddings, PAD_ID,
        )  # fmt: skip
        self._init_weights()

    @property
    def config(self) -> dict[str, Any]:
        """The init arguments as primitives: `Seq2Seq(**model.config)` rebuilds this model."""
        return dataclasses.asdict(self._config)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Seq2SeqOutput:
        """Teacher forcing: src [B, S], src_lengths [B], tgt_in [B, T] (BOS + target) -> logits [B, T, V]."""
        with fp32_where_bf16_is_missing(src.device):
            memory, mask, enc_moe = self.encoder(src, src_lengths)
            enc = EncoderOutput(memory, self.decoder.attention.keys(memory), mask)
            logits, dec_moe = self.decoder(tgt_in, enc)
        return Seq2SeqOutput(logits, {**enc_moe, **dec_moe})

    def encode(self, src: Tensor, src_lengths: Tensor) -> EncoderOutput:
        """src [B, S], src_lengths [B] -> memory, attention keys (computed once here) and mask."""
        with fp32_where_bf16_is_missing(src.device):
            memory, mask, _ = self.encoder(src, src_lengths)
            return EncoderOutput(memory, self.decoder.attention.keys(memory), mask)

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        return self.decoder.init_state(enc)

    def decode_step(self, prev_tokens: Tensor, state: DecoderState, enc: EncoderOutput) -> StepOutput:
        """prev_tokens [N] -> StepOutput(logits [N, V], state, attention [N, S], expert_index)."""
        with fp32_where_bf16_is_missing(prev_tokens.device):
            return self.decoder.step(prev_tokens, state, enc)

    def _init_weights(self) -> None:
        """Uniform(-0.1, 0.1) for the recurrent stack and attention (the usual LSTM-NMT init); embeddings
        N(0, embed_dim^-0.5), the scale that keeps tied output logits of order 1 at any width; MoE layers
        keep their own init."""
        # a list, not a set: a set's order follows memory addresses and would make the init vary by process
        embeddings = list(dict.fromkeys([self.encoder.embedding, self.decoder.embedding]))
        skip = {id(p) for m in [*self.encoder.moe, *self.decoder.moe, *embeddings] for p in m.parameters()}
        for p in self.parameters():
            if id(p) not in skip:
                nn.init.uniform_(p, -0.1, 0.1)
        for embedding in embeddings:
            nn.init.normal_(embedding.weight, std=embedding.embedding_dim**-0.5)
            with torch.no_grad():
                embedding.weight[PAD_ID].zero_()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters and the active ones per token: of each MoE layer's expert bank only the share of
    the experts a token visits counts as active (gates and shared experts count in full)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            bank = sum(p.numel() for p in layer.experts.parameters())
            inactive += bank - bank * layer.experts_per_token // layer.num_experts
    return {"total": total, "active": total - inactive}
