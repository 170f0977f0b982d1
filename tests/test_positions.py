"""--positions all: the update solved at every query position at once.

Tiny float64 models reproduce the with-context distribution after every query token (KL < 1e-10); layer 0's
update is checked against the dense formula ΔW = W (ZC − Z0) (Z0ᵀZ0)⁻¹ Z0ᵀ; repeated tokens give dependent
positions, which are reported rather than crashed on; export, replay and the CLI carry `solved_at`. The real
SmolLM2-135M and Gemma 3 270M are exact in float32 (KL < 1e-6 at every position).
"""

import json

import pytest
import torch
from helpers import run_parts, state
from tiny import char_tokenizer, tiny_model, tokenizer_for

from icl_probe import analyze, export_patch, load_patch, replay_patch
from icl_probe.capture import capture_positions, position_logits, select_blocks
from icl_probe.errors import ModelError, PatchError, UsageError
from icl_probe.inputs import tokenize
from icl_probe.lowrank import kl_divergence
from icl_probe.patching import applied
from icl_probe.positions import position_basis
from icl_probe.replay import patch_summary

CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"
EXACT = ["llama", "gpt2", "gemma3_text", "olmo2", "phi", "opt", "bloom", "granite"]
NORM_IN_FLOAT32 = ("gemma3_text", "olmo2")  # their RMSNorms compute in float32 even in a float64 model


@pytest.mark.parametrize("model_type", EXACT)
def test_float64_exact_at_every_position(model_type):
    model = tiny_model(model_type, torch.float64)
    before = state(model)
    result = analyze(model, tokenizer_for(model_type), CONTEXT, QUERY, positions="all")
    doc = result.to_dict()
    rows = doc["positions"]["per_position"]
    assert doc["solved_at"] == "all" and doc["residual"] == "fold" and len(rows) == len(QUERY)
    assert min(r["kl_no_context"] for r in rows) > 1e-3  # the context matters at every position
    assert max(r["kl"] for r in rows) < 1e-10 and all(r["top1_match"] for r in rows)
    assert doc["positions"]["worst_kl"] == max(r["kl"] for r in rows)
    block_limit = 1e-6 if model_type in NORM_IN_FLOAT32 else 1e-12
    assert max(layer["block_error_max"] for layer in doc["layers"]) < block_limit
    assert doc["positions"]["worst_block_error"]["value"] < block_limit
    assert all(layer["dependent_positions"] == [] for layer in doc["layers"])
    assert all(1 <= layer["z0_gram_condition"] < 1e6 for layer in doc["layers"])
    for key, value in model.state_dict().items():  # the model is left bit for bit as it was
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_update_has_rank_k_with_orthonormal_v(model_type):
    model = tiny_model(model_type, torch.float64)
    result = analyze(model, tokenizer_for(model_type), CONTEXT, QUERY, positions="all")
    k = len(QUERY)
    reported = {path: m["rank"] for layer in result.to_dict()["layers"] for path, m in layer["modules"].items()}
    assert set(reported) == set(result.patch.low_rank)  # first linears and output projections
    for path, delta in result.patch.low_rank.items():
        # rank k: the prefix is fitted with zero change; behind Gemma's post-MLP norm the output projection also
        # moves the prefix's norm input (the new scale must not change its output), so rank k + 1 there
        r = k + 1 if path.endswith("down_proj") and model_type == "gemma3_text" else k
        assert delta.u.shape[1] == delta.v.shape[1] == r, path
        torch.testing.assert_close(delta.v.T @ delta.v, torch.eye(r, dtype=torch.float64))
        assert int(torch.linalg.matrix_rank(delta.u @ delta.v.T, rtol=1e-10)) == r == reported[path], path


def test_first_layer_update_matches_the_dense_formula():
    """Layer 0 sees no patch below it: its ΔW is W (ZC − Z0) (Z0ᵀZ0)⁻¹ Z0ᵀ, from two hooked runs and a pinv."""
    model, tok = tiny_model("llama", torch.float64), char_tokenizer()
    result = analyze(model, tok, CONTEXT, QUERY, positions="all")
    prompt = result.prompt
    seen = {}
    gate = model.model.layers[0].mlp.gate_proj
    handle = gate.register_forward_hook(lambda m, args, out: seen.setdefault("z", []).append(args[0][0].clone()))
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt.full]))
        model(input_ids=torch.tensor([prompt.query_only]))
    handle.remove()
    k = len(prompt.query)
    z_ctx, z0 = seen["z"][0][-k:].T, seen["z"][1].T  # (in, k)
    want = gate.weight @ (z_ctx - z0) @ torch.linalg.pinv(z0)  # = W ΔZ (Z0ᵀZ0)⁻¹ Z0ᵀ for independent columns
    delta = result.patch.low_rank["model.layers.0.mlp.gate_proj"]
    torch.testing.assert_close(delta.u @ delta.v.T, want, rtol=1e-9, atol=1e-12)


