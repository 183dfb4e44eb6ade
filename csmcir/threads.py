"""How many torch threads a process uses: every core it is given, shared among a grid's lanes.

A process that runs alone (``csmcir quickstart``, a plain ``csmcir fit``) uses all the cores
its CPU affinity allows: on the 2-core development machine two threads train the tiny preset
1.4x as fast as one (BENCHMARKS.md, ``train_tiny``). A grid that runs ``lanes`` processes side
by side (``csmcir ablate --lanes N``) gives each ``cores // lanes``: more threads than cores make
OpenMP threads wait for each other, which measured 5-11x slower. The grid tells its processes
through the ``CSMCIR_LANES`` environment variable; an explicit ``--threads N`` wins over both.
"""

from __future__ import annotations

import os

from csmcir.errors import ConfigError

LANES_ENV = "CSMCIR_LANES"


def available_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def torch_threads(cores: int, lanes: int = 1, explicit: int | None = None) -> int:
    """Threads for one process: ``explicit`` if given, else its share of ``cores`` (at least 1)."""
    if explicit is not None:
        if explicit < 1:
            raise ConfigError(f"--threads must be at least 1, got {explicit}")
        return explicit
    if lanes < 1:
        raise ConfigError(f"{LANES_ENV} (processes side by side) must be at least 1, got {lanes}")
    return max(1, cores // lanes)


def lanes_from_env() -> int:
    """The lanes of the grid this process runs in (``CSMCIR_LANES``; 1: it runs alone)."""
    value = os.environ.get(LANES_ENV, "1")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{LANES_ENV} must be a whole number of lanes, got {value!r}") from None


def describe_threads(threads: int, cores: int, lanes: int, explicit: int | None) -> str:
    """One line that says the thread count and why: printed by every training run."""
    if explicit is not None:
        why = "set by --threads"
    elif lanes > 1:
        why = f"{cores} cores shared by {lanes} runs side by side"
    else:
        why = f"all {cores} cores this process may use"
    return f"torch threads: {threads} ({why})"
