"""Ensembles of models sharing one vocabulary: `nmt-moe translate -m A -m B ...`.

`Ensemble` has the decoding interface of one `Seq2Seq` (encode / init_state / decode_step), so greedy,
beam search and sampling drive it unchanged. At every step each member decodes the same prefixes and the
ensemble's next-token distribution is the average of the members' log-probabilities (a normalised
geometric mean up to a constant: the ranking of candidates is that of the mean). A model ensembled with
itself gives its own output: the mean of identical tensors is the tensor, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nmt_moe.checkpoint import ModelLoadError, load_model
from nmt_moe.data.tokenizer import Tokenizer


@dataclass
class EnsembleEncoding:
    """Each member's encoder output for the same batch (rows stay aligned across members)."""

    parts: list[Any]

    @property
    def mask(self) -> Tensor:
        """[B, S] real source positions (the same for every member: one vocabulary, one source)."""
        return self.parts[0].mask

    def index_select(self, index: Tensor) -> EnsembleEncoding:
        return EnsembleEncoding([part.index_select(index) for part in self.parts])


@dataclass
class EnsembleState:
    """Each member's decoder state, rows aligned."""

    parts: list[Any]

    def index_select(self, index: Tensor) -> EnsembleState:
        return EnsembleState([part.index_select(index) for part in self.parts])


@dataclass
class EnsembleStep:
    log_probs: Tensor  # [N, V] mean of the members' log-probs, computed once per step
    state: EnsembleState
    attention: Tensor  # [N, S] mean attention (what the coverage penalty sums)
    expert_index: list[Tensor]  # every member's decoder MoE layers in turn, [N, k] each


class Ensemble(nn.Module):
    """Several models decoded as one; members must share the vocabulary (checked by `load_models`)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def encode(self, src: Tensor, src_lengths: Tensor) -> EnsembleEncoding:
        return EnsembleEncoding([member.encode(src, src_lengths) for member in self.members])

    def init_state(self, enc: EnsembleEncoding) -> EnsembleState:
        return EnsembleState([m.init_state(e) for m, e in zip(self.members, enc.parts, strict=True)])

    def decode_step(self, prev_tokens: Tensor, state: EnsembleState, enc: EnsembleEncoding) -> EnsembleStep:
        """prev_tokens [N] -> the members' steps combined: mean log-probs [N, V], mean attention [N, S]."""
        steps = [
            member.decode_step(prev_tokens, s, e)
            for member, s, e in zip(self.members, state.parts, enc.parts, strict=True)
        ]
        log_probs = torch.stack([step.log_probs for step in steps]).mean(dim=0)  # [N, V]
        attention = torch.stack([step.attention.float() for step in steps]).mean(dim=0)  # [N, S]
        experts = [index for step in steps for index in step.expert_index]
        return EnsembleStep(log_probs, EnsembleState([step.state for step in steps]), attention, experts)


def load_models(paths: Sequence[Path], device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """One model, or an `Ensemble` of several with the same SentencePiece vocabulary (else ModelLoadError)."""
    model, tokenizer = load_model(paths[0], device)
    if len(paths) == 1:
        return model, tokenizer
    members = [model]
    for path in paths[1:]:
        member, other = load_model(path, device)
        if other.to_bytes() != tokenizer.to_bytes():
            raise ModelLoadError(
                f"{path}: its SentencePiece vocabulary differs from {paths[0]}'s; ensembled models must "
                "share one vocabulary"
            )
        members.append(member)
    return Ensemble(members).eval(), tokenizer


def members(model: nn.Module) -> list[nn.Module]:
    """The models inside `model`: its members for an ensemble, else the model itself."""
    return list(model.members) if isinstance(model, Ensemble) else [model]
