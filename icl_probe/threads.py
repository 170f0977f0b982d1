"""How many CPU threads torch may use: this process's share of the cores, not all of them.

Threads that outnumber the cores slow down far more than the sharing alone explains (each waits at every
parallel region for a thread that is not running), so under `torchrun --nproc_per_node N` on one machine
each rank takes cores / N. The rule, first match wins:

1. an explicit request (`fit_threads(N)`, which the command line's threads option calls);
2. `OMP_NUM_THREADS`, which torch already honours: left as it is;
3. `LOCAL_WORLD_SIZE` = N > 1 (set by torchrun): max(1, cores // N);
4. otherwise torch's default, every core this process may run on.

`cores` is the CPUs this process may run on (its affinity mask: `taskset` and cgroup cpusets count).
"""

from __future__ import annotations

__all__ = ["ThreadPlan", "plan_threads", "fit_threads"]

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class ThreadPlan:
    """The thread count chosen and why (`requested`, `OMP_NUM_THREADS`, `LOCAL_WORLD_SIZE` or `default`)."""

    threads: int | None  # None: leave torch's own setting
    reason: str


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        return os.cpu_count() or 1


def plan_threads(requested: int | None = None, env: Mapping[str, str] | None = None, cores: int | None = None):
    """The ThreadPlan for `requested` threads (None: not asked) under `env` (default os.environ), on `cores`."""
    env = os.environ if env is None else env
    cores = available_cores() if cores is None else cores
    if requested is not None:
        if requested < 1:
            raise UsageError(f"threads must be at least 1, got {requested}; use threads=1 or more")
        return ThreadPlan(requested, "requested")
    if env.get("OMP_NUM_THREADS"):
        return ThreadPlan(None, "OMP_NUM_THREADS")
    local = env.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 1:
        return ThreadPlan(max(1, cores // int(local)), "LOCAL_WORLD_SIZE")
    return ThreadPlan(None, "default")


def fit_threads(requested: int | None = None) -> int:
    """Apply plan_threads(requested) to torch (intra-op threads); returns the thread count torch now uses."""
    import torch

    plan = plan_threads(requested)
    if plan.threads is not None and plan.threads != torch.get_num_threads():
        torch.set_num_threads(plan.threads)
    return torch.get_num_threads()
