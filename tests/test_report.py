"""The terminal report: at 80 and 160 columns no line is too long, no number is cut, and every part is shown."""

import io
import math
import random
import re

import pytest
import torch
from rich.console import Console
from tiny import char_tokenizer, tiny_model, tokenizer_for

from icl_probe import analyze, replay_patch
from icl_probe.cli.report.analysis import print_analysis
from icl_probe.cli.report.dynamics import print_dynamics
from icl_probe.cli.report.export import print_export
from icl_probe.cli.report.format import fmt, shorten, sparkline, wrap_phrases
from icl_probe.cli.report.replay import print_replay

WIDTHS = [80, 160]
MODULES = ("gate_proj", "up_proj")


def render(printer, doc, width, **kwargs) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    printer(console, doc, **kwargs)
    return console.export_text()


def check_lines(text: str, width: int) -> None:
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= width
    assert not any("…" in line for line in lines if not re.match(r"(context|query)\b", line))


@pytest.fixture(scope="module")
def tiny_doc():
    torch.manual_seed(0)
    model = tiny_model("llama", torch.float32)
    return analyze(model, char_tokenizer(), "ab\ncd\n", "ef", per_layer_ablation=True, gradient=True).to_dict()


def synthetic_analysis(num_layers: int = 30) -> dict:
    """An analysis/2 document shaped like SmolLM2-135M's, with magnitudes from 1e-9 to 1e4."""
    rng = random.Random(0)

    def module():
        return {"delta_w_norm": rng.uniform(0.1, 3), "weight_norm": rng.uniform(20, 60),
                "relative_norm": rng.uniform(1e-3, 3e-2), "rank": 1,
                "gradient_alignment": rng.uniform(-0.05, 0.05)}  # fmt: skip

    layers = [
        {"layer": i, "z0_norm": rng.uniform(5, 40), "dz_norm": rng.uniform(0.2, 30), "z_cosine": rng.uniform(0.6, 1),
         "attention_delta_norm": rng.uniform(1, 2e4), "mlp_branch_delta_norm": rng.uniform(1, 1e3),
         "mlp_branch_error": rng.uniform(1e-7, 2e-6), "residual_delta_norm": rng.uniform(1, 1.5e4),
         "block_error": rng.choice([0.0, 3.1e-9]), "fold_min_abs_normalised": None,
         "modules": {f"model.layers.{i}.mlp.{name}": module() for name in MODULES}}
        for i in range(num_layers)
    ]  # fmt: skip
    top = [{"token": t, "id": k, "prob": p} for k, (t, p) in enumerate([(" sad", 0.327), (" angry", 0.123),
           (" unhappy", 0.117), (" happy", 0.0708), (" upset", 0.0546)])]  # fmt: skip
    score = lambda kl, top1: {"kl": kl, "top1_match": top1}  # noqa: E731
    return {
        "schema": "icl-probe.analysis/2", "icl_probe_version": "0.1.0", "model": "smollm2-135m",
        "model_type": "llama", "num_layers": num_layers, "dtype": "float32", "residual": "bias",
        "context": "hot -> cold\nbig -> small\nfast -> slow\nup -> down\n" * 20, "query": "happy ->" * 30,
        "prefix_tokens": [1], "context_tokens": list(range(320)), "query_tokens": list(range(60)),
        "layers": layers,
        "logits": {"kl_patched": 5.9e-7, "kl_no_context": 8.63, "top1_match": True, "max_logit_error": 1.2e-3,
                   "top_k": {"context": top, "no_context": top[::-1], "patched": top}},
        "ablation": {"delta_w_only": score(8.06, False), "bias_only": score(1.02, False), "both": score(5.9e-7, True)},
        "layer_ablation": [{"layer": i, "without": score(rng.uniform(1e-3, 1.3), True),
                            "alone": score(rng.uniform(5, 9.2), False)} for i in range(num_layers)],
        "target": {"token": " sad", "id": 8177},
    }  # fmt: skip


