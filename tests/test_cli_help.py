"""`--help` as a reader sees it at 80 columns: commands in order, whole descriptions, escaped defaults."""

import json

import pytest
from typer.testing import CliRunner

from icl_probe.cli import app

ORDER = [
    "analyze", "dynamics", "transfer", "heads", "regression", "study", "export-patch", "replay", "batch", "merge",
    "modules", "tasks",
]  # fmt: skip


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="icl-probe", terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.stdout


def command_rows() -> list[str]:
    lines = help_text().splitlines()
    return [line for line in lines[lines.index("Commands:") + 1 :] if line.strip()]


def test_commands_are_listed_analyze_first_in_a_sensible_order():
    assert [row.split()[0] for row in command_rows()] == ORDER


def test_command_descriptions_are_whole_sentences_on_one_line():
    for row in command_rows():
        assert len(row) <= 80, row
        assert "..." not in row and "…" not in row, row
        assert row.rstrip().endswith((".", "?")), row  # a whole sentence, not one cut short


@pytest.mark.parametrize("command", ORDER)
def test_every_help_line_fits_80_columns(command):
    for line in help_text(command).splitlines():
        assert len(line) <= 80, line


@pytest.mark.parametrize("command", ["dynamics", "transfer"])
def test_defaults_with_a_newline_are_shown_escaped(command):
    text = " ".join(help_text(command).split())  # the help wraps lines; compare the words
    assert r"[default: {input} -> {output}\n]" in text
    if command == "dynamics":
        assert r"[default: \n]" in text
    assert "[default: ]" not in text and "{output} ]" not in text


def test_separator_typed_as_backslash_n_means_a_newline(tiny_llama_dir):
    context = "ab -> ba\n\ncd -> dc\n\n"

    def examples(separator: str) -> list[str]:
        args = ["dynamics", "-m", tiny_llama_dir, "--context", context, "--query", "ef ->", "--no-gradient"]
        result = CliRunner().invoke(app, [*args, "--separator", separator, "--json", "-"], prog_name="icl-probe")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["examples"]

    assert examples(r"\n\n") == examples("\n\n") == ["ab -> ba\n\n", "cd -> dc\n\n"]
