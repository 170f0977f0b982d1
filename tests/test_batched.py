"""Batched prompts: every row of `analyze_rows` equals its own unbatched `analyze`, family by family (float64): the
families of tests/tiny.py in detail, and every exact type of the coverage table by its logits."""

import functools
import json

import pytest
import torch
from coverage_models import model_of as coverage_model
from tiny import tiny_model, tokenizer_for

from icl_probe import batch, batched, capture, coverage
from icl_probe.analysis import analyze
from icl_probe.batch import run_batch
from icl_probe.batched import analyze_rows
from icl_probe.cli import batch as cli_batch
from icl_probe.errors import UsageError
from icl_probe.inputs import tokenize
from icl_probe.lowrank import kl_divergence
from icl_probe.metrics import static_logits

# different lengths of context and query, so the rows are padded differently
PROMPTS = [
    ("ab -> ba\ncd -> dc\n", "ef ->"),
    ("xy -> yx\n", "long query ->"),
    ("1 -> 2\n3 -> 4\n5 -> 6\n7 -> 8\n", "9 ->"),
    ("hot -> cold\n", "up->"),
]
KL_LIMIT = 1e-9
FAMILIES = [("llama", "bias"), ("llama", "fold"), ("gemma3_text", "bias"), ("gemma3_text", "fold"),
            ("gpt2", "bias"), ("gpt2", "fold"), ("qwen2", "bias"), ("opt", "bias"), ("falcon", "bias"),
            ("gpt_neox", "bias"), ("lfm2", "bias"), ("falcon_h1", "bias"), ("qwen3_next", "bias"),
            ("jamba-moe", "bias")]  # fmt: skip  # convolution, linear attention; Mamba and MoE row by row
# The coverage table's exact types and config variants (python -m icl_probe.coverage, transformers 5.25).
COVERAGE_EXACT = ["afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "axk1", "axk2", "bailing_hybrid",
    "bamba", "beam", "bert-generation", "biogpt", "bitnet", "bloom", "codegen", "cohere", "cohere2", "cohere2_moe",
    "ctrl", "cwm", "dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "diffllama", "doge", "dots1",
    "dots3_note_text", "emu3", "ergo", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "falcon",
    "falcon_h1", "flex_olmo", "flint", "fuyu", "gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n_text", "gemma4",
    "gemma4 (enable_moe_block)", "gemma4_text", "gemma4_unified", "gemma4_unified_text", "glm", "glm4", "glm4_moe",
    "glm4_moe_lite", "glm_moe_dsa", "got_ocr2", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox",
    "gpt_neox_japanese", "gpt_oss", "gptj", "granite", "granite_swa", "granitemoe", "granitemoe_swa",
    "granitemoehybrid", "granitemoeshared", "helium", "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "hy_v4",
    "hyperclovax", "inkling2_loop_text", "inkling2_text", "inkling_text", "internlm3", "iquestcoder", "jais2",
    "jamba", "jetmoe", "kimi_linear", "kolibri1", "laguna", "lara_mini", "lfm2", "lfm2_moe", "lfm3", "llama",
    "llama4", "llama4_text", "mellum", "mimo_v2_flash", "minicpm3", "minicpm5_moe", "minimax", "minimax_m2",
    "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral", "mllama", "modernbert-decoder", "moshi",
    "mpt", "nanochat", "nemotron", "olmo", "olmo2", "olmo3", "olmo_hybrid", "olmoe", "openai-gpt", "opt",
    "param2moe", "persimmon", "phi", "phi3", "phi4_multimodal", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_5",
    "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_moe", "qwen3_next", "recurrent_gemma", "sarvam_mla",
    "sarvam_moe", "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2", "trocr", "vaultgemma", "xglm",
    "xlstm", "youtu", "zaya"]  # fmt: skip


@functools.cache
def model_of(name: str):
    return tiny_model(name, torch.float64)


