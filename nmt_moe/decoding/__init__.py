"""Search over the model's next-token distributions: greedy (and beam search)."""

from nmt_moe.decoding.greedy import greedy_decode

__all__ = ["greedy_decode"]
