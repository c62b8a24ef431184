"""SentencePiece wrapper: fixed ids, round trip on real text, serialization, clear errors."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import pytest

from nmt_moe.data.cleaning import normalize_whitespace
from nmt_moe.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    lang_token,
    reservoir_sample,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def m30k_lines(multi30k: Path) -> tuple[list[str], list[str]]:
    en = (multi30k / "train.en").read_text(encoding="utf-8").splitlines()[:3000]
    de = (multi30k / "train.de").read_text(encoding="utf-8").splitlines()[:3000]
    return [normalize_whitespace(s) for s in en], [normalize_whitespace(s) for s in de]


@pytest.fixture(scope="module")
def multi30k(request: pytest.FixtureRequest) -> Path:  # module-scoped twin of conftest's fixture
    from helpers.paths import MULTI30K

    if not (MULTI30K / "train.en").exists():
        pytest.skip(f"Multi30k not found at {MULTI30K}")
    return MULTI30K


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_round_trip_on_real_text(m30k_lines: tuple[list[str], list[str]], model_type: str) -> None:
    en, de = m30k_lines
    tok = train_tokenizer(en + de, 2000, model_type=model_type)
    assert tok.vocab_size == 2000
    assert (tok.sp.pad_id(), tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id()) == (
        PAD_ID,
        UNK_ID,
        BOS_ID,
        EOS_ID,
    )
    ids = tok.encode(en + de)
    assert all(0 < len(x) for x in ids)
    assert not any({PAD_ID, BOS_ID, EOS_ID} & set(x) for x in ids)  # specials are the batcher's job
    assert tok.decode(ids) == en + de


def test_serialization_and_pickle() -> None:
    text = [f"word{i} and thing{i % 7} with more{i % 13}" for i in range(300)]
    tok = train_tokenizer(text, 100, model_type="bpe", user_defined_symbols=[lang_token("de")])
    again = Tokenizer.from_bytes(tok.to_bytes())
    assert again.encode(text[:5]) == tok.encode(text[:5])
    assert pickle.loads(pickle.dumps(tok)).encode(text[:5]) == tok.encode(text[:5])
    assert tok.token_id("<2de>") > EOS_ID
    with pytest.raises(KeyError, match="<2fr>"):
        tok.token_id("<2fr>")


def test_save_and_load(tmp_path: Path) -> None:
    tok = train_tokenizer([f"alpha beta {i}" for i in range(100)], 30, model_type="bpe")
    tok.save(tmp_path / "m.model")
    assert Tokenizer.load(tmp_path / "m.model").to_bytes() == tok.to_bytes()
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(tmp_path / "nope.model")


def test_byte_fallback_keeps_unseen_characters() -> None:
    tok = train_tokenizer(
        [f"plain ascii line {i}" for i in range(200)], 300, model_type="bpe", byte_fallback=True
    )
    assert UNK_ID not in tok.encode(["Grüße ☃"])[0]
    assert tok.decode(tok.encode(["Grüße ☃"])) == ["Grüße ☃"]


def test_vocab_too_large_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"vocab_size 5000 is too large .* at most \d+ pieces"):
        train_tokenizer(["a b c", "b c d"] * 10, 5000)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(["a"], 100, model_type="word")


def test_reservoir_sample_keeps_everything_when_the_stream_is_short() -> None:
    assert reservoir_sample(iter(["a", "b", "c"]), 5, seed=0) == ["a", "b", "c"]
    assert reservoir_sample(["a", "b", "c"], 3, seed=0) == ["a", "b", "c"]


def test_reservoir_sample_is_uniform_and_seeded() -> None:
    """4000 draws of 10 from 100 items: each item picked 400 times give or take 6 binomial sds (19)."""
    counts = Counter()
    for seed in range(4000):
        picked = reservoir_sample(range(100), 10, seed)
        assert len(set(picked)) == 10
        counts.update(picked)
    assert set(counts) == set(range(100))
    assert all(abs(count - 400) < 6 * 19 for count in counts.values())
    assert reservoir_sample(range(1000), 10, 7) == reservoir_sample(range(1000), 10, 7)
    assert reservoir_sample(range(1000), 10, 7) != reservoir_sample(range(1000), 10, 8)


def test_input_sentence_size_zero_trains_on_every_sentence() -> None:
    text = [f"w{i} x{i % 7}" for i in range(200)]
    assert (
        train_tokenizer(text, 24, input_sentence_size=0).to_bytes()
        == train_tokenizer(text, 24, input_sentence_size=200).to_bytes()
    )
    with pytest.raises(ValueError, match="input_sentence_size must be >= 0"):
        train_tokenizer(text, 30, input_sentence_size=-1)
