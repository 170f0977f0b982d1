"""Riders (update.Rider): the ablation's rows, run as extra rows of the sequential solve's pass, equal the same
patches applied statically in a pass of their own (patching.applied_rows), and the solved rows are unchanged."""

import functools

import pytest
import torch
from tiny import tiny_model, tokenizer_for

from icl_probe.capture import (
    capture_targets,
    capture_targets_rows,
    columns_logits,
    head_columns,
    last_logits_rows,
    select_blocks,
)
from icl_probe.errors import UsageError
from icl_probe.inputs import tokenize
from icl_probe.lowrank import kl_divergence
from icl_probe.metrics import ablation_rows, static_logits_rows
from icl_probe.patching import Patch, applied_rows
from icl_probe.update import Rider, SequentialRun, ablation_riders, solve, solve_rows

FAMILIES = ["llama", "gemma3_text", "gpt2", "qwen2", "opt", "falcon", "gpt_neox", "lfm2", "qwen3_next"]
PROMPTS = [("ab -> ba\ncd -> dc\n", "ef ->"), ("xy -> yx\n", "long query ->"), ("1 -> 2\n3 -> 4\n", "9 ->")]


@functools.cache
def model_of(name: str):
    return tiny_model(name, torch.float64)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float64 rounding: the riders run in a pass of another shape."""
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def assert_same_patch(a: Patch, b: Patch) -> None:
    assert a.low_rank.keys() == b.low_rank.keys() and a.residual.keys() == b.residual.keys()
    for path in a.low_rank:
        close(a.low_rank[path].u, b.low_rank[path].u)
        close(a.low_rank[path].v, b.low_rank[path].v)
    for path in a.residual:
        close(a.residual[path], b.residual[path])


@pytest.mark.parametrize("name", FAMILIES)
def test_riders_equal_the_static_patches_and_leave_the_solve_unchanged(name):
    model, tok = model_of(name), tokenizer_for(name)
    chosen = select_blocks(model, None)
    prompt = tokenize(tok, *PROMPTS[0])
    with torch.no_grad():
        targets, _ = capture_targets(model, chosen, prompt.full)
        plain = solve(model, chosen, targets, prompt.query_only, "bias")
        ridden = solve(model, chosen, targets, prompt.query_only, "bias", riders=ablation_riders(1))
        static = static_logits_rows(model, [*ablation_rows(chosen, plain.patches[0]), Patch()], prompt.query_only)
    assert ridden.riders.shape == (3, static.shape[-1])
    assert_same_patch(ridden.patches[0], plain.patches[0])
    close(ridden.logits, plain.logits)
    close(ridden.riders[0], static[0])  # ΔW only
    close(ridden.riders[1], static[1])  # Δb only
    close(ridden.riders[2], static[3])  # the query alone, unpatched
    close(plain.logits[0], static[2])  # the whole patch applied statically is the solved row: `both` reads it
    assert kl_divergence(static[2], ridden.logits[0]) < 1e-12


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_text"])
def test_riders_of_rows_of_different_lengths(name):
    """solve_rows with riders: each rider follows its own owner's padding, ΔW and Δb, in any order."""
    model, tok = model_of(name), tokenizer_for(name)
    chosen = select_blocks(model, None)
    prompts = [tokenize(tok, c, q) for c, q in PROMPTS]
    queries = [p.query_only for p in prompts]
    riders = [Rider(2, True, False), Rider(0, False, True), Rider(1, True, True), Rider(2, False, False)]
    with torch.no_grad():
        rows, _ = capture_targets_rows(model, chosen, [p.full for p in prompts])
        targets = {b.index: type(rows[0][b.index]).stacked([r[b.index] for r in rows]) for b in chosen}
        plain = solve_rows(model, chosen, targets, queries, "bias")
        ridden = solve_rows(model, chosen, targets, queries, "bias", riders)
        parts = [ablation_rows(chosen, plain.patches[r.owner]) for r in riders]
        patches = [parts[0][0], parts[1][1], parts[2][2], Patch()]
        with applied_rows(model, patches):
            static = last_logits_rows(model, [queries[r.owner] for r in riders])
    for a, b in zip(ridden.patches, plain.patches):
        assert_same_patch(a, b)
    close(ridden.logits, plain.logits)
    close(ridden.riders, static)


