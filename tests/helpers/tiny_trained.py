"""A tiny model trained briefly on the copy task: outputs that end with EOS at varied lengths.

Random tiny models rarely emit EOS and keep to the length limit; this one ends its sentences itself (it is
not a good copier after 150 steps), so scoring, serving and ensemble tests compare varied outputs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from helpers.tiny_models import tiny_corpus, tiny_tokenizer
from nmt_moe.checkpoint import save_checkpoint
from nmt_moe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoEConfig


def _batch(ids: list[list[int]]) -> tuple[torch.Tensor, ...]:
    width = max(map(len, ids)) + 1
    src = torch.full((len(ids), width), PAD_ID)
    tgt_in, tgt_out = src.clone(), src.clone()
    for i, row in enumerate(ids):
        src[i, : len(row) + 1] = torch.tensor([*row, EOS_ID])
        tgt_in[i, : len(row) + 1] = torch.tensor([BOS_ID, *row])
        tgt_out[i, : len(row) + 1] = torch.tensor([*row, EOS_ID])
    return src, torch.tensor([len(r) + 1 for r in ids]), tgt_in, tgt_out


@functools.cache
def trained_tiny_model(steps: int = 150, seed: int = 0) -> tuple[Seq2Seq, Tokenizer]:
    """A tiny MoE Seq2Seq trained on the copy task over `tiny_corpus` (about 4 s), once per process.

    One thread: two OpenMP threads spinning on a shared, loaded box made this 100x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, seed: int) -> tuple[Seq2Seq, Tokenizer]:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = Seq2Seq(Seq2SeqConfig(
        vocab_size=tokenizer.vocab_size, embed_dim=32, hidden_size=32, encoder_layers=2, decoder_layers=2,
        dropout=0.0, moe=MoEConfig(num_experts=4, k=2, d_hidden=32),
    ))  # fmt: skip
    data = tokenizer.encode(tiny_corpus(600, seed=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        picks = torch.randint(len(data), (32,), generator=generator).tolist()
        src, lengths, tgt_in, tgt_out = _batch([data[i] for i in picks])
        out = model(src, lengths, tgt_in)
        loss = torch.nn.functional.cross_entropy(
            out.logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD_ID
        )
        optimizer.zero_grad()
        (loss + out.aux_loss).backward()
        optimizer.step()
    return model.eval(), tokenizer


def trained_tiny_checkpoint(path: Path, steps: int = 150, seed: int = 0) -> Path:
    model, tokenizer = trained_tiny_model(steps, seed)
    save_checkpoint(path, model, tokenizer)
    return path
