"""Shared fixtures. Tests that read the real annotation files skip when ../shared is absent."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from csmcir import cli as csmcir_cli
from csmcir.data.synth import SynthConfig, generate
from csmcir.threads import LANES_ENV, available_cores
from csmcir.train.datamodule import caption_command

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"


@pytest.fixture
def shared_benchmarks() -> Path:
    """The real FashionIQ / CIRR / CIRCO annotation files, or a skip when they are absent."""
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"real annotation files not found at {SHARED_BENCHMARKS}")
    return SHARED_BENCHMARKS


@pytest.fixture(autouse=True)
def fits_share_the_cores(monkeypatch):
    """A ``csmcir fit`` inside a test takes one thread, as if one of a grid's lanes per core:
    the suite shares a small machine with other work, where two threads ran several times
    slower (a test of the thread rule itself sets its own)."""
    monkeypatch.setenv(LANES_ENV, str(available_cores()))


@pytest.fixture
def one_thread():
    """One torch thread for a test that trains: on a shared 2-core machine two threads run
    several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthcir(tmp_path_factory) -> Path:
    """A small synthetic benchmark: 64 training queries (8 steps an epoch at batch 8), 16
    validation queries."""
    root = tmp_path_factory.mktemp("synthcir")
    generate(root, SynthConfig(train_refs=32, val_refs=8, test_refs=2))
    return root


@pytest.fixture(scope="module")
def captions(synthcir: Path) -> Path:
    """Its oracle MCoT captions, made by running, word for word, the command the missing-caption
    error prints."""
    out = synthcir / "mcot_captions.json"
    for command in caption_command("synthcir", synthcir, out).split(" && "):
        assert csmcir_cli.main(shlex.split(command)[1:]) == 0
    return out
