"""Threads that fit the machine: the rule that picks torch's thread count, and the CLI's --threads."""

import pytest
import torch
from helpers import run

from icl_probe.errors import UsageError
from icl_probe.threads import ThreadPlan, plan_threads


@pytest.mark.parametrize(
    ("requested", "env", "cores", "want"),
    [
        (None, {}, 8, ThreadPlan(None, "default")),  # torch's own: every core
        (None, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 8, ThreadPlan(None, "OMP_NUM_THREADS")),
        (None, {"LOCAL_WORLD_SIZE": "4"}, 8, ThreadPlan(2, "LOCAL_WORLD_SIZE")),
        (None, {"LOCAL_WORLD_SIZE": "3"}, 8, ThreadPlan(2, "LOCAL_WORLD_SIZE")),  # floor: never oversubscribe
        (None, {"LOCAL_WORLD_SIZE": "4"}, 2, ThreadPlan(1, "LOCAL_WORLD_SIZE")),  # at least one
        (None, {"LOCAL_WORLD_SIZE": "1"}, 8, ThreadPlan(None, "default")),
        (5, {"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 8, ThreadPlan(5, "requested")),
    ],
)
def test_the_rule_in_its_order(requested, env, cores, want):
    assert plan_threads(requested, env, cores) == want


def test_zero_threads_is_refused():
    with pytest.raises(UsageError, match="at least 1"):
        plan_threads(0, {}, 2)


def test_threads_option_sets_torch_threads_for_the_command(tiny_llama_dir):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = run("--threads", "1", "modules", "--model", str(tiny_llama_dir), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_below_one_is_a_usage_error():
    result = run("--threads", "0", "tasks", catch_exceptions=False)
    assert result.exit_code == 2 and "--threads" in result.output
