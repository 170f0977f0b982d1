"""`Analysis.to_dict`'s layers are `dataclasses.asdict` of the reports (the same values, deep copies), whatever the
report holds: modules, dependent positions, an MoE block's routing."""

import json
from dataclasses import asdict

import pytest
import torch
from tiny import tiny_model, tokenizer_for

from icl_probe.analysis import analyze, plain


@pytest.mark.parametrize(("name", "positions"), [("llama", "last"), ("llama", "all"), ("jamba-moe", "last")])
def test_layers_are_asdict_of_the_reports(name, positions):
    model, tok = tiny_model(name, torch.float64), tokenizer_for(name)
    result = analyze(model, tok, "ab -> ba\ncd -> dc\n", "ef ->", positions=positions)
    doc = result.to_dict()
    expected = [asdict(r) for r in result.layers]
    assert doc["layers"] == expected
    assert json.dumps(doc["layers"]) == json.dumps(expected)  # the same types, as JSON writes them
    doc["layers"][0]["modules"].clear()  # a copy: the report is untouched
    assert result.layers[0].modules


def test_plain_copies_containers_and_keeps_scalars():
    value = {"a": [1, 2.5, None, "x", (3, 4)], "b": {"c": True}}
    copied = plain(value)
    assert copied == value and copied is not value and copied["a"] is not value["a"]
