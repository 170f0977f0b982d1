"""Read the commands and tables the docs print, and run those commands through the real CLI.

A figure in README.md or docs/*.md is reproduced by the block of commands printed beside it, tagged in the
Markdown source by a `<!-- reproduce: NAME -->` line just above it (invisible once rendered). The tests read
the commands from there, so the text and the test cannot drift apart: what a reader copies is what runs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("icl-probe", ".venv/bin/icl-probe")


def markdown(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


def reproduce_block(doc: str, name: str) -> str:
    """The text of the fenced block under `<!-- reproduce: NAME -->` in `doc` (a path relative to the repo)."""
    match = re.search(rf"<!-- reproduce: {re.escape(name)} -->\n```[a-z]*\n(.*?)\n```", markdown(doc), re.S)
    assert match, f"{doc} has no '<!-- reproduce: {name} -->' block"
    return match.group(1)


def commands(doc: str, name: str, programs: tuple[str, ...] = PROGRAMS) -> list[list[str]]:
    """Each command of the block as its argument list, the program name dropped (comments after # dropped).

    `programs` are the words a command may start with: icl-probe's names, or e.g. ("python",) for a benchmark.
    """
    lines = reproduce_block(doc, name).replace("\\\n", " ").splitlines()
    parsed = [shell_words(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for words in parsed:
        assert words[0] in programs, f"{doc}, {name}: not a {' or '.join(programs)} command: {words}"
    return [words[1:] for words in parsed]


def shell_words(line: str) -> list[str]:
    r"""Split a bash command line as bash would for the quoting the docs use: '…', "…", $'…' (\n, \t), # comments."""

    def plain(match: re.Match) -> str:
        return shlex.quote(match.group(1).encode("latin-1", "backslashreplace").decode("unicode_escape"))

    return shlex.split(re.sub(r"\$'((?:[^'\\]|\\.)*)'", plain, line), comments=True)


def table_after(doc: str, heading_text: str) -> list[list[str]]:
    """The body rows (cells stripped, `\\|` read as |) of the first Markdown table from the line of `heading_text`."""
    text = markdown(doc)
    start = text.rindex("\n", 0, text.index(heading_text)) + 1  # the line itself may be the table's header
    rows = []
    for line in text[start:].splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip().removeprefix("|").removesuffix("|"))  # not at an escaped \|
            rows.append([cell.strip().replace("\\|", "|") for cell in cells])
        elif rows:
            break
    assert len(rows) > 2, f"{doc}: no table after {heading_text!r}"
    return rows[2:]  # past the header and the --- row


def number(text: str) -> float:
    """A printed figure as a float: the typographic minus, and units or words around it, ignored."""
    match = re.search(r"[−-]?\d+(?:\.\d+)?(?:e[−-]?\d+)?", text)
    assert match, f"no number in {text!r}"
    return float(match.group(0).replace("−", "-"))


def half_unit(text: str) -> float:
    """Half a unit of the last digit printed: the precision a figure is printed to (0.005 for 8.63)."""
    mantissa, _, exponent = text.replace("−", "-").partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def agrees(got: float, figure: str) -> bool:
    """`got` is the printed figure to its last digit, or to 0.5% where that is looser (8.2049 against "8.21").

    KLs of several nats and the norms move in their third digit between library versions (float32 rounding
    of long sums); the README says so beside each table that is checked this way.
    """
    return abs(got - number(figure)) <= max(half_unit(figure), 0.005 * abs(number(figure))) * (1 + 1e-9)


MODELS = {"SmolLM2-135M": "smollm2-135m", "Gemma 3 270M": "gemma3-270m"}  # the docs' names → aliases


class Runner:
    """Runs icl-probe commands through the CLI's real code with each real model loaded once per session.

    The seam is the CLI's one call to `load_model`: it gets the session's model (float32, CPU, as loaded by
    `real_models`). Each command's JSON document is kept, so two figures of one command cost one run.
    """

    def __init__(self, real_models, tmp_path: Path):
        self.real_models, self.tmp_path, self.docs = real_models, tmp_path, {}

    def load(self, name, dtype="float32", device="cpu", **kwargs):
        assert (dtype, device, kwargs.get("device_map")) == ("float32", "cpu", None), "only float32 on the CPU"
        return self.real_models(name)

    def json(self, args: list[str]) -> dict:
        """The JSON document of `icl-probe ARGS --json PATH`, run once per distinct command."""
        key = tuple(args)
        if key not in self.docs:
            path = self.tmp_path / f"doc{len(self.docs)}.json"
            self.invoke([*args, "--json", str(path)])
            self.docs[key] = json.loads(path.read_text(encoding="utf-8"))
        return self.docs[key]

    def run(self, args: list[str]) -> None:
        """Run `icl-probe ARGS` (a command that writes files, such as `regression train -o toy`) once."""
        if tuple(args) not in self.docs:
            self.invoke(args)
            self.docs[tuple(args)] = {}

    def invoke(self, args: list[str]) -> None:
        """The CLI on `args`, in the runner's folder (the docs' relative paths land there), with the real models."""
        from pytest import MonkeyPatch

        import icl_probe.models as models  # the CLI imports load_model from here when a command loads a model
        from icl_probe.cli import app

        with MonkeyPatch.context() as patch:
            patch.setattr(models, "load_model", self.load)
            patch.chdir(self.tmp_path)
            result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"icl-probe {' '.join(args)}: {result.output}"
