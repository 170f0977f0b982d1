"""The one recorder: what its taps read, summed keys, stop-after, the active switch and the call log."""

import pytest
import torch
from torch import nn

from icl_probe.hooks import Tap, recording


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def test_taps_read_inputs_and_outputs_as_a_dense_run_computes_them():
    model, x = net(), torch.randn(2, 4)
    h = torch.tanh(x @ model[0].weight.T + model[0].bias)  # computed by hand, not through hooks
    taps = [Tap(model[0], "x", "input"), Tap(model[1], "h"), Tap(model[2], "y")]
    with recording(taps) as seen:
        y = model(x)
    torch.testing.assert_close(seen["x"], x, rtol=0, atol=0)
    torch.testing.assert_close(seen["h"], h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["y"], y, rtol=0, atol=0)
    assert seen.keys() == ["x", "h", "y"]
    assert all(not m._forward_hooks for m in model)  # every hook removed


def test_taps_sharing_a_key_are_summed_with_their_scales_and_a_second_run_replaces_the_first():
    model = net()
    taps = [Tap(model[0], "s"), Tap(model[2], "s", scale=0.5, read=lambda x: x.sum(-1, keepdim=True))]
    with recording(taps, read=lambda x: x.sum(-1, keepdim=True)) as seen:
        model(torch.randn(2, 4))
        x = torch.randn(2, 4)
        model(x)
    first = x @ model[0].weight.T + model[0].bias
    expected = first.sum(-1, keepdim=True) + 0.5 * model[2](torch.tanh(first)).sum(-1, keepdim=True)
    torch.testing.assert_close(seen["s"], expected, rtol=1e-6, atol=1e-6)


def test_stop_ends_the_forward_pass_after_the_module_and_inactive_taps_read_nothing():
    model, later = net(), []
    model[2].register_forward_hook(lambda m, a, o: later.append(1))
    on = [False]
    with recording([Tap(model[0], "a"), Tap(model[1], "b")], stop=model[1], active=lambda: on[0]) as seen:
        model(torch.randn(1, 4))
    assert later == [] and "a" not in seen and seen.get("b") is None
    on[0] = True
    with recording([Tap(model[0], "a")], stop=model[0], active=lambda: on[0], log=True) as seen:
        model(torch.randn(1, 4))
    assert later == [] and [k for k, _ in seen.log] == ["a"]
    with pytest.raises(KeyError):
        seen["b"]


def test_call_taps_see_keyword_arguments_and_every_call_is_logged_in_order():
    model = net()
    with recording([Tap(model[0], "first", "call"), Tap(model[2], "last", "call")], log=True) as seen:
        model[0](input=torch.ones(1, 4))
        model(torch.zeros(1, 4))
    assert [k for k, _ in seen.log] == ["first", "first", "last"]
    assert seen.log[0][1].kwargs["input"].sum() == 4 and seen.log[0][1].input is None
    assert seen["last"].input.shape == (1, 5)


def test_a_key_reads_only_the_taps_that_ran_and_each_key_is_listed_once_in_tap_order():
    model, x = net(), torch.randn(2, 4)
    spare = nn.Linear(4, 4)  # never called
    taps = [Tap(spare, "k"), Tap(model[2], "y"), Tap(model[0], "k", scale=2.0), Tap(spare, "none")]
    with recording(taps) as seen:
        y = model(x)
    torch.testing.assert_close(seen["k"], 2 * (x @ model[0].weight.T + model[0].bias), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["y"], y, rtol=0, atol=0)
    assert seen.keys() == ["k", "y"] and "none" not in seen and seen.get("none", 7) == 7
