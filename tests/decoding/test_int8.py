"""int8 CPU decoding: the int8 experts match the float ones closely, every quantisable layer is swapped,
and `nmt-moe translate --int8` runs through the real CLI with scores close to float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_checkpoint

from nmt_moe.cli import main
from nmt_moe.decoding.int8 import Int8Experts, quantize_int8
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import Experts, MoEConfig


@pytest.mark.parametrize(("activation", "bias"), [("relu", False), ("swiglu", True)])
def test_int8_experts_are_close_and_take_counts_as_list_or_tensor(activation: str, bias: bool) -> None:
    torch.manual_seed(0)
    experts = Experts(6, 32, 48, activation=activation, bias=bias).eval()
    counts = [5, 0, 9, 1, 0, 17]
    x = torch.randn(sum(counts), 32)
    with torch.no_grad():
        expected = experts(x, counts)
    int8 = Int8Experts(experts)
    from_list, from_tensor = int8(x, counts), int8(x, torch.tensor(counts))
    assert torch.equal(from_list, from_tensor)
    relative = (from_list - expected).norm() / expected.norm()
    assert relative < 0.05, relative  # 7-bit activations (reduce_range) on AVX2
    with pytest.raises(ValueError, match="counts"):
        int8(x, [1, 2, 3])
    padded = torch.cat([x, torch.randn(3, 32)])  # rows that reach no expert come out as zeros
    assert torch.equal(int8(padded, counts), torch.cat([from_list, torch.zeros(3, 32)]))


def test_quantize_int8_swaps_every_layer_and_keeps_log_probs_close() -> None:
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, k=1, gate="switch", d_hidden=32, num_shared_experts=1)
    config = Seq2SeqConfig(vocab_size=50, embed_dim=32, hidden_size=32, dropout=0.0, ffn="moe", moe=moe)
    model = Seq2Seq(config).eval()
    src = torch.randint(4, 50, (6, 7))
    lengths = torch.full((6,), 7)
    with torch.no_grad():
        expected = model(src, lengths, src).logits.log_softmax(-1)
        quantize_int8(model)
        got = model(src, lengths, src).logits.log_softmax(-1)
    kinds = {type(m).__name__ for m in model.modules()}
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.LSTM, torch.nn.LSTMCell, Experts))
                   for m in model.modules()), kinds  # fmt: skip
    assert "Int8Experts" in kinds
    assert (got - expected).abs().max() < 0.05


def test_translate_int8_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "tiny.ckpt"
    tiny_checkpoint(checkpoint)
    source = tmp_path / "in.txt"
    source.write_text("a dog runs\n\nthe house\ntwo people on a street\n", encoding="utf-8")
    common = ["translate", "-m", str(checkpoint), "-i", str(source), "--quiet", "--output-format", "jsonl",
              "--beam", "3", "--max-len-b", "4"]  # fmt: skip
    assert main([*common, "-o", str(tmp_path / "fp32.jsonl")]) == 0
    assert main([*common, "-o", str(tmp_path / "int8.jsonl"), "--int8"]) == 0
    fp32, int8 = ([json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
                  for name in ("fp32.jsonl", "int8.jsonl"))  # fmt: skip
    assert len(fp32) == len(int8) == 4 and int8[1]["tokens"] == []
    same = [(a, b) for a, b in zip(fp32, int8, strict=True) if a["tokens"] and a["tokens"] == b["tokens"]]
    assert same, "int8 changed every translation"
    assert all(abs(a["log_prob"] - b["log_prob"]) < 0.1 for a, b in same)
    assert any(a["log_prob"] != b["log_prob"] for a, b in same), "scores identical: nothing was quantised"
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--int8", "--bf16"])
    assert exit_info.value.code == 2 and "--int8" in capsys.readouterr().err
