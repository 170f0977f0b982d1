"""Families read by the structural rule, and five table rows, on tiny random float64 models: they give an exact
`analyze`, the theorem's MLP-branch identity, and module maps written out by hand from transformers' modeling
files; layouts the rule cannot see are refused in one line naming what was found. The mixture-of-experts
families are in tests/test_moe.py; here, the hybrids' MoE layers and the coverage sample.
"""

import contextlib
import functools
import json
import re

import pytest
import torch
from helpers import forward_hooks, hidden, last_outputs
from tiny import char_tokenizer, tiny_model, tokenizer_for
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from icl_probe import analyze, coverage, decoder, export_patch, load_patch, replay_patch
from icl_probe.errors import ModelError
from icl_probe.patching import applied

CONTEXT, QUERY = "ab -> ba\ncd -> dc\nxy -> yx\n", "pq ->"

GATE_UP = ["mlp.gate_proj", "mlp.up_proj"]
LLAMA = ("attention", "self_attn", GATE_UP, "mlp.down_proj", "post_attention_layernorm", None)
POST_NORMS = ("attention", "post_attention_layernorm", GATE_UP, "mlp.down_proj", None, "post_feedforward_layernorm")
UP_DOWN = ("attention", "self_attn", ["mlp.up_proj"], "mlp.down_proj", "post_attention_layernorm", None)
GPT2_LINEAR = ("attention", "attn", ["mlp.c_fc"], "mlp.c_proj", "ln_2", None)

