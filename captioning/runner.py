"""Captioning a list of images with any backend: parse, check, retry, store, show progress.

Every image ends with exactly one new record in the store: its caption, or a failure with the
reason of each attempt. An answer that cannot be parsed or fails the checks is asked again, up
to ``max_attempts`` times in all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from captioning.backends.base import Answer, Backend, BackendFailure, Request
from captioning.parsing import ParseError, parse_answer
from captioning.prompts import PromptSpec
from captioning.store import CaptionStore, failure_record, ok_record


@dataclass
class RunSummary:
    """What one run over the pending images did."""

    captioned: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return (self.captioned + self.failed) / self.seconds if self.seconds else 0.0


async def caption_images(
    backend: Backend,
    images: Mapping[str, Path],
    spec: PromptSpec,
    store: CaptionStore,
    max_attempts: int = 3,
    progress: bool = True,
) -> RunSummary:
    """Caption ``images`` (id -> path, already filtered to the pending ones) into ``store``."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    loop = asyncio.get_running_loop()
    start = loop.time()
    summary = RunSummary()
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for image_id, path in images.items():
        queue.put_nowait(Request(image_id, Path(path), spec))
    reasons: dict[str, list[str]] = {}
    bar = tqdm(
        total=len(images), unit="img", desc=f"caption ({backend.name})", disable=not progress
    )

    def finish(record: dict) -> None:
        store.append(record)
        reasons.pop(record["image_id"], None)
        if record["status"] == "ok":
            summary.captioned += 1
        else:
            summary.failed += 1
        bar.update(1)
        bar.set_postfix(ok=summary.captioned, failed=summary.failed, refresh=False)

    def handle(request: Request, answer: Answer | BackendFailure) -> None:
        tried = reasons.setdefault(request.image_id, [])
        if isinstance(answer, BackendFailure):
            tried.append(answer.reason)
            finish(failure_record(request.image_id, tried, spec.version, backend.model))
            return
        try:
            caption = parse_answer(answer.text, spec)
        except ParseError as e:
            cut = " (answer cut off at the token limit)" if answer.truncated else ""
            tried.append(f"{e}{cut}")
            if len(tried) < max_attempts:
                queue.put_nowait(replace(request, attempt=request.attempt + 1))
            else:
                record = failure_record(
                    request.image_id, tried, spec.version, backend.model, raw=answer.text
                )
                finish(record)
            return
        finish(ok_record(request.image_id, caption, spec.version, backend.model, len(tried) + 1))

    async def worker() -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < backend.batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                answers = await backend.generate(batch)
                for request, answer in zip(batch, answers, strict=True):
                    handle(request, answer)
            finally:
                for _ in batch:
                    queue.task_done()

    workers = [asyncio.create_task(worker()) for _ in range(backend.concurrency)]
    all_done = asyncio.create_task(queue.join())
    try:
        await asyncio.wait([all_done, *workers], return_when=asyncio.FIRST_COMPLETED)
        for task in workers:
            if task.done() and task.exception() is not None:
                raise task.exception()
    finally:
        for task in [all_done, *workers]:
            task.cancel()
        await asyncio.gather(all_done, *workers, return_exceptions=True)
        bar.close()
    summary.seconds = loop.time() - start
    return summary


def run_captioning(
    backend: Backend,
    images: Mapping[str, Path],
    spec: PromptSpec,
    store: CaptionStore,
    max_attempts: int = 3,
    progress: bool = True,
) -> RunSummary:
    """Synchronous entry point: open the backend, caption, close it."""

    async def main() -> RunSummary:
        async with backend:
            return await caption_images(backend, images, spec, store, max_attempts, progress)

    return asyncio.run(main())
