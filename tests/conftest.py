"""Shared fixtures. Tests that read the real annotation files skip when ../shared is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"


@pytest.fixture
def shared_benchmarks() -> Path:
    """The real FashionIQ / CIRR / CIRCO annotation files, or a skip when they are absent."""
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"real annotation files not found at {SHARED_BENCHMARKS}")
    return SHARED_BENCHMARKS
