"""Memory bank: hand-computed cases for every part (ring buffer, window, entropy, selection,
false-negative masks, staleness, share cap), gradient isolation and checkpoint round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from csmcir.errors import ConfigError
from csmcir.train.loss import info_nce
from csmcir.train.memory_bank import (
    EMPTY,
    MemoryBank,
    MemoryBankConfig,
    all_gather_cat,
    mean_pairwise_cosine,
    normalized_entropy,
)


def make_bank(dim: int = 2, **overrides: object) -> MemoryBank:
    options: dict[str, object] = {
        "enabled": True,
        "size": 4,
        "selection": "all",
        "window": "fixed",
        "max_age": None,
        "logit_offset": 0.0,
        "exclude_reference": False,
        "open_entropy": None,
    }
    options.update(overrides)
    return MemoryBank(MemoryBankConfig(**options), dim=dim)


def hook_inputs(q: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The training hook's keyword arguments for a batch of two (targets 1, 2; references 3, 4),
    all but the step; ``in_batch_logits`` is q t^T at temperature 1."""
    return {
        "queries": q,
        "targets": t,
        "in_batch_logits": q @ t.T,
        "target_keys": ids(1, 2),
        "reference_keys": ids(3, 4),
        "temperature": torch.tensor(1.0),
    }


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def unit(*angles_deg: float) -> torch.Tensor:
    """Unit vectors in the plane at the given angles: their cosines are easy to compute by hand."""
    a = torch.tensor(angles_deg, dtype=torch.float32) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=-1)


# ---------------------------------------------------------------- ring buffer
def test_ring_buffer_order_and_wrap_around() -> None:
    bank = make_bank()
    bank.write(torch.ones(3, 2), ids(10, 11, 12), step=1)
    assert bank.ids.tolist()[:3] == [10, 11, 12]
    assert bank.written.tolist() == [1, 1, 1, EMPTY]
    assert int(bank.cursor) == 3
    bank.write(torch.ones(3, 2), ids(20, 21, 22), step=2)  # slots 3, 0, 1
    assert bank.ids.tolist() == [21, 22, 12, 20]
    assert bank.written.tolist() == [2, 2, 1, 2]
    assert int(bank.cursor) == 2
    # a batch larger than the bank keeps its last `size` rows, still in ring order from the cursor
    bank.write(torch.ones(6, 2), ids(30, 31, 32, 33, 34, 35), step=3)  # 32..35 -> slots 2, 3, 0, 1
    assert bank.ids.tolist() == [34, 35, 32, 33]
    assert int(bank.cursor) == 2


def test_write_stores_normalised_detached_embeddings() -> None:
    bank = make_bank()
    t = torch.tensor([[3.0, 4.0]], requires_grad=True)
    bank.write(t * 2, ids(1), step=0)
    assert torch.allclose(bank.embeddings[0], torch.tensor([0.6, 0.8]))
    assert not bank.embeddings.requires_grad and bank.embeddings.grad_fn is None


def test_write_rejects_token_level_targets() -> None:
    bank = make_bank()
    with pytest.raises(ConfigError, match="target_text='caption'"):
        bank.write(torch.ones(2, 3, 2), ids(1, 2), step=0)


# ---------------------------------------------------------------- temporal window
def test_fixed_window_eviction_by_age() -> None:
    bank = make_bank(size=8, max_age=2)
    for step in (1, 2, 3):
        bank.write(torch.ones(2, 2), ids(step, step + 100), step=step)
    # at step 4 the ages are 3, 2, 1: the step-1 entries are evicted
    assert bank.live_mask(4).tolist() == [False, False, True, True, True, True, False, False]
    assert bank.evict(4) == 2
    assert bank.written.tolist()[:2] == [EMPTY, EMPTY]
    assert bank.evict(4) == 0
    # entries written at the current step are not yet negatives (age 0)
    bank.write(torch.ones(1, 2), ids(9), step=4)
    assert not bank.live_mask(4)[6]
    assert bank.live_mask(5)[6]


