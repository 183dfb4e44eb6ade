"""Train/eval modes of a module tree, switched for a side computation and restored exactly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside, then every submodule's own mode back (a frozen ViT stays in eval
    mode, a training model goes back to training, whatever it was before)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
