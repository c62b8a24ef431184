"""`translate --sampling`: reproducible by seed whatever the batching, and drawing from the right law."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_checkpoint, tiny_model

from nmt_moe.cli import main
from nmt_moe.decoding.greedy import greedy_decode
from nmt_moe.decoding.sampling import SamplingOptions, draw, sample_decode

LINES = "a man plays with the ball\n\nthe red cat sits on a big blue house\nsmall dog\nthe ball\n" * 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    tiny_checkpoint(path)
    return path


def sample(tmp_path: Path, checkpoint: Path, name: str, *args: str) -> str:
    source = tmp_path / "in.txt"
    source.write_text(LINES)
    out = tmp_path / name
    assert main(["translate", "-m", str(checkpoint), "-i", str(source), "-o", str(out), "--quiet",
                 "--max-len-b", "4", "--sampling", *args]) == 0  # fmt: skip
    return out.read_text()


def test_same_seed_same_samples_whatever_the_batching(checkpoint: Path, tmp_path: Path) -> None:
    first = sample(tmp_path, checkpoint, "a", "--seed", "7")
    assert first.count("\n") == LINES.count("\n")
    assert sample(tmp_path, checkpoint, "b", "--seed", "7") == first
    assert sample(tmp_path, checkpoint, "c", "--seed", "7", "--max-sentences", "1") == first
    assert sample(tmp_path, checkpoint, "d", "--seed", "8") != first
    # the same line repeated gets different samples (each line has its own stream)
    lines = first.splitlines()
    assert len({lines[0], lines[5], lines[10]}) > 1


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, vocab, (6, 7), generator=generator)
    src[:, -1] = 3
    return src, torch.full((6,), 7)


@pytest.mark.parametrize("options", [SamplingOptions(top_k=1, seed=3), SamplingOptions(temperature=1e-4)])
def test_top_k_one_and_temperature_near_zero_are_greedy(options: SamplingOptions) -> None:
    model = tiny_model(64, seed=2)
    src, lengths = batch(64)
    greedy_tokens, greedy_scores = greedy_decode(model, src, lengths, max_len_b=6)
    tokens, scores = sample_decode(model, src, lengths, list(range(6)), options, max_len_b=6)
    assert tokens == greedy_tokens
    torch.testing.assert_close(scores, greedy_scores)


def expected_law(log_probs: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """The tempered, top-k and top-p truncated distribution, written out plainly for one row."""
    p = torch.softmax(log_probs.double() / options.temperature, dim=0)
    order = p.argsort(descending=True).tolist()
    kept, mass = [], 0.0
    for rank, token in enumerate(order):
        if (options.top_k and rank >= options.top_k) or mass >= options.top_p:
            break
        kept.append(token)
        mass += float(p[token])
    law = torch.zeros_like(p)
    law[kept] = p[kept]
    return law / law.sum()


@pytest.mark.parametrize(
    "options",
    [
        SamplingOptions(),
        SamplingOptions(temperature=0.6, top_k=5),
        SamplingOptions(temperature=1.5, top_p=0.7),
    ],
)
def test_first_tokens_follow_the_truncated_tempered_law(options: SamplingOptions) -> None:
    """4,000 sentences (same source, different line numbers) draw their first token; the counts must
    match the law within 5 standard deviations per token, and tokens outside the law never appear."""
    model = tiny_model(64, seed=4)
    n = 4000
    src, lengths = batch(64)
    src, lengths = src[:1].expand(n, -1).contiguous(), lengths[:1].expand(n).contiguous()
    tokens, _ = sample_decode(model, src, lengths, list(range(n)), options, max_len_a=0, max_len_b=1)
    with torch.no_grad():
        enc = model.encode(src[:1], lengths[:1])
        log_probs = model.decode_step(torch.tensor([2]), model.init_state(enc), enc).log_probs[0]
    law = expected_law(log_probs, options)
    counts = torch.bincount(torch.tensor([t[0] if t else 3 for t in tokens]), minlength=64).double()
    assert counts[law == 0].sum() == 0
    sigma = (n * law * (1 - law)).sqrt()
    assert ((counts - n * law).abs() <= 5 * sigma + 1).all(), (counts, n * law)
    assert (law > 0).sum() > 2  # a law with some spread, else the test proves little


def test_draw_on_a_known_law() -> None:
    log_probs = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]]).expand(3, -1)
    uniforms = torch.tensor([0.49, 0.79, 0.99])
    assert draw(log_probs, uniforms, SamplingOptions()).tolist() == [0, 1, 2]
    assert draw(log_probs, uniforms, SamplingOptions(top_p=0.6)).tolist() == [0, 1, 1]  # keeps 0.5 + 0.3
    assert draw(log_probs, uniforms, SamplingOptions(top_k=1)).tolist() == [0, 0, 0]


def test_bad_sampling_options_exit_2(checkpoint: Path, capsys) -> None:
    for args in (["--temperature", "0"], ["--top-p", "1.5"], ["--top-k", "-1"], ["--nbest", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["translate", "-m", str(checkpoint), "--sampling", "--output-format", "jsonl", *args])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("nmt-moe translate: error:")
