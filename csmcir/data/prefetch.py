"""A DataLoader that makes its batches ahead in a thread of the training process.

The feature cache's batch read is a copy from memory-mapped shards: in the training process it
runs at 0.86-0.92 of the host's memory-copy speed, through a DataLoader worker process at
0.06-0.21 (fresh shared memory per batch and the hand-off between processes; BENCHMARKS.md,
``feature_loader``). But in the training process it sits on the step's critical path. A thread
keeps the speed and leaves the path: it reads (and pins) the next ``prefetch`` batches while the
step runs, and the copies release the GIL, so the thread and the step's kernel launches share the
interpreter well. The batches and their order are the DataLoader's own.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

_BATCH, _END, _ERROR = range(3)
_JOIN_S = 30.0  # a batch in the making is finished first; longer is a source that hangs


def loader_options(*, features: bool, num_workers: int, on_cuda: bool) -> dict[str, Any]:
    """Who reads batches ahead of the step. Images: ``num_workers`` processes
    (``prefetch_factor`` batches each), or without workers on a GPU a thread of the training
    process. A feature cache: always that thread, whatever ``num_workers`` says, as a worker's
    hand-off of features runs at a fifth of the thread's speed (the module docstring). On a
    GPU the batches come pinned (by the workers' pinning thread or the prefetch thread), so a
    non-blocking copy to the device overlaps the step. Keyword arguments of
    :class:`PrefetchLoader`."""
    workers = 0 if features else num_workers
    thread = workers == 0 and (on_cuda or features)
    return {"num_workers": workers, "pin_memory": on_cuda, "prefetch": 2 if thread else 0}


class PrefetchLoader(DataLoader):
    """A ``DataLoader`` whose batches, without worker processes, come from a background thread
    ``prefetch`` batches ahead (0: made on demand, as a plain DataLoader does). With workers it
    is a plain DataLoader: they read ahead already."""

    def __init__(self, *args: Any, prefetch: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 or more, got {prefetch}")
        self.prefetch = prefetch

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()
        if self.num_workers > 0 or self.prefetch == 0:
            return batches
        return Ahead(batches, self.prefetch)


class Ahead:
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead of the reader.

    An error of ``source`` (a missing feature row) is raised in the reader, in order. A reader
    that stops early (Lightning at ``max_steps``) drops the iterator, which stops the thread: the
    thread holds only the queue and the stop flag, never the iterator itself. One still alive at
    interpreter exit is stopped and joined first: a daemon thread cut off inside a torch copy
    aborts the process ("terminate called without an active exception").
    """

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.done = False
        self.thread = threading.Thread(
            target=_fill, args=(source, self.queue, self.stopped), name="prefetch", daemon=True
        )
        self.thread.start()
        _LIVE.add(self)

    def __iter__(self) -> Ahead:
        return self

    def __next__(self) -> Any:
        if self.done:
            raise StopIteration
        kind, value = self.queue.get()
        if kind == _BATCH:
            return value
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the thread and wait for it (it finishes the batch it is making)."""
        self.done = True
        self.stopped.set()
        if self.thread is not threading.current_thread():
            self.thread.join(_JOIN_S)

    def __del__(self) -> None:
        self.stopped.set()


_LIVE: weakref.WeakSet[Ahead] = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for ahead in list(_LIVE):
        ahead.close()


def _fill(source: Iterator[Any], out: queue.Queue, stopped: threading.Event) -> None:
    def put(item: tuple[int, Any]) -> bool:
        while not stopped.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for batch in source:
            if not put((_BATCH, batch)):
                return
        put((_END, None))
    except BaseException as e:  # raised in the reader
        put((_ERROR, e))
