"""What greedy and beam search share: token ids, the maximum-length rule, eval mode, the EOS block.

One definition of each, so `translate --beam 1` (beam search) and `greedy_decode` (validation during
training) stop at the same step and see the same model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from nmt_moe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "block_eos_", "eval_mode", "max_target_lengths"]


def max_target_lengths(src_lengths: Tensor, max_len_a: float, max_len_b: float) -> Tensor:
    """Per-sentence target length limit int(a * src_len + b), EOS included, at least 1: [B] -> [B].

    src_len counts the source EOS. Computed in float32, so every search stops at the same step.
    """
    return (max_len_a * src_lengths.float() + max_len_b).long().clamp(min=1)


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode for the search (no dropout, no gate noise), the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def block_eos_(log_probs: Tensor, generated: int, min_len: int) -> Tensor:
    """Sets log P(EOS) to -inf in place while fewer than `min_len` tokens are generated: [N, V] -> same.

    In place on the step's own log-softmax output: a copy of [N, V] per step cost as much as the top-k.
    """
    if generated < min_len:
        log_probs[:, EOS_ID] = float("-inf")
    return log_probs