def test_entropy_of_known_distributions() -> None:
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, normalised by ln 3
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    assert normalized_entropy(logits).item() == pytest.approx(1.5 * math.log(2) / math.log(3))
    assert normalized_entropy(torch.zeros(2, 5)).tolist() == pytest.approx([1.0, 1.0])
    assert normalized_entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(
        0, abs=1e-6
    )
    # a masked column is not a candidate: two equal finite logits are uniform over 2
    assert normalized_entropy(torch.tensor([[1.0, 1.0, -math.inf]])).item() == pytest.approx(1.0)


def test_entropy_window_follows_the_ema() -> None:
    bank = make_bank(window="entropy", min_age=2, max_age=10, entropy_momentum=0.5)
    assert bank.window() == pytest.approx(2.0)  # starts maximally uncertain: A_min
    h = 1.5 * math.log(2) / math.log(3)
    bank.observe(torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]]))
    ema = 0.5 * 1.0 + 0.5 * h
    assert bank.entropy_ema.item() == pytest.approx(ema)
    assert bank.window() == pytest.approx(2 + 8 * (1 - ema))
    for _ in range(40):  # a confident model: H -> 0, window -> A_max
        bank.observe(torch.tensor([[50.0, 0.0, 0.0]]))
    assert bank.window() == pytest.approx(10.0, abs=1e-4)


def test_the_default_window_is_fixed_while_the_entropy_ema_is_still_tracked() -> None:
    """Measured level with the entropy window behind the gate (docs/memory_bank.md), the plain
    window is the default; the entropy EMA it no longer reads is still kept, for the gate."""
    config = MemoryBankConfig(enabled=True, size=4)
    assert (config.window, config.selection) == ("fixed", "hardest")
    bank = MemoryBank(config, dim=2)
    assert bank.window() == config.max_age == 50  # H = 1 at the start: no effect on the window
    bank.observe(torch.tensor([[50.0, 0.0, 0.0]]))
    assert bank.window() == 50 and bank.entropy_ema.item() == pytest.approx(0.9)


def test_entropy_window_evicts_when_the_model_turns_uncertain() -> None:
    bank = make_bank(size=8, window="entropy", min_age=1, max_age=5, entropy_momentum=0.0)
    bank.observe(torch.tensor([[50.0, 0.0]]))  # confident: window 5
    for step in range(1, 5):
        bank.write(torch.ones(1, 2), ids(step), step=step)
    assert int(bank.live_mask(5).sum()) == 4
    bank.observe(torch.zeros(1, 2))  # uniform: window 1, only the step-4 entry is young enough
    assert bank.evict(5) == 3
    assert bank.written.tolist()[:4] == [EMPTY, EMPTY, EMPTY, 4]


# ---------------------------------------------------------------- selection and masks
def bank_with_angles(angles: list[float], **overrides: object) -> MemoryBank:
    bank = make_bank(size=len(angles), **overrides)
    bank.write(unit(*angles), ids(*range(100, 100 + len(angles))), step=0)
    return bank


def negatives_for(bank: MemoryBank, q_angle: float = 0.0, t_angle: float = 0.0, **kw: object):
    q, t = unit(q_angle), unit(t_angle)
    args = {
        "in_batch_logits": torch.zeros(1, 4),
        "target_ids": ids(-1),
        "reference_ids": ids(-2),
        "step": 1,
        "temperature": 1.0,
    }
    args.update(kw)
    return bank.negatives(q, t, **args)


def selected_ids(bank: MemoryBank, neg) -> set[int]:
    """Image ids of the kept negatives, recovered from their cosine to the query at angle 0."""
    cos = neg.similarities[0][neg.mask[0]]
    found = set()
    for c in cos.tolist():
        match = (bank.embeddings[:, 0] - c).abs().argmin()
        found.add(int(bank.ids[match]))
    return found


