"""User inputs: reading prompt text, tokenizing it with the fixed prefix rule, parsing --layers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, UsageError

DEMO_CONTEXT = "hot -> cold\nbig -> small\nfast -> slow\nup -> down\n"
DEMO_QUERY = "happy ->"


@dataclass(frozen=True)
class Prompt:
    """Token ids split so that the query's tokens are identical with and without the context."""

    prefix: list[int]
    context: list[int]
    query: list[int]

    @property
    def full(self) -> list[int]:
        return self.prefix + self.context + self.query

    @property
    def query_only(self) -> list[int]:
        return self.prefix + self.query


def tokenize(tokenizer, context: str, query: str) -> Prompt:
    """prefix = the special tokens the tokenizer puts in front; context and query without specials."""
    check_text(context, "context")
    check_text(query, "query")
    q = tokenizer(query, add_special_tokens=False)["input_ids"]
    c = tokenizer(context, add_special_tokens=False)["input_ids"]
    return Prompt(special_prefix(tokenizer, query, q), list(c), list(q))


def special_prefix(tokenizer, text: str, ids: list[int]) -> list[int]:
    """The ids the tokenizer puts in front of `text` by default (e.g. [bos] for Gemma, [] for SmolLM2)."""
    with_specials = tokenizer(text)["input_ids"]
    for k in range(len(with_specials) - len(ids) + 1):
        if with_specials[k : k + len(ids)] == ids:
            return with_specials[:k]
    return []


def check_text(text: str | None, what: str) -> None:
    if text is None or not text.strip():
        raise InputError(f"the {what} is empty; give some text with --{what} or --{what}-file")


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file, or an InputError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} file is a directory: {path}; give a text file")
    if not path.is_file():  # a FIFO or device would block or never end
        raise InputError(f"{what} file is not a regular file: {path}; give a text file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} file {path} is not UTF-8: bad byte 0x{data[e.start]:02x} at offset {e.start}") from e


def parse_layers(spec: str | int | list[int] | None, num_layers: int) -> list[int]:
    """Layer indices from `all`, `5`, `3,7`, `10:20`, `-1`, `-4:` (Python index and slice meaning)."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, int):
        spec = str(spec)
    if isinstance(spec, list):
        spec = ",".join(str(i) for i in spec)
    chosen: set[int] = set()
    for part in str(spec).split(","):
        chosen.update(_parse_part(part.strip(), spec, num_layers))
    return sorted(chosen)


def _parse_part(part: str, spec: str, n: int) -> list[int]:
    bad = f"bad layer spec {str(spec)!r}"  # repr: a spec may hold newlines or control characters
    hint = f"use e.g. all, 5, 3,7, 10:20, -1 or -4: (the model has {n} layers, 0..{n - 1})"
    try:
        if ":" in part:
            pieces = part.split(":")
            if len(pieces) > 3:
                raise ValueError
            bounds = [int(x) if x.strip() else None for x in pieces]
            if len(bounds) == 3 and bounds[2] == 0:
                raise ValueError
            picked = list(range(n))[slice(*bounds)]
            if not picked:
                raise UsageError(f"{bad}: {part!r} selects no layer; {hint}")
            return picked
        i = int(part)
    except ValueError:
        raise UsageError(f"{bad}: {part!r} is not an index or slice; {hint}") from None
    if not -n <= i < n:
        raise UsageError(f"{bad}: layer {i} is out of range; {hint}")
    return [i % n]
