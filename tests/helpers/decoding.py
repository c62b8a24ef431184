"""A tiny stand-in decoder for the decoding tests, and exact comparison of hypotheses.

`ToyModel` implements the decoding interface of `Seq2Seq` (encode / init_state / decode_step) with a small
random RNN plus dot-product attention and a fake top-2 router, so a search can be checked exhaustively.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nmt_moe.decoding.beam import EOS_ID

PAD_ID, BOS_ID = 0, 2


@dataclass
class ToyEncoderOutput:
    memory: Tensor  # [B, S, H]
    mask: Tensor  # [B, S] bool

    def index_select(self, index: Tensor) -> ToyEncoderOutput:
        return ToyEncoderOutput(self.memory.index_select(0, index), self.mask.index_select(0, index))


@dataclass
class ToyState:
    hidden: Tensor  # [N, H]

    def index_select(self, index: Tensor) -> ToyState:
        return ToyState(self.hidden.index_select(0, index))


@dataclass
class ToyStep:
    logits: Tensor  # [N, V] unnormalised, as the Seq2Seq decoder returns them
    state: ToyState
    attention: Tensor  # [N, S]
    expert_index: list[Tensor]  # one [N, 2] per fake MoE layer

    @property
    def log_probs(self) -> Tensor:
        return self.logits.log_softmax(dim=1)


class ToyModel(nn.Module):
    """A random RNN decoder with attention; PAD and BOS are never predicted (as a trained model)."""

    def __init__(
        self, vocab: int = 6, hidden: int = 8, experts: int = 5, seed: int = 0, eos_bias: float = 0.0
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, hidden, generator=gen))
        self.recur = nn.Parameter(torch.randn(hidden, hidden, generator=gen) / hidden**0.5)
        self.out = nn.Parameter(torch.randn(hidden, vocab, generator=gen) * 1.5)
        self.router = nn.Parameter(torch.randn(hidden, experts, generator=gen))
        self.requires_grad_(False)
        self.eos_bias = eos_bias

    def encode(self, src: Tensor, src_lengths: Tensor) -> ToyEncoderOutput:
        mask = torch.arange(src.size(1)).unsqueeze(0) < src_lengths.unsqueeze(1)  # [B, S]
        return ToyEncoderOutput(self.embed[src] * mask.unsqueeze(2), mask)

    def init_state(self, enc: ToyEncoderOutput) -> ToyState:
        mean = enc.memory.sum(1) / enc.mask.sum(1, keepdim=True)  # [B, H]
        return ToyState(torch.tanh(mean))

    def decode_step(self, prev: Tensor, state: ToyState, enc: ToyEncoderOutput) -> ToyStep:
        hidden = torch.tanh(state.hidden @ self.recur + self.embed[prev])  # [N, H]
        energy = torch.einsum("nsh,nh->ns", enc.memory, hidden).masked_fill(~enc.mask, float("-inf"))
        attention = energy.softmax(dim=1)  # [N, S]
        context = torch.einsum("ns,nsh->nh", attention, enc.memory)  # [N, H]
        logits = (hidden + context) @ self.out  # [N, V]
        logits[:, EOS_ID] += self.eos_bias
        logits[:, PAD_ID] = float("-inf")
        logits[:, BOS_ID] = float("-inf")
        experts = (hidden @ self.router).topk(2, dim=1).indices  # [N, 2]
        return ToyStep(logits, ToyState(hidden), attention, [experts])


def toy_batch(lengths: list[int], vocab: int = 6, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Random source ids (real tokens 4..vocab-1) + EOS, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD_ID, dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, : n - 1] = torch.randint(4, vocab, (n - 1,), generator=gen)
        src[i, n - 1] = EOS_ID
    return src, torch.tensor(lengths)


def assert_same(new: list, old: list) -> None:
    """Exact equality of every field of every hypothesis (floats compared with ==)."""
    assert len(new) == len(old)
    for new_list, old_list in zip(new, old, strict=True):
        assert [(h.tokens, h.score, h.log_prob, h.experts) for h in new_list] == [
            (h.tokens, h.score, h.log_prob, h.experts) for h in old_list
        ]