def test_prefix_positions_keep_their_states():
    """Gemma's <bos> holds the same state with and without the context, and so with the patch."""
    model, tok = tiny_model("gemma3_text", torch.float64), tokenizer_for("gemma3_text")
    result = analyze(model, tok, CONTEXT, QUERY, positions="all")
    assert result.prompt.prefix == [1] and result.to_dict()["positions"]["prefix_positions"] == 1

    def hidden_states():
        with torch.no_grad():
            out = model(input_ids=torch.tensor([result.prompt.query_only]), output_hidden_states=True)
        return [h[0, 0] for h in out.hidden_states]

    plain = hidden_states()
    with applied(model, result.patch):
        patched = hidden_states()
    for a, b in zip(plain, patched):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # the norms compute in float32


def test_repeated_tokens_are_reported_as_dependent_positions():
    """'aaaa': at layer 0 the four inputs coincide (same value vector everywhere), so only the first is matched."""
    model, tok = tiny_model("llama", torch.float64), char_tokenizer()
    doc = analyze(model, tok, CONTEXT, "aaaa ->", positions="all").to_dict()
    layer0 = doc["layers"][0]["dependent_positions"]
    assert [p["position"] for p in layer0] == [1, 2, 3]
    assert all("model.layers.0.mlp.gate_proj" in p["modules"] for p in layer0)
    assert all(p["block_error"] > 1e-3 for p in layer0)  # how far off they are
    kl = {r["position"]: r["kl"] for r in doc["positions"]["per_position"]}
    assert kl[0] < 1e-10 and kl[6] < 1e-10  # positions the fit can separate stay exact
    assert min(kl[j] for j in (1, 2, 3)) > 1e-4


def test_position_basis_keeps_positions_in_order():
    z = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0]], dtype=torch.float64)
    basis = position_basis(z, 1e-10, "test")
    assert basis.kept == [0, 2]
    t = torch.tensor([[1.0], [5.0], [3.0], [4.0]], dtype=torch.float64)
    delta = basis.fit(t)
    torch.testing.assert_close((z @ delta.v) @ delta.u.T, torch.tensor([[1.0], [2.0], [3.0], [4.0]]).double())


def test_fold_is_implied_and_bias_refused():
    model, tok = tiny_model("llama", torch.float64), char_tokenizer()
    assert analyze(model, tok, CONTEXT, QUERY, positions="all", residual="fold").residual == "fold"
    with pytest.raises(UsageError, match='drop `residual="bias"`'):
        analyze(model, tok, CONTEXT, QUERY, positions="all", residual="bias")
    with pytest.raises(UsageError, match="use last or all"):
        analyze(model, tok, CONTEXT, QUERY, positions="first")


def test_family_without_a_fold_is_refused_in_one_line():
    model, tok = tiny_model("olmo", torch.float64), char_tokenizer()  # read by the structural rule: no fold
    with pytest.raises(ModelError, match='`positions="all"` needs the residual term folded') as e:
        analyze(model, tok, CONTEXT, QUERY, positions="all")
    assert "\n" not in str(e.value)


def test_generation_is_compared_with_the_last_token_patch():
    model, tok = tiny_model("llama", torch.float64), char_tokenizer()
    gen = analyze(model, tok, CONTEXT, QUERY, positions="all").to_dict()["positions"]["generation"]
    assert gen["tokens"] == len(gen["context"]["token_ids"]) == 10
    for which in ("all", "last"):
        ids = gen[which]["token_ids"]
        agree = next((i for i, (a, b) in enumerate(zip(ids, gen["context"]["token_ids"])) if a != b), len(ids))
        assert gen[which]["agree_tokens"] == agree
    assert gen["all"]["agree_tokens"] >= 1  # the first token is exact


# ---- export and replay ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_export_then_replay_is_exact_at_every_position(tmp_path, model_type):
    model, tok = tiny_model(model_type, torch.float64), tokenizer_for(model_type)
    path = tmp_path / "p.safetensors"
    exported = export_patch(model, tok, CONTEXT, QUERY, output=path, positions="all")
    assert exported.solved_at == "all" and exported.residual == "fold"
    assert max(exported.kl_stored_positions) < 1e-10  # float32 factors, a float64 model
    meta = load_patch(path).metadata
    assert meta["solved_at"] == "all" and meta["residual"] == "fold" and meta["positions"] == "last"
    doc = replay_patch(model, tok, path, context=CONTEXT).to_dict()
    assert doc["patch"]["solved_at"] == "all"
    assert len(doc["kl_positions"]) == len(QUERY) and max(doc["kl_positions"]) < 1e-10


