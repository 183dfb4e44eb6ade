"""Process pools whose workers end with the process that started them.

A pool's workers outlive a parent that is killed outright (SIGKILL, the OOM killer): nothing runs
in the parent to stop them, so they keep rendering, holding hundreds of MB each, as orphans. On
Linux each worker asks the kernel for SIGKILL when its parent ends (``PR_SET_PDEATHSIG``);
elsewhere a thread in each worker polls its parent's pid and ends the worker when it changes.
(The kernel's signal follows the *thread* that started the worker; the pool starts its workers
in the thread that submits work, and without ``max_tasks_per_child`` never replaces them.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_SECONDS = 1.0


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` processes that end when this process ends."""
    return ProcessPoolExecutor(workers, initializer=end_with_parent)


def end_with_parent(use_prctl: bool = sys.platform.startswith("linux")) -> None:
    """Pool initializer: make this worker end when its parent does. ``use_prctl=False`` takes
    the portable path (a watchdog thread) on Linux too."""
    parent = os.getppid()
    if use_prctl and _parent_death_signal(signal.SIGKILL):
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _parent_death_signal(signum: int) -> bool:
    """Ask the Linux kernel to send ``signum`` when the parent ends; False where it cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    """End the process once its parent is gone (it is then re-parented, so its ppid changes)."""
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(1)
