"""Seq2Seq: shapes, teacher forcing == step-by-step decoding, padding never routed, config round trip."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Iterator

import pytest
import torch

from nmt_moe.models import Seq2Seq, Seq2SeqConfig, parameter_counts
from nmt_moe.moe import MoEConfig

V, PAD, BOS = 40, 0, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices only pay for thread hand-offs (and a busy machine makes those slow)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODEL_KEYS = {f.name for f in dataclasses.fields(Seq2SeqConfig)}


def tiny_config(**overrides) -> Seq2SeqConfig:
    """The test model's config; an override that is no model knob is an MoE one (k, num_experts, ...)."""
    kwargs = dict(
        vocab_size=V, embed_dim=16, hidden_size=24, encoder_layers=3, decoder_layers=3, dropout=0.1,
        encoder_moe_after=[2], decoder_moe_after=[1],
    )  # fmt: skip
    moe = dict(num_experts=4, k=2, d_hidden=8)
    for key, value in overrides.items():
        (kwargs if key in MODEL_KEYS else moe)[key] = value
    return Seq2SeqConfig(**kwargs, moe=MoEConfig(**moe))


def tiny(**overrides) -> Seq2Seq:
    config = tiny_config(**overrides)
    torch.manual_seed(0)
    return Seq2Seq(config)


