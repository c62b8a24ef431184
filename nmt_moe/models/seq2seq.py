"""The MoE encoder-decoder of Shazeer et al. (2017) on a GNMT-style LSTM stack, built from one typed config.

`Seq2Seq(Seq2SeqConfig.from_dict(model.config))` rebuilds a model from a checkpoint; `forward` is teacher
forcing for training; `encode` / `init_state` / `decode_step` are what greedy and beam search drive one token
at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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
from nmt_moe.moe import MoEConfig, MoELayer, MoEOutput

# The flat layout before MoEConfig: these keys sat beside the model's own, any other MoE knob in moe_options.
LEGACY_MOE_KEYS = ("d_hidden", "num_experts", "k", "gate")
NEW_LAYOUT = (
    "the MoE settings now live in the model config's `moe` section (moe.num_experts, moe.k, moe.gate, "
    "moe.d_hidden and every former moe_options key, e.g. moe.num_shared_experts)"
)


@dataclass
class Seq2SeqConfig:
    """Every model knob: `Seq2Seq(config)` builds the model; the one place they are defined and checked.

    vocab_size: joint source/target vocabulary (one SentencePiece model serves both sides).
    embed_dim, hidden_size: embedding and LSTM sizes; the bidirectional bottom encoder layer uses
        hidden_size / 2 per direction.
    encoder_layers, decoder_layers: LSTM layers; residual connections start at the third layer.
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
    encoder_bidirectional: "bottom" (GNMT: only the first encoder layer) or "all" (every layer, as
        OpenNMT-py's brnn encoder).
    moe: the MoE layers' settings (every layer alike); with ffn "dense" they size the dense layer.
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
    encoder_bidirectional: Literal["bottom", "all"] = "bottom"
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        """Rejects a bad configuration before anything is built, naming the argument at fault."""
        self.encoder_moe_after, self.decoder_moe_after = (
            list(self.encoder_moe_after),
            list(self.decoder_moe_after),
        )
        if isinstance(self.moe, Mapping):
            self.moe = MoEConfig(**self.moe)
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
        moe = self.moe
        if moe.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {moe.num_experts}")
        if not 1 <= moe.k <= moe.num_experts:
            raise ValueError(f"k must be in 1..num_experts ({moe.num_experts}), got {moe.k}")
        if moe.d_hidden < 1:
            raise ValueError(f"d_hidden must be >= 1, got {moe.d_hidden}")
        if self.ffn == "moe":
            moe.check(self.hidden_size)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> Seq2SeqConfig:
        """The config a dict describes (`Seq2Seq.config`, a checkpoint's model_config), nested `moe` section
        or the flat layout older checkpoints hold (num_experts, k, gate, d_hidden and moe_options beside
        the model's keys). Unknown keys are a ValueError naming them."""
        values = dict(config)
        if "moe_options" in values or any(key in values for key in LEGACY_MOE_KEYS):
            if "moe" in values:
                raise ValueError(f"model config mixes `moe` with the old flat MoE keys: {NEW_LAYOUT}")
            moe = {key: values.pop(key) for key in LEGACY_MOE_KEYS if key in values}
            values["moe"] = {**moe, **dict(values.pop("moe_options", None) or {})}
        _check_keys(values, cls, "model config")
        moe = values.get("moe", {})
        if isinstance(moe, Mapping):
            _check_keys(moe, MoEConfig, "model config's moe section")
            values["moe"] = MoEConfig(**moe)
        return cls(**values)


def _check_keys(values: Mapping[str, Any], kind: type, what: str) -> None:
    known = [f.name for f in dataclasses.fields(kind)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{what}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # [B, T, V]
    moe: dict[str, MoEOutput] = field(default_factory=dict)  # "encoder.moe0", "decoder.moe0", ...

    @property
    def aux_loss(self) -> Tensor:
        """Sum of the (already weighted) auxiliary losses of all MoE layers; 0 without MoE layers."""
        return sum((out.aux_loss for out in self.moe.values()), self.logits.new_zeros(()))


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        """The model `config` describes (`Seq2SeqConfig` documents and validates every knob)."""
        super().__init__()
        self._config = cfg = config
        encoder_moe_after, decoder_moe_after = (
            ([], []) if cfg.ffn == "none" else (cfg.encoder_moe_after, cfg.decoder_moe_after)
        )

        def ffns(count: int) -> list[nn.Module]:
            return [build_ffn(cfg.ffn, cfg.hidden_size, cfg.moe) for _ in range(count)]

        vocab_size, embed_dim = cfg.vocab_size, cfg.embed_dim
        src_embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        tgt_embedding = src_embedding if cfg.share_embeddings else nn.Embedding(vocab_size, embed_dim, PAD_ID)
        enc_ffns, dec_ffns = ffns(len(encoder_moe_after)), ffns(len(decoder_moe_after))
        self.encoder = Encoder(
            src_embedding, cfg.hidden_size, cfg.encoder_layers, cfg.dropout, encoder_moe_after, enc_ffns,
            cfg.encoder_bidirectional,
        )  # fmt: skip
        self.decoder = Decoder(
            tgt_embedding, cfg.hidden_size, cfg.decoder_layers, cfg.attention, cfg.input_feeding, cfg.dropout,
            decoder_moe_after, dec_ffns, cfg.tie_embeddings, PAD_ID,
        )  # fmt: skip
        self._init_weights()

    @property
    def config(self) -> dict[str, Any]:
        """The config as primitives (nested `moe` section), as checkpoints store it:
        `Seq2Seq(Seq2SeqConfig.from_dict(model.config))` rebuilds this model."""
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
