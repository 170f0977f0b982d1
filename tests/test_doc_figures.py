"""The real-model figures of README.md and docs/theory.md, re-measured by running the commands printed beside them.

The commands are read from the docs' `<!-- reproduce: NAME -->` blocks (tests/doc_commands.py) and run through
the real CLI with the session's SmolLM2-135M and Gemma 3 270M; each distinct command runs once. Every figure
is checked to the last digit printed, or, where it is float32 rounding, against the bound the text states.
The dynamics table is tests/test_real_dynamics.py's; the export table's sizes are tests/test_export.py's.
"""

import re

import pytest
from doc_commands import MODELS, agrees, commands, markdown, number, table_after

from icl_probe.inputs import DEMO_CONTEXT, DEMO_QUERY

ANALYZE_ROWS = table_after("README.md", "`icl-probe analyze`, float32, CPU, all layers")
ANALYZE_COMMANDS = commands("README.md", "analyze-table")
ABLATION_ROWS = table_after("docs/theory.md", "Measured in float32 on the CPU:")
ABLATION_COMMANDS = commands("docs/theory.md", "ablation-table")


def model_of(args: list[str]) -> str:
    return args[args.index("--model") + 1] if "--model" in args else "smollm2-135m"


def close(got: float, printed: str) -> bool:
    """`got` agrees with the figure as printed ("1.02, top-1 lost" is read as 1.02; see doc_commands.agrees)."""
    return agrees(got, re.search(r"[−-]?\d+(?:\.\d+)?(?:e[−-]?\d+)?", printed).group(0))


def test_each_table_row_has_its_command():
    assert len(ANALYZE_ROWS) == len(ANALYZE_COMMANDS) == 6
    assert [MODELS[row[0]] for row in ANALYZE_ROWS] == [model_of(args) for args in ANALYZE_COMMANDS]
    assert len(ABLATION_ROWS) == len(ABLATION_COMMANDS) == 3
    assert [MODELS[row[0].split(",")[0]] for row in ABLATION_ROWS] == [model_of(a) for a in ABLATION_COMMANDS]


@pytest.mark.parametrize(("row", "args"), list(zip(ANALYZE_ROWS, ANALYZE_COMMANDS)), ids=lambda r: r[0][:3])
def test_readme_analyze_table(runner, row, args):
    """README, "Measured": KL patched (0), KL of the query alone, the top-1 kept, the ΔW-only KL."""
    _, prompt, kl_patched, kl_alone, top1, delta_w_only = row
    doc = runner.json(args)
    query = re.search(r"`([^`]*)`", prompt)
    assert query is None or doc["query"] == query.group(1)
    assert doc["logits"]["kl_patched"] == number(kl_patched) == 0  # the plumbing, bit for bit
    assert close(doc["logits"]["kl_no_context"], kl_alone)
    assert doc["logits"]["top1_match"] and "kept" in top1
    assert doc["logits"]["top_k"]["patched"][0]["token"] == re.search(r"`([^`]*)`", top1).group(1)
    assert close(doc["ablation"]["delta_w_only"]["kl"], delta_w_only)
    # "below 1e-5 (relative) at every layer of these six prompts (tested)": the theorem, to float32 rounding
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-5


@pytest.mark.parametrize("args", commands("README.md", "positions"), ids=model_of)
def test_readme_positions_all(runner, args):
    """README, "Whole-query patches": the worst KL over the query's positions is below 1e-6 in float32."""
    doc = runner.json(args)
    positions = doc["positions"]
    assert max(row["kl"] for row in positions["per_position"]) < 1e-6
    assert all(row["top1_match"] for row in positions["per_position"])
    assert all(layer["dependent_positions"] == [] for layer in doc["layers"])
    assert positions["worst_block_error"]["value"] < 1e-5


@pytest.mark.parametrize(("row", "args"), list(zip(ABLATION_ROWS, ABLATION_COMMANDS)), ids=lambda r: r[0][:9])
def test_theory_ablation_table(runner, row, args):
    """docs/theory.md, "What carries the context": each part's KL and whether it keeps the top-1."""
    _, no_context, delta_w_only, bias_only, both = row
    doc = runner.json(args)
    assert close(doc["logits"]["kl_no_context"], no_context)
    for part, printed in (("delta_w_only", delta_w_only), ("bias_only", bias_only)):
        assert close(doc["ablation"][part]["kl"], printed), part
        assert doc["ablation"][part]["top1_match"] == printed.endswith("kept"), part
    assert both == "0, kept" and doc["ablation"]["both"]["kl"] == 0.0 and doc["ablation"]["both"]["top1_match"]
    assert max(layer["mlp_branch_error"] for layer in doc["layers"]) < 1e-5  # "below 1e-5 (tested)"


