"""ICL tasks: the built-in tasks, task files, prompt templates, and the demonstrations and query they give.

A task is a list of (input, output) pairs. A template such as "{input} -> {output}\\n" turns a pair into one
demonstration; the query is the template's part before {output}, with its trailing spaces moved to the target.
Templates are filled by plain string splitting, never str.format, so inputs may hold braces.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_TEMPLATE", "Task", "Example", "builtin_names", "builtin_task", "tasks_document", "load_task_file",
    "pick_task", "check_template", "format_example", "query_for", "target_text", "task_examples", "split_context",
    "first_target_id", "DEMO_TASK", "DEMO_DEMOS", "DEMO_INPUT", "pick_examples"
]  # fmt: skip

import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from .errors import InputError, UsageError

DEFAULT_TEMPLATE = "{input} -> {output}\n"
SCHEMA = "icl-probe.tasks/1"
FORMATS = 'give a JSON list of {"input": ..., "output": ...} objects or a JSON object {input: output}'
ENTRY_SHAPE = 'each entry must be {"input": ..., "output": ...} with string values'


@dataclass(frozen=True)
class Task:
    """Named (input, output) pairs, in the order given."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    description: str = ""


@dataclass(frozen=True)
class Example:
    """One piece of the context; input and output are known when it was made from a task pair."""

    text: str
    input: str | None = None
    output: str | None = None


# --- built-in tasks -------------------------------------------------------------------------------------------


def _builtin_dir():
    return resources.files("icl_probe") / "data" / "tasks"


def builtin_names() -> list[str]:
    """The names of the built-in tasks, sorted."""
    return sorted(f.name[: -len(".json")] for f in _builtin_dir().iterdir() if f.name.endswith(".json"))


@cache
def builtin_task(name: str) -> Task:
    """The built-in task `name` (hyphens count as underscores); a UsageError lists the names if it is unknown."""
    names = builtin_names()
    key = name.strip().lower().replace("-", "_")
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"unknown task {name!r}; {hint}the built-in tasks are: {', '.join(names)}")
    where = f"built-in task {key}"
    data = json.loads((_builtin_dir() / f"{key}.json").read_text(encoding="utf-8"))
    return Task(key, _list_pairs(data["pairs"], where), data.get("description", ""))


def tasks_document() -> dict:
    """The built-in tasks as JSON-ready data (what `icl-probe tasks` writes as JSON)."""
    tasks = []
    for name in builtin_names():
        task = builtin_task(name)
        first_input, first_output = task.pairs[0]
        example = {"input": first_input, "output": first_output}
        tasks.append({"name": name, "description": task.description, "pairs": len(task.pairs), "example": example})
    return {"schema": SCHEMA, "tasks": tasks}


# --- task files -----------------------------------------------------------------------------------------------


def load_task_file(path: str | Path) -> Task:
    """A task from a JSON file: a list of {"input", "output"} objects, or one {input: output} object."""
    from .inputs import read_text  # here, not at the top: `icl-probe tasks` runs without torch

    where = f"task file {path}"
    text = read_text(path, "task").removeprefix("\ufeff")  # a BOM is legal in UTF-8 files but not in JSON
    try:
        data = json.loads(text, object_pairs_hook=lambda items: _unique_keys(items, where))
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not JSON: {e}; {FORMATS}") from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply to read; {FORMATS}") from None
    if isinstance(data, list):
        pairs = _list_pairs(data, where)
    elif isinstance(data, dict):
        pairs = _dict_pairs(data, where)
    else:
        raise InputError(f"{where} holds {_kind(data)} at the top level; {FORMATS}")
    return Task(Path(path).stem, pairs, f"from {path}")


def pick_task(task: str | None, task_file: str | Path | None) -> Task | None:
    """The task chosen by name (a built-in task) or by file; None when neither is given."""
    if task is not None and task_file is not None:
        raise UsageError("give `task` or `task_file`, not both")
    if task is not None:
        return builtin_task(task)
    if task_file is not None:
        return load_task_file(task_file)
    return None


def _unique_keys(items: list[tuple[str, object]], where: str) -> dict:
    """json's object hook: a repeated key would silently drop a pair, so it is an error."""
    seen = {}
    for key, value in items:
        if key in seen:
            raise InputError(f"{where}: the key {json.dumps(key, ensure_ascii=False)} appears twice; keep one")
        seen[key] = value
    return seen


def _list_pairs(data: list, where: str) -> tuple[tuple[str, str], ...]:
    """The pairs of a function-vectors style list; entries are numbered from 1 in the messages."""
    if not data:
        raise InputError(f"{where} has no pairs; {FORMATS}")
    return tuple(_entry_pair(entry, i, where) for i, entry in enumerate(data, start=1))


def _entry_pair(entry: object, i: int, where: str) -> tuple[str, str]:
    if not isinstance(entry, dict):
        raise InputError(f"{where}: entry {i} is {_kind(entry)}, not an object; {ENTRY_SHAPE}")
    for key in ("input", "output"):
        if key not in entry:
            raise InputError(f'{where}: entry {i} {_show(entry)} has no "{key}"; {ENTRY_SHAPE}')
        problem = _string_problem(entry[key])
        if problem:
            raise InputError(f'{where}: entry {i} {_show(entry)}: "{key}" is {problem}; {ENTRY_SHAPE}')
    return entry["input"], entry["output"]


def _dict_pairs(data: dict, where: str) -> tuple[tuple[str, str], ...]:
    """The pairs of a task-vectors style {input: output} object."""
    if not data:
        raise InputError(f"{where} has no pairs; {FORMATS}")
    for key, value in data.items():
        shown = json.dumps(key, ensure_ascii=False)
        if _string_problem(key):
            raise InputError(f"{where}: the input {shown} is empty; give each input some text")
        problem = _string_problem(value)
        if problem:
            raise InputError(f"{where}: the output of {shown} is {problem}; give each output as a non-empty string")
    return tuple(data.items())