def test_riders_refuse_a_fold():
    model = model_of("llama")
    with pytest.raises(UsageError, match="bias"):
        SequentialRun(select_blocks(model, None), {}, "fold", 1, riders=[Rider(0, True, False)])


class Head(torch.nn.Linear):
    """An output layer that is not a plain nn.Linear: `riders.apart` runs it on every row, then on the solved rows."""


@pytest.mark.parametrize("bias", [False, True])
def test_the_output_layer_gives_the_riders_the_same_logits_either_way(bias):
    """A plain nn.Linear output layer runs on the solved rows and the riders' logits are W xᵀ (+ b); any other runs
    on every row and again on the solved rows. The solved rows' logits are the layer's own product of the solved
    rows either way (bit for bit); the riders' agree to float64 rounding, and with a bias too."""
    model, tok = tiny_model("llama", torch.float64), tokenizer_for("llama")
    old = model.get_output_embeddings()
    plain = torch.nn.Linear(old.in_features, old.out_features, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.copy_(old.weight)
        if bias:
            plain.bias.normal_()
    other = Head(old.in_features, old.out_features, bias=bias, dtype=torch.float64)
    other.load_state_dict(plain.state_dict())
    chosen = select_blocks(model, None)
    prompt = tokenize(tok, *PROMPTS[0])
    solutions = []
    with torch.no_grad():
        for head in (plain, other):
            model.set_output_embeddings(head)
            targets, _ = capture_targets(model, chosen, prompt.full)
            unpatched = last_logits_rows(model, [prompt.query_only])
            solutions.append(solve(model, chosen, targets, prompt.query_only, "bias", riders=ablation_riders(1)))
            close(solutions[-1].riders[2], unpatched[0])  # the query alone, unpatched, as a pass of its own gives it
    assert torch.equal(solutions[0].logits, solutions[1].logits)
    close(solutions[0].riders, solutions[1].riders)


def test_riders_under_autograd_equal_the_riders_without_it():
    """With autograd recording (parameters that require grad), the solve with riders gives the logits of the run
    without autograd, bit for bit, and a graph that differentiates (SequentialRun.added writes into a copy there)."""
    model, tok = model_of("llama"), tokenizer_for("llama")
    chosen = select_blocks(model, None)
    prompts = [tokenize(tok, c, q) for c, q in PROMPTS]
    queries = [p.query_only for p in prompts]
    with torch.no_grad():
        rows, _ = capture_targets_rows(model, chosen, [p.full for p in prompts])
        targets = {b.index: type(rows[0][b.index]).stacked([r[b.index] for r in rows]) for b in chosen}
        plain = solve_rows(model, chosen, targets, queries, "bias", ablation_riders(len(queries)))
    assert all(p.requires_grad for p in model.parameters())
    with torch.enable_grad():
        recorded = solve_rows(model, chosen, targets, queries, "bias", ablation_riders(len(queries)))
    assert torch.equal(recorded.logits.detach(), plain.logits)
    assert torch.equal(recorded.riders.detach(), plain.riders)
    recorded.riders.sum().backward()  # the graph autograd recorded is whole: the riders' logits differentiate
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("bias", [False, True])
def test_columns_logits_are_the_layers_and_a_row_keeps_its_bits_whatever_the_other_rows(bias):
    """W xᵀ (+ b) in one product of 12 columns equals the layer against a float64 product, and row i's logits are the
    same bits whether the other columns are zeros (a with-context pass) or other rows (the solve's riders)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    x = torch.randn(3, 1, 16)
    dense = x.double() @ head.weight.double().T + (head.bias.double() if bias else 0)
    padded = columns_logits(head, x, rows=12)
    assert padded.shape == (3, 1, 50)
    torch.testing.assert_close(padded.double(), dense, rtol=1e-5, atol=1e-6)
    with_others = columns_logits(head, torch.cat([x, torch.randn(9, 1, 16)]))
    assert torch.equal(with_others[:3], padded)


def test_head_columns_runs_the_output_layer_as_columns_then_gives_it_back():
    model, tok = model_of("llama"), tokenizer_for("llama")
    ids = tokenize(tok, *PROMPTS[0]).query_only
    head = model.get_output_embeddings()
    with torch.no_grad():
        own = last_logits_rows(model, [ids])
        with head_columns(model, 4):
            assert "forward" in head.__dict__
            columns = last_logits_rows(model, [ids])
    assert "forward" not in head.__dict__
    close(columns, own)
