"""InfoNCE, temperature and schedule against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from csmcir.train.loss import (
    Temperature,
    hard_negatives,
    info_nce,
    matching_loss,
    prediction_entropy,
    target_to_query,
)
from csmcir.train.schedule import warmup_cosine, warmup_cosine_scheduler


def test_info_nce_known_value():
    sims = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # each row: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    assert info_nce(sims, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # temperature 0.5 doubles the logits
    assert info_nce(sims, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_info_nce_labels_select_the_positive_column():
    sims = torch.tensor([[0.1, 0.7, 0.3]])
    expected = -math.log(math.exp(0.7) / sum(math.exp(s) for s in (0.1, 0.7, 0.3)))
    assert info_nce(sims, 1.0, labels=torch.tensor([1])).item() == pytest.approx(expected)


def test_ignore_mask_removes_duplicate_targets_but_never_the_positive():
    sims = torch.tensor([[0.5, 0.2, 0.9]])
    ignore = torch.tensor([[True, False, True]])  # column 0 is the positive: kept anyway
    expected = -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(0.2)))
    assert info_nce(sims, 1.0, ignore_mask=ignore).item() == pytest.approx(expected)


def test_target_to_query_reads_this_ranks_columns_the_other_way():
    """Rows are queries 0-1, columns another rank's target then this rank's targets 0-1."""
    sims = torch.tensor([[9.0, 0.8, 0.1], [9.0, 0.3, 0.6]])

    def picks(own: float, other: float) -> float:
        return -math.log(math.exp(own) / (math.exp(own) + math.exp(other)))

    # target 0 scores query 0 at 0.8 and query 1 at 0.3; target 1: query 1 at 0.6, query 0 at 0.1
    expected = (picks(0.8, 0.3) + picks(0.6, 0.1)) / 2
    assert target_to_query(sims, 1.0, offset=1).item() == pytest.approx(expected)
    # the two targets are one image: neither query is the other copy's negative
    ignore = torch.tensor([[False, True, True], [False, True, True]])
    assert target_to_query(sims, 1.0, offset=1, ignore_mask=ignore).item() == pytest.approx(0.0)


def test_hard_negatives_are_drawn_by_similarity_among_the_columns_left():
    torch.manual_seed(0)
    sims = torch.tensor([[9.0, 0.0, 30.0, 0.0], [0.0, 9.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ignore = torch.tensor(
        [[True, False, True, False], [True, True, True, True], [False, False, True, False]]
    )
    counts = torch.zeros(3, 4)
    for _ in range(300):
        rows, columns = hard_negatives(sims, ignore)
        assert rows.tolist() == [0, 2]  # row 1 has no column left: no negative
        counts[rows, columns] += 1
    assert not counts[ignore].any()  # an ignored column (the positive, a copy) never comes
    # row 0: column 2 would win, but it is ignored; columns 1 and 3 tie. Row 2: uniform of three
    assert counts[0, 1] > 100 and counts[0, 3] > 100
    assert all(counts[2, c] > 60 for c in (0, 1, 3))
    sharp = torch.tensor([[0.0, 50.0, 0.0]])
    assert hard_negatives(sharp, torch.tensor([[True, False, False]]))[1].tolist() == [1]


def test_matching_loss_known_value():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])  # [no match, match]
    # row 0 matches: -log(e^2 / (1 + e^2)); row 1 does not: -log(e / (e + 1)); row 2: log 2
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(2)) / 3
    assert matching_loss(logits, positives=1).item() == pytest.approx(expected)


def test_extra_negatives_with_bias_and_mask():
    sims = torch.tensor([[1.0, 0.0]])
    extra = torch.tensor([[0.4, 0.8]])
    mask = torch.tensor([[True, False]])
    bias = -math.log(4.0)
    denominator = math.exp(2.0) + math.exp(0.0) + math.exp(0.8 + bias)
    expected = -math.log(math.exp(2.0) / denominator)
    loss = info_nce(sims, 0.5, extra_logits=extra, extra_bias=bias, extra_mask=mask)
    assert loss.item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="extra_logits"):
        info_nce(sims, 1.0, extra_logits=torch.zeros(2, 3))


def test_info_nce_gradients_reach_queries_targets_and_temperature():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    temperature = Temperature(0.07)
    info_nce(q @ t.T, temperature()).backward()
    assert q.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
    assert temperature.log_scale.grad is not None and temperature.log_scale.grad != 0


def test_temperature_is_clamped_into_its_range():
    temperature = Temperature(init=0.07, minimum=0.01, maximum=0.5)
    assert temperature().item() == pytest.approx(0.07)
    with torch.no_grad():
        temperature.log_scale.fill_(10.0)  # tau = e^-10, below the minimum
    temperature.clamp_()
    assert temperature().item() == pytest.approx(0.01)
    with torch.no_grad():
        temperature.log_scale.fill_(-3.0)
    temperature.clamp_()
    assert temperature().item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        Temperature(init=2.0, maximum=1.0)
    assert not Temperature(learn=False).log_scale.requires_grad


def test_prediction_entropy_bounds():
    assert prediction_entropy(torch.zeros(3, 5), 1.0).item() == pytest.approx(1.0)
    confident = torch.eye(4) * 100
    assert prediction_entropy(confident, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_warmup_cosine_values():
    # warm-up of 4 steps: 1/4, 2/4, 3/4, 4/4
    assert [warmup_cosine(s, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 14) == pytest.approx(1.0)  # decay starts at 1
    assert warmup_cosine(9, 4, 14) == pytest.approx(0.5)  # half way down the cosine
    assert warmup_cosine(14, 4, 14, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(100, 4, 14, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 0, 10) == pytest.approx(1.0)  # no warm-up
    with pytest.raises(ValueError):
        warmup_cosine(0, 2, 0)


def test_scheduler_drives_the_optimizer_and_round_trips_its_state():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = warmup_cosine_scheduler(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([1.0, 2.0, 2.0])
    assert lrs[-1] < lrs[3] < lrs[2]
    opt2 = torch.optim.SGD([param], lr=2.0)
    sched2 = warmup_cosine_scheduler(opt2, warmup_steps=2, total_steps=6)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == 6 and sched2.get_last_lr() == sched.get_last_lr()
