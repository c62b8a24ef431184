"""Greedy decoding: batching changes nothing, scores are the model's log-probs, lengths are capped."""

from __future__ import annotations

import torch

from nmt_moe.decoding import greedy_decode
from nmt_moe.models import Seq2Seq

V, PAD, BOS, EOS = 40, 0, 2, 3


def model_that_stops(ffn: str = "moe") -> Seq2Seq:
    """An untrained model whose EOS logit is raised, so sentences end at different, input-dependent steps."""
    torch.manual_seed(0)
    model = Seq2Seq(
        vocab_size=V, embed_dim=16, hidden_size=24, encoder_layers=3, decoder_layers=2, ffn=ffn,
        encoder_moe_after=[2], decoder_moe_after=[1], num_experts=4, k=2, d_hidden=8, tie_embeddings=False,
    )  # fmt: skip
    with torch.no_grad():
        model.decoder.output.weight.mul_(20)  # sharpen the distributions so EOS competes step by step
        model.decoder.output.bias[EOS] = 1.0
    return model


def sources(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, V, (len(lengths), max(lengths)), generator=g)
    for i, n in enumerate(lengths):
        src[i, n - 1] = EOS
        src[i, n:] = PAD
    return src, torch.tensor(lengths)


def test_batched_equals_one_sentence_at_a_time() -> None:
    model = model_that_stops()
    src, lengths = sources([9, 2, 6, 4, 7, 3])
    tokens, scores = greedy_decode(model, src, lengths)
    assert len({len(t) for t in tokens}) > 2, "sentences should stop at different steps for this test"
    for i in range(len(lengths)):
        n = int(lengths[i])
        alone, alone_score = greedy_decode(model, src[i : i + 1, :n], lengths[i : i + 1])
        assert alone == [tokens[i]]
        torch.testing.assert_close(alone_score, scores[i : i + 1])


def test_scores_are_teacher_forced_log_probs_and_lengths_are_capped() -> None:
    model = model_that_stops(ffn="dense").eval()
    src, lengths = sources([9, 2, 6, 4])
    tokens, scores = greedy_decode(model, src, lengths, max_len_a=1.0, max_len_b=2)
    for i, hyp in enumerate(tokens):
        max_len = int(1.0 * int(lengths[i]) + 2)
        assert EOS not in hyp and PAD not in hyp
        assert len(hyp) <= max_len
        stopped_at_eos = len(hyp) < max_len
        target = hyp + [EOS] if stopped_at_eos else hyp
        tgt_in = torch.tensor([[BOS] + target[:-1]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(src[i : i + 1], lengths[i : i + 1], tgt_in).logits, -1)[0]
        expected = log_probs.gather(1, torch.tensor(target)[:, None]).sum()
        torch.testing.assert_close(scores[i], expected, atol=1e-4, rtol=1e-5)
        assert (log_probs.argmax(-1) == torch.tensor(target)).all()  # greedy picked the argmax each step


def test_greedy_runs_in_eval_mode_and_restores_training_mode() -> None:
    model = model_that_stops().train()
    src, lengths = sources([5, 3])
    tokens, scores = greedy_decode(model, src, lengths)
    assert model.training
    again, again_scores = greedy_decode(model, src, lengths)  # no dropout or gate noise while decoding
    assert again == tokens
    torch.testing.assert_close(again_scores, scores)
