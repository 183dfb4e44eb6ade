"""The one interface every captioning backend implements.

A backend turns requests (an image and a rendered prompt) into raw answers; parsing, checking,
retrying and storing are the runner's job, so every backend gets the same robustness. The
runner asks for up to ``batch_size`` requests at a time from ``concurrency`` workers: a local
model batches (``batch_size`` > 1, one worker), an HTTP client overlaps requests (many workers,
one request each).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from captioning.prompts import PromptSpec


@dataclass(frozen=True)
class Request:
    """One image to caption. ``attempt`` counts from 0; a retry follows an unusable answer,
    so backends that can sample do so on retries instead of repeating the same answer."""

    image_id: str
    image_path: Path
    spec: PromptSpec
    attempt: int = 0


@dataclass(frozen=True)
class Answer:
    """A raw answer; ``truncated`` when generation stopped at the token limit."""

    text: str
    truncated: bool = False


@dataclass(frozen=True)
class BackendFailure:
    """A request that produced no answer (unreadable image, server error after its retries).

    It is recorded as the image's failure without further attempts: retrying the same request
    is the backend's own business (the HTTP client retries 429/5xx with backoff).
    """

    reason: str


class Backend(ABC):
    """Base class of ``oracle``, ``hf`` and ``openai``. Use as an async context manager."""

    name: str = "backend"
    batch_size: int = 1
    concurrency: int = 1

    @property
    @abstractmethod
    def model(self) -> str:
        """The model name stored with every caption."""

    def check(self, spec: PromptSpec, image_ids: Sequence[str]) -> None:
        """Refuse, before any work, a run this backend cannot do (default: accept)."""
        return None

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    @abstractmethod
    async def generate(self, requests: Sequence[Request]) -> list[Answer | BackendFailure]:
        """One answer or failure per request, in order."""