@pytest.mark.parametrize(("name", "residual"), FAMILIES)
def test_each_row_is_its_unbatched_run(name, residual):
    model, tok = model_of(name), tokenizer_for(name)
    batched = analyze_rows(model, tok, PROMPTS, residual=residual)
    for (context, query), row in zip(PROMPTS, batched):
        alone = analyze(model, tok, context, query, residual=residual)
        assert_same_logits(model, row, alone)
        # the reported figures: the patch closes the gap (kl_patched ≈ 0 in both) and the no-context run agrees
        for key in ("kl_patched", "kl_no_context"):
            assert row.logits[key] == pytest.approx(alone.logits[key], rel=1e-6, abs=1e-12)
        assert row.logits["top1_match"] == alone.logits["top1_match"]
        top = lambda a, which: [t["id"] for t in a.logits["top_k"][which]]  # noqa: E731
        for which in ("context", "no_context", "patched"):
            assert top(row, which) == top(alone, which)
        for part in ("delta_w_only", "bias_only", "both"):
            assert row.ablation[part]["kl"] == pytest.approx(alone.ablation[part]["kl"], rel=1e-6, abs=1e-12)
        rel = 1e-9
        for mine_layer, their_layer in zip(row.layers, alone.layers):
            assert mine_layer.block_error == pytest.approx(their_layer.block_error, abs=1e-12)
            assert mine_layer.mlp_branch_error == pytest.approx(their_layer.mlp_branch_error, rel=rel, abs=1e-12)
            assert mine_layer.dz_norm == pytest.approx(their_layer.dz_norm, rel=rel)
        for path, delta in alone.patch.low_rank.items():
            assert torch.allclose(dense(row.patch.low_rank[path]), dense(delta), rtol=rel, atol=1e-12)


def assert_same_logits(model, row, alone) -> None:
    """The row's prompt, with-context logits and the query alone under its patch (applied unbatched, one pass each)
    are its own run's: KL < KL_LIMIT and the same top-1."""
    assert row.prompt == alone.prompt
    assert kl_divergence(alone.context_logits, row.context_logits) < KL_LIMIT
    assert int(alone.context_logits.argmax()) == int(row.context_logits.argmax())
    ids = alone.prompt.query_only
    mine, theirs = static_logits(model, row.patch, ids), static_logits(model, alone.patch, ids)
    assert kl_divergence(theirs, mine) < KL_LIMIT
    assert int(theirs.argmax()) == int(mine.argmax())


def test_pass_parts_keep_each_pass_within_its_token_budget():
    """Distinct rows split into parts of at most PASS_TOKENS tokens a pass (a longer row alone), the fullest parts
    first; rows after one shared prefix count only their rests, so they stay in one pass."""
    budget = batched.PASS_TOKENS
    distinct = [[i] * (budget // 3) for i in range(7)]  # no shared prefix: 3 rows fit a pass, 4 do not
    assert batched.pass_parts(distinct) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batched.pass_parts([[1] * (budget + 5), [2] * 3]) == [[0], [1]]
    shared = [[9] * budget + [i, i + 1] for i in range(32)]  # one long context, 32 short queries
    assert batched.pass_parts(shared) == [list(range(32))]
    assert batched.pass_parts([]) == []


def padded_cost(rows: list, parts: list) -> int:
    """What pass_parts minimises: each part's rows times its longest row, plus PASS_COST a part."""
    return sum(len(part) * max(len(rows[r]) for r in part) + batched.PASS_COST for part in parts)


def test_pass_parts_group_rows_by_length_where_the_padding_costs_more_than_a_batch():
    """Rows of close lengths (the demo prompts: 18 to 20 tokens) stay one batch in input order; 16 rows of 30 tokens
    and 4 of 200 among them split into the short and the long, which computes 1280 padded tokens, not 4000."""
    close = [[i] * (18 + i % 3) for i in range(32)]
    assert batched.pass_parts(close) == [list(range(32))]
    mixed = [[i] * (200 if i % 5 == 0 else 30) for i in range(20)]
    assert batched.pass_parts(mixed) == [[0, 5, 10, 15], [r for r in range(20) if r % 5]]
    assert padded_cost(mixed, batched.pass_parts(mixed)) == 4 * 200 + 16 * 30 + 2 * batched.PASS_COST


def set_partitions(items: list) -> list[list[list]]:
    """Every way to split `items` into non-empty groups (Bell(n) of them)."""
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for smaller in set_partitions(rest):
        out.append([[first], *smaller])
        out += [[*smaller[:k], [first, *group], *smaller[k + 1 :]] for k, group in enumerate(smaller)]
    return out


def within_budget(rows: list, split: list) -> bool:
    return all(len(p) == 1 or len(p) * max(len(rows[r]) for r in p) <= batched.PASS_TOKENS for p in split)


def test_pass_parts_are_the_cheapest_split_of_the_rows():
    """Against every split of the rows into groups within the token budget (all set partitions, enumerated, not
    only cuts in order of length): pass_parts' cost is the least, and its parts hold every row once."""
    generator = torch.Generator().manual_seed(0)
    for n in range(1, 8):
        for _ in range(3):
            lengths = torch.randint(1, 1400, (n,), generator=generator).tolist()
            rows = [[r] * length for r, length in enumerate(lengths)]
            parts = batched.pass_parts(rows)
            assert sorted(r for part in parts for r in part) == list(range(n))
            assert within_budget(rows, parts)
            splits = set_partitions(list(range(n)))
            least = min(padded_cost(rows, split) for split in splits if within_budget(rows, split))
            assert padded_cost(rows, parts) == least


def test_prompts_over_the_token_budget_run_as_parts_equal_to_their_unbatched_runs(monkeypatch):
    model, tok = model_of("llama"), tokenizer_for("llama")
    longest = max(len(tok(c + q)["input_ids"]) for c, q in PROMPTS)
    monkeypatch.setattr(batched, "PASS_TOKENS", 2 * longest)  # at most 2 of the 4 prompts a pass
    solved = []
    real = batched.solve_batch
    monkeypatch.setattr(batched, "solve_batch", lambda model, runs: solved.append(len(runs)) or real(model, runs))
    rows = analyze_rows(model, tok, PROMPTS)
    assert sum(solved) == len(PROMPTS) and max(solved) <= 2 and len(solved) >= 2
    for (context, query), row in zip(PROMPTS, rows, strict=True):
        alone = analyze(model, tok, context, query)
        assert_same_logits(model, row, alone)
        assert row.ablation["delta_w_only"]["kl"] == pytest.approx(alone.ablation["delta_w_only"]["kl"], rel=1e-6)


def test_prompts_grouped_by_length_come_back_in_order_each_its_own_run(monkeypatch):
    """With no cost for another batch, every length runs as its own batch, out of the input's order; each result
    is still its own prompt's (the prompt, and logits equal to its unbatched run's), in the input's order."""
    model, tok = model_of("llama"), tokenizer_for("llama")
    monkeypatch.setattr(batched, "PASS_COST", 0)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0][:1] + ("gh ->",), PROMPTS[3]]
    solved = []
    real = batched.solve_batch
    monkeypatch.setattr(batched, "solve_batch", lambda model, runs: solved.append([r.prompt.full for r in runs])
                        or real(model, runs))  # fmt: skip
    rows = analyze_rows(model, tok, prompts)
    lengths = [len(tokenize(tok, c, q).full) for c, q in prompts]
    assert len(solved) == len(set(lengths)) > 2 and len(set(lengths)) < len(prompts)  # a batch per length
    assert all(len({len(full) for full in batch}) == 1 for batch in solved)
    for (context, query), row in zip(prompts, rows, strict=True):
        assert (row.context, row.query) == (context, query)
        assert_same_logits(model, row, analyze(model, tok, context, query))