def layer_numbers(doc: dict) -> list[str]:
    """The figures every layout must show whole: each layer's relative norms, mlp err and ‖Δb‖."""
    out = []
    for layer in doc["layers"]:
        out += [fmt(layer["mlp_branch_error"]), fmt(layer["residual_delta_norm"])]
        out += [fmt(m["relative_norm"]) for m in layer["modules"].values()]
    return out


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("which", ["tiny", "synthetic"])
def test_analysis_fits_and_shows_every_number(tiny_doc, width, which):
    doc = tiny_doc if which == "tiny" else synthetic_analysis()
    text = render(print_analysis, doc, width)
    check_lines(text, width)
    for number in layer_numbers(doc):
        assert re.search(rf"(?<![\w.+-]){re.escape(number)}(?![\w.])", text), number
    for row in doc["layer_ablation"]:
        assert fmt(row["without"]["kl"]) in text and fmt(row["alone"]["kl"]) in text
    for part in doc["ablation"].values():
        assert fmt(part["kl"]) in text


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("which", ["tiny", "synthetic"])
def test_analysis_shows_header_legend_scores_and_the_honest_line(tiny_doc, width, which):
    doc = tiny_doc if which == "tiny" else synthetic_analysis()
    text = render(print_analysis, doc, width)
    flat = " ".join(text.split())
    assert f"{len(doc['context_tokens'])} tokens" in text
    assert f"({len(doc['query_tokens'])} tokens{', +1 prefix token' if doc['prefix_tokens'] else ''})" in text
    for phrase in ("‖ΔW‖/‖W‖: relative size", "mlp err: ‖MLP(z0; W+ΔW) − MLP(zC; W)‖", "see docs/theory.md",
                   "Δb closes the gap at every block by construction, so KL≈0 proves the plumbing; mlp err tests "
                   "the theorem (ΔW alone carries what the ablation shows).",
                   "KL(context ‖ patched)", "KL(context ‖ query alone)", "top-1 kept", "max |Δlogit|",
                   "with context", "query alone, patched", "ΔW only", "Δb only", "per-layer ablation",
                   f"target token {doc['target']['token']!r}"):  # fmt: skip
        assert phrase in flat, phrase
    for entry in doc["logits"]["top_k"]["context"]:
        assert repr(entry["token"]) in text


def test_header_shows_short_texts_whole_and_long_ones_shortened_to_fit(tiny_doc):
    text = render(print_analysis, tiny_doc, 80)
    assert repr(tiny_doc["context"]) in text and repr(tiny_doc["query"]) in text
    long = render(print_analysis, synthetic_analysis(), 80)
    context_line = next(line for line in long.splitlines() if line.startswith("context"))
    assert "…" in context_line and context_line.startswith("context 'hot -> cold\\nbig")
    assert context_line.rstrip().endswith("(320 tokens)")


def test_text_not_stored(tiny_doc):
    text = render(print_analysis, {**tiny_doc, "context": None, "query": None}, 80)
    assert text.count("(text not stored)") == 2


def without_gradient(doc: dict) -> dict:
    layers = [{**layer, "modules": {p: {**m, "gradient_alignment": None} for p, m in layer["modules"].items()}}
              for layer in doc["layers"]]  # fmt: skip
    return {**doc, "layers": layers, "target": None}


def test_narrow_table_has_a_column_per_module_and_a_bar():
    text = render(print_analysis, without_gradient(synthetic_analysis()), 80)
    assert all(name in text for name in MODULES) and "█" in text
    table = text.split("‖ΔW‖/‖W‖: relative")[0]
    assert "‖zC−z0‖" not in table and "∇cos" not in table  # the narrow table leaves out the wide figures


def test_narrow_table_shows_each_modules_gradient_alignment():
    doc = synthetic_analysis()
    text = render(print_analysis, doc, 80)
    check_lines(text, 80)
    table, legend = text.split("‖ΔW‖/‖W‖: relative")
    assert table.count("∇cos") == len(MODULES) and "wide view" not in text
    for layer, line in zip(doc["layers"], table.splitlines()[-len(doc["layers"]) - 1 :]):
        cells = line.replace("│", " ").split()
        expected = [fmt(layer["modules"][f"model.layers.{layer['layer']}.mlp.{m}"]["gradient_alignment"])
                    for m in MODULES]  # fmt: skip
        assert cells[0] == str(layer["layer"]) and cells[-len(MODULES) :] == expected, line
    assert "∇cos: cos_F(ΔW, −∇W loss of the target)" in " ".join(legend.split())


