"""Two gloo processes train against their own banks: after several steps both banks are
identical, and equal to one bank that wrote the concatenated batches in rank order (a replay)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from csmcir.train.loss import info_nce
from csmcir.train.memory_bank import MemoryBank, MemoryBankConfig

WORLD, STEPS, BATCH, DIM, TAU = 2, 6, 3, 8, 0.1
CONFIG = {
    "enabled": True,
    "size": 16,
    "selection": "hardest",
    "top_k": 4,
    "window": "entropy",
    "min_age": 1,
    "max_age": 4,
    "entropy_momentum": 0.5,
    "open_entropy": None,  # open from the first step, so the replay below can write every batch
}
STATE = ("embeddings", "ids", "written", "cursor", "entropy_ema", "opened_at")


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each rank's own queries, targets and ids; the last step's batch is short on rank 1."""
    g = torch.Generator().manual_seed(100 * rank + step)
    n = BATCH - 1 if (rank == 1 and step == STEPS) else BATCH
    q = F.normalize(torch.randn(n, DIM, generator=g), dim=-1)
    t = F.normalize(q + 0.5 * torch.randn(n, DIM, generator=g), dim=-1)
    ids = torch.arange(n) + 1000 * rank + 10 * step
    return q, t, ids


def worker(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    torch.manual_seed(rank)  # the ranks' random draws differ; their banks must not
    bank = MemoryBank(MemoryBankConfig(**CONFIG), dim=DIM)
    for step in range(1, STEPS + 1):
        q, t, ids = batch(rank, step)
        q.requires_grad_()
        if step < STEPS:  # the training hook: observe, read, write (all-gathered)
            sim = q @ t.T
            extra = bank.extra_negatives(
                queries=q,
                targets=t,
                in_batch_logits=sim / TAU,
                target_keys=ids,
                reference_keys=ids,
                step=step,
                temperature=torch.tensor(TAU),
            )
            extra.pop("stats")
            info_nce(sim, TAU, **extra).backward()
        else:  # the short last batch is only written (the entropy replay needs equal batches)
            bank.write(t, ids, step)
    torch.save({name: getattr(bank, name) for name in STATE}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_both_ranks_hold_identical_banks(tmp_path: Path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    banks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in STATE:
        assert torch.equal(banks[0][name], banks[1][name]), name

    replay = MemoryBank(MemoryBankConfig(**CONFIG), dim=DIM)
    for step in range(1, STEPS + 1):
        parts = [batch(r, step) for r in range(WORLD)]
        if step < STEPS:
            replay.observe(torch.cat([q @ t.T / TAU for q, t, _ in parts]))
            assert replay.active(step)
            replay.evict(step)
        t_all = torch.cat([t for _, t, _ in parts])
        replay.write(t_all, torch.cat([ids for _, _, ids in parts]), step, gather=False)
    for name in STATE:
        assert torch.allclose(banks[0][name].float(), getattr(replay, name).float()), name
    # both ranks' writes are in it, and the entropy EMA moved off its start value on both
    held = set(banks[0]["ids"][banks[0]["written"] >= 0].tolist())
    assert {1000 + 10 * STEPS, 10 * STEPS} <= held
    assert banks[0]["entropy_ema"].item() < 1.0
