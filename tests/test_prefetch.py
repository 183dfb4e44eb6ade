"""The prefetching DataLoader: the same batches in the same order, made a thread ahead; errors
reach the reader; a reader that stops early stops the thread."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from csmcir.data import prefetch
from csmcir.data.prefetch import Ahead, PrefetchLoader
from csmcir.errors import DataError


class Numbers(Dataset):
    """0..n-1; item ``bad`` raises a DataError, as a missing feature row does."""

    def __init__(self, n: int, bad: int | None = None) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise DataError(f"no features for item {i}")
        return torch.tensor([i, i * i])


def test_the_same_batches_in_the_same_order_from_a_thread() -> None:
    options = {"batch_size": 4, "shuffle": True, "generator": None}
    torch.manual_seed(0)
    plain = list(DataLoader(Numbers(30), **options))
    torch.manual_seed(0)
    loader = PrefetchLoader(Numbers(30), prefetch=3, **options)
    batches = iter(loader)
    assert isinstance(batches, Ahead) and batches.thread.name == "prefetch"
    got = list(batches)
    assert len(got) == len(plain) == 8
    assert all(torch.equal(a, b) for a, b in zip(got, plain, strict=True))
    assert next(batches, "end") == "end"  # exhausted stays exhausted
    assert not isinstance(iter(PrefetchLoader(Numbers(8), prefetch=0)), Ahead)
    assert not isinstance(iter(PrefetchLoader(Numbers(8), num_workers=1)), Ahead)


def test_an_error_reaches_the_reader_after_the_batches_before_it() -> None:
    batches = iter(PrefetchLoader(Numbers(20, bad=9), batch_size=4))
    assert [b[0, 0].item() for b in (next(batches), next(batches))] == [0, 4]
    with pytest.raises(DataError, match="no features for item 9"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)


def test_a_reader_that_stops_early_stops_the_thread() -> None:
    batches = iter(PrefetchLoader(Numbers(1000), batch_size=2, prefetch=2))
    next(batches)
    thread = batches.thread
    del batches  # as Lightning drops the iterator at max_steps
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_close_and_interpreter_exit_wait_for_the_thread() -> None:
    """A thread still running at exit is joined first: cut off inside a torch copy, a daemon
    thread aborts the process."""
    closed = iter(PrefetchLoader(Numbers(1000), batch_size=2, prefetch=2))
    live = iter(PrefetchLoader(Numbers(1000), batch_size=2, prefetch=2))
    next(closed), next(live)
    closed.close()
    assert not closed.thread.is_alive() and next(closed, "end") == "end"
    assert live.thread.is_alive()
    prefetch._close_live()  # what atexit runs
    assert not live.thread.is_alive()
