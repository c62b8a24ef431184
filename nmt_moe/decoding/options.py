"""Decoding settings: the one place their defaults live.

`nmt-moe translate`, `evaluate -m` and `serve` generate their search flags from these dataclasses
(jsonargparse reads the field types, defaults and the docstrings below), the library functions and the
benchmarks build them directly. Plain dataclasses without torch: importing them costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling instead of search (e.g. for back-translation): one draw per line.

    Args:
        temperature: < 1 sharpens the distribution, > 1 flattens it
        top_k: draw from the K most likely tokens (0: all)
        top_p: nucleus: draw from the smallest set of probability mass P (1: all)
        seed: same seed, same samples, whatever the batching
    """

    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class DecodeOptions:
    """Search settings shared by `translate`, `evaluate -m`, `serve` and the benchmarks.

    Args:
        beam_size: beam size; 1 = greedy
        nbest: hypotheses returned per line (at most beam_size)
        alpha: GNMT length penalty alpha
        beta: GNMT coverage penalty beta
        max_len_a: max output length = max_len_a * source length + max_len_b
        max_len_b: see max_len_a
        min_len: no EOS before this many tokens
        experts: also return the experts each target token was routed to
        bf16: search under bfloat16 autocast: ~1.4x faster on CPUs with avx512_bf16/AMX and on recent
            GPUs; scores stay float32 (slower where bf16 is emulated)
        sampling: draw one sample per line instead of searching
    """

    beam_size: int = 5
    nbest: int = 1
    alpha: float = 0.6
    beta: float = 0.0
    max_len_a: float = 1.5
    max_len_b: int = 10
    min_len: int = 0
    experts: bool = False
    bf16: bool = False  # search under bfloat16 autocast: faster where the hardware has bf16, scores in fp32
    sampling: SamplingOptions | None = None  # draw one sample per line instead of searching

    def __post_init__(self) -> None:
        """Bad values are refused here, before a model is loaded (the CLIs name the flag)."""
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.min_len < 0:
            raise ValueError(f"min_len must be >= 0, got {self.min_len}")
        if self.nbest < 1:
            raise ValueError(f"nbest must be >= 1, got {self.nbest}")

    @property
    def is_greedy(self) -> bool:
        """One beam, no penalties, no n-best or routing: greedy search returns the same (tests prove it)."""
        plain = self.alpha == 0 and self.beta == 0 and self.nbest == 1 and not self.experts
        return self.beam_size == 1 and plain and self.sampling is None


@dataclass(frozen=True)
class BatchOptions:
    """How lines are grouped for the model (results always come back in input order).

    Args:
        max_tokens: padded source tokens per batch (beam search multiplies the decoder's by the beam size)
        max_sentences: sentences per batch
        max_input_tokens: longer inputs are truncated with a warning naming the line
    """

    max_tokens: int = 4096
    max_sentences: int = 256
    max_input_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_sentences < 1:
            raise ValueError("max_tokens and max_sentences must be >= 1")
        if self.max_input_tokens < 3:
            raise ValueError(f"max_input_tokens must be >= 3, got {self.max_input_tokens}")
