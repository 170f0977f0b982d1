"""User inputs: reading prompt text, tokenizing it with the fixed prefix rule, prompts given as vectors, `layers`.

A prompt reaches the engine as token ids (text, tokenized; the model embeds them) or as `Vectors`, input
vectors a continuous-input model reads directly (passed as `inputs_embeds`). Both are sequences that slice
and concatenate alike, so every part of the engine takes either.
"""

from __future__ import annotations

__all__ = [
    "DEMO_CONTEXT", "DEMO_QUERY", "Vectors", "Ids", "Prompt", "as_inputs", "tokenize", "special_prefix",
    "check_text", "read_text", "reencode", "read_query", "fusion_warning", "parse_layers"
]  # fmt: skip

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError, UsageError

DEMO_CONTEXT = "hot -> cold\nbig -> small\nfast -> slow\nup -> down\n"
DEMO_QUERY = "happy ->"


class Vectors:
    """A prompt (or part of one) given as input vectors, shape (T, d): slices and `+` as a list of token ids does.

    Args:
        data: the vectors, shape (T, d), one per position; other shapes raise InputError.

    Example:
        >>> ctx, query = icl_probe.Vectors(torch.randn(50, 3)), icl_probe.Vectors(torch.randn(1, 3))
        >>> (ctx[:10] + query).data.shape
        torch.Size([11, 3])
    """

    def __init__(self, data: torch.Tensor):
        if data.ndim != 2:
            raise InputError(f"input vectors must have shape (tokens, width), not {tuple(data.shape)}")
        self.data = data

    @property
    def width(self) -> int:
        return self.data.shape[-1]

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: slice) -> Vectors:
        if not isinstance(index, slice):
            raise TypeError("Vectors take slices; index .data for one vector")
        return Vectors(self.data[index])

    def __add__(self, other) -> Vectors:
        if isinstance(other, list) and not other:  # an empty list of ids: no prefix
            return self
        if not isinstance(other, Vectors):
            return NotImplemented
        if other.width != self.width:
            raise InputError(f"cannot join input vectors of width {self.width} and {other.width}; give one width")
        return Vectors(torch.cat([self.data, other.data.to(self.data.dtype)]))

    def __radd__(self, other) -> Vectors:
        if isinstance(other, list) and not other:
            return self
        return NotImplemented

    def __eq__(self, other) -> bool:
        return isinstance(other, Vectors) and torch.equal(self.data, other.data)

    __hash__ = None


Ids = list[int] | Vectors  # a prompt's token ids, or its input vectors


@dataclass(frozen=True)
class Prompt:
    """Token ids (or input vectors) split so that the query's are identical with and without the context."""

    prefix: list[int] | Vectors
    context: list[int] | Vectors
    query: list[int] | Vectors

    @property
    def full(self) -> list[int] | Vectors:
        return self.prefix + self.context + self.query

    @property
    def query_only(self) -> list[int] | Vectors:
        return self.prefix + self.query


def as_inputs(rows: list) -> dict[str, torch.Tensor]:
    """Rows of equal length as model input: token ids → input_ids (B, T), Vectors → inputs_embeds (B, T, d)."""
    if rows and isinstance(rows[0], Vectors):
        return {"inputs_embeds": torch.stack([r.data for r in rows])}
    return {"input_ids": torch.tensor(rows)}


def tokenize(tokenizer, context: str, query: str) -> Prompt:
    """prefix = the special tokens the tokenizer puts in front; context and query without specials."""
    check_tokenizer(tokenizer)
    check_text(context, "context")
    check_text(query, "query")
    q = tokenizer(query, add_special_tokens=False)["input_ids"]
    c = tokenizer(context, add_special_tokens=False)["input_ids"]
    return Prompt(special_prefix(tokenizer, query, q), list(c), list(q))


def check_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise InputError(
            "this model has no tokenizer: it reads input vectors, not text (a model from icl-probe regression "
            "train); measure it with icl-probe regression run `model=DIR`"
        )


def special_prefix(tokenizer, text: str, ids: list[int]) -> list[int]:
    """The ids the tokenizer puts in front of `text` by default (e.g. [bos] for Gemma, [] for SmolLM2).

    Raises InputError if `ids` (the text without specials) do not appear whole in the text with specials.
    """
    check_tokenizer(tokenizer)
    with_specials = list(tokenizer(text)["input_ids"])
    for k in range(len(with_specials) - len(ids) + 1):
        if with_specials[k : k + len(ids)] == list(ids):
            return with_specials[:k]
    raise InputError(
        f"cannot find the query's token ids {shorten(list(ids))} inside its tokenization with special tokens "
        f"{shorten(with_specials)}, so the tokens to put in front are unknown; the tokenizer changes the text when "
        "it adds its special tokens: use a tokenizer whose special tokens only wrap the text, or try another query"
    )


def shorten(ids: list[int], keep: int = 8) -> str:
    """`ids` as a list, cut to the first `keep` with a count of the rest, for one-line messages."""
    if len(ids) <= keep:
        return str(ids)
    return "[" + ", ".join(map(str, ids[:keep])) + f", … {len(ids) - keep} more]"


def check_text(text: str | None, what: str) -> None:
    if text is None or not text.strip():
        raise InputError(f"the {what} is empty; give some text with `{what}` or `{what}_file`")


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
        raise InputError(
            f"{what} file {path} is not UTF-8: bad byte 0x{data[e.start]:02x} at offset {e.start}; {reencode(path)}"
        ) from e


def reencode(path: Path) -> str:
    """The fix for a file that is not UTF-8, as a command to copy (Latin-1 is the usual culprit)."""
    fixed = f"{path.stem}.utf8{path.suffix}"
    return f"re-encode it as UTF-8, e.g. iconv -f latin1 -t utf-8 {shlex.quote(str(path))} > {shlex.quote(fixed)}"


def read_query(path: str | Path) -> str:
    """A query file's text without its final line break ("\\n" or "\\r\\n"): editors end files with one."""
    text = read_text(path, "query")
    return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")


def fusion_warning(context: str, query: str) -> str | None:
    """A one-line warning if the context and query touch with no whitespace between them, else None."""
    if not context or not query or context[-1].isspace() or query[0].isspace():
        return None
    tail, head = context.split()[-1][-20:], query.split()[0][:20]
    return (
        f"the context ends with {tail!r} and the query starts with {head!r} with no space or newline between, "
        f"so the model reads them run together as {tail + head!r}; end the context with a newline"
    )


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