# Per layer of each tiny model, relative to its block: (mixer kind, mixer branch, MLP first linears, output
# projection, pre-MLP norm, post-MLP norm). One entry stands for both layers.
EXPECTED = {
    "nemotron": [UP_DOWN],
    "arcee": [UP_DOWN],
    "glm4": [("attention", "post_self_attn_layernorm", ["mlp.gate_up_proj"], "mlp.down_proj",
              "post_attention_layernorm", "post_mlp_layernorm")],
    "cohere2": [("attention", "self_attn", GATE_UP, "mlp.down_proj", "input_layernorm", None)],
    "exaone4": [POST_NORMS],
    "olmo3": [POST_NORMS],
    "seed_oss": [LLAMA],
    "apertus": [("attention", "self_attn", ["mlp.up_proj"], "mlp.down_proj", "feedforward_layernorm", None)],
    "gpt_bigcode": [GPT2_LINEAR],
    "gpt_neo": [GPT2_LINEAR],
    "persimmon": [("attention", "self_attn", ["mlp.dense_h_to_4h"], "mlp.dense_4h_to_h", "post_attention_layernorm",
                   None)],
    "lfm2": [("convolution", "conv", ["feed_forward.w1", "feed_forward.w3"], "feed_forward.w2", "ffn_norm", None),
             ("attention", "self_attn", ["feed_forward.w1", "feed_forward.w3"], "feed_forward.w2", "ffn_norm", None)],
    "qwen3_next": [("linear attention", "linear_attn", *LLAMA[2:]), LLAMA],
    "jamba": [("mamba", "mamba", ["feed_forward.gate_proj", "feed_forward.up_proj"], "feed_forward.down_proj",
               "pre_ff_layernorm", None),
              ("attention", "self_attn", ["feed_forward.gate_proj", "feed_forward.up_proj"], "feed_forward.down_proj",
               "pre_ff_layernorm", None)],
    # table rows
    "codegen": [("attention", "attn", ["mlp.fc_in"], "mlp.fc_out", "ln_1", None)],
    "mpt": [("attention", "attn", ["ffn.up_proj"], "ffn.down_proj", "norm_2", None)],
    "xglm": [("attention", "self_attn", ["fc1"], "fc2", "final_layer_norm", None)],
    "gemma4_text": [("attention", "post_attention_layernorm", GATE_UP, "mlp.down_proj", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm")],
    "falcon_h1": [("mamba+attention", "self_attn", ["feed_forward.gate_proj", "feed_forward.up_proj"],
                   "feed_forward.down_proj", "pre_ff_layernorm", None)],
}  # fmt: skip
BLOCKS = {"gpt_bigcode": "transformer.h", "gpt_neo": "transformer.h", "codegen": "transformer.h",
          "mpt": "transformer.blocks"}  # fmt: skip
TABLE = {"codegen": "gptj", "mpt": "mpt", "xglm": "xglm", "gemma4_text": "gemma4", "falcon_h1": "falcon_h1"}
PARALLEL = {"cohere2", "codegen"}  # the MLP reads the block input
BRANCH = {"mpt": "ffn.down_proj", "xglm": "fc2"}  # MPT's MLP module adds the residual; XGLM's linears sit in the block
NAMES = list(EXPECTED)


@contextlib.contextmanager
def default_dtype_for(name: str):
    """XGLM's attention floors its scores with torch.full in the default dtype, which overflows float32 when the
    model is float64, so its float64 runs need float64 as the default dtype."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if name == "xglm" else before)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@functools.cache
def model_of(name: str):
    return tiny_model(name, torch.float64)


@functools.cache
def analysis_of(name: str):
    with default_dtype_for(name):
        return analyze(model_of(name), tokenizer_for(name), CONTEXT, QUERY)


def expected_layer(name: str, i: int) -> tuple:
    rows = EXPECTED[name]
    return rows[i] if len(rows) > 1 else rows[0]


@pytest.mark.parametrize("name", NAMES)
def test_analyze_is_exact(name):
    doc = analysis_of(name).to_dict()
    assert doc["logits"]["kl_no_context"] > 1e-2  # the context matters, so exactness means something
    assert doc["logits"]["kl_patched"] < 1e-12
    assert doc["logits"]["top1_match"]
    assert max(layer["block_error"] for layer in doc["layers"]) < 1e-9
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-9  # ΔW z0 reproduces the MLP branch


@pytest.mark.parametrize("name", NAMES)
def test_module_map(name):
    doc = decoder.describe(model_of(name))
    assert doc["family"] == TABLE.get(name, f"generic ({name})")
    assert doc["parallel"] == (name in PARALLEL)
    assert doc["fold"] == ("linear" if TABLE.get(name) in ("gptj", "mpt", "xglm") else None)
    assert len(doc["layers"]) == 2
    for i, layer in enumerate(doc["layers"]):
        block = f"{BLOCKS.get(name, 'model.layers')}.{i}"
        mixer, attn, first, down, pre, post = expected_layer(name, i)
        full = functools.partial(relative_to, block)
        assert (layer["block"], layer["mixer"], layer["attention"]) == (block, mixer, full(attn))
        assert layer["mlp_first"] == [full(f) for f in first] and layer["mlp_down"] == full(down)
        assert (layer["pre_mlp_norm"], layer["post_mlp_norm"]) == (full(pre), full(post))


def relative_to(block: str, rel: str | None) -> str | None:
    return None if rel is None else f"{block}.{rel}"


@pytest.mark.parametrize("name", NAMES)
def test_updates_are_rank_one_or_vanish_for_parallel_blocks(name):
    model, result = model_of(name), analysis_of(name)
    for path, delta in result.patch.low_rank.items():
        dense = delta.u @ delta.v.T  # (out, in)
        relative = float(dense.norm() / model.get_submodule(path).weight.detach().norm())
        # In a parallel block the block input, and so z, is already the with-context one. LFM2's layer 0 is a
        # short convolution: from the last token its kernel (3) does not reach the context, so z is unchanged.
        if name in PARALLEL or name == "lfm2" and path.startswith("model.layers.0."):
            assert relative < 1e-12, path
        else:
            assert int(torch.linalg.matrix_rank(dense, rtol=1e-10)) == 1 and relative > 1e-3, path


@pytest.mark.parametrize("name", NAMES)
def test_mlp_branch_matches_the_context_under_the_patch(name):
    # Theorem 2.2 checked from outside: the MLP branch at the last token, hooked by its hand-written path, is
    # the same with the context and in the patched query-only run, whatever the mixer.
    model, result = model_of(name), analysis_of(name)
    paths = []
    for i in range(2):
        _, _, first, _, _, post = expected_layer(name, i)
        rel = BRANCH.get(name) or post or first[0].split(".")[0]
        paths.append(f"{BLOCKS.get(name, 'model.layers')}.{i}.{rel}")
    with torch.no_grad(), default_dtype_for(name):
        ctx = last_outputs(model, paths, result.prompt.full)
        with applied(model, result.patch):
            patched = last_outputs(model, paths, result.prompt.query_only)
    for path in paths:
        assert float((ctx[path] - patched[path]).norm() / ctx[path].norm()) < 1e-9, path


@pytest.mark.parametrize("name", [n for n in NAMES if n not in BRANCH and expected_layer(n, 0)[5] is None])
def test_the_mlp_branch_change_is_the_mlp_with_and_without_its_update(name):
    # mlp_branch_delta_norm = ‖MLP_ΔW(z0) − MLP(z0)‖ at the last token, computed from outside: the patch applied as
    # weights records the MLP's input z0 and output on the query alone, then the MLP is called on z0 without it.
    model, result = model_of(name), analysis_of(name)
    doc = result.to_dict()
    mlps = [model.get_submodule(f"{BLOCKS.get(name, 'model.layers')}.{i}.{expected_layer(name, i)[2][0].split('.')[0]}")
            for i in range(2)]  # fmt: skip
    seen = {}

    def record(i):
        def hook(module, args, output):
            seen[i] = (args[0][:, -1:].clone(), hidden(output)[:, -1].clone())

        return hook

    with torch.no_grad(), default_dtype_for(name):
        with applied(model, result.patch), forward_hooks([(m, record(i)) for i, m in enumerate(mlps)]):
            last_outputs(model, [], result.prompt.query_only)
        for i, mlp in enumerate(mlps):
            z0, with_update = seen[i]
            change = float((with_update - hidden(mlp(z0))[:, -1]).norm())
            assert change == pytest.approx(doc["layers"][i]["mlp_branch_delta_norm"], rel=1e-9, abs=1e-12), i


@pytest.mark.parametrize("name", ["lfm2", "jamba", "qwen3_next", "falcon_h1"])
def test_hybrid_native_export_then_replay(tmp_path, name):
    model, tok = model_of(name), tokenizer_for(name)
    export_patch(model, tok, CONTEXT, QUERY, output=tmp_path / "patch.safetensors")
    doc = replay_patch(model, tok, load_patch(tmp_path / "patch.safetensors"), context=CONTEXT).to_dict()
    assert doc["kl_patched"] < 1e-10 and doc["top1_match"]  # float32 factors on a float64 model


@pytest.mark.parametrize("name", ["lfm2", "jamba", "qwen3_next", "falcon_h1"])
def test_the_mixer_change_is_the_whole_mixer_branch(name):
    # With the block input and the MLP exact at the last token, Δb is the change of the whole mixer branch: for
    # Falcon-H1 that is ssm_out_multiplier · Mamba-2 + attention_out_multiplier · attention, which no module outputs.
    model = model_of(name)
    doc = analyze(model, tokenizer_for(name), CONTEXT, QUERY).to_dict()
    kinds = [layer["mixer"] for layer in decoder.describe(model)["layers"]]
    for layer, kind in zip(doc["layers"], kinds):
        assert layer["mixer"] == kind
        assert layer["residual_delta_norm"] == pytest.approx(layer["attention_delta_norm"], rel=1e-9, abs=1e-12)
    if name == "falcon_h1":
        assert kinds == ["mamba+attention", "mamba+attention"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rule_reads_the_same_structure_in_lower_precision(dtype):
    for name in [n for n in NAMES if n not in TABLE]:
        assert decoder.describe(tiny_model(name, dtype))["layers"] == decoder.describe(model_of(name))["layers"], name


# ---- the rule against the table, and what it refuses ----------------------------------------------------


def renamed(name: str, dtype=torch.float64) -> nn.Module:
    """A fresh tiny model whose model_type the table does not know, so that the structural rule reads it."""
    model = tiny_model(name, dtype)
    model.config.model_type = f"{name.split('-')[0]}_unlisted"
    return model


SEEN_BY_RULE = ["llama", "gemma2", "gpt2", "gpt_neox", "gpt_neox-sequential", "gptj", "phi", "olmo2", "falcon",
                "falcon-sequential", "stablelm-parallel", "codegen"]  # fmt: skip


@pytest.mark.parametrize("name", SEEN_BY_RULE)
def test_rule_agrees_with_the_table_where_it_can_see(name):
    # Sandwich norms (Gemma 2), post-MLP norms (OLMo2), parallel blocks and GPT-2's Conv1D are read from the
    # structure alone to the same modules as the hand-written rows.
    keys = ("mixer", "attention", "pre_mlp_norm", "mlp_first", "mlp_down", "post_mlp_norm", "mlp_branch")
    by_table = decoder.describe(model_of(name) if name in EXPECTED else tiny_model(name))
    by_rule = decoder.describe(renamed(name))
    assert by_rule["family"].startswith("generic") and by_rule["parallel"] == by_table["parallel"]
    for a, b in zip(by_table["layers"], by_rule["layers"]):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    model = renamed(name)
    assert decoder.blocks(model)[0].family.conv1d == (name == "gpt2")
    doc = analyze(model, tokenizer_for(name), CONTEXT, QUERY).to_dict()  # and the rule's reading is exact
    assert doc["logits"]["kl_patched"] < 1e-12 and max(x["mlp_branch_error"] for x in doc["layers"]) < 1e-9


REFUSED = {
    "opt": r"block model\.decoder\.layers\.0 keeps linear layers \(fc1, fc2\) in the block itself",
    "mpt": r"block transformer\.blocks\.0 has an MLP 'ffn' that adds its input `residual` to its output",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_layouts_the_rule_cannot_see_are_refused_in_one_line(name):
    # Linears with no MLP module, an MLP that adds the residual itself: each has a table row, and without it the
    # rule says what it found.
    with pytest.raises(ModelError) as info:
        decoder.blocks(renamed(name))
    message = str(info.value)
    assert message.startswith(f"model type '{name}_unlisted' is not supported: ") and "\n" not in message
    assert "supported: " in message and "gpt2" in message  # the table's types, and the rule, are named
    assert re.search(REFUSED[name], message), message


@pytest.mark.parametrize("name", ["falcon_h1", "gemma4_text", "granite"])
def test_layouts_left_to_the_remainder_are_exact_without_their_row(name):
    # Two mixers summed (Falcon-H1), per-layer inputs after the MLP (Gemma 4), scaled residuals (Granite): the
    # rule updates the MLP and leaves the rest of the block to Δb, which is exact without the table's row.
    model = renamed(name)
    doc = analyze(model, tokenizer_for(name), CONTEXT, QUERY).to_dict()
    assert doc["logits"]["kl_no_context"] > 1e-3 and doc["logits"]["kl_patched"] < 1e-10
    assert max(layer["block_error"] for layer in doc["layers"]) < 1e-9
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-9
    assert decoder.blocks(model)[0].family.name == f"generic ({name}_unlisted)"


class TwoOutputs(nn.Module):
    """An MLP with two linear layers writing the hidden size: which is the output projection is ambiguous."""

    def __init__(self, d: int, i: int):
        super().__init__()
        self.up, self.down_a, self.down_b = nn.Linear(d, i), nn.Linear(i, d), nn.Linear(i, d)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.down_a(h) + self.down_b(h)


class Squashed(nn.Module):
    """An MLP that squashes its output projection's output: the branch is not that projection's."""

    def __init__(self, d: int, i: int):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, i), nn.Linear(i, d)

    def forward(self, x):
        return torch.tanh(self.down_proj(torch.relu(self.up_proj(x))))


class Skip(nn.Module):
    """An MLP whose input also reaches its output directly, outside its linear layers."""

    def __init__(self, d: int, i: int):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, i), nn.Linear(i, d)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x))) + 0.1 * x


@pytest.mark.parametrize(
    ("change", "found"),
    [
        (lambda m: setattr(m.model.layers[1], "mlp", TwoOutputs(32, 64).double()),
         r"block model\.layers\.1 has an MLP 'mlp' with 2 linear layers writing the hidden size \(down_a, down_b\)"),
        (lambda m: setattr(m.model.layers[0], "mlp", Skip(32, 64).double()),
         r"block model\.layers\.0 has an MLP 'mlp' whose input reaches its output other than through up_proj"),
        (lambda m: setattr(m.model.layers[0], "mlp", Squashed(32, 64).double()),
         r"block model\.layers\.0 has an MLP 'mlp' whose output is not its output projection 'down_proj' times a"),
        (lambda m: setattr(m.config, "num_hidden_layers", 3),
         r"found no ModuleList of num_hidden_layers=3 blocks"),
    ],
)  # fmt: skip
def test_ambiguous_structure_is_refused_in_one_line(change, found):
    model = tiny_model("helium")
    change(model)
    with pytest.raises(ModelError) as info:
        decoder.blocks(model)
    message = str(info.value)
    assert message.startswith("model type 'helium' is not supported: ") and "\n" not in message
    assert re.search(found, message), message


@pytest.mark.parametrize(
    ("name", "moe_layers"), [("jamba-moe", [1]), ("qwen3_next-moe", [0, 1])]
)  # fmt: skip
def test_mixture_of_experts_layers_are_read_and_exact(name, moe_layers):
    # tests/test_moe.py checks every MoE family; here, the hybrids of tests/tiny.py with their default
    # experts implementation (grouped_mm, switched to batched_mm for float64)
    model = tiny_model(name)
    doc = analyze(model, char_tokenizer(), CONTEXT, QUERY).to_dict()
    assert [layer["layer"] for layer in doc["layers"] if layer["moe"]] == moe_layers
    assert doc["logits"]["kl_patched"] < 1e-10
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-9
    assert model.config._experts_implementation == "batched_mm"


def test_a_module_list_that_does_not_run_is_not_the_decoder():
    # A multimodal model also holds its encoders' layers; the decoder blocks are the list that input ids run.
    model = tiny_model("helium")
    model.model.extra = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    assert [b.path for b in decoder.blocks(model)] == ["model.layers.0", "model.layers.1"]


def test_gemma4_with_its_expert_block_has_one_reader_per_input():
    # Its dense MLP, router and experts read three normalisations of the state: each maps its own input
    # (exactness is tested in tests/test_moe_readers.py).
    config = dict(vocab_size=103, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, global_head_dim=8, hidden_size_per_layer_input=8,
                  vocab_size_per_layer_input=103, enable_moe_block=True, num_experts=4, top_k_experts=2,
                  moe_intermediate_size=16)  # fmt: skip
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma4_text", **config))
    b = decoder.blocks(model)[0]
    assert [rel for rel, _ in b.readers] == ["mlp", "router.proj", "experts"]
    assert b.z_reader is model.model.layers[0].pre_feedforward_layernorm


def test_reading_is_cached_per_model():
    model = tiny_model("lfm2")
    first = decoder.blocks(model)
    calls = []
    with forward_hooks([(model.model.layers[0], lambda m, a, o: calls.append(1))]):
        again = decoder.blocks(model)
    assert not calls and [b.family for b in again] == [b.family for b in first]


# ---- the coverage table --------------------------------------------------------------------------------------

SAMPLE = {"llama": "exact", "lfm2": "exact", "nemotron": "exact", "mixtral": "exact", "mamba": "refused",
          "bart": "out of scope", "bert": "out of scope", "gemma4 (enable_moe_block)": "exact"}  # fmt: skip


def test_coverage_sample(tmp_path, capsys):
    coverage.main(["--types", ",".join(SAMPLE), "--json", str(tmp_path / "coverage.json")])
    rows = {r["model_type"]: r for r in json.loads((tmp_path / "coverage.json").read_text())["rows"]}
    assert {t: r["status"] for t, r in rows.items()} == SAMPLE
    for r in rows.values():
        if r["status"] == "exact":
            assert r["kl"] < 1e-10 and r["block_error"] < 1e-9 and r["mlp_branch_error"] < 1e-9
            assert r["kl_no_context"] > 1e-2
            # analyze_rows' rows against each prompt's own analyze
            assert r["batched_kl"] < 1e-9 and r["batched_top1"] is True and r["batched_reason"] is None
    assert {t for t, r in rows.items() if r["batched_shared"]} == {"llama", "lfm2", "nemotron"}  # MoE: one at a time
    assert rows["mixtral"]["moe_layers"] == 2 and rows["mixtral"]["routing_exact"] is True
    assert "has only 'mixer' (mamba), no MLP after a contextual layer" in rows["mamba"]["reason"]
    assert rows["lfm2"]["mixers"] == "attention, convolution"
    out, err = capsys.readouterr()
    assert err.startswith("[1/") and "ETA" in err and err.count("\n") == len(rows)  # a line per type
    assert out.startswith("4 of 5 families exact (transformers ") and "| lfm2 | exact | generic (lfm2) |" in out
    assert "; config variants: 1 of 1 exact;" in out  # a variant is its own row, counted apart
    batched = "; batched rows: 5 of 5 exact rows equal their own runs (KL < 1e-9, same top-1; 3 share passes, 2 run"
    assert batched + " one at a time)\n" in out and "| precision floor | batched rows |" in out
    variant = rows["gemma4 (enable_moe_block)"]  # the multimodal type, read by the gemma4_text row
    assert variant["family"] == "gemma4" and variant["moe_layers"] == 2 and variant["routing_exact"] is True
    assert "Out of scope (encoder-decoder or encoder-only): bart, bert." in out
    assert torch.get_default_dtype() == torch.float32  # measure restores it
