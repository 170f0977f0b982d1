"""Greedy generation against the with-context run (`analyze --generate`, `replay --generate [--recompute]`), and the
stable and naive precisions, on tiny random models."""

import io
import json

import pytest
import torch
from helpers import run
from rich.console import Console
from tiny import char_tokenizer, tiny_model, tokenizer_for

from icl_probe import analyze, export_patch, replay_patch
from icl_probe.capture import greedy, select_blocks
from icl_probe.cli.report.analysis import print_with_positions
from icl_probe.cli.report.replay import print_replay
from icl_probe.generation import recompute_generation
from icl_probe.inputs import tokenize

CONTEXT, QUERY = "ab:c\nde:f\n", "gh:"
N = 6
SPECIALS = {0, 1, 2}  # <unk>, <bos>, <eos>: their text would not tokenize back to the same id


def assert_error(result, code: int, *fragments: str) -> None:
    """A clean failure: exit `code` and one `icl-probe: error:` line on stderr naming every fragment."""
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, (result.exit_code, result.output)
    (line,) = result.stderr.splitlines()
    assert line.startswith("icl-probe: error: ") and "Traceback" not in result.output
    assert all(fragment in line for fragment in fragments), line


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_recompute_agrees_and_matches_a_slow_loop_of_fresh_analyses(family):
    model, tok = tiny_model(family), tokenizer_for(family)
    gen = analyze(model, tok, CONTEXT, QUERY, generate=N).to_dict()["generation"]
    assert gen["mode"] == "recompute"
    assert gen["agreement"] == 1.0 and gen["first_mismatch"] is None
    assert all(t["kl"] < 1e-12 for t in gen["tokens"])
    # the independent loop: a plain with-context greedy continuation (no KV cache), then a fresh analyze
    # of the text query + tokens so far at every step
    prompt = tokenize(tok, CONTEXT, QUERY)
    context_ids = greedy(model, prompt.full, N, tok.eos_token_id)
    assert not SPECIALS & set(context_ids)
    assert [t["id"] for t in gen["tokens"]] == context_ids
    for step, token in enumerate(context_ids):
        text = QUERY + "".join(tok.decode([i]) for i in context_ids[:step])
        doc = analyze(model, tok, CONTEXT, text).to_dict()
        assert doc["logits"]["top_k"]["patched"][0]["id"] == token == gen["tokens"][step]["patched_id"]


# caches that are not a plain list of keys and values: sliding windows, convolution and state-space layers, experts
CACHE_KINDS = ["gemma2", "exaone4", "gpt_neo", "lfm2", "jamba", "qwen3_next", "falcon_h1", "qwen3_next-moe", "opt"]


@pytest.mark.parametrize("family", CACHE_KINDS)
def test_the_cached_context_run_is_the_plain_greedy_one(family):
    model, tok = tiny_model(family), char_tokenizer()
    gen = analyze(model, tok, CONTEXT, QUERY, generate=N).to_dict()["generation"]
    assert [t["id"] for t in gen["tokens"]] == greedy(model, tokenize(tok, CONTEXT, QUERY).full, N, tok.eos_token_id)
    assert gen["agreement"] == 1.0 and max(t["kl"] for t in gen["tokens"]) < 1e-12


def test_the_context_runs_once_on_a_kv_cache(tokenizer):
    model = tiny_model("llama")
    prompt = tokenize(tokenizer, CONTEXT, QUERY)
    lengths = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        gen = recompute_generation(model, tokenizer, prompt, select_blocks(model, "all"), "bias", N)
    finally:
        handle.remove()
    assert len(gen.context_ids) == N
    assert lengths.count(len(prompt.full)) == 1  # the full prompt once, then one token per step
    assert lengths.count(1) == N - 1
    assert max(n for n in lengths if n != len(prompt.full)) == len(prompt.query_only) + N - 1


