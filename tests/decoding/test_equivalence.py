"""The restructured beam search and greedy decoding return exactly what the pre-issue-18 code returned.

tests/helpers/decoding_reference.py holds a frozen copy of the old search. On random small models (the toy
stand-in and real Seq2Seq stacks with MoE, dense and no FFN layers, every attention type, with and without
input feeding) and many random batches and settings, tokens, scores, log-probs and experts must be equal bit
for bit, not just close.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers.decoding import ToyModel, assert_same, toy_batch
from helpers.decoding_reference import reference_beam_search, reference_greedy_decode

from nmt_moe.decoding.beam import beam_search
from nmt_moe.decoding.greedy import greedy_decode
from nmt_moe.decoding.options import DecodeOptions
from nmt_moe.decoding.search import EOS_ID
from nmt_moe.decoding.translate import search_batch
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoEConfig

MODEL_KINDS = [
    dict(ffn="none"),
    dict(ffn="dense", input_feeding=False),
    dict(ffn="moe", moe=dict(gate="noisy_topk", k=2), attention="dot"),
    dict(ffn="moe", moe=dict(gate="switch", k=1, num_shared_experts=1), input_feeding=False),
    dict(ffn="moe", moe=dict(gate="softmax_topk", k=2), attention="additive", encoder_layers=3,
         decoder_layers=3, encoder_moe_after=[1, 2], decoder_moe_after=[2]),
]  # fmt: skip


def random_seq2seq(kind: dict, seed: int, vocab: int) -> Seq2Seq:
    """A small random model whose EOS logit is raised so that hypotheses end at varied lengths."""
    torch.manual_seed(seed)
    options = dict(embed_dim=12, hidden_size=16, encoder_layers=2, decoder_layers=2, dropout=0.0) | kind
    moe = MoEConfig(**{"num_experts": 4, "d_hidden": 8, **options.pop("moe", {})})
    model = Seq2Seq(Seq2SeqConfig(vocab_size=vocab, **options, moe=moe))
    with torch.no_grad():
        model.decoder.output.bias[EOS_ID] += (-1.0, 1.0, 2.5)[seed % 3]
    return model.eval()


def random_batch(rng: random.Random, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 9))]
    return toy_batch(lengths, vocab=vocab, seed=rng.randint(0, 10**6))


def random_options(rng: random.Random) -> dict:
    beam = rng.choice([1, 1, 2, 3, 4, 5, 6])
    return dict(
        beam_size=beam, nbest=rng.randint(1, beam), alpha=rng.choice([0.0, 0.6, 1.3]),
        beta=rng.choice([0.0, 0.0, 0.4]), min_len=rng.choice([0, 0, 1, 3]),
        max_len_a=rng.choice([0.0, 0.5, 1.5]), max_len_b=rng.choice([1, 3, 6]),
        return_experts=rng.random() < 0.5,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_beam_search_equals_the_old_search_on_toy_models(seed: int) -> None:
    rng = random.Random(seed)
    for case in range(8):
        model = ToyModel(vocab=rng.choice([6, 10, 20]), hidden=8, seed=seed * 100 + case,
                         eos_bias=rng.choice([-1.0, 0.0, 1.0, 2.0]))  # fmt: skip
        src, lengths = random_batch(rng, model.embed.shape[0])
        options = random_options(rng)
        assert_same(
            beam_search(model, src, lengths, **options), reference_beam_search(model, src, lengths, **options)
        )


@pytest.mark.parametrize("kind", range(len(MODEL_KINDS)))
def test_beam_search_equals_the_old_search_on_seq2seq_models(kind: int) -> None:
    rng = random.Random(1000 + kind)
    for case in range(6):
        vocab = rng.choice([12, 30])
        model = random_seq2seq(MODEL_KINDS[kind], seed=case, vocab=vocab)
        src, lengths = random_batch(rng, vocab)
        options = random_options(rng)
        assert_same(
            beam_search(model, src, lengths, **options), reference_beam_search(model, src, lengths, **options)
        )


def test_the_property_test_sees_every_way_a_hypothesis_ends() -> None:
    """The random cases must end hypotheses by EOS and by the length limit, and fill n-best lists."""
    rng = random.Random(7)
    by_eos = by_limit = 0
    for case in range(10):
        model = random_seq2seq(MODEL_KINDS[case % len(MODEL_KINDS)], seed=case, vocab=12)
        src, lengths = random_batch(rng, 12)
        hyps = beam_search(model, src, lengths, beam_size=3, nbest=2, max_len_a=0.0, max_len_b=4)
        for nbest in hyps:
            by_limit += sum(len(h.tokens) == 4 for h in nbest)
            by_eos += sum(len(h.tokens) < 4 for h in nbest)
    assert by_eos > 5 and by_limit > 5


@pytest.mark.parametrize("kind", range(len(MODEL_KINDS)))
def test_greedy_equals_the_old_greedy(kind: int) -> None:
    rng = random.Random(2000 + kind)
    for case in range(4):
        model = random_seq2seq(MODEL_KINDS[kind], seed=case, vocab=12)
        src, lengths = random_batch(rng, 12)
        a, b = rng.choice([0.0, 1.0, 1.5]), rng.choice([1, 4, 10])
        tokens, scores = greedy_decode(model, src, lengths, max_len_a=a, max_len_b=b)
        old_tokens, old_scores = reference_greedy_decode(model, src, lengths, max_len_a=a, max_len_b=b)
        assert tokens == old_tokens
        assert torch.equal(scores, old_scores)


@pytest.mark.parametrize("kind", range(len(MODEL_KINDS)))
def test_translate_greedy_path_equals_beam_one_bit_for_bit(kind: int) -> None:
    """`translate --beam 1 --alpha 0` runs greedy_decode: same tokens and scores as beam search."""
    rng = random.Random(3000 + kind)
    for case in range(3):
        model = random_seq2seq(MODEL_KINDS[kind], seed=case, vocab=12)
        src, lengths = random_batch(rng, 12)
        min_len = rng.choice([0, 2])
        greedy = search_batch(model, src, lengths, DecodeOptions(beam_size=1, alpha=0.0, min_len=min_len))
        beam = beam_search(model, src, lengths, beam_size=1, alpha=0.0, min_len=min_len)
        assert_same(greedy, beam)
