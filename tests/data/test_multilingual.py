"""One-to-many multilingual data: a list of target languages, each source tagged with its target's <2xx>."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmt_moe.data.datamodule import TranslationDataModule
from nmt_moe.data.pipeline import PipelineConfig
from nmt_moe.data.tokenizer import EOS_ID, lang_token


def write_three_way(directory: Path, name: str, n: int) -> str:
    """n sentences with a German, French and Czech "translation" each: the English words, suffixed."""
    directory.mkdir(parents=True, exist_ok=True)
    english = [" ".join(f"w{(i * 7 + j) % 40}" for j in range(1 + i % 9)) for i in range(n)]
    (directory / f"{name}.en").write_text("\n".join(english) + "\n", encoding="utf-8")
    for lang in ("de", "fr", "cs"):
        lines = [" ".join(f"{word}{lang}" for word in sentence.split()) for sentence in english]
        (directory / f"{name}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(directory / name)


def test_each_target_language_is_read_and_tagged(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    pipeline = PipelineConfig(
        src_lang="en",
        tgt_lang=("de", "fr", "cs"),
        train=write_three_way(corpus, "train", 90),
        valid=write_three_way(corpus, "val", 12),
        test=write_three_way(corpus, "test", 10),
        vocab_size=48,
        spm_model_type="bpe",
    )
    dm = TranslationDataModule(pipeline, cache_dir=str(tmp_path / "cache"), max_tokens=300)
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    tags = {lang: tok.token_id(lang_token(lang)) for lang in ("de", "fr", "cs")}
    assert len(set(tags.values())) == 3 and all(t > 3 for t in tags.values())  # reserved, distinct pieces

    for split, n in [("train", 90), ("valid", 12), ("test", 10)]:
        ds = dm.splits[split]
        assert len(ds) == 3 * n  # one pair per sentence and target language, language after language
        first_ids = [row[0] for row in ds["src_ids"]]
        assert first_ids == [tags["de"]] * n + [tags["fr"]] * n + [tags["cs"]] * n
        assert all(row[-1] == EOS_ID for row in ds["src_ids"])
    # The references follow the same order: row i of the test split is in the language its tag asks for.
    refs = dm.references("test")
    assert refs[0].endswith("de") and refs[10].endswith("fr") and refs[20].endswith("cs")
    assert dm.sources("test")[0] == dm.sources("test")[10] == dm.sources("test")[20]


def test_single_target_language_is_unchanged(tmp_path: Path) -> None:
    """A plain string keeps the bilingual behaviour: no tag unless target_lang_token asks for one."""
    corpus = tmp_path / "corpus"
    settings = dict(
        src_lang="en", train=write_three_way(corpus, "train", 60), vocab_size=40, spm_model_type="bpe"
    )
    plain = TranslationDataModule(
        PipelineConfig(tgt_lang="de", **settings), cache_dir=str(tmp_path / "a"), max_tokens=300
    )
    plain.setup("fit")
    assert plain.splits["train"].column_names.count("tgt_lang") == 0
    tagged = TranslationDataModule(
        PipelineConfig(tgt_lang="de", target_lang_token=True, **settings),
        cache_dir=str(tmp_path / "b"),
        max_tokens=300,
    )
    tagged.setup("fit")
    tag = tagged.tokenizer.token_id(lang_token("de"))
    assert all(row[0] == tag for row in tagged.splits["train"]["src_ids"])
    with pytest.raises(KeyError):
        plain.tokenizer.token_id(lang_token("de"))  # no tag reserved, none prepended


@pytest.mark.parametrize(
    ("tgt_lang", "message"),
    [(("de", "de"), "distinct"), (("de", "en"), "both 'en'"), ((), "distinct")],
)
def test_bad_target_languages_are_named(tgt_lang: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PipelineConfig(src_lang="en", tgt_lang=tgt_lang, train=("x",))


def test_several_targets_refuse_the_hub() -> None:
    with pytest.raises(ValueError, match="local files only"):
        PipelineConfig(src_lang="en", tgt_lang=("de", "fr"), hub_dataset="wmt/wmt14", hub_config="de-en")