def test_generation_stops_after_end_of_sequence():
    model, tok = tiny_model("llama"), char_tokenizer()
    first = analyze(model, tok, CONTEXT, QUERY, generate=1).to_dict()["generation"]["tokens"][0]
    tok.eos_token = first["token"]  # the with-context first token is now the end of the sequence
    gen = analyze(model, tok, CONTEXT, QUERY, generate=N).to_dict()["generation"]
    assert [t["id"] for t in gen["tokens"]] == [first["id"]]


def test_naive_bf16_differs_from_stable(tokenizer):
    model = tiny_model("llama", torch.bfloat16)
    stable = analyze(model, tokenizer, CONTEXT, QUERY, generate=3).to_dict()
    naive = analyze(model, tokenizer, CONTEXT, QUERY, generate=3, precision="naive").to_dict()
    assert (stable["precision"], naive["precision"]) == ("stable", "naive")
    # stable: Δb in float64, rounded once, restores the last block's bf16 output bit for bit
    assert stable["logits"]["kl_patched"] == 0.0
    assert all(t["kl"] == 0.0 for t in stable["generation"]["tokens"])
    assert naive["logits"]["kl_patched"] > 0.0
    assert max(t["kl"] for t in naive["generation"]["tokens"]) > 0.0


def test_naive_in_float64_is_the_stable_math(tokenizer):
    model = tiny_model("llama")
    stable = analyze(model, tokenizer, CONTEXT, QUERY).to_dict()
    naive = analyze(model, tokenizer, CONTEXT, QUERY, precision="naive").to_dict()
    assert naive["layers"] == stable["layers"] and naive["logits"] == stable["logits"]


@pytest.mark.parametrize("residual", ["bias", "fold"])
def test_replay_fixed_and_recompute(tmp_path, tokenizer, residual):
    model = tiny_model("llama")
    path = tmp_path / "p.safetensors"
    export_patch(model, tokenizer, CONTEXT, QUERY, output=path, residual=residual, layers="-1")
    fixed = replay_patch(model, tokenizer, path, context=CONTEXT, generate=N).to_dict()["generation"]
    assert fixed["mode"] == "fixed" and len(fixed["tokens"]) == N
    assert fixed["tokens"][0]["id"] == fixed["tokens"][0]["patched_id"]  # exact at the query's last token
    recomputed = replay_patch(model, tokenizer, path, context=CONTEXT, generate=N, recompute=True).to_dict()
    want = analyze(model, tokenizer, CONTEXT, QUERY, generate=N, residual=residual, layers="-1").to_dict()
    want = want["generation"]
    assert recomputed["generation"] == want
    alone = replay_patch(model, tokenizer, path, generate=N).to_dict()
    assert alone["generation"] is None  # no context, nothing to match


def test_cli_analyze_generate(tiny_llama_dir):
    result = run("analyze", "-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY, "--generate", 3,
                 "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["precision"] == "stable"
    gen = doc["generation"]
    assert set(gen) == {"mode", "tokens", "agreement", "first_mismatch"}
    assert gen["mode"] == "recompute" and len(gen["tokens"]) == 3
    assert gen["agreement"] == 1.0 and gen["first_mismatch"] is None
    assert set(gen["tokens"][0]) == {"id", "token", "patched_id", "patched_token", "kl"}
    naive = run("analyze", "-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY, "--precision", "naive",
                "--json", "-")  # fmt: skip
    assert naive.exit_code == 0, naive.output
    assert json.loads(naive.stdout)["precision"] == "naive" and json.loads(naive.stdout)["generation"] is None


def render(printer, doc: dict, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    printer(console, doc)
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 160])
def test_the_report_fits_and_names_the_first_mismatch(tmp_path, tokenizer, width):
    model = tiny_model("llama")
    analysis = analyze(model, tokenizer, CONTEXT, QUERY, generate=N).to_dict()
    lines = render(print_with_positions, analysis, width)
    first = next(i for i, line in enumerate(lines) if line.startswith("position-wise match (recomputed per token): "))
    assert lines[first].endswith(f"{N} of {N} tokens (100%)") and lines[first + 1].startswith("teacher-forced: ")
    assert lines[first + 2].startswith("with context ")
    path = tmp_path / "p.safetensors"
    export_patch(model, tokenizer, CONTEXT, QUERY, output=path)
    fixed = replay_patch(model, tokenizer, path, context=CONTEXT, generate=N).to_dict()
    fixed["generation"]["tokens"][1]["patched_token"] = "a long token " * 4  # the line must wrap, not overflow
    lines = render(print_replay, fixed, width)
    start = next(i for i, line in enumerate(lines) if line.startswith("position-wise match (patch held fixed): "))
    assert any(line.startswith("first mismatch at token 1: context ") for line in lines[start:])
    assert all(len(line.rstrip()) <= width for line in lines[start:])