def batch(lengths: list[int], tgt_lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Right-padded src [B, S] (EOS-free random ids are fine here), lengths [B], tgt_in [B, T] (BOS first)."""
    g = torch.Generator().manual_seed(seed)
    B, S, T = len(lengths), max(lengths), max(tgt_lengths)
    src = torch.randint(4, V, (B, S), generator=g)
    tgt = torch.randint(4, V, (B, T), generator=g)
    tgt[:, 0] = BOS
    for i, (s, t) in enumerate(zip(lengths, tgt_lengths, strict=True)):
        src[i, s:] = PAD
        tgt[i, t:] = PAD
    return src, torch.tensor(lengths), tgt


@pytest.mark.parametrize("ffn", ["moe", "dense", "none"])
def test_forward_shapes_and_named_moe_outputs(ffn: str) -> None:
    model = tiny(ffn=ffn, encoder_moe_after=[1, 2])
    src, lengths, tgt = batch([5, 3], [4, 6])
    out = model(src, lengths, tgt)
    assert out.logits.shape == (2, 6, V)
    expected = ["encoder.moe0", "encoder.moe1", "decoder.moe0"] if ffn == "moe" else []
    assert list(out.moe) == expected
    assert out.aux_loss.shape == ()


@pytest.mark.parametrize("input_feeding", [True, False])
@pytest.mark.parametrize("attention", ["general", "dot", "additive"])
def test_teacher_forcing_equals_stepping(input_feeding: bool, attention: str) -> None:
    model = tiny(input_feeding=input_feeding, attention=attention).eval()
    src, lengths, tgt = batch([6, 4, 2], [5, 3, 5])
    with torch.no_grad():
        forced = torch.log_softmax(model(src, lengths, tgt).logits, dim=-1)  # [B, T, V]
        enc = model.encode(src, lengths)
        state = model.init_state(enc)
        for t in range(tgt.shape[1]):
            step = model.decode_step(tgt[:, t], state, enc)
            state = step.state
            real = tgt[:, t] != PAD  # padded rows of the forced pass are not comparable targets
            torch.testing.assert_close(step.log_probs[real], forced[real, t], atol=1e-5, rtol=1e-5)
            assert step.attention.shape == (3, 6)
            torch.testing.assert_close(step.attention.sum(-1), torch.ones(3))
            assert (step.attention[~enc.mask] == 0).all()  # padding is never attended
            assert [e.shape for e in step.expert_index] == [(3, 2)]
            assert (step.expert_index[0][~real] == -1).all() and (step.expert_index[0][real] >= 0).all()


def test_decode_step_scores_are_float32_under_bf16_autocast() -> None:
    """Validation decodes inside the bf16-mixed autocast: beam scores must not be rounded to bfloat16."""
    model = tiny().eval()
    src, lengths, tgt = batch([6, 4], [5, 3])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        enc = model.encode(src, lengths)
        step = model.decode_step(tgt[:, 0], model.init_state(enc), enc)
    assert step.log_probs.dtype == torch.float32
    torch.testing.assert_close(step.log_probs.exp().sum(-1), torch.ones(2))


def test_padding_is_never_routed_and_never_changes_real_positions() -> None:
    model = tiny(encoder_moe_after=[1, 2], decoder_moe_after=[1, 2]).eval()
    src, lengths, tgt = batch([7, 2, 4], [3, 6, 2])
    out = model(src, lengths, tgt)
    real_src, real_tgt = int((src != PAD).sum()), int((tgt != PAD).sum())
    for name, moe in out.moe.items():
        real = real_src if name.startswith("encoder") else real_tgt
        assert moe.expert_index.shape == (real, 2), name
        assert int(moe.load.sum()) == 2 * real, name
    # Extra padding columns change nothing at real positions (so padding is neither routed nor attended).
    padded = model(torch.nn.functional.pad(src, (0, 5)), lengths, torch.nn.functional.pad(tgt, (0, 4)))
    torch.testing.assert_close(padded.logits[:, : tgt.shape[1]][tgt != PAD], out.logits[tgt != PAD])


def test_aux_loss_trains_the_gates() -> None:
    model = tiny().train()
    src, lengths, tgt = batch([5, 3], [4, 6])
    out = model(src, lengths, tgt)
    assert out.aux_loss > 0
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    grads = [p.grad for n, p in model.named_parameters() if ".moe." in n]
    assert grads and all(g is not None for g in grads)


def test_config_round_trip_rebuilds_the_same_model() -> None:
    model = tiny(attention="additive", input_feeding=False).eval()
    config = json.loads(json.dumps(model.config))  # primitives only
    rebuilt = Seq2Seq(Seq2SeqConfig.from_dict(config)).eval()
    rebuilt.load_state_dict(model.state_dict())
    src, lengths, tgt = batch([5, 3], [4, 6])
    torch.testing.assert_close(rebuilt(src, lengths, tgt).logits, model(src, lengths, tgt).logits)
    assert rebuilt.config == model.config


def test_tied_embeddings_share_one_matrix_and_untied_do_not() -> None:
    tied = tiny(tie_embeddings=True, share_embeddings=True)
    assert tied.decoder.output.weight is tied.encoder.embedding.weight
    untied = tiny(tie_embeddings=False, share_embeddings=False, embed_dim=10)
    assert untied.decoder.output.weight is not untied.decoder.embedding.weight
    assert untied.decoder.embedding is not untied.encoder.embedding


def test_dense_baseline_has_the_active_size_of_the_moe_model() -> None:
    """Active weight matrices are equal; active parameters differ only by the gates and biases. Totals differ
    by the experts a token does not visit."""
    E, k = 8, 2
    moe, dense = tiny(ffn="moe", num_experts=E, k=k), tiny(ffn="dense", num_experts=E, k=k)
    moe_counts, dense_counts = parameter_counts(moe), parameter_counts(dense)
    moe_layers, dense_layers = [*moe.encoder.moe, *moe.decoder.moe], [*dense.encoder.moe, *dense.decoder.moe]
    gates = sum(p.numel() for layer in moe_layers for p in layer.gate.parameters())
    assert gates > 0
    expert_biases = sum(p.numel() for layer in moe_layers for p in layer.experts.parameters() if p.ndim == 1)
    dense_biases = sum(p.numel() for layer in dense_layers for p in layer.parameters() if p.ndim == 1)
    assert moe_counts["active"] - dense_counts["active"] == gates + expert_biases * k // E - dense_biases
    bank = sum(p.numel() for layer in moe_layers for p in layer.experts.parameters())
    assert moe_counts["total"] - moe_counts["active"] == bank * (E - k) // E
    assert dense_counts["total"] == dense_counts["active"]


def test_config_dataclass_is_the_one_definition_of_the_model() -> None:
    signature = inspect.signature(Seq2Seq.__init__).parameters
    assert list(signature) == ["self", "config"]  # every knob is a Seq2SeqConfig field, defined once
    config = Seq2SeqConfig()
    assert isinstance(config.moe, MoEConfig) and config.moe == MoEConfig()
    assert Seq2Seq(Seq2SeqConfig(vocab_size=V, hidden_size=8, embed_dim=8)).config["vocab_size"] == V


def test_old_flat_config_with_moe_options_builds_the_same_model() -> None:
    """Checkpoints written before MoEConfig hold num_experts, k, gate, d_hidden and moe_options beside the
    model's keys: they are read as the nested layout."""
    model = tiny(gate="switch", k=1, num_shared_experts=1, w_z=0.001).eval()
    old = {key: value for key, value in model.config.items() if key != "moe"}
    moe = dict(model.config["moe"])
    old.update({key: moe.pop(key) for key in ("num_experts", "k", "gate", "d_hidden")}, moe_options=moe)
    assert Seq2SeqConfig.from_dict(old) == Seq2SeqConfig.from_dict(model.config)
    rebuilt = Seq2Seq(Seq2SeqConfig.from_dict(old)).eval()
    rebuilt.load_state_dict(model.state_dict())
    src, lengths, tgt = batch([5, 3], [4, 6])
    torch.testing.assert_close(rebuilt(src, lengths, tgt).logits, model(src, lengths, tgt).logits)
    assert rebuilt.config == model.config


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"vocab_size": V, "hidden_sise": 8}, "unknown key(s) hidden_sise"),
        ({"vocab_size": V, "moe": {"num_expert": 4}}, "unknown key(s) num_expert"),
        ({"vocab_size": V, "moe": {}, "moe_options": {}}, "moe.num_shared_experts"),
    ],
)
def test_config_dict_with_unknown_or_mixed_keys_is_named(config: dict, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        Seq2SeqConfig.from_dict(config)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (dict(encoder_moe_after=[3]), "encoder_moe_after"),
        (dict(decoder_moe_after=[0]), "decoder_moe_after"),
        (dict(k=5), "k"),
        (dict(dropout=-0.1), "dropout"),
        (dict(attention="bilinear"), "attention"),
        (dict(ffn="sparse"), "ffn"),
        (dict(hidden_size=25), "hidden_size"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_bad_config_is_rejected_naming_the_argument(overrides: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        tiny(**overrides)
