"""The network scripts/bench_opennmt.py compares: every encoder layer bidirectional (OpenNMT-py's `brnn`),
one input-feeding decoder layer, tied output. Its parameter count must be OpenNMT-py's, layer for layer,
and padding must not leak into any bidirectional layer."""

from __future__ import annotations

import pytest
import torch
from helpers.decoding import assert_same, toy_batch
from helpers.decoding_reference import reference_beam_search

from nmt_moe.decoding.beam import beam_search
from nmt_moe.models import Seq2Seq, Seq2SeqConfig, parameter_counts


def like_for_like(vocab: int = 8000, hidden: int = 256, **extra: object) -> Seq2Seq:
    torch.manual_seed(0)
    options = dict(encoder_layers=2, decoder_layers=1, encoder_bidirectional="all", input_feeding=True,
                   dropout=0.0, ffn="none") | extra  # fmt: skip
    return Seq2Seq(Seq2SeqConfig(vocab_size=vocab, embed_dim=hidden, hidden_size=hidden, **options)).eval()


def lstm(inputs: int, hidden: int) -> int:
    """Parameters of one LSTM direction (two bias vectors, as torch and OpenNMT-py keep them)."""
    return 4 * hidden * (inputs + hidden) + 8 * hidden


def test_parameters_match_opennmt_py_brnn_layer_for_layer() -> None:
    """OpenNMT-py 3.5.1, brnn 2x256, 1-layer decoder, general attention, shared and tied embeddings: the
    embedding, 2 bidirectional layers of 128 per direction, an LSTMCell over [emb; input feed], linear_in
    (256x256), linear_out (512->256, no bias) and the generator bias. Ours differs by one bias: the
    combine layer's 256 (OpenNMT-py's linear_out has none for general attention)."""
    V, H = 8000, 256
    opennmt = V * H + 2 * 2 * lstm(H, H // 2) + lstm(2 * H, H) + H * H + 2 * H * H + V
    assert parameter_counts(like_for_like(V, H))["total"] == opennmt + H


def test_every_layer_is_bidirectional_and_padding_never_leaks() -> None:
    model = like_for_like(vocab=30, hidden=16)
    assert all(layer.bidirectional for layer in model.encoder.layers)
    src, lengths = toy_batch([3, 7, 5], vocab=30)
    batched = model.encode(src, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone = model.encode(src[i : i + 1, :n], lengths[i : i + 1])
        torch.testing.assert_close(batched.memory[i, :n], alone.memory[0], rtol=0, atol=1e-6)


def test_beam_search_on_it_equals_the_old_search() -> None:
    model = like_for_like(vocab=12, hidden=16)
    with torch.no_grad():
        model.decoder.output.bias[3] += 1.0  # EOS: hypotheses of varied length
    src, lengths = toy_batch([4, 9, 2, 6], vocab=12, seed=5)
    for options in (dict(beam_size=5), dict(beam_size=3, nbest=2, alpha=0.6, beta=0.2, min_len=1)):
        assert_same(
            beam_search(model, src, lengths, **options), reference_beam_search(model, src, lengths, **options)
        )


def test_bad_encoder_option_is_named() -> None:
    with pytest.raises(ValueError, match="encoder_bidirectional"):
        like_for_like(vocab=30, hidden=16, encoder_bidirectional="top")