def test_cli_replay_recompute_with_given_and_stored_context(tiny_llama_dir, tmp_path):
    stored, plain = tmp_path / "stored.safetensors", tmp_path / "plain.safetensors"
    common = ["-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY]
    assert run("export-patch", *common, "-o", stored, "--store-context").exit_code == 0
    assert run("export-patch", *common, "-o", plain).exit_code == 0
    docs = []
    for args in ([stored], [plain, "--context", CONTEXT]):
        result = run("replay", *args, "--generate", 3, "--recompute", "--json", "-")
        assert result.exit_code == 0, result.output
        docs.append(json.loads(result.stdout))
    for doc in docs:
        assert doc["generation"]["mode"] == "recompute"
        assert doc["generation"]["agreement"] == 1.0 and doc["generation"]["first_mismatch"] is None
        assert doc["context_matches_patch"] is True
    assert docs[0]["generation"] == docs[1]["generation"]
    fixed = json.loads(run("replay", plain, "--context", CONTEXT, "--generate", 3, "--json", "-").stdout)
    assert fixed["generation"]["mode"] == "fixed"
    tokens = fixed["generation"]["tokens"]
    assert len(tokens) == 3 and tokens[0]["id"] == tokens[0]["patched_id"]  # exact at the query's last token
    assert fixed["generation"]["agreement"] == sum(t["id"] == t["patched_id"] for t in tokens) / 3


def test_cli_bad_generation_input(tiny_llama_dir, tmp_path):
    prompt = ["-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY]
    assert_error(run("analyze", *prompt, "--generate", -1), 2, "--generate")
    assert_error(run("analyze", *prompt, "--precision", "fast"), 2,
                 "Invalid value for '--precision': 'fast' is not one of 'stable', 'naive'")  # fmt: skip
    assert_error(run("analyze", *prompt, "--positions", "all", "--generate", 2), 2, "--generate", "--positions all")
    patch = tmp_path / "p.safetensors"
    assert run("export-patch", *prompt, "-o", patch).exit_code == 0
    assert_error(run("replay", patch, "--generate", 2, "--recompute"), 2, "--recompute needs the context")
    assert_error(run("replay", patch, "--context", CONTEXT, "--recompute"), 2, "pass --generate N")
    assert_error(run("replay", patch, "--generate", -1), 2, "--generate")


def test_analyze_generate_runs_the_full_prompt_once(tokenizer):
    # analyze's own with-context pass is the first step's KV-cached pass: the full prompt runs once in all
    model = tiny_model("llama")
    prompt = tokenize(tokenizer, CONTEXT, QUERY)
    lengths = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
    try:
        gen = analyze(model, tokenizer, CONTEXT, QUERY, generate=N).to_dict()["generation"]
    finally:
        handle.remove()
    assert len(gen["tokens"]) == N and gen["agreement"] == 1.0
    assert lengths.count(len(prompt.full)) == 1 and lengths.count(1) == N - 1