def test_hardest_top_k_picks_the_most_similar_entries() -> None:
    bank = bank_with_angles([80.0, 10.0, 50.0, 30.0, 170.0], selection="hardest", top_k=2)
    neg = negatives_for(bank)
    assert neg.similarities.shape == (1, 2)
    assert neg.similarities[0].tolist() == pytest.approx(
        [math.cos(math.radians(a)) for a in (10, 30)]
    )
    assert selected_ids(bank, neg) == {101, 103}


def test_all_selection_returns_every_live_entry() -> None:
    bank = bank_with_angles([80.0, 10.0, 50.0])
    neg = negatives_for(bank)
    assert neg.similarities.shape == (1, 3) and neg.mask.all()
    expected = [math.cos(math.radians(a)) for a in (80, 10, 50)]
    assert neg.similarities[0].tolist() == pytest.approx(expected)


def test_random_selection_draws_only_usable_entries() -> None:
    bank = bank_with_angles([80.0, 10.0, 50.0, 30.0], selection="random", top_k=2)
    seen: set[int] = set()
    torch.manual_seed(0)
    for _ in range(30):
        neg = negatives_for(bank, target_ids=ids(101))  # 101 is the positive: never drawn
        assert int(neg.mask.sum()) == 2
        seen |= selected_ids(bank, neg)
    assert seen == {100, 102, 103}


def test_entropy_selection_scales_k_with_query_confidence() -> None:
    bank = bank_with_angles([80.0, 10.0, 50.0, 30.0], selection="entropy", top_k=4)
    confident = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    assert int(negatives_for(bank, in_batch_logits=confident).mask.sum()) == 4
    uniform = torch.zeros(1, 4)
    assert int(negatives_for(bank, in_batch_logits=uniform).mask.sum()) == 0
    # p = (1/2, 1/4, 1/4, 0+): h = 0.75 -> k = ceil(4 * 0.25) = 1, the hardest one
    half = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25), -math.inf]])
    h = normalized_entropy(half).item()
    assert h == pytest.approx(1.5 * math.log(2) / math.log(3))
    neg = negatives_for(bank, in_batch_logits=half)
    assert int(neg.mask.sum()) == math.ceil(4 * (1 - h)) == 1
    assert selected_ids(bank, neg) == {101}


def test_false_negatives_masked_by_target_and_reference_id() -> None:
    bank = bank_with_angles([10.0, 20.0, 30.0], selection="hardest", top_k=3)
    neg = negatives_for(bank, target_ids=ids(100), reference_ids=ids(101))
    assert selected_ids(bank, neg) == {101, 102}  # reference kept: exclude_reference is off
    assert neg.stats["bank/false_neg_share"].item() == pytest.approx(1 / 3)
    bank.config.exclude_reference = True
    neg = negatives_for(bank, target_ids=ids(100), reference_ids=ids(101))
    assert selected_ids(bank, neg) == {102}
    assert neg.stats["bank/false_neg_share"].item() == pytest.approx(2 / 3)
    assert torch.isinf(neg.logits(1.0)[~neg.mask]).all()


def test_false_negatives_masked_by_margin_over_the_positive() -> None:
    # positive at 40 deg: cos 0.766. Margin 0.05 masks entries with cos > 0.816: 0 and 20 deg.
    bank = bank_with_angles([0.0, 20.0, 38.0, 60.0], fn_margin=0.05)
    neg = negatives_for(bank, t_angle=40.0)
    assert selected_ids(bank, neg) == {102, 103}
    # a negative margin is stricter: everything at least as similar as (cos_pos - 0.1) goes
    bank.config.fn_margin = -0.1
    assert selected_ids(bank, negatives_for(bank, t_angle=40.0)) == {103}


# ---------------------------------------------------------------- logits: staleness, offset, cap
def test_staleness_weights_and_temperature() -> None:
    bank = make_bank(size=4, staleness="exp", tau_age=4.0)
    bank.write(unit(0.0), ids(1), step=1)
    bank.write(unit(60.0), ids(2), step=3)
    neg = negatives_for(bank, step=5, temperature=0.5)  # ages 4 and 2
    expected = [1.0 / 0.5 - 4 / 4.0, 0.5 / 0.5 - 2 / 4.0]
    assert neg.logits(0.5)[0][neg.mask[0]].tolist() == pytest.approx(expected)
    # as a weight on exp(logit): exp(-age / tau)
    weights = (neg.logits(0.5)[0][neg.mask[0]] - torch.tensor([2.0, 1.0])).exp()
    assert weights.tolist() == pytest.approx([math.exp(-1.0), math.exp(-0.5)])


