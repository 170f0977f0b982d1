"""docs/transfer.md's tables and the README's transfer paragraph, re-measured by their commands (`./run test-figures`).

"What we measured" (K = 8, every remaining pair held out) and "The K sweep" (`--calibration 1,2,4,8,16`) are
re-run from the `<!-- reproduce: … -->` blocks beside them, through the real CLI with the real SmolLM2-135M and
Gemma 3 270M (tests/doc_commands.py). Accuracies are fractions of a few dozen queries, printed to 2 decimals;
KLs are checked to the last digit printed, or to 0.5% where that is looser (doc_commands.agrees); the layer
and α exactly as printed.
"""

import re
import sys

import pytest
from doc_commands import ROOT, agrees, commands, markdown, table_after

from icl_probe.transfer import METHODS

DOC = "docs/transfer.md"
ROWS = table_after(DOC, "| model | task | held out |")
COMMANDS = commands(DOC, "transfer-table")
SWEEPS = commands(DOC, "transfer-sweep")
TRANSFERABLE = ("single_patch", "mean_patch", "joint_patch", "thought_patch", "task_vector")


def model_of(args: list[str]) -> str:
    return args[args.index("--model") + 1] if "--model" in args else "smollm2-135m"


def cell_agrees(entry: dict, method: str, printed: str) -> bool:
    """A cell "0.78 (0.00)": the method's accuracy and mean KL, each to its printed digits (or 0.5%)."""
    accuracy, kl = re.fullmatch(r"(\S+) \((\S+)\)", printed).groups()
    return agrees(entry["accuracy"][method], accuracy) and agrees(entry["kl"][method], kl)


def check_entry(entry: dict, cells: list[str], methods: tuple[str, ...]) -> None:
    """The cells of one row: one per method, then the task vector's layer and the thought patch's α."""
    for method, printed in zip(methods, cells, strict=False):
        assert cell_agrees(entry, method, printed), (method, printed, entry["accuracy"][method], entry["kl"][method])
    layer, alpha = cells[len(methods) :]
    assert entry["task_vector_layer"] == int(layer) and agrees(entry["thought_lambda"], alpha)


def test_one_command_per_row():
    assert len(ROWS) == len(COMMANDS) == 7
    for row, args in zip(ROWS, COMMANDS, strict=True):
        assert args[:1] == ["transfer"] and [row[0], row[1]] == [model_of(args), args[args.index("--task") + 1]]
        assert args[args.index("--calibration") + 1] == "8" and args[args.index("--demos") + 1] == "5"
    assert [model_of(args) for args in SWEEPS] == ["smollm2-135m", "gemma3-270m"]


@pytest.mark.figures
@pytest.mark.parametrize(("row", "args"), list(zip(ROWS, COMMANDS)), ids=lambda r: f"{r[0][:5]}-{r[1]}")
def test_transfer_table_row(runner, row, args):
    """One row of "What we measured": held out, every method's accuracy (KL), the layer and α."""
    doc = runner.json(args)
    (entry,) = doc["sweep"]
    assert doc["n_heldout"] == int(row[2]) and entry["calibration"] == 8
    check_entry(entry, row[3:], METHODS)
    assert doc["own_patch_check"]["equal"]  # own_patch == icl exactly (the construction)


def prose(doc: str) -> str:
    return " ".join(markdown(doc).split())


@pytest.mark.figures
def test_readme_paragraph(runner):
    """The README's transfer paragraph quotes the K = 8 runs: SmolLM2's best held-out accuracy of a transferable
    patch against its in-context range, and Gemma 3's antonyms row."""
    docs = {(model_of(args), args[args.index("--task") + 1]): runner.json(args)["sweep"][0] for args in COMMANDS}
    smol = [entry for (model, _), entry in docs.items() if model == "smollm2-135m"]
    best = max(entry["accuracy"][m] for entry in smol for m in TRANSFERABLE)
    icl = sorted(entry["accuracy"]["icl"] for entry in smol)
    antonyms = docs["gemma3-270m", "antonyms"]["accuracy"]
    text = prose("README.md")
    assert f"(held-out accuracy ≤ {best:.2f} against {icl[0]:.2f}–{icl[-1]:.2f} in context)" in text
    single, mean, vector, context = (antonyms[m] for m in ("single_patch", "mean_patch", "task_vector", "icl"))
    quoted = f"(antonyms: one query's patch {single:.2f}, their mean {mean:.2f}, Hendel et al.'s task vector"
    assert f"{quoted} {vector:.2f}, in context {context:.2f})" in text


@pytest.mark.figures
def test_forward_call_counts(real_models):
    """docs/transfer.md, "Where the time goes": the benchmark's run makes 152 forward calls (1976 rows, 8169
    tokens), against 775 passes it cannot avoid, counted as benchmarks/bench_transfer.py counts them (its times
    are not checked)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_transfer

    model, tokenizer = real_models(bench_transfer.MODEL)
    bench_transfer.model_layers[0] = model.config.num_hidden_layers
    floor = len(bench_transfer.floor_prompts(tokenizer))
    calls = bench_transfer.profile(model, tokenizer)["forwards"]
    text = prose(DOC)
    assert f"| **total** | **{floor}** |" in text
    assert f"Now the same run makes **{calls['calls']} calls** ({calls['rows']} rows, {calls['tokens']} tokens;" in text


def spread(entries: list[dict], method: str) -> str:
    """The smallest and largest accuracy of `method` over the runs as "Reading it" prints them: "0.53 to 0.71"."""
    values = sorted(entry["accuracy"][method] for entry in entries)
    return " to ".join("0" if v == 0 else f"{v:.2f}" for v in (values[0], values[-1]))


@pytest.mark.figures
def test_reading_it(runner):
    """docs/transfer.md, "Reading it": the ranges it quotes from the K = 8 table, per model."""
    runs = [(model_of(args), runner.json(args)["sweep"][0]) for args in COMMANDS]
    smol, gemma = ([entry for model, entry in runs if model == name] for name in ("smollm2-135m", "gemma3-270m"))
    best = max(entry["accuracy"][m] for entry in smol for m in TRANSFERABLE)
    text = prose(DOC)
    assert f"all stay at zero-shot accuracy (0 to {best:.2f}) on held-out queries" in text
    assert f"while in context the model gets {spread(smol, 'icl')} right" in text
    assert (
        f"already gives {spread(gemma, 'single_patch')} on held-out queries (against {spread(gemma, 'zero_shot')} "
        f"zero-shot and {spread(gemma, 'icl')} in context), the mean of eight {spread(gemma, 'mean_patch')}, the "
        f"thought patch {spread(gemma, 'thought_patch')}, and the task vector {spread(gemma, 'task_vector')}"
    ) in text
