"""docs/transfer.md's "The K sweep", re-measured by its commands (`./run test-figures`).

The two `--calibration 1,2,4,8,16` runs are read from the `<!-- reproduce: transfer-sweep -->` block and run
through the real CLI with the real models (tests/doc_commands.py); each row is checked as
tests/test_figures_transfer.py checks "What we measured".
"""

import re

import pytest
from doc_commands import agrees, commands, markdown, table_after
from test_figures_transfer import DOC, TRANSFERABLE, check_entry, model_of

SWEEPS = commands(DOC, "transfer-sweep")


@pytest.mark.figures
@pytest.mark.parametrize("args", SWEEPS, ids=model_of)
def test_k_sweep(runner, args):
    """docs/transfer.md, "The K sweep": the line above each table (zero-shot, ICL, own patch) and a row per K."""
    model = model_of(args)
    doc = runner.json(args)
    head = re.search(rf"{model}: zero-shot (\S+), ICL (\S+), own patch (\S+)\.", markdown(DOC)).groups()
    rows = table_after(DOC, f"{model}: zero-shot")
    sizes = [int(k) for k in args[args.index("--calibration") + 1].split(",")]
    assert [entry["calibration"] for entry in doc["sweep"]] == sizes == [int(row[0]) for row in rows]
    assert f"`--calibration 1,2,4,8,16`: {doc['n_heldout']} held out" in markdown(DOC)
    for entry, row in zip(doc["sweep"], rows, strict=True):
        for method, printed in zip(("zero_shot", "icl", "own_patch"), head, strict=True):
            assert agrees(entry["accuracy"][method], printed), (entry["calibration"], method)  # the same for every K
        check_entry(entry, row[1:], TRANSFERABLE)


@pytest.mark.figures
def test_reading_the_sweep(runner):
    """docs/transfer.md, "Reading it": the joint patch against K on Gemma 3, the thought patch's flat curve, and
    SmolLM2's mean-patch KL falling with K."""
    smol, gemma = (runner.json(args)["sweep"] for args in SWEEPS)
    text = " ".join(markdown(DOC).split())
    joint = {e["calibration"]: e["accuracy"]["joint_patch"] for e in gemma}
    assert f"({joint[2]:.2f} at K = 2, {joint[16]:.2f} at K = 16)" in text
    thought = [e["accuracy"]["thought_patch"] for e in gemma]
    assert (
        f"the thought patch is at {thought[0]:.2f} with a single calibration query and stays between "
        f"{min(thought):.2f} and {max(thought):.2f} up to K = 16"
    ) in text
    mean_kl = [e["kl"]["mean_patch"] for e in smol]
    assert f"(the mean patch from {mean_kl[0]:.2f} to {mean_kl[-1]:.2f})" in text