def test_auto_offset_is_minus_log_live_over_batch() -> None:
    bank = bank_with_angles([0.0] * 16, logit_offset="auto")
    neg = negatives_for(bank, in_batch_logits=torch.zeros(1, 4))
    assert neg.stats["bank/offset"].item() == pytest.approx(-math.log(16 / 4))
    assert neg.logits(1.0)[0].tolist() == pytest.approx([1.0 - math.log(4)] * 16)
    # 16 bank logits of 1 - log 4 weigh as much as 4 logits of 1, against 4 in-batch logits of 0
    in_batch = torch.zeros(1, 4)
    share = 4 * math.e / (4 * math.e + 4)
    assert negatives_for(bank, in_batch_logits=in_batch).stats["bank/share"].item() == (
        pytest.approx(share)
    )
    # never a boost: a bank smaller than the batch gets no offset
    small = bank_with_angles([0.0] * 3, logit_offset="auto")
    assert negatives_for(small).stats["bank/offset"].item() == 0.0


def test_max_share_caps_each_querys_bank_mass() -> None:
    bank = bank_with_angles([0.0] * 8, max_share=0.2)
    in_batch = torch.tensor([[0.0, -1.0], [4.0, 4.0]])
    q = unit(0.0, 0.0)
    neg = bank.negatives(q, q, in_batch, ids(-1, -1), None, step=1, temperature=1.0)
    bank_mass = neg.logits(1.0).exp().sum(dim=-1)
    share = bank_mass / (bank_mass + in_batch.exp().sum(dim=-1))
    # query 0 would hold 8e / (8e + 1 + 1/e) = 0.94 -> capped at 0.2;
    # query 1 holds 8e / (8e + 2e^4) = 0.17, under the cap: untouched
    uncapped = 8 * math.e / (8 * math.e + 2 * math.exp(4))
    assert share.tolist() == pytest.approx([0.2, uncapped])
    assert neg.stats["bank/share"].item() == pytest.approx((0.2 + uncapped) / 2)


# ---------------------------------------------------------------- gradients
def test_gradient_reaches_queries_but_never_bank_entries() -> None:
    torch.manual_seed(0)
    bank = make_bank(dim=8, size=16, selection="hardest", top_k=4, logit_offset="auto")
    bank.write(torch.randn(16, 8), torch.arange(16), step=0)
    before = bank.embeddings.clone()
    q = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    sim, tau = q @ t.T, 0.1
    neg = bank.negatives(q, t, sim / tau, ids(100, 101, 102), None, step=1, temperature=tau)
    assert not neg.bias.requires_grad
    loss = info_nce(
        sim, tau, extra_logits=neg.similarities, extra_bias=neg.bias, extra_mask=neg.mask
    )
    loss.backward()
    assert not bank.embeddings.requires_grad and bank.embeddings.grad is None
    assert torch.equal(bank.embeddings, before)
    # d loss / d q = sum_j (p_j - y_j) v_j / (B T), over in-batch targets and the selected entries
    logits = torch.cat([sim.detach() / tau, neg.logits(tau).detach()], dim=1)
    p = logits.softmax(dim=-1)
    top = (q.detach() @ bank.embeddings.T).topk(4, dim=-1).indices  # the 4 hardest per query
    candidates = torch.cat([t.detach()[None].expand(3, -1, -1), bank.embeddings[top]], dim=1)
    y = F.one_hot(torch.arange(3), logits.shape[1]).float()
    expected = torch.einsum("bk,bkd->bd", p - y, candidates) / (3 * tau)
    assert torch.allclose(q.grad, expected, atol=1e-5)
    # the targets' gradient comes from the in-batch logits alone
    expected_t = torch.einsum("bk,bd->kd", (p - y)[:, :3], q.detach()) / (3 * tau)
    assert torch.allclose(t.grad, expected_t, atol=1e-5)


