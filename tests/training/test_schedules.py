"""Learning-rate schedules: warm-up shape, decay shapes, and bad arguments named in the error."""

from __future__ import annotations

import math

import pytest
import torch

from nmt_moe.training.schedules import lr_multiplier


@pytest.mark.parametrize("schedule", ["inverse_sqrt", "cosine", "constant"])
def test_warmup_rises_linearly_to_one(schedule: str) -> None:
    f = lr_multiplier(schedule, warmup_steps=10, max_steps=100)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f(9) == pytest.approx(1.0)


def test_inverse_sqrt_decays_as_sqrt_of_warmup_over_step() -> None:
    f = lr_multiplier("inverse_sqrt", warmup_steps=100)
    assert f(399) == pytest.approx(0.5)
    assert f(9999) == pytest.approx(0.1)


def test_cosine_reaches_min_ratio_at_max_steps_and_stays() -> None:
    f = lr_multiplier("cosine", warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_constant_after_warmup() -> None:
    f = lr_multiplier("constant", warmup_steps=0)
    assert f(0) == f(1000) == 1.0


def test_drives_lambda_lr_per_optimizer_step() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier("inverse_sqrt", warmup_steps=4))
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs[7] == pytest.approx(2.0 * math.sqrt(4 / 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "cosine", "warmup_steps": 10}, "max_steps"),
        ({"schedule": "cosine", "warmup_steps": 10, "max_steps": 5}, "max_steps"),
        ({"schedule": "linear", "warmup_steps": 10}, "linear"),
        ({"schedule": "constant", "warmup_steps": -1}, "warmup_steps"),
        ({"schedule": "cosine", "warmup_steps": 1, "max_steps": 5, "min_ratio": 2.0}, "min_ratio"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lr_multiplier(**kwargs)


def test_hold_keeps_the_peak_then_inverse_sqrt_from_the_end_of_the_hold() -> None:
    """Shazeer et al. (2017), appendix E: linear warm-up over 2000 steps, constant for 8000 more, then
    proportional to the inverse square root of the step."""
    f = lr_multiplier("inverse_sqrt", warmup_steps=2000, hold_steps=8000)
    assert f(999) == pytest.approx(0.5)
    assert [f(s) for s in (1999, 2000, 5000, 9999)] == [1.0, 1.0, 1.0, 1.0]
    assert f(39_999) == pytest.approx(0.5)  # sqrt(10000 / 40000)
    assert f(10_000) < 1.0
    cosine = lr_multiplier("cosine", warmup_steps=10, max_steps=110, hold_steps=50)
    assert cosine(59) == 1.0 and cosine(110) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="hold_steps"):
        lr_multiplier("inverse_sqrt", warmup_steps=10, hold_steps=-1)
    with pytest.raises(ValueError, match="max_steps"):
        lr_multiplier("cosine", warmup_steps=10, max_steps=50, hold_steps=50)


def test_the_module_passes_hold_steps_to_its_scheduler() -> None:
    from nmt_moe.models import Seq2SeqConfig
    from nmt_moe.moe import MoEConfig
    from nmt_moe.training.module import TranslationModule

    model = Seq2SeqConfig(vocab_size=16, embed_dim=8, hidden_size=8, moe=MoEConfig(num_experts=2, k=1))
    module = TranslationModule(model, lr=1.0, warmup_steps=2, hold_steps=3)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert [scheduler.lr_lambdas[0](s) for s in range(7)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, math.sqrt(5 / 6), math.sqrt(5 / 7)]
    )
