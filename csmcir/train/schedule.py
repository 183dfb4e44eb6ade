"""Learning-rate schedule by optimiser steps: linear warm-up, then cosine decay to a floor.

Steps, not epochs or wall time, so a run's schedule is the same on any machine and with any
number of DDP ranks for a given ``max_steps``.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The multiplier of the base learning rate at ``step`` (0-based).

    Rises linearly from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, then
    follows half a cosine from 1 down to ``min_ratio`` at ``total_steps``, and stays there.
    """
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
        raise ValueError(
            f"bad schedule: warmup_steps={warmup_steps}, total_steps={total_steps}, "
            f"min_ratio={min_ratio}"
        )
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> LambdaLR:
    warmup_cosine(0, warmup_steps, total_steps, min_ratio)  # validate the arguments now
    return LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_ratio)
    )
