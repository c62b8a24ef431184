"""TranslationModule without a Trainer: what reaches the experts, the loss, optimizers and balancing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nmt_moe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoEConfig
from nmt_moe.training.module import TranslationModule, token_accuracy

V = 20


def tiny_model(moe: dict | None = None, **kwargs: object) -> Seq2SeqConfig:
    """The config of a tiny model (TranslationModule builds it, right after the seed is set here)."""
    torch.manual_seed(0)
    options = dict(vocab_size=V, embed_dim=8, hidden_size=16, dropout=0.0)
    moe_config = MoEConfig(num_experts=4, k=2, d_hidden=8, **(moe or {}))
    return Seq2SeqConfig(**{**options, **kwargs}, moe=moe_config)


def padded_batch() -> dict[str, torch.Tensor]:
    """Three pairs of very different lengths, so most of each tensor is padding."""
    src = [[5, 6, 7, 8, 9, 10, EOS_ID], [5, EOS_ID], [11, 12, EOS_ID]]
    tgt = [[BOS_ID, 5, EOS_ID], [BOS_ID, 6, 7, 8, 9, 10, 11, 12, EOS_ID], [BOS_ID, 13, EOS_ID]]

    def pad(rows: list[list[int]]) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], True, PAD_ID)

    return {
        "src": pad(src),
        "src_lengths": torch.tensor([len(r) for r in src]),
        "tgt": pad(tgt),
        "index": torch.arange(3),
    }


def test_padding_never_reaches_an_expert() -> None:
    module = TranslationModule(tiny_model(encoder_layers=2, decoder_layers=2), label_smoothing=0.0)
    batch = padded_batch()
    out = module.training_step(batch, 0)
    stats = out["moe"]
    real_src = int(batch["src_lengths"].sum())  # 12 of 21 positions
    real_tgt_in = int((batch["tgt"][:, :-1] != PAD_ID).sum())  # 12 of 24 positions
    assert int(stats["encoder.moe0"]["load"].sum()) == 2 * real_src  # k = 2 assignments per real token
    assert int(stats["decoder.moe0"]["load"].sum()) == 2 * real_tgt_in
    out["loss"].backward()
    assert torch.isfinite(out["loss"])


def test_loss_is_cross_entropy_over_real_tokens_plus_aux_losses() -> None:
    module = TranslationModule(tiny_model(ffn="dense"), label_smoothing=0.1)
    module.eval()  # no dropout; dense FFN has no aux loss, so the loss is the cross entropy alone
    batch = padded_batch()
    loss = module.training_step(batch, 0)["loss"]
    logits = module.model(batch["src"], batch["src_lengths"], batch["tgt"][:, :-1]).logits
    target = batch["tgt"][:, 1:]
    real = target != PAD_ID
    expected = F.cross_entropy(logits[real], target[real], label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_token_accuracy_counts_real_tokens_only() -> None:
    target = torch.tensor([[4, 5, PAD_ID], [6, PAD_ID, PAD_ID]])
    logits = torch.full((2, 3, V), -1.0)
    logits[0, 0, 4] = logits[0, 1, 9] = logits[1, 0, 6] = 1.0  # right, wrong, right
    logits[0, 2, PAD_ID] = logits[1, 1, 3] = 1.0  # padding positions: ignored either way
    assert token_accuracy(logits, target).item() == pytest.approx(2 / 3)


def test_update_bias_runs_after_each_optimizer_step() -> None:
    model = tiny_model(moe={"loss_free_bias": True, "bias_update_rate": 0.1})
    module = TranslationModule(model, optimizer="adafactor", warmup_steps=0, schedule="constant")
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.Adafactor)
    layer = module.moe_layers[0]
    batch = padded_batch()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = module.training_step(batch, 0)["loss"]
        loss.backward()
        return loss

    bias_before = layer.expert_bias.clone()
    module.optimizer_step(0, 0, optimizer, closure)
    assert len(module.moe_layers) == 2
    assert not torch.equal(layer.expert_bias, bias_before)  # load seen in the step moved the bias
    assert float(layer.load_since_update.sum()) == 0  # and was consumed by update_bias


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "sgd"}, "optimizer"),
        ({"schedule": "linear"}, "linear"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"lr": 0.0}, "lr"),
        ({"val_max_sentences": -1}, "val_max_sentences"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TranslationModule(tiny_model(), **kwargs)


def test_hyperparameters_are_primitives() -> None:
    module = TranslationModule(tiny_model(), lr=3e-4)
    hparams = dict(module.hparams)
    assert hparams["lr"] == 3e-4
    assert hparams["model"] == module.model.config
    assert Seq2Seq(Seq2SeqConfig.from_dict(hparams["model"])).config == module.model.config
