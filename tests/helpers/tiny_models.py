"""The tiny model builders translate, evaluate, serving and reliability tests share: a real Seq2Seq with
MoE layers and a real SentencePiece model, small enough to build in well under a second."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from nmt_moe.checkpoint import save_checkpoint
from nmt_moe.data.tokenizer import Tokenizer, train_tokenizer
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoEConfig

WORDS = "a man woman dog cat runs sits on the red blue green big small house street ball plays with".split()


def tiny_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def tiny_tokenizer(vocab_size: int = 64) -> Tokenizer:
    return train_tokenizer(tiny_corpus(), vocab_size, model_type="bpe")


def tiny_model(vocab_size: int, seed: int = 0, ffn: str = "moe") -> Seq2Seq:
    torch.manual_seed(seed)
    model = Seq2Seq(Seq2SeqConfig(
        vocab_size=vocab_size, embed_dim=16, hidden_size=16, encoder_layers=2, decoder_layers=2,
        dropout=0.0, ffn=ffn, moe=MoEConfig(num_experts=4, k=2, d_hidden=16),
    ))  # fmt: skip
    return model.eval()


def tiny_checkpoint(path: Path, seed: int = 0, **extra: object) -> tuple[Seq2Seq, Tokenizer]:
    """A training-format checkpoint of a random tiny model at `path`."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer.vocab_size, seed)
    save_checkpoint(path, model, tokenizer, **extra)
    return model, tokenizer