@pytest.fixture
def float64_default():
    """As the coverage table runs its models: some families build masks and rotary tables in the default dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("name", COVERAGE_EXACT)
def test_coverage_rows_are_their_unbatched_runs(name, float64_default):
    """Every exact type of the coverage table, its tiny float64 model given coverage.BATCH: each row of analyze_rows
    is its prompt's own analyze (MoE and Mamba types run their rows one at a time)."""
    assert name in coverage.causal_types() + list(coverage.VARIANTS)
    model, tok = coverage_model(name), coverage.char_tokenizer()
    for (context, query), row in zip(coverage.BATCH, analyze_rows(model, tok, coverage.BATCH)):
        assert_same_logits(model, row, analyze(model, tok, context, query))


@pytest.mark.parametrize("name", ["trocr", "xlstm"])
def test_logits_are_read_at_the_last_position_where_logits_to_keep_is_ignored(name, float64_default):
    """TrOCR and xLSTM hand their output layer every position whatever logits_to_keep says: analyze's no-context
    figure is still the query's last position's, as one plain forward pass gives it."""
    model, tok = coverage_model(name), coverage.char_tokenizer()
    alone = analyze(model, tok, coverage.CONTEXT, coverage.QUERY)
    with torch.no_grad():
        full, query = (
            model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            for ids in (alone.prompt.full, alone.prompt.query_only)
        )
    assert kl_divergence(alone.context_logits, full) < KL_LIMIT
    assert alone.logits["kl_no_context"] == pytest.approx(kl_divergence(full, query), rel=1e-9)


