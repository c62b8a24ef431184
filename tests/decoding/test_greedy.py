"""Greedy decoding on a tiny MoE model trained for a few seconds to reverse symbol strings.

Training first makes the tests meaningful: the model then stops at EOS at input-dependent steps (so batched
decoding really drops finished sentences mid-batch), and a model that is wired wrong (attention over the wrong
axis, a state never carried) cannot pass the accuracy test, which shape tests would not catch.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from nmt_moe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt_moe.decoding import greedy_decode
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoEConfig

SYMBOLS = 8  # ids 4..11


def reversal_batch(g: torch.Generator, size: int) -> dict[str, torch.Tensor]:
    """Batch-contract tensors for "reverse the string": src = x + EOS, tgt = BOS + reversed(x) + EOS."""
    lengths = torch.randint(3, 7, (size,), generator=g)
    src = torch.full((size, int(lengths.max()) + 1), PAD_ID)
    tgt = torch.full((size, int(lengths.max()) + 2), PAD_ID)
    for i, n in enumerate(lengths.tolist()):
        row = torch.randint(4, 4 + SYMBOLS, (n,), generator=g)
        src[i, : n + 1] = torch.cat([row, torch.tensor([EOS_ID])])
        tgt[i, : n + 2] = torch.cat([torch.tensor([BOS_ID]), row.flip(0), torch.tensor([EOS_ID])])
    return {"src": src, "src_lengths": lengths + 1, "tgt": tgt}


def tiny_model() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(Seq2SeqConfig(
        vocab_size=4 + SYMBOLS, embed_dim=32, hidden_size=64, encoder_layers=2, decoder_layers=2, dropout=0.0,
        encoder_moe_after=[1], decoder_moe_after=[1], moe=MoEConfig(num_experts=4, k=2, d_hidden=32),
    ))  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices only pay for thread hand-offs (and a busy machine makes those slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reverser(one_thread: None) -> Seq2Seq:
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(160):
        batch = reversal_batch(g, 64)
        out = model(batch["src"], batch["src_lengths"], batch["tgt"][:, :-1])
        loss = F.cross_entropy(out.logits.transpose(1, 2), batch["tgt"][:, 1:], ignore_index=PAD_ID)
        optimizer.zero_grad()
        (loss + out.aux_loss).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def test_set() -> dict[str, torch.Tensor]:
    return reversal_batch(torch.Generator().manual_seed(1), 200)


def test_trained_model_reverses_under_greedy(reverser: Seq2Seq, test_set: dict[str, torch.Tensor]) -> None:
    hypotheses, _ = greedy_decode(reverser, test_set["src"], test_set["src_lengths"])
    references = [row[1 : int((row != PAD_ID).sum()) - 1].tolist() for row in test_set["tgt"]]
    exact = sum(h == r for h, r in zip(hypotheses, references, strict=True)) / len(references)
    assert exact >= 0.9, f"only {exact:.0%} of reversals exactly right"


def test_batched_equals_one_sentence_at_a_time(reverser: Seq2Seq, test_set: dict[str, torch.Tensor]) -> None:
    src, lengths = test_set["src"][:12], test_set["src_lengths"][:12]
    tokens, scores = greedy_decode(reverser, src, lengths)
    assert len({len(t) for t in tokens}) > 2, "sentences should stop at different steps for this test"
    for i in range(len(lengths)):
        n = int(lengths[i])
        alone, alone_score = greedy_decode(reverser, src[i : i + 1, :n], lengths[i : i + 1])
        assert alone == [tokens[i]]
        torch.testing.assert_close(alone_score, scores[i : i + 1])


def test_scores_are_the_teacher_forced_log_probs_of_the_argmax_path(
    reverser: Seq2Seq, test_set: dict[str, torch.Tensor]
) -> None:
    src, lengths = test_set["src"][:8], test_set["src_lengths"][:8]
    tokens, scores = greedy_decode(reverser, src, lengths)
    for i, hyp in enumerate(tokens):
        target = torch.tensor(hyp + [EOS_ID])  # every sentence here stops at EOS, well before the cap
        tgt_in = torch.cat([torch.tensor([BOS_ID]), target[:-1]]).unsqueeze(0)
        with torch.no_grad():
            log_probs = torch.log_softmax(reverser(src[i : i + 1], lengths[i : i + 1], tgt_in).logits, -1)[0]
        assert (log_probs.argmax(-1) == target).all()  # greedy took the argmax at every step
        torch.testing.assert_close(
            scores[i], log_probs.gather(1, target[:, None]).sum(), atol=1e-4, rtol=1e-5
        )


def test_lengths_are_capped_without_eos() -> None:
    """An untrained model rarely says EOS, so its output length is the cap int(a * src_len + b)."""
    model = tiny_model()
    batch = reversal_batch(torch.Generator().manual_seed(2), 6)
    with torch.no_grad():
        model.decoder.output.bias[EOS_ID] = -100.0  # never EOS
    tokens, scores = greedy_decode(model, batch["src"], batch["src_lengths"], max_len_a=0.5, max_len_b=2)
    assert [len(t) for t in tokens] == [int(0.5 * n + 2) for n in batch["src_lengths"].tolist()]
    assert all(EOS_ID not in t and PAD_ID not in t and BOS_ID not in t for t in tokens)
    assert scores.shape == (6,) and (scores < 0).all()


def test_greedy_runs_in_eval_mode_and_restores_training_mode(
    reverser: Seq2Seq, test_set: dict[str, torch.Tensor]
) -> None:
    reverser.train()
    src, lengths = test_set["src"][:16], test_set["src_lengths"][:16]
    tokens, scores = greedy_decode(reverser, src, lengths)
    assert reverser.training
    again, again_scores = greedy_decode(reverser, src, lengths)  # no gate noise while decoding
    reverser.eval()
    assert again == tokens
    torch.testing.assert_close(again_scores, scores)
