"""The README's "Precision and generation" table, re-measured by the benchmark printed beside it (`./run test-figures`).

The README's `<!-- reproduce: precision-table -->` block is `python benchmarks/bench_precision.py --json PATH`;
the test parses those arguments with the benchmark's own parser and calls its `run`, the API equivalent (the
benchmark loads each model in float32 and bf16 itself). Every figure of the table is checked: the top-1 and
generation percentages exactly (they count prompts and tokens), the KLs to the last digit printed, or to 0.5%
where that is looser (doc_commands.agrees), and a KL printed as 0 as exactly 0 (the stable update's
construction). The sentence on the fixed patch (`replay --generate`) is the same run's float32 arm.
"""

import json
import sys

import pytest
from doc_commands import MODELS, ROOT, agrees, commands, markdown, table_after

ROWS = table_after("README.md", "| model | update | top-1 kept (20 prompts)")
(COMMAND,) = commands("README.md", "precision-table", programs=("python",))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The benchmark's document for the README's command line, also written where its --json says (in tmp)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_precision

    assert COMMAND[0] == "benchmarks/bench_precision.py"
    args = bench_precision.parser().parse_args(COMMAND[1:])
    doc = bench_precision.run(args)
    path = tmp_path_factory.mktemp("precision") / args.json
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return doc


def arm(update: str) -> str:
    """The table's "bf16, stable, merged" as the benchmark's arm "bfloat16 stable merged"."""
    return update.replace("bf16", "bfloat16").replace(",", "")


def percent(fraction: float, printed: str) -> bool:
    return printed.endswith("%") and round(100 * fraction) == int(printed.removesuffix("%"))


def test_one_row_per_arm():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_precision import ARMS

    every = [(model, f"{dtype} {method}") for model in MODELS for dtype, method in ARMS]
    assert [(row[0], arm(row[1])) for row in ROWS] == every


@pytest.mark.figures
@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r[0][:5]}-{arm(r[1]).replace(' ', '-')}")
def test_precision_row(measured, row):
    model, update, top1, kls, generated = row
    result = measured["models"][MODELS[model]][arm(update)]
    token, gen = result["next_token"], result["generation"]
    assert token["prompts"] == 20 and gen["tokens"] == 100  # "20 prompts", "5 × 20"
    assert percent(token["top1_agreement"], top1), token["top1_agreement"]
    mean, largest = (part.strip() for part in kls.split("/"))
    for got, printed in ((token["kl_mean"], mean), (token["kl_max"], largest)):
        assert got == 0 if printed == "0" else agrees(got, printed), (got, printed)
    assert percent(gen["agreement"], generated), gen["agreement"]


def prose(doc: str) -> str:
    return " ".join(markdown(doc).split())


@pytest.mark.figures
def test_precision_prose(measured):
    """The paragraphs under the table: the fixed patch's agreement, the naive update's worst KL, what merging loses."""
    text = prose("README.md")
    smol, gemma = (measured["models"][name]["float32 stable"]["generation_fixed"] for name in MODELS.values())
    fixed = [round(g["agreement"] * g["tokens"]) for g in (smol, gemma)]
    assert (f"agrees on {fixed[0]} of {smol['tokens']} generated tokens on SmolLM2 and {fixed[1]} of "
            f"{gemma['tokens']} on Gemma 3") in text  # fmt: skip
    naive = max(measured["models"][name]["bfloat16 naive"]["next_token"]["kl_max"] for name in MODELS.values())
    assert f"(KL at most {naive:.1e}, no top-1 lost)".replace("e-0", "e-") in text
    merged = [measured["models"][name][f"bfloat16 {m} merged"] for name in MODELS.values() for m in ("stable", "naive")]
    lost = [[r["query"] for r in a["next_token"]["rows"] if not r["top1_match"]] for a in merged]
    assert all(queries == lost[0] for queries in lost) and len(lost[0]) == 1  # the same prompt, every merged arm
    assert f"(`{lost[0][0]}`, 1 of 20) on both models" in text
    worst = max(round((1 - a["generation"]["agreement"]) * a["generation"]["tokens"]) for a in merged)
    assert f"and up to {worst} of 100 generated tokens" in text