def test_narrow_table_falls_back_to_the_largest_module_when_columns_cannot_fit():
    doc = synthetic_analysis(4)
    for layer in doc["layers"]:
        layer["modules"] = {f"model.layers.{layer['layer']}.mlp.a_rather_long_projection_{k}": {
            "delta_w_norm": 1.0, "weight_norm": 30.0, "relative_norm": 0.01 * (k + 1), "rank": 1,
            "gradient_alignment": None} for k in range(4)}  # fmt: skip
    text = render(print_analysis, doc, 80)
    check_lines(text, 80)
    assert "max" in text and "0.04" in text and "0.01" not in text


def test_narrow_table_falls_back_to_the_mean_alignment_when_columns_cannot_fit():
    doc = synthetic_analysis(4)
    for layer in doc["layers"]:
        layer["modules"] = {f"model.layers.{layer['layer']}.mlp.a_rather_long_projection_{k}": {
            "delta_w_norm": 1.0, "weight_norm": 30.0, "relative_norm": 0.01 * (k + 1), "rank": 1,
            "gradient_alignment": 0.01 * (k + 1) * (layer["layer"] + 1)} for k in range(4)}  # fmt: skip
    text = render(print_analysis, doc, 80)
    check_lines(text, 80)
    table, legend = text.split("‖ΔW‖/‖W‖: relative")
    assert "max" in table and "mean" in table and "projection" not in table
    assert "∇cos: cos_F(ΔW, −∇W loss of the target), mean over modules" in " ".join(legend.split())
    for layer in doc["layers"]:  # mean of 0.01..0.04 times (layer + 1)
        assert fmt(0.025 * (layer["layer"] + 1)) in text


@pytest.mark.parametrize("width", WIDTHS)
def test_wide_mode_shows_every_figure_in_labelled_columns(tiny_doc, width):
    for doc in (tiny_doc, synthetic_analysis()):
        text = render(print_analysis, doc, width, wide=True)
        check_lines(text, width)
        for head in ("‖z0‖", "‖zC−z0‖", "cos", "‖ΔA‖", "‖Δmlp‖", "mlp err", "‖Δb‖", "block"):
            assert head in text
        assert text.count("∇cos") >= 2 and text.count("‖ΔW‖/‖W‖") >= 3
        for layer in doc["layers"]:
            for key in ("z0_norm", "dz_norm", "attention_delta_norm", "mlp_branch_delta_norm"):
                assert fmt(layer[key]) in text
            for m in layer["modules"].values():
                assert fmt(m["gradient_alignment"]) in text


def test_wide_is_automatic_from_140_columns(tiny_doc):
    assert "‖zC−z0‖" in render(print_analysis, tiny_doc, 140)
    assert "‖zC−z0‖" not in render(print_analysis, tiny_doc, 139)
    assert "‖zC−z0‖" not in render(print_analysis, tiny_doc, 160, wide=False)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_fold_shows_the_folded_modules_and_the_norm_scale(model_type):
    torch.manual_seed(0)
    model, tok = tiny_model(model_type, torch.float32), tokenizer_for(model_type)
    doc = analyze(model, tok, "ab\ncd\n", "ef", residual="fold").to_dict()
    for width, wide in [(80, False), (80, True), (160, True)]:
        text = render(print_analysis, doc, width, wide=wide)
        check_lines(text, width)
        assert "folded into weights" in text and "∇cos" not in text
        assert ("down_proj" in text) is (model_type == "llama")
        assert all(number in text for number in layer_numbers(doc))
    assert ("min|n|" in text) is (model_type == "gemma3_text")


def test_analysis_without_gradient_target_or_layer_ablation(tiny_doc):
    doc = {**tiny_doc, "target": None, "layer_ablation": None}
    doc["layers"] = [{**layer, "modules": {p: {**m, "gradient_alignment": None} for p, m in layer["modules"].items()}}
                     for layer in tiny_doc["layers"]]  # fmt: skip
    for width in WIDTHS:
        text = render(print_analysis, doc, width)
        check_lines(text, width)
        assert "per-layer ablation" not in text and "target token" not in text
    assert "∇cos\n" not in render(print_analysis, doc, 160)


# --- dynamics -----------------------------------------------------------------------------------------------------