def prose(doc: str) -> str:
    """The doc's text with every run of white space made one space, so that a phrase is found across line breaks."""
    return " ".join(markdown(doc).split())


def test_theory_positions_figures(runner):
    """docs/theory.md, "The whole query": cond(Z0ᵀZ0) over the layers, and how many generated tokens agree."""
    smol, gemma = (runner.json(args) for args in commands("docs/theory.md", "positions"))
    for doc in (smol, gemma):
        assert doc["positions"]["worst_kl"] < 1e-6
    (s_lo, s_hi), (g_lo, g_hi) = (conditions(doc) for doc in (smol, gemma))
    text = prose("docs/theory.md")
    assert f"between {s_lo:.1f} and {s_hi:.1f} (SmolLM2) and {g_lo:.1f} and {g_hi:.0f} (Gemma 3)" in text
    agree = [doc["positions"]["generation"][mode]["agree_tokens"] for mode in ("all", "last") for doc in (smol, gemma)]
    assert agree[0] == agree[1] == 1 and "for 1 token on both models" in text
    assert f"(under the last-token patch, {agree[2]} and {agree[3]})" in text


def conditions(doc: dict) -> tuple[float, float]:
    values = [layer["z0_gram_condition"] for layer in doc["layers"]]
    return min(values), max(values)


def test_theory_gradient_alignment(runner):
    """docs/theory.md, "Gradient alignment": the largest |cos| over SmolLM2's first linears, analyze and dynamics."""
    (analyze,) = commands("docs/theory.md", "gradient")
    (dynamics,) = commands("docs/theory.md", "dynamics-demo")
    cosines = [m["gradient_alignment"] for layer in runner.json(analyze)["layers"] for m in layer["modules"].values()]
    rows = runner.json(dynamics)["gradient_alignment"]
    largest = max(abs(v) for row in rows for v in row["modules"].values())
    text = prose("docs/theory.md")
    assert f"|cos| ≤ {max(map(abs, cosines)):.3f} on every first linear of SmolLM2" in text
    assert f"and ≤ {largest:.3f} for the `dynamics` demo" in text


def test_theory_dynamics_demo(runner):
    """docs/theory.md, Proposition 3.1 and the fine-tuning example: one run of the dynamics demo."""
    (args,) = commands("docs/theory.md", "dynamics-demo")
    doc = runner.json(args)
    assert max(p["kl_patched"] for p in doc["prefixes"][1:]) < 1e-9  # "below 1e-9"
    errors = [[max(m["prop31_error"] for m in layer["modules"].values()) for layer in p["layers"]]
              for p in doc["prefixes"][1:]]  # fmt: skip
    last = errors[-1]
    assert last[0] < 2e-5  # exact at the first layer, to float32 rounding
    text = prose("docs/theory.md")
    assert f"between {min(last[1:]):.2f} and {max(last[1:]):.1f} in layers 1–{len(last) - 1}" in text
    assert f"(layer 1: {last[1]:.2f}, layer {last.index(max(last[1:]))}: {max(last[1:]):.1f})" in text
    above = [e for row in errors for e in row[1:]]
    assert f"the range in layers 1–{len(last) - 1} is {min(above):.2f} to {max(above):.1f}" in text
    steps = doc["finetune"]["steps"]
    assert len(steps) == 10 and all(abs(v) < 0.05 for s in steps for v in s["alignment"].values())
    first, final = steps[0], steps[-1]
    assert f"falls from {first['train_loss']:.1f} before the first step to {final['train_loss']:.2f}" in text
    assert f"from {first['query_loss']:.1f} after the first step to {final['query_loss']:.2f}" in text
    assert f"(implicit update: {doc['finetune']['implicit_query_loss']:.2f})" in text


def test_prose_quotes_the_checked_tables():
    """The README's opening paragraph, docs/cli.md and docs/theory.md's prose repeat rows of the checked tables."""
    _, _, _, kl_alone, _, delta_w_only = ANALYZE_ROWS[0]
    assert ANALYZE_COMMANDS[0] == ["analyze", "--context", DEMO_CONTEXT, "--query", DEMO_QUERY]  # a bare analyze
    readme = f"the query alone is at KL = {kl_alone}, and ΔW alone, without Δb, is at KL = {delta_w_only}"
    assert readme in prose("README.md")
    cli = f"ΔW alone gives KL {delta_w_only} (top-1 lost), against {kl_alone} for the query alone"
    assert cli in prose("docs/cli.md")
    smol, _, gemma = ([cell.split(",")[0] for cell in row] for row in ABLATION_ROWS)
    assert smol[1:3] == [kl_alone, delta_w_only]  # the theory table's demo row is the README's
    theory = f"(KL {smol[2]} against {smol[1]}); on Gemma 3 they halve the KL ({gemma[2]} against {gemma[1]})"
    assert theory in prose("docs/theory.md")
