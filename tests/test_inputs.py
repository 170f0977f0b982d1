"""--layers parsing, the prefix rule and reading prompt files."""

import pytest

from icl_probe.errors import InputError, UsageError
from icl_probe.inputs import parse_layers, read_text, tokenize


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("all", list(range(12))),
        (None, list(range(12))),
        ("5", [5]),
        ("3,7", [3, 7]),
        ("10:20", [10, 11]),
        ("-1", [11]),
        ("-4:", [8, 9, 10, 11]),
        (":3,-1", [0, 1, 2, 11]),
        ("::4", [0, 4, 8]),
        ([1, 2], [1, 2]),
        (3, [3]),
    ],
)
def test_layer_specs_follow_python_indexing(spec, expected):
    assert parse_layers(spec, 12) == expected
    if isinstance(spec, str) and spec != "all":
        python = list(range(12))
        for part in spec.split(","):
            assert set(eval(f"python[{part}]") if ":" in part else [python[int(part)]]) <= set(expected)


@pytest.mark.parametrize("spec", ["12", "-13", "x", "1:2:0", "3,,4", "20:", "1:2:3:4", ""])
def test_bad_layer_specs_name_the_range(spec):
    with pytest.raises(UsageError, match="0..11"):
        parse_layers(spec, 12)


def test_prefix_rule_without_bos(tokenizer):
    prompt = tokenize(tokenizer, "a -> b\n", "c ->")
    assert prompt.prefix == []
    assert prompt.full == tokenizer("a -> b\nc ->")["input_ids"]


def test_prefix_rule_with_bos(bos_tokenizer):
    prompt = tokenize(bos_tokenizer, "a -> b\n", "c ->")
    assert prompt.prefix == [bos_tokenizer.bos_token_id]
    assert prompt.full == bos_tokenizer("a -> b\nc ->")["input_ids"]
    assert prompt.query_only == bos_tokenizer("c ->")["input_ids"]


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text_is_refused(tokenizer, text):
    with pytest.raises(InputError, match="empty"):
        tokenize(tokenizer, text, "q")
    with pytest.raises(InputError, match="query is empty"):
        tokenize(tokenizer, "c", text)


def test_read_text_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_text(tmp_path / "nope.txt", "context")
    with pytest.raises(InputError, match="directory"):
        read_text(tmp_path, "context")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(InputError, match="offset 6"):
        read_text(bad, "context")