def test_empty_bank_leaves_the_loss_unchanged() -> None:
    bank = make_bank(dim=4, size=8, selection="hardest", top_k=4)
    q = F.normalize(torch.randn(2, 4), dim=-1).requires_grad_()
    sim = q @ q.detach().T
    neg = bank.negatives(q, q, sim, ids(1, 2), None, step=0, temperature=1.0)
    assert not neg.mask.any()
    loss = info_nce(
        sim, 1.0, extra_logits=neg.similarities, extra_bias=neg.bias, extra_mask=neg.mask
    )
    assert loss.item() == pytest.approx(info_nce(sim, 1.0).item())
    loss.backward()
    assert torch.isfinite(q.grad).all()
    assert neg.stats["bank/share"].item() == 0.0


# ---------------------------------------------------------------- state and config
def test_state_dict_round_trip_through_a_checkpoint() -> None:
    torch.manual_seed(0)
    config = MemoryBankConfig(enabled=True, size=8, top_k=3, window="entropy", max_age=6)
    parent = torch.nn.Module()  # as in a LightningModule: the bank is a submodule
    parent.bank = MemoryBank(config, dim=4)
    for step in range(1, 4):
        parent.bank.observe(torch.randn(3, 3))
        parent.bank.write(torch.randn(3, 4), torch.arange(3) + 10 * step, step=step)
    buf = io.BytesIO()
    torch.save(parent.state_dict(), buf)
    buf.seek(0)
    restored = torch.nn.Module()
    restored.bank = MemoryBank(MemoryBankConfig(**vars(config)), dim=4)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("embeddings", "ids", "written", "cursor", "entropy_ema", "opened_at"):
        assert torch.equal(getattr(parent.bank, name), getattr(restored.bank, name)), name
    q = F.normalize(torch.randn(2, 4), dim=-1)
    a = parent.bank.negatives(q, q, torch.randn(2, 2), ids(0, 1), None, step=4, temperature=0.1)
    b = restored.bank.negatives(q, q, torch.randn(2, 2), ids(0, 1), None, step=4, temperature=0.1)
    assert torch.equal(a.similarities, b.similarities) and torch.equal(a.bias, b.bias)


def test_loading_a_bank_of_another_size_names_the_knob() -> None:
    state = make_bank(size=8).state_dict()
    with pytest.raises(ConfigError, match=r"bank\.size to 8"):
        make_bank(size=4).load_state_dict(state)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"selection": "hard"}, "bank.selection"),
        ({"window": "entropy", "max_age": None}, "bank.max_age"),
        ({"min_age": 5, "max_age": 3}, "bank.max_age"),
        ({"max_share": 1.0}, "bank.max_share"),
        ({"logit_offset": "big"}, "bank.logit_offset"),
        ({"size": 0}, "bank.size"),
        ({"staleness": "exp", "tau_age": 0.0}, "bank.tau_age"),
        ({"open_entropy": 0.0}, "bank.open_entropy"),
        ({"open_entropy": 1.5}, "bank.open_entropy"),
    ],
)
def test_bad_config_names_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MemoryBankConfig(**overrides)


def test_disabled_by_default_and_start_step() -> None:
    assert not MemoryBankConfig().enabled
    bank = make_bank(start_step=10)
    assert not bank.active(9) and bank.active(10)
    assert not MemoryBank(MemoryBankConfig(), dim=2).active(100)