def _string_problem(value: object) -> str | None:
    """What keeps `value` from being a pair's text ("a number, not a string", "empty"), or None."""
    if not isinstance(value, str):
        return f"{_kind(value)}, not a string"
    return None if value.strip() else "empty"


def _kind(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _show(entry: dict, limit: int = 60) -> str:
    """The entry as one line of JSON in parentheses, cut to `limit` characters."""
    text = json.dumps(entry, ensure_ascii=False)
    return f"({text if len(text) <= limit else text[: limit - 3] + '...'})"


# --- templates ------------------------------------------------------------------------------------------------


def check_template(template: str) -> None:
    """A UsageError unless the template holds {input} then {output}, once each, and no other {field}."""
    shown = json.dumps(template, ensure_ascii=False)
    for field in ("{input}", "{output}"):
        if template.count(field) != 1:
            raise UsageError(f"template {shown} must contain {field} exactly once; e.g. {json.dumps(DEFAULT_TEMPLATE)}")
    if template.index("{input}") > template.index("{output}"):
        raise UsageError(f"template {shown} has {{output}} before {{input}}; put {{input}} first")
    other = re.search(r"\{\w*\}", template.replace("{input}", "").replace("{output}", ""))
    if other:
        raise UsageError(f"template {shown} has an unknown field {other.group()}; use only {{input}} and {{output}}")


def _parts(template: str) -> tuple[str, str, str]:
    """(before {input}, between, after {output}) of a checked template."""
    check_template(template)
    head, rest = template.split("{input}")
    middle, tail = rest.split("{output}")
    return head, middle, tail


def format_example(template: str, input: str, output: str) -> str:
    """The template with its {input} and {output} filled in."""
    head, middle, tail = _parts(template)
    return head + input + middle + output + tail


def query_for(template: str, input: str) -> tuple[str, str]:
    """(query, stripped spaces): the template up to {output}, filled, less its trailing spaces.

    The spaces belong to the target, as tokenizers attach a space to the word after it: " sad", not "sad".
    """
    head, middle, _ = _parts(template)
    text = head + input + middle
    query = text.rstrip(" ")
    return query, text[len(query) :]


def target_text(template: str, output: str) -> str:
    """What follows the query: the spaces the query stripped, then the output."""
    _, middle, _ = _parts(template)
    return middle[len(middle.rstrip(" ")) :] + output


def task_examples(task: Task, template: str, demos: int | None = None) -> list[Example]:
    """The first `demos` pairs of the task (all if None) as demonstrations filled into the template."""
    n = len(task.pairs)
    if demos is not None and not 1 <= demos <= n:
        raise UsageError(f"`demos={demos}` is out of range: task {task.name} has {n} pairs; give 1 to {n}")
    chosen = task.pairs if demos is None else task.pairs[:demos]
    return [Example(format_example(template, x, y), x, y) for x, y in chosen]


def split_context(context: str, separator: str = "\n") -> list[Example]:
    """The context cut after each separator, which each piece keeps; "".join of the texts gives the context."""
    if not separator:
        raise UsageError('the separator is empty; give one such as "\\n"')
    pieces = context.split(separator)
    texts = [piece + separator for piece in pieces[:-1]] + [pieces[-1]]
    return [Example(text) for text in texts if text]


# --- a sweep's examples and query -----------------------------------------------------------------------------

DEMO_TASK, DEMO_DEMOS, DEMO_INPUT = "antonyms", 5, "happy"  # the demo: `happy ->` after five antonyms


def pick_examples(task: str | None = None, task_file: str | Path | None = None, context: str | None = None,
                  query: str | None = None, query_input: str | None = None, *, template: str = DEFAULT_TEMPLATE,
                  demos: int | None = None, separator: str = "\n",
                  target: str | None = None) -> tuple[list[Example], str, str | None]:  # fmt: skip
    """(examples, query, target) from a task (a built-in name or a file) or a context cut after each `separator`,
    the query given or built from `query_input`. The first `demos` examples (all if None) are kept.

    With a task and `query_input`, the target defaults to the task's answer to it, after the template's spaces
    (" dry"). With neither a task nor a context: the antonym task's first five pairs, and the query `happy ->`.
    """
    check_template(template)
    chosen = pick_task(task, task_file)
    if chosen is not None and context is not None:
        raise UsageError("give a task (`task` or `task_file`) or a `context`, not both")
    if chosen is None and context is None:
        if query is not None or query_input is not None:
            raise UsageError("give the examples with `task`, `task_file` or `context`")
        chosen, demos, query_input = builtin_task(DEMO_TASK), demos or DEMO_DEMOS, DEMO_INPUT
    if (query is None) == (query_input is None):
        raise UsageError("give the query with `query` or `query_input` (not both)")
    if chosen is not None:
        examples = task_examples(chosen, template, demos)
    else:
        examples = split_context(context, separator)[:demos] if demos else split_context(context, separator)
    if query_input is not None:
        query, spaces = query_for(template, query_input)
        answer = dict(chosen.pairs).get(query_input) if chosen is not None else None
        if target is None and answer is not None:
            target = spaces + answer  # the first token of what the template puts after the query
    return examples, query, target


# --- tokens ---------------------------------------------------------------------------------------------------


def first_target_id(tokenizer, text: str) -> int:
    """The first token id of `text` tokenized without special tokens; an InputError if it gives no token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"the target {text!r} gives no tokens with this tokenizer; give an output with some text")
    return int(ids[0])
