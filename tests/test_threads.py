"""The thread rule: a run alone takes every core, a grid's lanes share them, --threads wins."""

from __future__ import annotations

import pytest

from csmcir.errors import ConfigError
from csmcir.threads import LANES_ENV, describe_threads, lanes_from_env, torch_threads


@pytest.mark.parametrize(
    ("cores", "lanes", "explicit", "threads"),
    [
        (2, 1, None, 2),  # the quickstart on the 2-core machine: both cores
        (2, 2, None, 1),  # a grid of two runs side by side: one each
        (16, 3, None, 5),  # the remainder stays idle rather than oversubscribing
        (2, 4, None, 1),  # more lanes than cores: never zero threads
        (2, 2, 3, 3),  # --threads wins over the share
    ],
)
def test_threads_are_the_cores_share_unless_set(cores, lanes, explicit, threads):
    assert torch_threads(cores, lanes, explicit) == threads


def test_impossible_counts_are_refused_by_name():
    with pytest.raises(ConfigError, match="--threads must be at least 1, got 0"):
        torch_threads(2, 1, 0)
    with pytest.raises(ConfigError, match=f"{LANES_ENV} .* must be at least 1, got 0"):
        torch_threads(2, 0)


def test_lanes_come_from_the_environment(monkeypatch):
    monkeypatch.delenv(LANES_ENV, raising=False)
    assert lanes_from_env() == 1
    monkeypatch.setenv(LANES_ENV, "3")
    assert lanes_from_env() == 3
    monkeypatch.setenv(LANES_ENV, "two")
    with pytest.raises(ConfigError, match=f"{LANES_ENV} must be a whole number of lanes"):
        lanes_from_env()


def test_the_printed_line_says_why():
    assert describe_threads(2, 2, 1, None) == "torch threads: 2 (all 2 cores this process may use)"
    assert describe_threads(1, 2, 2, None) == (
        "torch threads: 1 (2 cores shared by 2 runs side by side)"
    )
    assert describe_threads(3, 2, 2, 3) == "torch threads: 3 (set by --threads)"