def synthetic_dynamics(num_layers: int = 30, examples: int = 6, finetune: bool = True) -> dict:
    """A dynamics/1 document shaped like SmolLM2-135M's on the antonym task."""
    rng = random.Random(1)
    paths = lambda i: [f"model.layers.{i}.mlp.{name}" for name in MODULES]  # noqa: E731

    def layer(i, k):
        modules = {p: {"delta_w_norm": rng.uniform(0.1, 3) * math.sqrt(k), "step_norm": rng.uniform(0.05, 2) / k,
                       "step_cosine": None if k == 1 else rng.uniform(-1, 1),
                       "prop31_error": rng.uniform(1e-8, 1e-6)} for p in paths(i)}  # fmt: skip
        return {"layer": i, "learning_rate": rng.uniform(1e-4, 1e-2), "modules": modules}

    prefixes = [{"examples": k, "context_tokens": 8 * k, "kl_patched": None if k == 0 else rng.uniform(0, 1e-6),
                 "top1": [" the", " cold", " sad", " sad", " sad", " sad", " sad"][k], "target_prob": 0.05 * (k + 1),
                 "layers": [layer(i, k) for i in range(num_layers)] if k else []}
                for k in range(examples + 1)]  # fmt: skip
    steps = [{"step": s, "train_loss": 3.0 / (s + 1), "query_loss": 4.0 / (s + 1),
              "alignment": {str(i): rng.uniform(-0.1, 0.3) for i in range(num_layers)}} for s in range(5)]  # fmt: skip
    return {
        "schema": "icl-probe.dynamics/1", "model": "smollm2-135m", "model_type": "llama", "dtype": "float32",
        "query": "happy ->", "examples": [f"w{k} -> v{k}" for k in range(examples)],
        "target": {"token": " sad", "id": 8177}, "prefixes": prefixes,
        "gradient_alignment": [{"layer": i, "modules": {p: rng.uniform(-0.05, 0.05) for p in paths(i)}}
                               for i in range(num_layers)],
        "finetune": {"steps": steps, "implicit_query_loss": 1.07} if finetune else None,
        "ablation": {"delta_w_only": {"kl": 8.06, "top1_match": False}, "bias_only": {"kl": 1.02, "top1_match": False},
                     "both": {"kl": 3.2e-7, "top1_match": True}},
    }  # fmt: skip


@pytest.mark.parametrize("width", WIDTHS)
def test_dynamics_fits_and_shows_prefixes_layers_finetuning_and_ablation(width):
    doc = synthetic_dynamics()
    text = render(print_dynamics, doc, width)
    check_lines(text, width)
    flat = " ".join(text.split())
    assert "'happy ->'" in text and "6 examples" in text and "' sad'" in text
    for p in doc["prefixes"]:
        assert repr(p["top1"]) in text and fmt(p["target_prob"]) in text
        if p["kl_patched"] is not None:
            assert fmt(p["kl_patched"]) in text
    last = doc["prefixes"][-1]["layers"]
    for rec in last:
        assert fmt(max(m["prop31_error"] for m in rec["modules"].values())) in text
    lines = [line for line in text.splitlines() if re.match(r"\d+ +[▁▂▃▄▅▆▇█]{6} ", line)]
    assert len(lines) == 30  # one sparkline of 6 steps per layer
    for s in doc["finetune"]["steps"]:
        assert fmt(s["query_loss"]) in text
    assert "1.07" in text and "ΔW only" in text and "8.06" in text
    assert "Δb closes the gap at every block by construction, so KL≈0 proves the plumbing;" in flat


def test_dynamics_header_counts_the_query_tokens_when_given():
    doc = {**synthetic_dynamics(2, 2), "query_tokens": [5, 6, 7], "prefix_tokens": [1]}
    assert "query 'happy ->'  (3 tokens, +1 prefix token)" in render(print_dynamics, doc, 80)


def test_dynamics_without_finetune_gradient_or_ablation():
    doc = {**synthetic_dynamics(4, 3, finetune=False), "gradient_alignment": None, "ablation": None,
           "query": None, "examples": None}  # fmt: skip
    text = render(print_dynamics, doc, 80)
    check_lines(text, 80)
    assert "fine-tuning" not in text and "∇cos" not in text and "3 examples" in text
    assert "(text not stored)" in text