def test_last_token_patches_say_so_and_older_ones_load_as_last(tmp_path):
    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "p.safetensors")
    assert load_patch(tmp_path / "p.safetensors").metadata["solved_at"] == "last"
    golden = load_patch("tests/data/golden/patch-v1.safetensors")  # written before solved_at existed
    assert "solved_at" not in golden.metadata and patch_summary(golden, False)["solved_at"] == "last"


def test_merged_export_and_peft_refusal(tmp_path):
    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    merged = export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "merged", format="merged", positions="all")
    assert max(merged.kl_stored_positions) < 1e-6
    with pytest.raises(PatchError, match="rank-1 adapters"):
        export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "peft", format="peft", positions="all")
    assert not (tmp_path / "peft").exists()


# ---- the command line -----------------------------------------------------------------------------------------


def test_cli_analyze_export_and_replay(tiny_llama_dir, tmp_path):
    code, out, err = run_parts(
        "analyze", "-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY, "--positions", "all"
    )
    assert code == 0, err
    assert "solved at all 5 query positions" in out and "prefix agreement (free-running greedy): first" in out
    code, out, err = run_parts("analyze", "-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY,
                               "--positions", "all", "--json", "-")  # fmt: skip
    doc = json.loads(out)
    assert code == 0 and doc["solved_at"] == "all" and doc["positions"]["worst_kl"] < 1e-6
    patch = tmp_path / "p.safetensors"
    code, out, err = run_parts("export-patch", "-m", tiny_llama_dir, "--context", CONTEXT, "--query", QUERY,
                               "-o", patch, "--positions", "all")  # fmt: skip
    assert code == 0, err
    code, out, err = run_parts("replay", patch, "--context", CONTEXT, "--json", "-")
    doc = json.loads(out)
    assert code == 0 and doc["patch"]["solved_at"] == "all" and max(doc["kl_positions"]) < 1e-6


def test_cli_errors_are_one_line(tiny_llama_dir):
    code, _, err = run_parts("analyze", "-m", tiny_llama_dir, "--positions", "every")
    assert code == 2 and err.strip().count("\n") == 0
    assert "Invalid value for '--positions': 'every' is not one of 'last', 'all'" in err
    code, _, err = run_parts("analyze", "-m", tiny_llama_dir, "--positions", "all", "--residual", "bias")
    assert code == 2 and "drop --residual bias" in err and err.strip().count("\n") == 0


# ---- the real models ------------------------------------------------------------------------------------------

# The antonym demo (`analyze --positions all`) is tests/test_doc_figures.py's: it runs the README's commands.
PROMPTS = {
    "capitals": ("France: Paris\nJapan: Tokyo\nItaly: Rome\nEgypt: Cairo\n", "Germany:"),
    "sentence": ("Q: What is the capital of France?\nA: Paris\n", "Q: What is the capital of Germany?\nA:"),
}


@pytest.mark.parametrize("model_name", ["smollm2-135m", "gemma3-270m"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_real_models_exact_at_every_position_in_float32(real_models, model_name, prompt):
    model, tok = real_models(model_name)
    doc = analyze(model, tok, *PROMPTS[prompt], positions="all").to_dict()
    rows = doc["positions"]["per_position"]
    assert max(r["kl"] for r in rows) < 1e-6 and all(r["top1_match"] for r in rows)
    assert all(layer["dependent_positions"] == [] for layer in doc["layers"])
    assert doc["positions"]["worst_block_error"]["value"] < 1e-5


def test_smollm2_patch_file_is_exact_at_every_position(real_models, tmp_path):
    model, tok = real_models("smollm2-135m")
    context, query = PROMPTS["sentence"]
    exported = export_patch(model, tok, context, query, output=tmp_path / "p.safetensors", positions="all")
    assert max(exported.kl_stored_positions) < 1e-6
    prompt = tokenize(tok, context, query)
    with torch.no_grad():
        chosen = select_blocks(model, "all")
        _, ctx = capture_positions(model, chosen, prompt)
        with applied(model, load_patch(tmp_path / "p.safetensors")):
            patched = position_logits(model, prompt.query_only, len(prompt.query))
    assert max(kl_divergence(c, p) for c, p in zip(ctx, patched)) < 1e-6
