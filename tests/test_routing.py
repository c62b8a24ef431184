"""`nmt-moe routing` on a tiny random-weight multilingual model: counts add up, languages split the total."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from nmt_moe.checkpoint import load_model, save_checkpoint
from nmt_moe.cli import main
from nmt_moe.data.tokenizer import lang_token, train_tokenizer
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoEConfig
from nmt_moe.routing import line_languages, routing_report

WORDS = "a man woman dog cat runs sits on the red blue big small house street ball , . !".split()
LANGS = ["de", "fr", "cs"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight model with hierarchical MoE layers and `<2xx>` tags. Router weights are random (they
    start at zero, which would send every token to the same experts)."""
    tokenizer = train_tokenizer(
        sentences(300, 0), 60, model_type="bpe", user_defined_symbols=[lang_token(x) for x in LANGS]
    )
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(
        vocab_size=tokenizer.vocab_size, embed_dim=16, hidden_size=16, encoder_layers=3, decoder_layers=2,
        dropout=0.0, encoder_moe_after=[1, 2], decoder_moe_after=[1],
        moe=MoEConfig(num_experts=8, k=2, d_hidden=8, gate="hierarchical", num_groups=2, k_group=2),
    ))  # fmt: skip
    for name, p in model.named_parameters():
        if ".gate." in name:
            nn.init.normal_(p, std=1.0)
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    save_checkpoint(path, model.eval(), tokenizer)
    return path


def check_counts(layers: dict, num_languages: int) -> None:
    for name, layer in layers.items():
        assert layer.experts_per_token == 4, name  # k=2 in each of k_group=2 groups
        assert int(layer.load.sum()) == layer.routed_tokens * 4, name
        assert layer.by_language.shape == (num_languages, 8)
        assert torch.equal(layer.by_language.sum(0), layer.load), name
        assert [sum(c.values()) for c in layer.pieces] == layer.load.tolist(), name


def test_teacher_forced_counts_add_up(model_path: Path) -> None:
    model, tokenizer = load_model(model_path)
    src, tgt = sentences(20, 1), sentences(20, 2)
    tgt[3], tgt[7] = "", ""  # lines without a target are not routed
    tagged = [f"{lang_token(LANGS[i % 3])} {line}" for i, line in enumerate(src)]
    report = routing_report(model, tokenizer, tagged, targets=tgt)
    assert report.languages == sorted(LANGS) and report.sentences == 18
    assert set(report.layers) == {"encoder.moe0", "encoder.moe1", "decoder.moe0"}
    check_counts(report.layers, 3)
    # the decoder routes BOS + each target piece of the routed lines; the encoder tag + pieces + EOS
    kept = [i for i in range(20) if i not in (3, 7)]
    target_pieces = sum(len(ids) + 1 for ids in tokenizer.encode([tgt[i] for i in kept]))
    assert report.layers["decoder.moe0"].routed_tokens == target_pieces
    source_pieces = sum(len(ids) + 1 for ids in tokenizer.encode([tagged[i] for i in kept]))
    assert report.layers["encoder.moe0"].routed_tokens == source_pieces
    # each tagged line's tokens go to its language's row: de has lines 0, 6, 9, ... (minus line 3)
    de_lines = [i for i in kept if i % 3 == 0]
    de_tokens = sum(len(ids) + 1 for ids in tokenizer.encode([tagged[i] for i in de_lines]))
    de = report.languages.index("de")
    assert int(report.layers["encoder.moe0"].by_language[de].sum()) == de_tokens * 4


def test_langs_route_every_line_into_each_language(model_path: Path) -> None:
    model, tokenizer = load_model(model_path)
    lines = sentences(10, 3)
    report = routing_report(model, tokenizer, lines, langs=LANGS)
    assert report.languages == LANGS and report.sentences == 30
    check_counts(report.layers, 3)
    # the encoder reads the same pieces for each language, after a different tag
    rows = report.layers["encoder.moe0"].by_language.sum(1)
    assert rows[0] == rows[1] == rows[2]
    with pytest.raises(ValueError, match="no <2xx> tag|has no <2en> tag"):
        routing_report(model, tokenizer, lines, langs=["en"])


def test_line_languages() -> None:
    assert line_languages(["<2de> a", "b", " <2fr> c"]) == (["all", "de", "fr"], [1, 0, 2])
    assert line_languages(["a", "b"], ["cs", "de"]) == (["cs", "de"], [0, 1])
    with pytest.raises(ValueError, match="one language code per input line"):
        line_languages(["a", "b"], ["cs"])


def test_cli_writes_table_json_and_png(
    model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "test.en"
    src.write_text("\n".join(sentences(12, 4)) + "\n")
    (tmp_path / "langs.txt").write_text("\n".join(LANGS[i % 3] for i in range(12)) + "\n")
    out = tmp_path / "report"
    args = ["routing", "-m", str(model_path), "-i", str(src), "--lang-of-line", str(tmp_path / "langs.txt")]
    assert main([*args, "-o", str(out)]) == 0  # no --tgt: teacher-forced on its own greedy output
    text = capsys.readouterr().out
    assert "encoder.moe0:" in text and "decoder.moe0:" in text and "most frequent pieces" in text
    png = (out / "routing.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    report = json.loads((out / "routing.json").read_text())
    assert report["languages"] == sorted(LANGS) and report["sentences"] == 12
    for layer in report["layers"].values():
        assert sum(layer["load"]) == layer["routed_tokens"] * layer["experts_per_token"]
        per_language = [sum(row) for row in layer["by_language"].values()]
        assert sum(per_language) == sum(layer["load"])


def test_cli_names_bad_input(model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "a.txt"
    src.write_text("a man\nthe dog\n")
    (tmp_path / "b.txt").write_text("one line\n")
    assert main(["routing", "-m", str(model_path), "-i", str(src), "--tgt", str(tmp_path / "b.txt")]) == 2
    assert "--tgt has 1 lines but the input has 2" in capsys.readouterr().err
    assert main(["routing", "-m", str(tmp_path / "nope.ckpt"), "-i", str(src)]) == 2
