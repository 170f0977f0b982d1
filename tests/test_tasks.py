"""The built-in tasks, task files in both public formats, templates, and the examples and targets they give."""

import json
from importlib import resources

import pytest
from hypothesis import given
from hypothesis import strategies as st

from icl_probe.errors import InputError, UsageError
from icl_probe.tasks import (
    DEFAULT_TEMPLATE,
    Example,
    Task,
    builtin_names,
    builtin_task,
    check_template,
    first_target_id,
    format_example,
    load_task_file,
    pick_examples,
    pick_task,
    query_for,
    split_context,
    target_text,
    task_examples,
    tasks_document,
)

QA_TEMPLATE = "Q: {input}\nA: {output}\n\n"
PAIRS = [("dog", "chien"), ("cat", "chat"), ("{x}", "a {output} brace")]
SHAPE = r'each entry must be \{"input": \.\.\., "output": \.\.\.\} with string values'


def write(tmp_path, data, name="t.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


# --- built-in tasks -------------------------------------------------------------------------------------------


def test_builtin_files_ship_as_package_data():
    folder = resources.files("icl_probe") / "data" / "tasks"
    found = sorted(f.name for f in folder.iterdir() if f.name.endswith(".json"))
    assert found == [f"{name}.json" for name in builtin_names()]
    assert builtin_names() == ["antonyms", "country_capital", "english_french", "present_past", "singular_plural"]


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_task_is_clean(name):
    task = builtin_task(name)
    inputs = [x for x, _ in task.pairs]
    assert task.name == name and task.description
    assert len(task.pairs) >= 40
    assert len(set(inputs)) == len(inputs)
    assert all(x.strip() == x and y.strip() == y and x and y for x, y in task.pairs)
    assert all("\n" not in x + y for x, y in task.pairs)


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_layout_is_name_description_pairs(name):
    data = json.loads((resources.files("icl_probe") / "data" / "tasks" / f"{name}.json").read_text("utf-8"))
    assert set(data) == {"name", "description", "pairs"} and data["name"] == name
    assert all(set(entry) == {"input", "output"} for entry in data["pairs"])


def test_builtin_task_contents():
    antonyms = builtin_task("antonyms").pairs
    assert antonyms[:5] == (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("old", "new"))
    assert "happy" not in {x for x, _ in antonyms}
    capitals = builtin_task("country_capital").pairs
    assert ("Germany", "Berlin") in capitals and capitals[0] != ("Germany", "Berlin")
    assert ("dog", "chien") in builtin_task("english_french").pairs
    assert ("go", "went") in builtin_task("present_past").pairs
    assert "mouse" not in {x for x, _ in builtin_task("singular_plural").pairs}


def test_builtin_name_accepts_hyphens():
    assert builtin_task("country-capital") == builtin_task("country_capital")


def test_unknown_builtin_lists_names_and_suggests():
    with pytest.raises(UsageError, match=r"unknown task 'antonym'; did you mean antonyms\? the built-in tasks are: "):
        builtin_task("antonym")
    with pytest.raises(UsageError, match=r"unknown task 'zzz'; the built-in tasks are: antonyms, country_capital"):
        builtin_task("zzz")


def test_tasks_document():
    doc = tasks_document()
    assert doc["schema"] == "icl-probe.tasks/1"
    assert [t["name"] for t in doc["tasks"]] == builtin_names()
    first = doc["tasks"][0]
    assert first["example"] == {"input": "hot", "output": "cold"}
    assert first["pairs"] == len(builtin_task("antonyms").pairs) and first["description"]
    json.dumps(doc)


# --- task files -----------------------------------------------------------------------------------------------


def test_both_file_formats_give_the_same_task(tmp_path):
    listed = write(tmp_path, [{"input": x, "output": y} for x, y in PAIRS], "a.json")
    mapped = write(tmp_path, dict(PAIRS), "b.json")
    a, b = load_task_file(listed), load_task_file(mapped)
    assert a.pairs == b.pairs == tuple(PAIRS)
    assert a.name == "a" and b.name == "b"


def test_file_may_start_with_a_bom_and_entries_may_carry_extra_keys(tmp_path):
    path = write(tmp_path, '\ufeff[{"input": "a", "output": "b", "note": 1}]')
    assert load_task_file(path).pairs == (("a", "b"),)


MALFORMED = [
    ("not json", r"task file \S*t.json is not JSON: Expecting value: line 1 column 1 \(char 0\); give a JSON list"),
    ("", r"is not JSON: Expecting value"),
    ('"text"', r"task file \S*t.json holds a string at the top level; give a JSON list of \{\"input\""),
    ("3", r"holds a number at the top level"),
    ("[" * 100_000, r"task file \S*t.json is nested too deeply to read; give a JSON list"),
    ("[]", r"task file \S*t.json has no pairs; give a JSON list"),
    ("{}", r"has no pairs"),
    ('[{"input": "a", "output": "b"}, "c"]', rf"task file \S*t.json: entry 2 is a string, not an object; {SHAPE}$"),
    ('[{"input": "a", "output": "b"}, null]', r"entry 2 is null, not an object"),
    ('[{"input": "a"}]', rf'task file \S*t.json: entry 1 \(\{{"input": "a"\}}\) has no "output"; {SHAPE}$'),
    ('[{"output": "a"}]', r'entry 1 \(\{"output": "a"\}\) has no "input"'),
    ('[{"input": "a", "output": 7}]', rf'entry 1 \(.*\): "output" is a number, not a string; {SHAPE}$'),
    ('[{"input": ["a"], "output": "b"}]', r'entry 1 \(.*\): "input" is a list, not a string'),
    ('[{"input": "a", "output": " "}]', r'entry 1 \(.*\): "output" is empty'),
    ('{"dog": 7}', r'task file \S*t.json: the output of "dog" is a number, not a string; give each output as a non-'),
    ('{"dog": ""}', r'the output of "dog" is empty'),
    ('{"": "x"}', r'the input "" is empty; give each input some text'),
    ('{"dog": "chien", "dog": "chat"}', r'task file \S*t.json: the key "dog" appears twice; keep one$'),
]


@pytest.mark.parametrize("text, message", MALFORMED)
def test_malformed_file_names_file_and_entry(tmp_path, text, message):
    with pytest.raises(InputError, match=message) as err:
        load_task_file(write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_long_entry_is_cut_in_the_message(tmp_path):
    path = write(tmp_path, [{"input": "x" * 200}])
    with pytest.raises(InputError, match=r'entry 1 \(\{"input": "x+\.\.\.\) has no "output"') as err:
        load_task_file(path)
    assert "x" * 60 not in str(err.value)


def test_missing_folder_and_non_utf8_files(tmp_path):
    with pytest.raises(InputError, match="task file not found"):
        load_task_file(tmp_path / "nope.json")
    with pytest.raises(InputError, match="task file is a directory"):
        load_task_file(tmp_path)
    (tmp_path / "bad.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(InputError, match=r"task file \S*bad.json is not UTF-8: bad byte 0xff"):
        load_task_file(tmp_path / "bad.json")


def test_pick_task(tmp_path):
    path = write(tmp_path, {"a": "b"})
    assert pick_task(None, None) is None
    assert pick_task("antonyms", None) == builtin_task("antonyms")
    assert pick_task(None, path).pairs == (("a", "b"),)
    with pytest.raises(UsageError, match="give `task` or `task_file`, not both"):
        pick_task("antonyms", path)


# --- templates ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, QA_TEMPLATE, "{input}{output}", "x {input} = {output};"])
def test_good_templates_pass(template):
    check_template(template)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{output}\n", r"must contain \{input\} exactly once"),
        ("{input} {input} {output}", r"must contain \{input\} exactly once"),
        ("{input} ->\n", r"must contain \{output\} exactly once"),
        ("{output} <- {input}\n", r"has \{output\} before \{input\}; put \{input\} first"),
        ("{input} -> {output} {label}\n", r"has an unknown field \{label\}; use only \{input\} and \{output\}"),
        ("{} {input} -> {output}\n", r"unknown field \{\}"),
    ],
)
def test_bad_templates_say_why(template, message):
    with pytest.raises(UsageError, match=message):
        check_template(template)


def test_format_example_does_not_read_braces_in_the_values():
    assert format_example(DEFAULT_TEMPLATE, "{output}", "{input}") == "{output} -> {input}\n"
    assert format_example(QA_TEMPLATE, "happy", "sad") == "Q: happy\nA: sad\n\n"


@pytest.mark.parametrize(
    "template, query, spaces, target",
    [
        (DEFAULT_TEMPLATE, "happy ->", " ", " sad"),
        (QA_TEMPLATE, "Q: happy\nA:", " ", " sad"),
        ("{input}:   {output}\n", "happy:", "   ", "   sad"),
        ("{input}\t{output}\n", "happy\t", "", "sad"),
        ("{input}={output}", "happy=", "", "sad"),
    ],
)
def test_query_and_target(template, query, spaces, target):
    assert query_for(template, "happy") == (query, spaces)
    assert target_text(template, "sad") == target
    assert query + target == format_example(template, "happy", "sad").removesuffix(template.split("{output}")[1])


def test_task_examples():
    task = Task("t", (("a", "b"), ("c", "d"), ("e", "f")))
    assert task_examples(task, DEFAULT_TEMPLATE, 2) == [Example("a -> b\n", "a", "b"), Example("c -> d\n", "c", "d")]
    assert len(task_examples(task, QA_TEMPLATE, None)) == 3
    for demos in (0, 4, -1):
        with pytest.raises(UsageError, match=rf"`demos={demos}` is out of range: task t has 3 pairs; give 1 to 3"):
            task_examples(task, DEFAULT_TEMPLATE, demos)


# --- context splitting ----------------------------------------------------------------------------------------


def test_split_context_examples():
    texts = [e.text for e in split_context("hot -> cold\nbig -> small\n")]
    assert texts == ["hot -> cold\n", "big -> small\n"]
    assert [e.text for e in split_context("a\n\nb")] == ["a\n", "\n", "b"]
    assert [e.text for e in split_context("Q: a\nA: b\n\nQ: c", "\n\n")] == ["Q: a\nA: b\n\n", "Q: c"]
    assert split_context("") == []
    assert split_context("a\n")[0] == Example("a\n")
    with pytest.raises(UsageError, match="the separator is empty"):
        split_context("a", "")


@given(st.text(alphabet="ab\n;", max_size=30), st.sampled_from(["\n", "\n\n", ";", "ab"]))
def test_split_context_round_trip(context, separator):
    texts = [e.text for e in split_context(context, separator)]
    assert "".join(texts) == context
    assert all(texts)
    assert all(t.endswith(separator) for t in texts[:-1])
    assert all(separator not in t[: -len(separator)] for t in texts)


# --- a sweep's examples and query -----------------------------------------------------------------------------


def test_pick_examples_from_a_task_a_context_or_the_demo(tmp_path):
    examples, query, target = pick_examples()  # the demo: five antonyms, then `happy ->` (not in the task)
    assert [e.text for e in examples] == ["hot -> cold\n", "big -> small\n", "fast -> slow\n", "up -> down\n",
                                          "old -> new\n"]  # fmt: skip
    assert (query, target) == ("happy ->", None)
    examples, query, target = pick_examples(task="antonyms", demos=2, query_input="wet", template="{input}: {output};")
    assert [e.text for e in examples] == ["hot: cold;", "big: small;"] and (query, target) == ("wet:", " dry")
    path = write(tmp_path, {"ab": "ba"})
    assert pick_examples(task_file=path, query_input="ab", target="x")[1:] == ("ab ->", "x")  # a given target stays
    examples, query, target = pick_examples(context="a;b;c", separator=";", demos=2, query="d")
    assert [e.text for e in examples] == ["a;", "b;"] and (query, target) == ("d", None)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"task": "antonyms", "context": "a\n"}, "give a task (`task` or `task_file`) or a `context`, not both"),
        ({"query": "b"}, "give the examples with `task`, `task_file` or `context`"),
        ({"context": "a\n"}, "give the query with `query` or `query_input` (not both)"),
        ({"task": "antonyms", "query": "b", "query_input": "c"}, "give the query with `query` or `query_input`"),
    ],
)  # fmt: skip
def test_pick_examples_refusals_name_its_parameters(given, message):
    with pytest.raises(UsageError) as e:
        pick_examples(**given)
    assert message in str(e.value)


# --- tokens ---------------------------------------------------------------------------------------------------


def test_first_target_id(tokenizer):
    assert first_target_id(tokenizer, " sad") == tokenizer.convert_tokens_to_ids(" ")
    assert first_target_id(tokenizer, "sad") == tokenizer.convert_tokens_to_ids("s")
    with pytest.raises(InputError, match=r"the target '' gives no tokens with this tokenizer"):
        first_target_id(tokenizer, "")