def test_entropy_gate_stays_shut_while_uncertain_then_latches_open() -> None:
    bank = make_bank(size=8, selection="hardest", top_k=2, open_entropy=0.5, entropy_momentum=0.0)
    q = unit(0.0, 90.0)
    hook = {k: v for k, v in hook_inputs(q, q).items() if k != "in_batch_logits"}
    uniform, confident = torch.zeros(2, 2), torch.tensor([[20.0, 0.0], [0.0, 20.0]])
    shut = bank.extra_negatives(**hook, in_batch_logits=uniform, step=0)
    assert set(shut) == {"stats"} and shut["stats"]["bank/open"] == 0.0
    assert float(shut["stats"]["bank/entropy"]) == pytest.approx(1.0)
    assert int(bank.opened_at) == EMPTY and not bool((bank.written != EMPTY).any())  # no write
    opened = bank.extra_negatives(**hook, in_batch_logits=confident, step=1)
    assert opened["stats"]["bank/open"] == 1.0 and int(bank.opened_at) == 1
    again = bank.extra_negatives(**hook, in_batch_logits=uniform, step=2)  # H back at 1: latched
    assert again["stats"]["bank/open"] == 1.0 and "extra_logits" in again
    assert int(bank.opened_at) == 1
    assert MemoryBankConfig().open_entropy == 0.2  # shut at random init by default


# ---------------------------------------------------------------- helpers and diagnostics
def test_training_hook_reads_before_it_writes_and_waits_for_start_step() -> None:
    bank = make_bank(size=8, selection="hardest", top_k=2, start_step=2)
    q, t = unit(0.0, 90.0), unit(10.0, 80.0)
    hook = hook_inputs(q, t)
    assert set(bank.extra_negatives(step=1, **hook)) == {"stats"}  # no negatives
    assert (bank.written == EMPTY).all()  # nothing written before start_step...
    assert bank.entropy_ema.item() < 1.0  # ...but the entropy clock runs
    first = bank.extra_negatives(step=2, **hook)
    assert not first["extra_mask"].any()  # read before this batch was written
    assert bank.ids.tolist()[:2] == [1, 2] and bank.written.tolist()[:2] == [2, 2]
    second = bank.extra_negatives(step=3, **hook)
    # each query's own target (key 1 for query 0, key 2 for query 1) is masked; the other stays
    assert second["extra_mask"].sum(dim=1).tolist() == [1, 1]
    assert set(second["stats"]) >= {"bank/share", "bank/window", "bank/false_neg_share"}
    kwargs = {k: v for k, v in second.items() if k != "stats"}
    assert torch.isfinite(info_nce(q @ t.T, 1.0, **kwargs))


@pytest.mark.parametrize("selection", ["all", "random", "hardest", "entropy"])
def test_hook_write_before_backward_keeps_the_graph_valid(selection: str) -> None:
    """The hook writes this batch into the ring buffer before the loss's backward pass; the
    read must not leave autograd holding the buffer it overwrites (it did for ``all``)."""
    bank = make_bank(size=2, selection=selection, top_k=1)
    bank.write(unit(45.0, 135.0), ids(7, 8), step=0)
    q = unit(0.0, 90.0).requires_grad_()
    t = unit(10.0, 80.0)
    hook = hook_inputs(q, t)
    extra = bank.extra_negatives(step=1, **hook)
    assert bank.ids.tolist() == [1, 2]  # the write overwrote both slots
    kwargs = {k: v for k, v in extra.items() if k != "stats"}
    info_nce(q @ t.T, 1.0, **kwargs).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_mean_pairwise_cosine_hand_cases() -> None:
    assert mean_pairwise_cosine(torch.eye(3)).item() == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.ones(4, 2)).item() == pytest.approx(1.0)
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])  # pair cosines 1, -1, -1
    assert mean_pairwise_cosine(x).item() == pytest.approx(-1 / 3)


def test_probe_drift_measures_one_minus_cosine() -> None:
    bank = make_bank()
    assert bank.probe_drift(unit(0.0, 90.0)) is None
    drift = bank.probe_drift(unit(60.0, 90.0))  # moved by 60 and 0 degrees
    assert drift.item() == pytest.approx((0.5 + 0.0) / 2)


def test_all_gather_is_the_identity_without_a_process_group() -> None:
    x = torch.arange(6).reshape(3, 2)
    assert all_gather_cat(x) is x
