"""The training sampler: a seeded shuffle per epoch, sharded over ranks, resumable mid-epoch.

It subclasses DistributedSampler so that Lightning uses it as is under DDP instead of wrapping
it, and it yields ``(index, epoch)`` pairs so a sample's random choices depend on its epoch
(see :func:`csmcir.train.datasets.sample_rng`). The order is a pure function of (seed, epoch,
rank, world size): a run resumed from a mid-epoch checkpoint skips the samples already consumed
and continues with exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence, Sized

import torch
from torch.utils.data import DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """``groups`` (a group key per sample, e.g. its reference image) shuffles whole groups and
    keeps each group's samples next to each other, so they share a batch: queries on the same
    reference then serve as each other's hard negatives."""

    def __init__(
        self,
        dataset: Sized,
        *,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        groups: Sequence[Hashable] | None = None,
    ) -> None:
        # drop_last: every rank gets the same number of samples, so all_gather sees equal shapes.
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self._skip_epoch: int | None = None
        self._skip = 0
        self._groups: list[list[int]] | None = None
        if groups is not None:
            members: dict[Hashable, list[int]] = {}
            for index, key in enumerate(groups):
                members.setdefault(key, []).append(index)
            self._groups = list(members.values())

    def resume(self, epoch: int, skip: int) -> None:
        """Start at ``epoch`` and leave out its first ``skip`` samples of this rank (once)."""
        self.set_epoch(epoch)
        self._skip_epoch, self._skip = epoch, skip

    def _grouped(self) -> list[int]:
        """DistributedSampler's order and sharding, with groups shuffled instead of samples."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self._groups), generator=generator).tolist()
        indices = [i for g in order for i in self._groups[g]][: self.total_size]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = self._grouped() if self._groups is not None else list(super().__iter__())
        if self._skip_epoch == self.epoch:
            indices = indices[self._skip :]
            self._skip_epoch, self._skip = None, 0
        epoch = self.epoch
        return iter([(i, epoch) for i in indices])