def test_a_block_that_attends_both_ways_gets_its_padding_masked(float64_default):
    """bert-generation's default config is not a decoder: its attention reads later positions, so padded rows get an
    attention mask (each row then its own plain forward pass) and no cached prefix is used; Llama's rows get none."""
    model = coverage_model("bert-generation")
    assert not capture.causal(model) and capture.causal(coverage_model("llama"))
    assert not capture.cache_croppable(model, 4)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    with torch.no_grad():
        batched = capture.last_logits_rows(model, rows)
        alone = [model(torch.tensor([r]), use_cache=False).logits[0, -1] for r in rows]
    assert capture.padded_inputs(model, rows)[0]["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0]
    assert "attention_mask" not in capture.padded_inputs(coverage_model("llama"), rows)[0]
    for mine, theirs in zip(batched, alone):
        assert kl_divergence(theirs, mine) < KL_LIMIT and int(theirs.argmax()) == int(mine.argmax())
    unmasked = model(capture.right_padded(rows)[0], use_cache=False).logits[1, 1]
    assert kl_divergence(alone[1], unmasked) > 1e-4  # without the mask the padding would change the row


def test_options_per_row_match():
    """--gradient and --layer-ablation are computed per row from the batched patch, as analyze computes them."""
    model, tok = model_of("llama"), tokenizer_for("llama")
    batched = analyze_rows(model, tok, PROMPTS[:2], layers="-1", gradient=True, per_layer_ablation=True)
    for (context, query), row in zip(PROMPTS[:2], batched):
        alone = analyze(model, tok, context, query, layers="-1", gradient=True, per_layer_ablation=True)
        assert row.target == alone.target
        for m, t in zip(row.layers, alone.layers):
            for path, module in t.modules.items():
                assert m.modules[path]["gradient_alignment"] == pytest.approx(module["gradient_alignment"], rel=1e-9)
        for m, t in zip(row.layer_ablation, alone.layer_ablation):
            assert m["layer"] == t["layer"]
            assert m["alone"]["kl"] == pytest.approx(t["alone"]["kl"], rel=1e-6, abs=1e-12)


def dense(delta) -> torch.Tensor:
    return delta.u @ delta.v.T


def test_run_batch_rows_equal_one_at_a_time_and_a_bad_line_fails_alone(tmp_path):
    """run_batch with batches of 3: the same documents as batch size 1 (within rounding, float64), and a line
    too long for the model fails alone, its batch run again one line at a time."""
    model, tok = model_of("llama"), tokenizer_for("llama")
    rows = [{"id": i, "context": f"{i} -> {i + 1}\n" * (1 + i % 3), "query": f"{i + 2} ->"} for i in range(5)]
    rows[1]["context"] = "3 -> 4\n" * 60  # longer than the model's 256 positions
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    outs = {}
    for size in (1, 3):
        outs[size] = tmp_path / f"out{size}.jsonl"
        summary = run_batch(model, tok, source, outs[size], batch_size=size)
        assert (summary["done"], summary["failed"]) == (4, 1)
    one, batched = ([json.loads(x) for x in outs[s].read_text().splitlines()] for s in (1, 3))
    assert [line["id"] for line in batched] == list(range(5))  # input order within and across batches
    assert "error" in batched[1] and batched[1] == one[1]
    for a, b in zip(one, batched):
        if "error" in a:
            continue
        la, lb = a["result"]["logits"], b["result"]["logits"]
        assert lb["kl_patched"] == pytest.approx(la["kl_patched"], abs=1e-12)
        for which in ("context", "no_context", "patched"):
            pa, pb = la["top_k"][which], lb["top_k"][which]
            assert [t["id"] for t in pa] == [t["id"] for t in pb]
            assert [t["prob"] for t in pb] == pytest.approx([t["prob"] for t in pa], rel=1e-9)


def test_batch_size_must_be_positive(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "context": "a", "query": "b"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match="`batch_size`"):
        run_batch(model_of("llama"), tokenizer_for("llama"), source, tmp_path / "o.jsonl", batch_size=0)


def test_cli_default_is_the_library_default():
    assert cli_batch.DEFAULT_BATCH_SIZE == batch.DEFAULT_BATCH_SIZE


def test_every_row_reproduces_its_context_bit_for_bit_on_smollm2(real_models):
    """In float32, each row's patched logits equal its with-context logits exactly (kl_patched 0.0), with distinct
    contexts and with a shared one: the last block's Δb restores each row's with-context state exactly, and the
    capture and the solve read those states through one (B, 1, d) product of the output layer (capture.heads_at).
    Before that, products of other shapes left up to 7e-12 here."""
    model, tok = real_models("smollm2-135m")
    distinct = [("hot -> cold\nbig -> small\n", "fast ->"), ("up -> down\nleft -> right\nin -> out\n", "yes ->"),
                ("a -> b\n", "old ->")]  # fmt: skip
    shared = [("hot -> cold\nbig -> small\n" * 8, q) for q in ("fast ->", "yes ->", "old ->")]
    for prompts in (distinct, shared):
        rows = analyze_rows(model, tok, prompts)
        assert [r.logits["kl_patched"] for r in rows] == [0.0] * len(prompts)