# --- replay and export --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_doc(tiny_doc):
    torch.manual_seed(0)
    model, tok = tiny_model("llama", torch.float32), char_tokenizer()
    patch = analyze(model, tok, "ab\ncd\n", "ef").patch
    return replay_patch(model, tok, patch, query="ef", context="ab\ncd\n", generate=4).to_dict()


@pytest.mark.parametrize("width", WIDTHS)
def test_replay_shows_the_query_and_warns_on_another_context(replay_doc, width):
    text = render(print_replay, replay_doc, width)
    check_lines(text, width)
    assert "query 'ef'" in text and "greedy continuations" in text and "sha256" not in text
    warned = render(print_replay, {**replay_doc, "context_matches_patch": False}, width)
    flat = " ".join(warned.split())
    assert "the --context given is not the one this patch was made from (its sha256 differs)" in flat
    stored = render(print_replay, {**replay_doc, "query": None}, width)
    assert "the patch's stored query" in stored


def test_export_fits_80_columns():
    doc = {"format": "native", "output": "/tmp/p.safetensors", "file_bytes": 123456, "layers": list(range(30)),
           "modules": 60, "residual": "bias", "dense_bytes": 10**8, "patch_bytes": 10**6, "kl_patched": 1e-8,
           "kl_stored": 2e-8, "kl_no_context": 8.6, "top1_match": True}  # fmt: skip
    text = render(print_export, doc, 80)
    check_lines(text, 80)
    assert "0–29" in text and "100× smaller" in text


# --- helpers ------------------------------------------------------------------------------------------------------


def test_fmt_gives_three_significant_digits_and_small_numbers_in_e_notation():
    assert [fmt(x) for x in (0.027632, 57.47, 5.814e-7, 0.0, None, -3.6e-4, 1634.2, 999.7, -11834, 2.5e7)] == [
        "0.0276", "57.5", "5.8e-07", "0", "—", "-3.6e-04", "1630", "1000", "-11800", "2.5e+07"]  # fmt: skip


def test_shorten_wrap_and_sparkline():
    assert shorten("abcdefghijklmnopqrstuvwxyz", 11) == "abcde…vwxyz"
    assert shorten("short", 11) == "short"
    assert wrap_phrases(["aaa", "bbb", "ccc"], 9) == ["aaa · bbb", "ccc"]
    assert sparkline([1, 2, 4, 8]) == "▁▂▄█"


@pytest.mark.parametrize("width", WIDTHS)
def test_mixture_of_experts_shows_router_and_expert_updates_and_the_routing(width):
    from icl_probe import coverage

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as the coverage table builds tiny MoE models
    try:
        doc = analyze(coverage.tiny_model("mixtral"), coverage.char_tokenizer(), "ab -> ba\ncd -> dc\n", "pq ->")
        doc = doc.to_dict()
    finally:
        torch.set_default_dtype(before)
    text = render(print_analysis, doc, width)
    check_lines(text, width)
    assert "gate_up_proj" in text and "routing at the last token" in text
    lines = [line.strip() for line in text.splitlines()]
    routing_lines = lines[lines.index("routing at the last token") :]
    for layer in doc["layers"]:  # each layer's with-context and no-context experts, as the JSON has them
        routing = layer["moe"]["routing"]
        row = next(line for line in routing_lines if re.match(rf"\W*{layer['layer']}\W", line))
        for side in ("context", "no_context"):
            assert all(f"{e} " in row for e in routing[side]["experts"])
    changed = sum(layer["moe"]["routing"]["routing_changed"] for layer in doc["layers"])
    assert f"changed the chosen experts in {changed} of {len(doc['layers'])} MoE layers" in " ".join(text.split())


def test_a_hybrid_model_says_which_layers_have_which_mixer(tiny_doc):
    doc = {**tiny_doc, "layers": [{**layer, "mixer": ("mamba", "attention")[i % 2]} for i, layer in
                                   enumerate(tiny_doc["layers"])]}  # fmt: skip
    text = " ".join(render(print_analysis, doc, 80).split())
    assert "mixers: mamba 0, attention 1" in text
    assert "mixers:" not in render(print_analysis, tiny_doc, 80)  # one kind of mixer: nothing to say
