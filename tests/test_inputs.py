"""--layers parsing, the prefix rule, prompt and query files, and the warning when context and query fuse."""

import pytest

from icl_probe.errors import InputError, UsageError
from icl_probe.inputs import fusion_warning, parse_layers, read_query, read_text, special_prefix, tokenize


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


# ---- the prefix rule and query files -------------------------------------------------------------


class SplittingTokenizer:
    """A fake tokenizer whose specials go inside the text: [bos, first id, sep, rest...]."""

    def __call__(self, text, add_special_tokens=True):
        ids = [100 + ord(c) for c in text]
        return {"input_ids": [1, *ids[:1], 2, *ids[1:]] if add_special_tokens else ids}


def test_prefix_rule_refuses_specials_inside_the_query():
    with pytest.raises(InputError) as e:
        tokenize(SplittingTokenizer(), "a -> b\n", "c ->")
    message = str(e.value)
    assert "cannot find the query's token ids [199, 132, 145, 162] inside its tokenization" in message
    assert "with special tokens [1, 199, 2, 132, 145, 162]" in message
    assert "use a tokenizer whose special tokens only wrap the text" in message and "\n" not in message


def test_prefix_rule_error_cuts_long_id_lists():
    with pytest.raises(InputError, match=r"\[199, 199, 199, 199, 199, 199, 199, 199, … 32 more\]"):
        special_prefix(SplittingTokenizer(), "c" * 40, [199] * 40)


def test_prefix_rule_still_finds_a_bos(bos_tokenizer):
    assert special_prefix(bos_tokenizer, "c ->", bos_tokenizer("c ->", add_special_tokens=False)["input_ids"]) == [1]


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"big ->\n", "big ->"), (b"big ->\r\n", "big ->"), (b"big ->", "big ->"), (b"big ->\n\n", "big ->\n"),
     (b"big -> \n", "big -> ")],
)  # fmt: skip
def test_read_query_strips_one_final_line_break(tmp_path, data, expected):
    (tmp_path / "q.txt").write_bytes(data)
    assert read_query(tmp_path / "q.txt") == expected


def test_read_query_names_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="query file not found"):
        read_query(tmp_path / "nope.txt")


def test_fusion_warning_names_both_sides():
    assert fusion_warning("France: Paris\nJapan: Tokyo", "Germany:") == (
        "the context ends with 'Tokyo' and the query starts with 'Germany:' with no space or newline between, "
        "so the model reads them run together as 'TokyoGermany:'; end the context with a newline"
    )


@pytest.mark.parametrize(("context", "query"), [("Japan: Tokyo\n", "Germany:"), ("Tokyo", " Germany:"),
                                                ("Tokyo ", "Germany:"), ("Tokyo\t", "\nGermany:")])  # fmt: skip
def test_no_fusion_warning_with_whitespace_between(context, query):
    assert fusion_warning(context, query) is None
