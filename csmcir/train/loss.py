"""InfoNCE over a similarity matrix, with a learnable clamped temperature and extra negatives.

The loss takes similarities rather than embeddings so one function serves both target forms of
the model: ``[N, D]`` targets (dot products) and SPRC-style ``[N, T, D]`` token targets (max over
tokens); :meth:`CSMCIR.similarity` makes the matrix either way. Extra negatives (the memory bank)
arrive as their own similarity columns with an optional additive bias per logit (e.g. the
``-log(bank size / batch size)`` share cap or a staleness term) and a mask of usable entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Temperature(nn.Module):
    """Softmax temperature learnt as ``log(1 / tau)`` (CLIP's logit scale) and kept in a range.

    Learning the log keeps the step size relative; clamping the parameter itself after each
    optimiser step (:meth:`clamp_`) rather than the value in the forward pass keeps its gradient
    alive at the bounds, so it can move back inside.
    """

    def __init__(
        self, init: float = 0.07, minimum: float = 0.01, maximum: float = 1.0, learn: bool = True
    ):
        super().__init__()
        if not 0 < minimum <= init <= maximum:
            raise ValueError(
                f"temperature must satisfy 0 < min <= init <= max, got {minimum}, {init}, {maximum}"
            )
        self.minimum, self.maximum = minimum, maximum
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init)), requires_grad=learn)

    def forward(self) -> Tensor:
        return torch.exp(-self.log_scale)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(math.log(1.0 / self.maximum), math.log(1.0 / self.minimum))


def info_nce(
    similarities: Tensor,
    temperature: Tensor | float,
    labels: Tensor | None = None,
    *,
    ignore_mask: Tensor | None = None,
    extra_logits: Tensor | None = None,
    extra_bias: Tensor | float | None = None,
    extra_mask: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy of each query's positive against every other candidate.

    Args:
        similarities: ``[B, N]`` query-candidate similarities (the in-batch targets, gathered
            across ranks under DDP).
        temperature: softmax temperature; logits are ``similarities / temperature``.
        labels: ``[B]`` column of each query's positive; default ``arange(B)`` (row i's target
            is column i).
        ignore_mask: ``[B, N]`` bool, True where a candidate must not count as a negative (a
            duplicate of the query's target image elsewhere in the batch). The positive's own
            column is never ignored.
        extra_logits: ``[B, K]`` similarities to extra negatives (memory-bank entries), scaled by
            the same temperature.
        extra_bias: added to the scaled extra logits (a scalar or ``[B, K]``).
        extra_mask: ``[B, K]`` bool, True where an extra negative is usable; False entries drop out.
    """
    if similarities.ndim != 2:
        raise ValueError(
            f"similarities must be [queries, candidates], got shape {tuple(similarities.shape)}"
        )
    batch = similarities.shape[0]
    if labels is None:
        labels = torch.arange(batch, device=similarities.device)
    logits = similarities / temperature
    if ignore_mask is not None:
        keep_positive = torch.zeros_like(ignore_mask)
        keep_positive[torch.arange(batch, device=labels.device), labels] = True
        logits = logits.masked_fill(ignore_mask & ~keep_positive, -math.inf)
    if extra_logits is not None:
        if extra_logits.ndim != 2 or extra_logits.shape[0] != batch:
            raise ValueError(
                f"extra_logits must be [{batch}, K], got shape {tuple(extra_logits.shape)}"
            )
        extra = extra_logits / temperature
        if extra_bias is not None:
            extra = extra + extra_bias
        if extra_mask is not None:
            extra = extra.masked_fill(~extra_mask, -math.inf)
        logits = torch.cat([logits, extra], dim=1)
    return nn.functional.cross_entropy(logits, labels)


def target_to_query(
    similarities: Tensor,
    temperature: Tensor | float,
    offset: int = 0,
    ignore_mask: Tensor | None = None,
) -> Tensor:
    """InfoNCE the other way: each of this rank's targets picks its query among the batch's.

    ``similarities`` and ``ignore_mask`` are the ``[B, N]`` query-candidate matrices of
    :func:`info_nce`; this rank's targets are columns ``offset .. offset + B`` (target i is
    query i's positive). A duplicate target's other queries are ignored, not negatives.
    """
    local = slice(offset, offset + similarities.shape[0])
    ignore = None if ignore_mask is None else ignore_mask[:, local].T
    return info_nce(similarities[:, local].T, temperature, ignore_mask=ignore)


def hard_negatives(similarities: Tensor, ignore_mask: Tensor) -> tuple[Tensor, Tensor]:
    """BLIP-2's image-text matching negatives: for each row, one column drawn with probability
    ``softmax(similarities)`` among the columns ``ignore_mask`` leaves (it must exclude the row's
    own positive), so that the hardest look-alikes are drawn most. Returns ``(rows, columns)``:
    rows with no column left have no negative."""
    rows = (~ignore_mask).any(dim=1).nonzero().flatten()
    logits = similarities.detach().float()[rows].masked_fill(ignore_mask[rows], -math.inf)
    columns = torch.multinomial(torch.softmax(logits, dim=1), 1).flatten()
    return rows, columns


def matching_loss(logits: Tensor, positives: int) -> Tensor:
    """Cross-entropy of a ``[N, 2]`` match / no-match head whose first ``positives`` rows are
    matching pairs and the rest are not."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:positives] = 1
    return nn.functional.cross_entropy(logits.float(), labels)


def prediction_entropy(similarities: Tensor, temperature: Tensor | float) -> Tensor:
    """Mean normalised entropy (0..1) of the in-batch softmax: 1 = uniform, 0 = certain.

    A training health signal (and the memory bank's clock): a collapsing encoder drives it to 1.
    """
    n = similarities.shape[1]
    if n < 2:
        return similarities.new_zeros(())
    tau = temperature.detach() if isinstance(temperature, Tensor) else temperature
    log_p = torch.log_softmax(similarities.detach().float() / tau, dim=1)
    entropy = -(log_p.exp() * log_p).sum(1)
    return entropy.mean() / math.log(n)
