"""Learning-rate schedules: linear warm-up, an optional constant hold, then inverse-square-root, cosine or
constant (Shazeer et al. 2017 train their translation models with warm-up, hold and inverse square root).

Each schedule is a plain function of the optimizer step that returns a multiplier of the base learning rate,
so it plugs into `torch.optim.lr_scheduler.LambdaLR` and is stepped once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

Schedule = Literal["inverse_sqrt", "cosine", "constant"]


class ScheduleError(ValueError):
    """A schedule that does not fit the run's length: a bad setting, reported in one line by the CLI."""


def lr_multiplier(
    schedule: Schedule,
    warmup_steps: int,
    max_steps: int | None = None,
    min_ratio: float = 0.0,
    hold_steps: int = 0,
) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each optimizer step (0-based).

    All schedules rise linearly over `warmup_steps` to 1.0 and stay there for `hold_steps` more. After
    that, `inverse_sqrt` decays as sqrt((warmup + hold) / step) (Vaswani et al.; with a hold, the
    schedule of Shazeer et al. 2017, appendix E), `cosine` falls from 1.0 to `min_ratio` at `max_steps`
    and stays there, and `constant` keeps 1.0.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if hold_steps < 0:
        raise ValueError(f"hold_steps must be >= 0, got {hold_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    decay_start = warmup_steps + hold_steps  # the first step of the decay
    if schedule == "cosine" and (max_steps is None or max_steps <= decay_start):
        raise ScheduleError(
            f"the cosine schedule needs max_steps > warmup_steps + hold_steps, got max_steps={max_steps} "
            f"(warmup_steps={warmup_steps}, hold_steps={hold_steps})"
        )
    if schedule not in ("inverse_sqrt", "cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}: expected 'inverse_sqrt', 'cosine' or 'constant'")

    def warmup(step: int) -> float:
        return (step + 1) / warmup_steps

    def inverse_sqrt(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        if step < decay_start:
            return 1.0
        return math.sqrt(max(decay_start, 1) / (step + 1))

    def cosine(step: int) -> float:
        if step < warmup_steps:
            return warmup(step)
        if step < decay_start:
            return 1.0
        assert max_steps is not None
        progress = min(1.0, (step - decay_start) / (max_steps - decay_start))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def constant(step: int) -> float:
        return warmup(step) if step < warmup_steps else 1.0

    return {"inverse_sqrt": inverse_sqrt, "cosine": cosine, "constant": constant}[schedule]
